"""Overlap-tile prediction on Dask, into an OME-Zarr store, resumable chunk by chunk.

The stack becomes a dask array chunked (1, cy, cx); `map_overlap` hands every task its chunk
plus `context` pixels of its neighbours (context = margin + halo rounded up to the model step).
At the volume's borders the task mirror-extends the plane itself, exactly as the single-machine
tiler does (dask's own 'reflect' repeats the edge pixel; segkit's mirror does not). The task runs
the ordinary tiler on the chunk with that real context, and writes the chunk straight into the zarr array
(chunk-aligned, so no locks), then drops a marker: a rerun with `resume` skips marked chunks.

Only the chunk's own tiles are computed (the context feeds them, it is not predicted itself).

Exactness: with chunk origins on the model's step grid (chunk sizes are rounded to multiples of
the step), every output pixel of a valid-conv model is computed by a tile on the same pooling
grid as in the single-machine path, so the outputs are equal (float rounding aside). Same-padding
models blend tiles placed per chunk, so they differ slightly near chunk borders.

Each worker builds the engine once (kept on the dask worker object) and reuses it for all its chunks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.errors import InputError, OutputExistsError, SegkitError

MANIFEST = "segkit_manifest.json"
DONE = "segkit_done"


@dataclass(frozen=True)
class RunManifest:
    """What must match for `--resume` to continue a store: the model and every setting that changes values."""

    model_sha256: str
    source: str
    tile: int
    normalization: dict[str, float]
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    output: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RunManifest":
        data = json.loads(text)
        return cls(**{**data, "shape": tuple(data["shape"]), "chunks": tuple(data["chunks"])})


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chunk_size(chunk: int, geometry: Any, tile: int, context: int) -> int:
    """The chunk side actually used: a multiple of the model step (so chunk origins sit on the
    pooling grid), preferably of lcm(step, tile output) too (so tiles fill chunks without
    rounding up), and more than the context (so a border chunk holds the pixels its mirror needs)."""
    step = geometry.step
    out_tile = tile - 2 * geometry.margin if geometry.margin else tile - 2 * geometry.halo
    whole = math.lcm(step, max(out_tile, 1))
    size = max(chunk, context + 1)
    if whole <= 2 * size:
        return max(1, round(size / whole)) * whole
    return -(-size // step) * step


def _context(geometry: Any) -> int:
    need = geometry.margin + geometry.halo
    return -(-need // geometry.step) * geometry.step


def _engine_for_worker(checkpoint: str, device: str, threads: int | None) -> Any:
    """The worker's engine, built on first use and kept on the worker (one model load per worker).

    Dask starts workers with OMP_NUM_THREADS=1; `threads` gives each local worker its share of the cores.
    """
    import torch

    from segkit.checkpoint import load_model
    from segkit.inference.engines import TorchEngine

    if threads:
        torch.set_num_threads(threads)

    try:
        from distributed import get_worker

        holder: Any = get_worker()
    except (ImportError, ValueError):  # not on a dask worker (synchronous scheduler): no cache
        holder = None
    key = f"_segkit_engine::{checkpoint}::{device}"
    engine = getattr(holder, key, None) if holder is not None else None
    if engine is None:
        model, _ = load_model(checkpoint)
        engine = TorchEngine(model, device=device)
        if holder is not None:
            setattr(holder, key, engine)
    return engine


def axis_chunks(length: int, size: int, minimum: int) -> tuple[int, ...]:
    """Chunks of `size` along an axis, the last one merged into its neighbour when shorter than
    `minimum` (a border chunk must hold the pixels its mirror needs)."""
    sizes = [size] * (length // size) + ([length % size] if length % size else [])
    if len(sizes) > 1 and sizes[-1] < minimum:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return tuple(sizes)


def _predict_block(block: np.ndarray, *, block_info: dict | None = None, starts: tuple[tuple[int, ...], ...],
                   store: str, checkpoint: str, device: str, threads: int | None,
                   geometry: Any, tile: int, batch: int, context: int, mean: float, std: float,
                   encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """One task: mirror at volume borders, tile, crop, write the chunk and its marker."""
    import zarr

    from segkit.inference.tiler import predict_planes

    assert block_info is not None  # dask always passes it to a function that declares it
    # block_info describes the overlapped array; the chunk's place in the volume comes from its index
    cz, cy, cx = block_info[None]["chunk-location"]
    z0, y0, y1, x0, x1 = starts[0][cz], starts[1][cy], starts[1][cy + 1], starts[2][cx], starts[2][cx + 1]
    marker = Path(store) / DONE / f"{z0}.{y0}.{x0}"
    if marker.exists():
        return np.ones((1, 1, 1), np.uint8)
    height, width = starts[1][-1], starts[2][-1]
    # dask gave `context` px of neighbours where they exist; mirror-extend at the volume's borders
    pad = ((context if y0 == 0 else 0, context if y1 == height else 0),
           (context if x0 == 0 else 0, context if x1 == width else 0))
    engine = _engine_for_worker(checkpoint, device, threads)
    array = zarr.open_array(str(Path(store) / "0"), mode="r+")
    for index in range(block.shape[0]):
        window = np.pad((block[index].astype(np.float32) - mean) / std, pad, mode="reflect")
        chunk_input = window[context:-context, context:-context]
        probability = next(predict_planes([chunk_input], engine, geometry, tile=tile, batch=batch,
                                          pad=partial(_pad_from_window, window=window, context=context)))[0]
        array[z0 + index, y0:y1, x0:x1] = encode(probability)
    marker.parent.mkdir(exist_ok=True)
    marker.touch()
    return np.ones((1, 1, 1), np.uint8)


def _pad_from_window(plane: np.ndarray, plan: Any, *, window: np.ndarray, context: int) -> np.ndarray:
    """The padded plane the tiler needs, cut from the window (the chunk plus `context` px of real
    neighbours); the tiler may ask for more after the chunk than the context holds (its last tile
    rounds up to a valid size): that extra, which only feeds outputs beyond the chunk, is mirrored."""
    (before_y, after_y), (before_x, after_x) = plan.padding()
    extra = ((0, max(0, after_y - context)), (0, max(0, after_x - context)))
    window = np.pad(window, extra, mode="reflect") if any(e for _, e in extra) else window
    height, width = plane.shape
    return window[context - before_y : context + height + after_y, context - before_x : context + width + after_x]


def ome_zarr_attributes(shape: tuple[int, int, int], resolution_um: tuple[float, float] | None) -> dict[str, Any]:
    """NGFF 0.4 multiscales metadata: one level, axes z, y, x (micrometres when known)."""
    scale = [1.0, *(resolution_um or (1.0, 1.0))]
    axes = [{"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if resolution_um is not None:
        for axis in axes[1:]:
            axis["unit"] = "micrometer"
    return {"multiscales": [{"version": "0.4", "name": "segkit", "axes": axes,
                             "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                                       "scale": scale}]}]}]}


def predict_to_zarr(source: str, output: str | Path, checkpoint: str | Path, /, *, tile: int, batch: int = 4,
                    chunk: int = 1024, device: str = "cpu", spec: Any = None, scheduler: str | None = None,
                    workers: int | None = None, resume: bool = False, overwrite: bool = False,
                    report: Callable[[str], object] = print) -> Path:
    """Predict `source` (TIFF stack, or zarr/OME-Zarr store) with the checkpoint into an OME-Zarr store on Dask.

    `scheduler` is a dask.distributed address (tcp://host:8786); `workers` starts a local cluster
    of that many worker processes; neither: the current dask scheduler (threads). The store is
    built under `<output>.partial` and renamed when every chunk is written.
    """
    require("dask", feature="the Dask path (--scheduler/--workers or an .ome.zarr output)", package="dask[distributed]")
    require("zarr", feature="OME-Zarr output", package="zarr")
    import dask
    import dask.array as da
    import zarr

    from segkit.checkpoint import read_info
    from segkit.inference.pipeline import OutputSpec, choose_normalization
    spec = spec or OutputSpec()
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    if output.resolve() == Path(source).resolve():
        raise InputError(f"output {output} would replace its input; choose another output path")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists; pass --overwrite or choose another path")
    info = read_info(checkpoint)
    geometry = info.geometry
    geometry.check_tile(tile)
    context = _context(geometry)
    with open_volume(source) as stack:
        normalization, note = choose_normalization(stack, info)
        if note:
            report(note)
        shape = tuple(stack.shape)
        resolution = stack.resolution
        dtype = stack.dtype
    size = chunk_size(chunk, geometry, tile, context)
    chunks = (1, min(size, shape[1]), min(size, shape[2]))
    layout = ((1,) * shape[0], axis_chunks(shape[1], chunks[1], context + 1), axis_chunks(shape[2], chunks[2], context + 1))
    starts = tuple(tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)])) for sizes in layout)
    manifest = RunManifest(file_sha256(checkpoint), str(Path(source).resolve()), tile, normalization.to_dict(), shape,
                           chunks, f"{spec.kind} {spec.threshold}")
    if partial.exists():
        if not resume:
            raise OutputExistsError(f"{partial} holds an interrupted run; pass --resume to finish it, or delete it")
        found = RunManifest.from_json((partial / MANIFEST).read_text()) if (partial / MANIFEST).exists() else None
        if found != manifest:
            what = ("another model" if found and found.model_sha256 != manifest.model_sha256
                    else "other settings (input, tile, normalisation, chunks or output type)")
            raise SegkitError(f"--resume: {partial} was started with {what}; delete it to start again")
        done = len(list((partial / DONE).glob("*"))) if (partial / DONE).exists() else 0
        report(f"resuming {partial}: {done} chunks already written")
    else:
        group = zarr.open_group(str(partial), mode="w", zarr_format=2)
        group.create_array("0", shape=shape, chunks=chunks, dtype=spec.dtype, fill_value=0)
        um = None
        if resolution is not None and resolution.unit == 3 and resolution.x > 0:
            um = (1e4 / resolution.y, 1e4 / resolution.x)
        group.attrs.update(ome_zarr_attributes(shape, um))
        (partial / MANIFEST).write_text(manifest.to_json())

    reader = _plane_reader(source)
    stack_array = da.stack([da.from_delayed(dask.delayed(reader)(z), shape=shape[1:], dtype=dtype)
                            for z in range(shape[0])]).rechunk(layout)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers and not scheduler else None
    task = dict(starts=starts, store=str(partial), checkpoint=str(Path(checkpoint).resolve()), device=device,
                threads=threads, geometry=geometry,
                tile=tile, batch=batch, context=context, mean=normalization.mean, std=normalization.std,
                encode=spec.encode)
    flags = stack_array.map_overlap(_predict_block, depth={0: 0, 1: context, 2: context}, boundary="none",
                                    trim=False, dtype=np.uint8, chunks=(1, 1, 1), **task)
    _compute(flags, scheduler=scheduler, workers=workers)
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)
    return output


class ZarrStack:
    """A ZYX (or YX) zarr array, or the level 0 of an OME-Zarr group, with the plane interface of
    TiffStack, so normalisation and reading work the same for both inputs."""

    def __init__(self, source: str | Path) -> None:
        require("zarr", feature="zarr input", package="zarr")
        import zarr

        self.source = str(source)
        path = Path(source)
        if not path.exists():
            raise InputError(f"input {source} does not exist; check the path")
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:  # zarr raises several types for a folder that is not a store
            raise InputError(f"{source} is not a zarr store ({type(exc).__name__}); pass a TIFF or a zarr array") from exc
        if not hasattr(node, "shape"):
            if "0" not in node:
                raise InputError(f"{source} is a zarr group without a level-0 array '0'; pass the array itself")
            node = node["0"]
        if node.ndim not in (2, 3) or node.dtype not in (np.uint8, np.uint16, np.float32):
            raise InputError(f"{source}: a zarr input must be a YX or ZYX array of uint8, uint16 or float32, "
                             f"not {node.ndim}D {node.dtype}")
        self.array = node
        self.is_2d = node.ndim == 2
        self.shape: tuple[int, int, int] = (1, *node.shape) if self.is_2d else tuple(node.shape)
        self.dtype = np.dtype(node.dtype)
        self.resolution = None

    def __len__(self) -> int:
        return self.shape[0]

    def plane(self, index: int) -> np.ndarray:
        from segkit.io.tiff import check_finite

        return check_finite(np.asarray(self.array[...] if self.is_2d else self.array[index]), self.source, index)

    def __enter__(self) -> "ZarrStack":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def open_volume(source: str) -> Any:
    """A TIFF stack, or a zarr / OME-Zarr store (a path ending in .zarr)."""
    from segkit.io.tiff import open_stack

    return ZarrStack(source) if source.rstrip("/").endswith(".zarr") else open_stack(source)


def _plane_reader(source: str) -> Callable[[int], np.ndarray]:
    def read(index: int) -> np.ndarray:
        with open_volume(source) as stack:
            return stack.plane(index)

    return read


def _compute(flags: Any, *, scheduler: str | None, workers: int | None) -> None:
    if scheduler is None and workers is None:
        flags.compute()
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            client.compute(flags).result()
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        client.compute(flags).result()


def convert_zarr_to_tiff(store: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Stream the level-0 array of an OME-Zarr store into a tiled BigTIFF, plane by plane."""
    require("zarr", feature="reading OME-Zarr", package="zarr")
    import zarr

    from segkit.io.tiff import write_stack

    store = Path(store)
    if not (store / "0").exists():
        raise InputError(f"{store} is not a segkit OME-Zarr store (no level 0 array); pass a store from "
                         "`segkit predict ... -o out.ome.zarr`")
    array = zarr.open_array(str(store / "0"), mode="r")
    return write_stack(output, (np.asarray(array[z]) for z in range(array.shape[0])), shape=tuple(array.shape),
                       dtype=array.dtype, overwrite=overwrite)
