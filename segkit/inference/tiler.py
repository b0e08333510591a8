"""Overlap-tile prediction of planes on the engine's device, driven only by the model's geometry.

Each plane is mirror-extrapolated at its borders (Ronneberger et al. 2015, Fig. 2) and covered
by tiles whose origins are multiples of the model's step (its total pooling factor).

- Valid-conv models (margin > 0): a tile's output is exact, so tiles are placed side by side;
  every tile sees the pooling grid as a whole-plane forward of the padded plane would, so the
  tiled output equals the whole-plane output, with no seams.
- Same-padding models (margin 0, halo > 0): border pixels of a tile lack context, so tiles
  overlap by at least twice the halo and are blended with a window that fades at tile borders.

Planning is pure Python over the geometry. Everything else works on torch tensors where the
engine is (planes (C, H, W) in, (K, H, W) out): padding, cutting tiles (views of the padded
plane), placing and blending outputs. The same code runs on the CPU and on a GPU.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from segkit.errors import TileSizeError
from segkit.inference.options import Blend
from segkit.models.geometry import Geometry

#: The engine protocol (segkit.inference.engines.Engine): (N, C, tile, tile) float32 tensor on its
#: device -> (N, K, tile - 2 margin, tile - 2 margin) float32 tensor on the same device.
Forward = Callable[[Any], Any]


BLEND_WINDOWS = Blend.values()  # the choices of PredictOptions.blend


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

    def covered(self, oy: int, ox: int) -> tuple[int, int]:
        """How much of the tile at (oy, ox) earlier tiles cover, when tiles are placed row by row:
        its first `top` rows (the row of tiles above spans the whole width) and, below those, its
        first `left` columns (the tile to its left)."""
        iy, ix = self.origins_y.index(oy), self.origins_x.index(ox)
        top = max(0, self.origins_y[iy - 1] + self.out_tile - oy) if iy else 0
        left = max(0, self.origins_x[ix - 1] + self.out_tile - ox) if ix else 0
        return top, left

    def on_plane(self, origin: int, axis: int, size: int) -> tuple[int, int]:
        """The part [start, stop) of a tile output at `origin` (buffer coordinates) along `axis`
        that falls on the plane; the rest is the halo border or rounding beyond it."""
        first, last = self.halo, self.halo + self.plane_shape[axis]
        return max(0, first - origin), max(0, min(size, last - origin))

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
    """Plan the tiles of a plane for input tiles of size `tile` (pure arithmetic over the geometry).

    Parameters
    ----------
    plane_shape : (H, W) tuple of int
        The plane's height and width.
    geometry : Geometry
        The model's geometry: valid input sizes, margin, halo, step.
    tile : int
        The input tile, a valid input size of the model.

    Returns
    -------
    TilePlan
        The output tile, the tiles' origins (multiples of the step) and the padding around the plane.

    Raises
    ------
    TileSizeError
        `tile` is not a valid input size (the message names the nearest valid ones), or its output
        minus twice the halo is smaller than the model's step.
    """
    geometry.check_tile(tile)
    out_tile = geometry.output_size(tile)
    if out_tile - 2 * geometry.halo < geometry.step:
        smallest = tile + (-(-(geometry.step + 2 * geometry.halo - out_tile) // geometry.step)) * geometry.step
        what = f"minus twice the halo ({geometry.halo}) " if geometry.halo else ""
        raise TileSizeError(
            f"tile {tile} gives a {out_tile} px output, which {what}is less than the model's step "
            f"{geometry.step}, so tiles cannot cover the plane; use tile {smallest} or larger"
        )
    (ext_y, oys), (ext_x, oxs) = (_axis_plan(n, out_tile, geometry) for n in plane_shape)
    return TilePlan(tuple(plane_shape), out_tile, geometry.margin, geometry.halo, (ext_y, ext_x), oys, oxs)


def blend_profile(size: int, overlap: int, kind: str = "cosine") -> list[float]:
    """1D blending weights for a tile of `size` whose neighbours overlap it by `overlap` pixels.

    Parameters
    ----------
    size : int
        The output tile's side (px).
    overlap : int
        Pixels its neighbours overlap it by (the length of the cosine ramps).
    kind : {'cosine', 'gaussian'}
        cosine: flat top with raised-cosine ramps of length `overlap`; tiles on a regular grid with
        that overlap sum to exactly 1 (a partition of unity), so blending never rescales.
        gaussian: nnU-Net's centre-weighted window (sigma = size / 8). Both stay > 0 at the border.

    Returns
    -------
    list of float
        `size` weights in (0, 1].

    Raises
    ------
    ValueError
        An unknown `kind`.
    """
    if kind == "cosine":
        profile = [1.0] * size
        ramp = [math.sin(0.5 * math.pi * (i + 0.5) / overlap) ** 2 for i in range(overlap)]
        for i, value in enumerate(ramp):
            profile[i] = min(profile[i], value)
            profile[size - 1 - i] = min(profile[size - 1 - i], value)
        return profile
    if kind == "gaussian":
        centre = (size - 1) / 2
        values = [math.exp(-0.5 * ((i - centre) / (size / 8)) ** 2) for i in range(size)]
        top = max(values)
        return [max(v / top, 1e-3) for v in values]
    raise ValueError(f"unknown blend window {kind!r}; choose one of {', '.join(BLEND_WINDOWS)}")


def blend_window(size: int, overlap: int, kind: str = "cosine", *, device: Any = "cpu") -> Any:
    """2D blending weights: the outer product of `blend_profile` with itself.

    Parameters
    ----------
    size, overlap, kind
        As for `blend_profile`.
    device : str or torch.device
        Where the window is made.

    Returns
    -------
    (size, size) tensor of float32
        The window, on `device`.
    """
    import torch

    profile = torch.tensor(blend_profile(size, overlap, kind), dtype=torch.float64)
    return torch.outer(profile, profile).float().to(device)


def reflect_indices(size: int, before: int, after: int, *, device: Any = "cpu") -> Any:
    """Source indices of a mirror extension of an axis (numpy's 'reflect': the edge pixel is not
    repeated; any pad width, by repeated reflection).

    Parameters
    ----------
    size : int
        The axis length.
    before, after : int
        Pixels added before and after it.
    device : str or torch.device
        Where the indices are made.

    Returns
    -------
    (before + size + after,) tensor of int64
        For each position of the extended axis, the index it copies.
    """
    import torch

    positions = torch.arange(-before, size + after, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def mirror_pad(plane: Any, padding: tuple[tuple[int, int], tuple[int, int]]) -> Any:
    """Mirror-extrapolate the last two axes of a tensor (reflect without repeating the edge; any
    width). Pads narrower than the plane (the usual case) use torch's reflection padding; wider
    ones reflect repeatedly through an index gather.

    Parameters
    ----------
    plane : (..., H, W) tensor of float32 (or uint8, int8, int16, float16)
        The plane, on any device.
    padding : ((top, bottom), (left, right)) tuple of int
        Pixels to add on each side.

    Returns
    -------
    (..., H + top + bottom, W + left + right) tensor
        The padded plane, same dtype and device.
    """
    import torch.nn.functional as F

    (top, bottom), (left, right) = padding
    height, width = plane.shape[-2:]
    if max(top, bottom) < height and max(left, right) < width:  # torch's reflect pads 3D/4D tensors
        flat = plane.reshape(-1, height, width)
        padded = F.pad(flat, (left, right, top, bottom), mode="reflect")
        return padded.reshape(*plane.shape[:-2], height + top + bottom, width + left + right)
    rows = reflect_indices(height, top, bottom, device=plane.device)
    cols = reflect_indices(width, left, right, device=plane.device)
    return plane.index_select(-2, rows).index_select(-1, cols)


def pad_plane(plane: Any, plan: TilePlan) -> Any:
    """The padded plane whose whole-plane forward equals the tiled prediction.

    Parameters
    ----------
    plane : (C, H, W) tensor
        The plane, on the engine's device.
    plan : TilePlan
        Its tile plan (`plan_tiles`), which says the padding.

    Returns
    -------
    (C, H', W') tensor
        The plane mirror-padded by `plan.padding()`.
    """
    return mirror_pad(plane, plan.padding())


@dataclass
class _Blending:
    """Blending windows and, per plan, the reciprocal of the summed window weights.

    A window is the outer product of a 1D profile, and the tiles form a grid, so the summed weights
    are the outer product of two 1D sums (one per axis): dividing by them is one scale along y and
    one along x, and only where a sum is not exactly 1 (the plane's borders, where windows fade, and
    the overlaps between tiles). Computed once per plan, on the device."""

    kind: str
    device: Any
    windows: dict[tuple[int, int], Any] = field(default_factory=dict)
    scales: dict[tuple, tuple[list, list]] = field(default_factory=dict)

    def window(self, plan: TilePlan) -> Any:
        key = (plan.out_tile, plan.out_tile - min(plan.stride))
        if key not in self.windows:
            self.windows[key] = blend_window(key[0], key[1], self.kind, device=self.device)
        return self.windows[key]

    def normalize(self, values: Any, plan: TilePlan) -> Any:
        """Divide the weighted sums `values` (K, H, W) of a plane by the summed weights, in place."""
        key = (plan.plane_shape, plan.extent, plan.out_tile, plan.origins_y, plan.origins_x)
        if key not in self.scales:
            if len(self.scales) >= 8:  # planes of many sizes: keep device memory bounded
                self.scales.pop(next(iter(self.scales)))
            self.scales[key] = tuple(self._axis_scales(plan, axis) for axis in (0, 1))
        rows, columns = self.scales[key]
        for run, inverse in rows:
            values[:, run, :].mul_(inverse[:, None])
        for run, inverse in columns:
            values[:, :, run].mul_(inverse)
        return values

    def _axis_scales(self, plan: TilePlan, axis: int) -> list[tuple[slice, Any]]:
        """(run of the plane's pixels, 1 / summed weights there) along one axis, where that is not 1."""
        import torch

        size, overlap = plan.out_tile, plan.out_tile - min(plan.stride)
        profile = torch.tensor(blend_profile(size, overlap, self.kind), dtype=torch.float64)
        total = torch.zeros(plan.extent[axis], dtype=torch.float64)
        for origin in (plan.origins_y, plan.origins_x)[axis]:
            total[origin : origin + size] += profile
        inverse = total[plan.halo : plan.halo + plan.plane_shape[axis]].reciprocal().float()
        return [(run, inverse[run].to(self.device)) for run in _runs((inverse != 1).tolist())]


def _runs(flags: list[bool]) -> list[slice]:
    """The runs of consecutive True values, as slices."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(slice(start, i))
            start = None
    return runs


@dataclass
class _PlaneJob:
    plan: TilePlan
    padded: Any  # (C, H + pad, W + pad) tensor on the device
    output: Any = None  # (K, H, W): the plane only (tiles are clipped to it); weighted sums when blending
    remaining: int = 0

    def place(self, tile_output: Any, oy: int, ox: int, window: Any) -> None:
        """Write (or, blending, add) the part of a tile's output that falls on the plane."""
        import torch

        plan = self.plan
        if self.output is None:  # every pixel of the plane is written before it is read
            self.output = torch.empty((tile_output.shape[0], *plan.plane_shape), dtype=torch.float32,
                                      device=tile_output.device)
        size = tile_output.shape[-1]
        (y0, y1), (x0, x1) = (plan.on_plane(origin, axis, size) for axis, origin in enumerate((oy, ox)))
        region = self.output[:, oy + y0 - plan.halo : oy + y1 - plan.halo, ox + x0 - plan.halo : ox + x1 - plan.halo]
        tile_output = tile_output[:, y0:y1, x0:x1]
        if window is None:
            region.copy_(tile_output)
        else:  # add where earlier tiles wrote, write the rest: no zero fill, no reading zeros
            window = window[y0:y1, x0:x1]
            covered_rows, covered_columns = plan.covered(oy, ox)
            top, left = max(0, covered_rows - y0), max(0, covered_columns - x0)
            region[:, :top].addcmul_(tile_output[:, :top], window[:top])
            region[:, top:, :left].addcmul_(tile_output[:, top:, :left], window[top:, :left])
            torch.mul(tile_output[:, top:, left:], window[top:, left:], out=region[:, top:, left:])
        self.remaining -= 1

    def result(self, blending: _Blending) -> Any:
        if self.plan.blended:  # weighted sums / summed weights
            blending.normalize(self.output, self.plan)
        return self.output


def predict_planes(
    planes: Iterable[Any],
    forward: Forward,
    geometry: Geometry,
    /,
    *,
    tile: int,
    batch: int = 4,
    blend: str = "cosine",
    on_tiles: Callable[[int], None] | None = None,
    pad: Callable[[Any, TilePlan], Any] | None = None,
) -> Iterator[Any]:
    """Predict planes by overlap-tiling, on the engine's device.

    Valid-conv models: tiles are placed exactly. Same-padding models (halo > 0): tiles overlap
    by at least twice the halo and are blended with a `blend` window, normalised by the summed
    weights. Tiles of consecutive planes share batches, so small planes still fill the engine;
    only the planes whose tiles are in flight are held.

    Parameters
    ----------
    planes : iterable of (C, H, W) tensor of float32
        Normalised planes on the engine's device (a padding hook may take them raw, see `pad`).
    forward : callable
        The engine: (N, C, tile, tile) float32 tensor -> (N, K, tile - 2 margin, tile - 2 margin).
    geometry : Geometry
        The model's geometry.
    tile : int
        The input tile, a valid input size.
    batch : int
        Tiles per forward.
    blend : {'cosine', 'gaussian'}
        The window blending overlapping tiles of same-padding models.
    on_tiles : callable, optional
        Called with the number of tiles of each finished batch (progress).
    pad : callable, optional
        `pad(plane, plan)` builds the padded plane the tiles are cut from (default: mirror
        extrapolation, `pad_plane`); the Dask path passes real context from neighbouring chunks.

    Yields
    ------
    (K, H, W) tensor of float32
        Each plane's prediction, in order, on the same device.

    Raises
    ------
    ValueError
        batch < 1, an unknown blend window, or a plane that is not (C, H, W).
    TileSizeError
        A tile the model does not take (`plan_tiles`).
    """
    import torch

    if batch < 1:
        raise ValueError("batch must be >= 1")
    if blend not in BLEND_WINDOWS:
        raise ValueError(f"unknown blend window {blend!r}; choose one of {', '.join(BLEND_WINDOWS)}")
    blending: _Blending | None = None
    jobs: deque[_PlaneJob] = deque()
    pending: list[tuple[_PlaneJob, int, int]] = []
    buffers: dict[tuple[int, ...], Any] = {}

    def run_batch() -> None:
        chunk, pending[:] = pending[:batch], pending[batch:]
        size = chunk[0][0].plan.in_tile
        views = [job.padded[:, oy : oy + size, ox : ox + size] for job, oy, ox in chunk]
        if len(views) == 1:
            inputs = views[0].unsqueeze(0)
        else:  # one input buffer per tile shape for the whole run: engines do not keep their input
            shape = (batch, *views[0].shape)
            if shape not in buffers:
                buffers[shape] = views[0].new_empty(shape)
            inputs = torch.stack(views, out=buffers[shape][: len(views)])
        outputs = forward(inputs)
        for (job, oy, ox), out in zip(chunk, outputs):
            job.place(out, oy, ox, blending.window(job.plan) if job.plan.blended else None)
        if on_tiles is not None:
            on_tiles(len(chunk))

    def finished() -> Iterator[Any]:
        while jobs and jobs[0].remaining == 0:
            yield jobs.popleft().result(blending)

    for plane in planes:
        if plane.ndim != 3:
            raise ValueError(f"expected a (C, H, W) plane, got shape {tuple(plane.shape)}")
        if blending is None:
            blending = _Blending(blend, plane.device)
        plan = plan_tiles(tuple(plane.shape[1:]), geometry, tile=tile)
        job = _PlaneJob(plan, (pad or pad_plane)(plane, plan), remaining=plan.n_tiles)
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


def predict_plane(plane: Any, forward: Forward, geometry: Geometry, /, *, tile: int, batch: int = 4,
                  blend: str = "cosine") -> Any:
    """Overlap-tile prediction of a single plane (`predict_planes` of one).

    Parameters
    ----------
    plane : (C, H, W) tensor of float32
        A normalised plane on the engine's device.
    forward, geometry, tile, batch, blend
        As for `predict_planes`.

    Returns
    -------
    (K, H, W) tensor of float32
        The prediction, on the same device.
    """
    return next(predict_planes([plane], forward, geometry, tile=tile, batch=batch, blend=blend))


def predict_arrays(planes: Iterable[Any], forward: Forward, geometry: Geometry, /, *, tile: int, batch: int = 4,
                   blend: str = "cosine") -> Iterator[Any]:
    """`predict_planes` for numpy callers (training validation, tools); each plane goes to the
    engine's device once.

    Parameters
    ----------
    planes : iterable of (H, W) or (C, H, W) ndarray of float32
        Normalised planes.
    forward, geometry, tile, batch, blend
        As for `predict_planes`.

    Yields
    ------
    (K, H, W) ndarray of float32
        Each plane's prediction, in order.
    """
    import torch

    def tensors() -> Iterator[Any]:
        for plane in planes:
            tensor = torch.as_tensor(plane, dtype=torch.float32)
            yield (tensor[None] if tensor.ndim == 2 else tensor).to(forward.device)

    for values in predict_planes(tensors(), forward, geometry, tile=tile, batch=batch, blend=blend):
        yield values.cpu().numpy()
