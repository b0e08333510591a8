"""Overlap-tile prediction of 2D planes for valid-convolution models (numpy only).

Each plane is mirror-extrapolated by the model margin (Ronneberger et al. 2015, Fig. 2) and
covered by tiles whose outputs tile the plane. Tile origins are multiples of the model's step
(its total pooling factor), so every tile sees the pooling grid exactly as a whole-plane forward
of the padded plane would: tiled output equals whole-plane output, with no seams.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from segkit.errors import TileSizeError
from segkit.models.geometry import Geometry

#: (N, C, tile, tile) float32 -> (N, K, tile - 2 margin, tile - 2 margin) float32
Forward = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one plane go.

    `extent` is the output size of the padded plane (a valid output size, >= the plane);
    `origins_y`/`origins_x` are output-space tile origins, multiples of the model step; the
    input window of a tile starts at the same origin in the padded plane.
    """

    plane_shape: tuple[int, int]
    out_tile: int
    margin: int
    extent: tuple[int, int]
    origins_y: tuple[int, ...]
    origins_x: tuple[int, ...]

    @property
    def in_tile(self) -> int:
        return self.out_tile + 2 * self.margin

    @property
    def n_tiles(self) -> int:
        return len(self.origins_y) * len(self.origins_x)

    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Mirror padding (before, after) per axis that turns the plane into the padded plane."""
        (h, w), (eh, ew), m = self.plane_shape, self.extent, self.margin
        return (m, m + eh - h), (m, m + ew - w)


def _axis_plan(size: int, out_tile: int, geometry: Geometry) -> tuple[int, tuple[int, ...]]:
    # Smallest valid output extent covering the axis, at least one tile wide.
    step, first = geometry.step, geometry.min_output
    covering = first + max(0, -(-(size - first) // step)) * step
    extent = max(out_tile, covering)
    stride = (out_tile // step) * step  # largest step-aligned stride inside one tile
    origins = list(range(0, extent - out_tile + 1, stride))
    if origins[-1] != extent - out_tile:
        origins.append(extent - out_tile)  # last tile shifted back, still step-aligned
    return extent, tuple(origins)


def plan_tiles(plane_shape: tuple[int, int], geometry: Geometry, /, *, tile: int) -> TilePlan:
    """Plan the tiles of a plane for input tiles of size `tile` (a valid input size)."""
    geometry.check_tile(tile)
    out_tile = geometry.output_size(tile)
    if out_tile < geometry.step:
        smallest = tile + (-(-(geometry.step - out_tile) // geometry.step)) * geometry.step
        raise TileSizeError(
            f"tile {tile} gives a {out_tile} px output, less than the model's step {geometry.step}, "
            f"so tiles cannot cover the plane seamlessly; use --tile {smallest} or larger"
        )
    (ext_y, oys), (ext_x, oxs) = (_axis_plan(n, out_tile, geometry) for n in plane_shape)
    return TilePlan(tuple(plane_shape), out_tile, geometry.margin, (ext_y, ext_x), oys, oxs)


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
    output: np.ndarray | None = None
    remaining: int = 0
    tiles: list[tuple[int, int]] = field(default_factory=list)


def predict_planes(
    planes: Iterable[np.ndarray],
    forward: Forward,
    geometry: Geometry,
    /,
    *,
    tile: int,
    batch: int = 4,
    on_tiles: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Predict each 2D float32 plane by overlap-tiling; yields (K, H, W) float32 per plane.

    Tiles of consecutive planes share batches, so small planes still fill the engine. Only
    the planes whose tiles are in flight are held in memory. `on_tiles(n)` reports progress.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    jobs: deque[_PlaneJob] = deque()
    pending: list[tuple[_PlaneJob, int, int]] = []

    def run_batch() -> None:
        chunk, pending[:] = pending[:batch], pending[batch:]
        size = chunk[0][0].plan.in_tile
        inputs = np.stack([job.padded[oy : oy + size, ox : ox + size] for job, oy, ox in chunk])
        outputs = forward(inputs[:, None].astype(np.float32, copy=False))
        for (job, oy, ox), out in zip(chunk, outputs):
            if job.output is None:
                job.output = np.empty((out.shape[0], *job.plan.extent), np.float32)
            job.output[:, oy : oy + out.shape[1], ox : ox + out.shape[2]] = out
            job.remaining -= 1
        if on_tiles is not None:
            on_tiles(len(chunk))

    def finished() -> Iterator[np.ndarray]:
        while jobs and jobs[0].remaining == 0:
            job = jobs.popleft()
            h, w = job.plan.plane_shape
            assert job.output is not None
            yield job.output[:, :h, :w]

    for plane in planes:
        if plane.ndim != 2:
            raise ValueError(f"expected a 2D plane, got shape {plane.shape}")
        plan = plan_tiles(plane.shape, geometry, tile=tile)
        job = _PlaneJob(plan, pad_plane(np.asarray(plane, np.float32), plan), remaining=plan.n_tiles)
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
    plane: np.ndarray, forward: Forward, geometry: Geometry, /, *, tile: int, batch: int = 4
) -> np.ndarray:
    """Overlap-tile prediction of a single plane; returns (K, H, W) float32."""
    return next(predict_planes([plane], forward, geometry, tile=tile, batch=batch))
