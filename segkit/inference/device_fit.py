"""Fit the work to the device: pick the tile and batch that run fastest (`--tile auto`), and back
off when the device runs out of memory instead of failing the run.

Both treat the engine as a black box `forward(batch) -> output`, so they serve torch and ONNX
Runtime alike, and tests drive them with fake engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from segkit.cache import user_cache_dir
from segkit.errors import SegkitError
from segkit.inference.measurements import device_identity, measurement_key, recall, remember
from segkit.inference.tiler import Forward, plan_tiles
from segkit.models.geometry import Geometry

#: Tile sizes `--tile auto` tries (each rounded to the model's nearest valid size).
AUTO_TILES = (380, 572, 764, 1052, 1324)
GPU_BATCHES = (4, 8, 16, 32)
CPU_BATCHES = (1, 2)
T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or ONNX Runtime's failed device allocation."""
    text = str(exc)
    return (type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower()
            or "Failed to allocate memory" in text)


class DeviceMemoryError(SegkitError):
    """Even one tile does not fit in device memory."""


def with_smaller_tiles(run: Callable[[int], T], tile: int, geometry: Geometry, *,
                       report: Callable[[str], object] = print) -> T:
    """`run(tile)`, and again with about half the tile each time one tile alone does not fit in
    device memory (outputs are written atomically, so a restart loses nothing)."""
    while True:
        try:
            return run(tile)
        except DeviceMemoryError:
            below, above = geometry.nearest_valid(tile // 2)
            smaller = below if below is not None else above
            if smaller >= tile:
                raise
            report(f"out of device memory with one tile of {tile} px: starting again with tile {smaller}")
            tile = smaller


class BackoffForward:
    """An engine wrapper: a batch that runs out of device memory is split in halves (down to one
    tile) and the batch that fit is used for the rest of the run; `report` says so once per change."""

    def __init__(self, forward: Forward, *, report: Callable[[str], object] = print,
                 release: Callable[[], object] | None = None) -> None:
        self.forward = forward
        self.report = report
        self.release = release
        self.max_batch: int | None = None

    @property
    def device(self) -> Any:
        return self.forward.device

    @property
    def label(self) -> str:
        return getattr(self.forward, "label", "engine")

    def __call__(self, batch: Any) -> Any:
        import torch

        outputs = []
        start = 0
        while start < len(batch):
            size = min(self.max_batch or len(batch), len(batch) - start)
            try:
                outputs.append(self.forward(batch[start : start + size]))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if self.release is not None:
                    self.release()
                if size == 1:
                    raise DeviceMemoryError(f"out of device memory with one tile of {batch.shape[-1]} px; use a "
                                            "smaller tile (or tile auto), or the CPU") from exc
                self.max_batch = size // 2
                self.report(f"out of device memory at batch {size}: continuing with batch {self.max_batch}")
                continue
            start += size
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@dataclass(frozen=True)
class Trial:
    """One measured (tile, batch): seconds per batch and the estimated seconds per plane."""

    tile: int
    batch: int
    seconds_per_batch: float | None  # None: out of memory
    seconds_per_plane: float | None


def candidate_tiles(geometry: Geometry, plane_shape: tuple[int, int], sizes: Sequence[int] = AUTO_TILES, *,
                    keep: int = 4) -> list[int]:
    """Up to `keep` valid tile sizes (up to the largest of `sizes`) that compute the fewest pixels
    per plane (at most 1.5 x the fewest; measuring decides among them), from two families: sizes near `sizes`, and sizes that cover the plane with exactly
    n tiles per axis (n = 1, 2, ...), which waste the least on mirror padding beyond the plane.
    (A 4096-px plane and a 64-px halo: 1152 px tiles cover it 4 x 4, 1056 px tiles need 5 x 5.)"""
    context = 2 * (geometry.margin + geometry.halo)
    largest = geometry.nearest_valid(max(sizes))[1]
    tiles = {geometry.nearest_valid(size)[1] for size in sizes}
    for per_axis in range(1, 33):
        fitted = geometry.nearest_valid(-(-max(plane_shape) // per_axis) + context)[1]
        if per_axis > 1 and fitted < geometry.nearest_valid(min(sizes))[1]:
            break  # small tiles run inefficiently; only a small plane's single tile may be smaller
        tiles.add(fitted)
    cost = {t: plan_tiles(plane_shape, geometry, tile=t).n_tiles * t * t for t in tiles if t <= largest}
    cheapest = min(cost.values())
    ranked = sorted((t for t in cost if cost[t] <= 1.5 * cheapest), key=lambda t: (cost[t], t))
    return sorted(ranked[:keep])


def measure_tiles(forward: Forward, geometry: Geometry, plane_shape: tuple[int, int], *, tiles: Sequence[int],
                  batches: Sequence[int], warmup: int = 1, repeats: int = 2, channels: int = 1,
                  clock: Callable[[], float] = time.perf_counter) -> list[Trial]:
    """Time `forward` on zero batches of every (tile, batch), largest batch last, after `warmup`
    untimed runs (cuDNN autotuning, allocations); a batch that runs out of memory ends that
    tile's trials. Seconds per plane = tiles per plane x seconds per tile."""
    import torch

    trials = []
    device = getattr(forward, "device", "cpu")
    for tile in tiles:
        tiles_per_plane = plan_tiles(plane_shape, geometry, tile=tile).n_tiles
        for batch in sorted(batches):
            x = torch.zeros((batch, channels, tile, tile), dtype=torch.float32, device=device)
            try:
                for _ in range(warmup):
                    forward(x)
                synchronize(device)
                started = clock()
                for _ in range(repeats):
                    forward(x)
                synchronize(device)
                per_batch = (clock() - started) / repeats
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                trials.append(Trial(tile, batch, None, None))
                break
            # batches mix tiles of consecutive planes, so a plane costs its tiles at the batch's rate
            trials.append(Trial(tile, batch, per_batch, per_batch / batch * tiles_per_plane))
    return trials


def best_trial(trials: Sequence[Trial]) -> Trial:
    fitting = [t for t in trials if t.seconds_per_plane is not None]
    if not fitting:
        raise SegkitError("no tile size fits in device memory even at the smallest batch; use device='cpu'")
    return min(fitting, key=lambda t: (t.seconds_per_plane, t.batch))


def choose_tile(forward: Any, geometry: Geometry, plane_shape: tuple[int, int], *, batch: int | None = None,
                only: int | None = None, channels: int = 1, model_key: str | None = None,
                report: Callable[[str], object] = print) -> tuple[int, int]:
    """`--tile auto`: time the candidate tiles (or `only` one, for a fixed-shape graph) at the
    candidate batches (or `batch`) on this engine, with inputs of the model's `channels`; return the
    (tile, batch) with the least time per plane that fits in memory, and report what was measured and chosen.

    With `model_key` (what identifies the model and its precision) the choice is kept in the user cache
    (`segkit.inference.measurements`) for this device, plane size and free memory, and a later run reuses it."""
    gpu = _uses_gpu(forward)
    tiles = [only] if only is not None else candidate_tiles(geometry, plane_shape)
    batches = [batch] if batch else list(GPU_BATCHES if gpu else CPU_BATCHES)
    key = None
    if model_key is not None:
        key = measurement_key(kind="tile", model=model_key, device=device_identity(forward.device),
                              free_gib=_free_gib(forward.device), plane=list(plane_shape), tiles=tiles,
                              batches=batches, channels=channels, geometry=repr(geometry))
        known = recall(key)
        if known is not None and isinstance(known.get("tile"), int) and isinstance(known.get("batch"), int):
            report(f"tile auto: tile {known['tile']}, batch {known['batch']} (measured before on this device; "
                   f"{user_cache_dir() / 'measurements'})")
            return known["tile"], known["batch"]
    report(f"tile auto: measuring tiles {', '.join(map(str, tiles))} x batches {', '.join(map(str, batches))} "
           f"on {getattr(forward, 'label', 'this engine')}")
    with _eager(forward):
        trials = measure_tiles(forward, geometry, plane_shape, tiles=tiles, batches=batches, warmup=int(gpu),
                               repeats=2 if gpu else 1, channels=channels)
    best = best_trial(trials)
    out_of_memory = sorted({f"{t.tile}/{t.batch}" for t in trials if t.seconds_per_batch is None})
    report(f"tile auto: tile {best.tile}, batch {best.batch} ({best.seconds_per_plane:.2f} s per "
           f"{plane_shape[0]} x {plane_shape[1]} plane)"
           + (f"; out of memory: {', '.join(out_of_memory)}" if out_of_memory else ""))
    if key is not None:
        remember(key, {"tile": best.tile, "batch": best.batch, "seconds_per_plane": best.seconds_per_plane})
    return best.tile, best.batch


def _free_gib(device: Any) -> int | None:
    """Free GPU memory in whole GiB (what a tile choice depends on besides the model); None on the CPU."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info(device)[0] // 2**30)


def _eager(forward: Any) -> Any:
    """The engine's eager model for measurements (TorchEngine.eager), so torch.compile compiles only
    the run's batch shape; engines without one run as they are."""
    import contextlib

    return getattr(forward, "eager", contextlib.nullcontext)()


def _uses_gpu(forward: Any) -> bool:
    device = getattr(forward, "device", None)
    return getattr(device, "type", str(device)) == "cuda"


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (timing on a GPU); nothing on the CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def choose_batch(forward: Any, geometry: Geometry, tile: int, *, channels: int = 1, fraction: float = 0.5,
                 largest: int = 64, model_key: str | None = None, report: Callable[[str], object] = print) -> int:
    """The batch for a GPU run when none is given: one trial tile measures the device memory a tile
    needs, and the batch fills `fraction` of the free memory (at most `largest`; the out-of-memory
    back-off still guards the run). On the CPU: 4, as the throughput there hardly depends on it.

    With `model_key` the memory per tile is kept in the user cache for this GPU, tile and channels, and
    a later run computes its batch from it and the memory free then, without the trial tile."""
    import torch

    if not _uses_gpu(forward):
        return 4
    device = forward.device
    before = torch.cuda.memory_allocated(device)
    key = None if model_key is None else measurement_key(kind="tile_memory", model=model_key, tile=tile,
                                                         channels=channels, device=device_identity(device))
    known = recall(key) if key is not None else None
    if known is not None and isinstance(known.get("per_tile"), int) and known["per_tile"] > 0:
        per_tile = known["per_tile"]
    else:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with _eager(forward):
            forward(torch.zeros((1, channels, tile, tile), dtype=torch.float32, device=device))
        torch.cuda.synchronize(device)
        per_tile = max(torch.cuda.max_memory_allocated(device) - before, 1)
        if key is not None:
            remember(key, {"per_tile": int(per_tile)})
    free, _ = torch.cuda.mem_get_info(device)
    batch = int(max(1, min(largest, fraction * (free + torch.cuda.memory_reserved(device) - before) // per_tile)))
    report(f"batch {batch} ({per_tile / 2**20:.0f} MiB per {tile}-px tile, {free / 2**30:.1f} GiB free)")
    return batch
