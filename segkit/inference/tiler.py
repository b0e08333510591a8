"""Overlap-tile prediction of 2D planes, driven only by the model's geometry (numpy only).

Each plane is mirror-extrapolated at its borders (Ronneberger et al. 2015, Fig. 2) and covered
by tiles whose origins are multiples of the model's step (its total pooling factor).

- Valid-conv models (margin > 0): a tile's output is exact, so tiles are placed side by side;
  every tile sees the pooling grid as a whole-plane forward of the padded plane would, so the
  tiled output equals the whole-plane output, with no seams.
- Same-padding models (margin 0, halo > 0): border pixels of a tile lack context, so tiles
  overlap by at least twice the halo and are blended with a window that fades at tile borders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from segkit.errors import TileSizeError
from segkit.models.geometry import Geometry

#: (N, C, tile, tile) float32 -> (N, K, tile - 2 margin, tile - 2 margin) float32
Forward = Callable[[np.ndarray], np.ndarray]


BLEND_WINDOWS = ("cosine", "gaussian")


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one plane go, in the coordinates of an output buffer of size `extent`.

    The plane starts at (`halo`, `halo`) in the buffer; `origins_y`/`origins_x` are the tiles'
    output origins there, multiples of the model step. The input window of a tile starts at the
    same origin in the padded plane (`padding()`), which is `margin` larger on every side.
    """

    plane_shape: tuple[int, int]
    out_tile: int
    margin: int
    halo: int
    extent: tuple[int, int]
    origins_y: tuple[int, ...]
    origins_x: tuple[int, ...]

    @property
    def in_tile(self) -> int:
        return self.out_tile + 2 * self.margin

    @property
    def n_tiles(self) -> int:
        return len(self.origins_y) * len(self.origins_x)

    @property
    def blended(self) -> bool:
        """Same-padding models (halo > 0) blend overlapping tiles; valid models place them."""
        return self.halo > 0

    @property
    def stride(self) -> tuple[int, int]:
        return tuple(o[1] - o[0] if len(o) > 1 else self.out_tile for o in (self.origins_y, self.origins_x))

    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Mirror padding (before, after) per axis that turns the plane into the padded plane."""
        before = self.margin + self.halo
        return tuple((before, self.margin + e - self.halo - n) for n, e in zip(self.plane_shape, self.extent))


def _axis_plan(size: int, out_tile: int, geometry: Geometry) -> tuple[int, tuple[int, ...]]:
    # Buffer extent: the plane plus a halo on each side, rounded up to a valid output size.
    step, first, halo = geometry.step, geometry.min_output, geometry.halo
    need = size + 2 * halo
    covering = first + max(0, -(-(need - first) // step)) * step
    extent = max(out_tile, covering)
    stride = ((out_tile - 2 * halo) // step) * step  # step-aligned, overlapping by at least 2 halos
    origins = list(range(0, extent - out_tile + 1, stride))
    if origins[-1] != extent - out_tile:
        origins.append(extent - out_tile)  # last tile shifted back, still step-aligned
    return extent, tuple(origins)


def plan_tiles(plane_shape: tuple[int, int], geometry: Geometry, /, *, tile: int) -> TilePlan:
    """Plan the tiles of a plane for input tiles of size `tile` (a valid input size)."""
    geometry.check_tile(tile)
    out_tile = geometry.output_size(tile)
    if out_tile - 2 * geometry.halo < geometry.step:
        smallest = tile + (-(-(geometry.step + 2 * geometry.halo - out_tile) // geometry.step)) * geometry.step
        what = f"minus twice the halo ({geometry.halo}) " if geometry.halo else ""
        raise TileSizeError(
            f"tile {tile} gives a {out_tile} px output, which {what}is less than the model's step "
            f"{geometry.step}, so tiles cannot cover the plane; use --tile {smallest} or larger"
        )
    (ext_y, oys), (ext_x, oxs) = (_axis_plan(n, out_tile, geometry) for n in plane_shape)
    return TilePlan(tuple(plane_shape), out_tile, geometry.margin, geometry.halo, (ext_y, ext_x), oys, oxs)


def blend_window(size: int, overlap: int, kind: str = "cosine") -> np.ndarray:
    """2D blending weights for a tile of `size` whose neighbours overlap it by `overlap` pixels.

    cosine: flat top with raised-cosine ramps of length `overlap`; tiles on a regular grid with
    that overlap sum to exactly 1 (a partition of unity), so blending never rescales.
    gaussian: nnU-Net's centre-weighted window (sigma = size / 8). Both stay > 0 at the border.
    """
    if kind == "cosine":
        profile = np.ones(size, np.float64)
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2 if overlap > 0 else np.ones(0)
        profile[:overlap] = ramp
        profile[size - overlap :] = np.minimum(profile[size - overlap :], ramp[::-1])
    elif kind == "gaussian":
        centre = (size - 1) / 2
        profile = np.exp(-0.5 * ((np.arange(size) - centre) / (size / 8)) ** 2)
        profile = np.maximum(profile / profile.max(), 1e-3)
    else:
        raise ValueError(f"unknown blend window {kind!r}; choose one of {', '.join(BLEND_WINDOWS)}")
    return np.outer(profile, profile).astype(np.float32)


def mirror_pad(plane: np.ndarray, padding: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Mirror-extrapolate a 2D plane (reflect without repeating the edge; any pad width)."""
    mode = "reflect" if min(plane.shape) > 1 else "symmetric"
    return np.pad(plane, padding, mode=mode)


def pad_plane(plane: np.ndarray, plan: TilePlan) -> np.ndarray:
    """The padded plane whose whole-plane forward equals the tiled prediction."""
    return mirror_pad(plane, plan.padding())


@dataclass
class _PlaneJob:
    plan: TilePlan
    padded: np.ndarray
    output: np.ndarray | None = None  # (K, *extent); weighted sums when blending
    weights: np.ndarray | None = None  # (*extent) summed window weights when blending
    remaining: int = 0

    def place(self, tile_output: np.ndarray, oy: int, ox: int, window: np.ndarray | None) -> None:
        if self.output is None:
            self.output = np.zeros((tile_output.shape[0], *self.plan.extent), np.float32)
            if window is not None:
                self.weights = np.zeros(self.plan.extent, np.float32)
        size = tile_output.shape[-1]
        region = (slice(oy, oy + size), slice(ox, ox + size))
        if window is None:
            self.output[(slice(None), *region)] = tile_output
        else:
            self.output[(slice(None), *region)] += tile_output * window
            self.weights[region] += window  # type: ignore[index]
        self.remaining -= 1

    def result(self) -> np.ndarray:
        assert self.output is not None
        (h, w), halo = self.plan.plane_shape, self.plan.halo
        out = self.output[:, halo : halo + h, halo : halo + w]
        if self.weights is not None:
            out = out / self.weights[halo : halo + h, halo : halo + w]
        return out


def predict_planes(
    planes: Iterable[np.ndarray],
    forward: Forward,
    geometry: Geometry,
    /,
    *,
    tile: int,
    batch: int = 4,
    blend: str = "cosine",
    on_tiles: Callable[[int], None] | None = None,
    pad: Callable[[np.ndarray, TilePlan], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Predict each 2D float32 plane by overlap-tiling; yields (K, H, W) float32 per plane.

    `pad(plane, plan)` builds the padded plane the tiles are cut from (default: mirror
    extrapolation, `pad_plane`); the Dask path passes real context from neighbouring chunks.

    Valid-conv models: tiles are placed exactly. Same-padding models (halo > 0): tiles overlap
    by at least twice the halo and are blended with a `blend` window, normalised by the summed
    weights. Tiles of consecutive planes share batches, so small planes still fill the engine;
    only the planes whose tiles are in flight are held. `on_tiles(n)` reports progress.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if blend not in BLEND_WINDOWS:
        raise ValueError(f"unknown blend window {blend!r}; choose one of {', '.join(BLEND_WINDOWS)}")
    windows: dict[tuple[int, int], np.ndarray] = {}

    def window_for(plan: TilePlan) -> np.ndarray | None:
        if not plan.blended:
            return None
        key = (plan.out_tile, plan.out_tile - min(plan.stride))
        if key not in windows:
            windows[key] = blend_window(key[0], key[1], blend)
        return windows[key]

    jobs: deque[_PlaneJob] = deque()
    pending: list[tuple[_PlaneJob, int, int]] = []

    def run_batch() -> None:
        chunk, pending[:] = pending[:batch], pending[batch:]
        size = chunk[0][0].plan.in_tile
        inputs = np.stack([job.padded[oy : oy + size, ox : ox + size] for job, oy, ox in chunk])
        outputs = forward(inputs[:, None].astype(np.float32, copy=False))
        for (job, oy, ox), out in zip(chunk, outputs):
            job.place(out, oy, ox, window_for(job.plan))
        if on_tiles is not None:
            on_tiles(len(chunk))

    def finished() -> Iterator[np.ndarray]:
        while jobs and jobs[0].remaining == 0:
            yield jobs.popleft().result()

    for plane in planes:
        if plane.ndim != 2:
            raise ValueError(f"expected a 2D plane, got shape {plane.shape}")
        plan = plan_tiles(plane.shape, geometry, tile=tile)
        job = _PlaneJob(plan, (pad or pad_plane)(np.asarray(plane, np.float32), plan), remaining=plan.n_tiles)
        jobs.append(job)
        for oy in plan.origins_y:
            for ox in plan.origins_x:
                pending.append((job, oy, ox))
                if len(pending) >= batch:
                    run_batch()
                    yield from finished()
    while pending:
        run_batch()
    yield from finished()


def predict_plane(
    plane: np.ndarray, forward: Forward, geometry: Geometry, /, *, tile: int, batch: int = 4, blend: str = "cosine"
) -> np.ndarray:
    """Overlap-tile prediction of a single plane; returns (K, H, W) float32."""
    return next(predict_planes([plane], forward, geometry, tile=tile, batch=batch, blend=blend))
