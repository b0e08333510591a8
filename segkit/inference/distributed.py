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

Each worker builds the engine once (kept on the dask worker object) from a plain EngineRequest
(the model file and the prediction's options: engine, denoiser, amp, TTA, ...) and reuses it for
all its chunks. With several GPUs and `device` 'cuda', worker i takes GPU i mod n (round robin, as
dask-cuda's LocalCUDACluster does).

The store (`StorePlan`, `segkit.io.zarr.create_ome_zarr`): an NGFF 0.4 image pyramid of what the
output holds (probabilities; for labels, the probabilities they were cut from, as uint8) and, for
labels, a label image labels/<name> with its own pyramid. The run goes in stages, each computed once
the one before is complete, each resumable by its markers:

1. chunks (`_predict_block`): the image's level 0, a class map's labels, and for instances and objects
   the float32 probabilities the watershed reads (a scratch array);
2. instances and objects need whole planes (a watershed must not stop at chunk borders): one task per
   plane writes its labels (ids 1..n) to "segkit_slice_labels" and n into its marker; then each
   plane's offset is the cumulative sum of the counts of the planes before it
   (`segkit.instances.id_offsets`, so it depends on the labels, never on which task ran first), and one
   task per plane writes its shifted ids to the label image's level 0 (as the TIFF path does);
3. the pyramid (`segkit.io.pyramid`): level k from level k - 1, one task per chunk, mean for the image
   and every second pixel for labels; each level is marked done once all its chunks are written;
4. the store is marked complete, its scratch arrays, markers and manifest removed, validated with
   ome-zarr-models, and renamed from NAME.partial to NAME.

Outputs of several channels (every class's probability of a K-class model) add a leading channel
axis: the image is CZYX, chunked (1, 1, cy, cx), with an OME-Zarr channel axis c; each task writes
all channels of its chunk into that region (its own zarr chunks, so still no locks), and its
single marker covers them all. The progress bar hears the tiles of each chunk as it finishes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.errors import InputError, OutputError, OutputExistsError, SegkitError
from segkit.inference import tiler
from segkit.inference.encodings import (
    LABEL_ENCODINGS,
    ClassMapEncoding,
    InstanceEncoding,
    ObjectEncoding,
    PlaneEncoding,
    ProbabilityEncoding,
    output_content,
)
from segkit.inference.loading import EngineRequest, load_prediction_engine, model_record
from segkit.inference.pipeline import choose_normalization
from segkit.inference.tiler import mirror_pad
from segkit.instances import id_offsets, shift_ids
from segkit.io.calibration import zarr_attributes
from segkit.io.ngff import level_shapes, validate_store
from segkit.io.outputs import check_output, is_write_error, release_claim, resumable_path, write_failure
from segkit.io.pyramid import level_regions, write_level_region
from segkit.io.tiff import list_tiff_files
from segkit.io.zarr import (  # noqa: F401  (ZarrStack, convert_zarr_to_tiff, ome_zarr_attributes: importable from here too)
    MANIFEST,
    LabelImage,
    ZarrStack,
    convert_zarr_to_tiff,
    create_array,
    create_ome_zarr,
    mark_complete,
    ome_zarr_attributes,
    open_array,
    open_volume,
    plane_reader,
)
from segkit.words import counted

DONE = "segkit_done"
LABELS_DONE = "segkit_labels_done"
IDS_DONE = "segkit_ids_done"
#: pyramid levels written (one marker per image group and level)
LEVELS_DONE = "segkit_levels_done"
#: the float32 probabilities the watershed of instances and objects reads (removed when finished)
PROBABILITY = "probability"
#: each plane's labels 1..n before their ids are made unique across the stack (removed when finished)
SLICE_LABELS = "segkit_slice_labels"
#: What a store holds only while it is NAME.partial: removed before the rename, so a finished store holds
#: the output and nothing else (no array napari or ome-zarr would list besides the image and its labels).
SCRATCH = (PROBABILITY, SLICE_LABELS, DONE, LABELS_DONE, IDS_DONE, LEVELS_DONE, MANIFEST)
#: The store's layout, part of the manifest: a NAME.partial of an earlier layout is not resumed into this one.
LAYOUT = "NGFF 0.4, pyramid, labels/"
#: the probabilities an object model's watershed reads (segkit.instances.object_watershed): background,
#: interior, boundary
OBJECT_CHANNELS = 3


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
    engine: str = ""
    #: what the input holds (`input_fingerprint`): a rerun with the same path, shape and dtype but other
    #: content must not mix its chunks with the old ones
    input: str = ""

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


#: Inputs up to this size are hashed whole; larger ones by FINGERPRINT_SAMPLES evenly spaced blocks.
FINGERPRINT_FULL_BYTES = 64 << 20
FINGERPRINT_SAMPLES, FINGERPRINT_BLOCK = 64, 256 << 10


def input_fingerprint(source: str | Path) -> str:
    """What identifies the content of an input (a TIFF, a folder or glob of TIFFs, a zarr store):
    its files' count, total size and newest modification time, and a sha256 over their names, sizes
    and bytes: all bytes up to FINGERPRINT_FULL_BYTES, beyond that FINGERPRINT_SAMPLES blocks of
    FINGERPRINT_BLOCK bytes evenly spaced over the files (so a rewrite of any size is noticed by
    its size or time, and an edit in place by its time or, in most places, its bytes)."""
    path = Path(source)
    if path.is_dir() and str(source).rstrip("/").lower().endswith(".zarr"):
        files = sorted(str(p) for p in path.rglob("*") if p.is_file())
    else:
        files = list_tiff_files(str(source))
    stats = [os.stat(f) for f in files]
    sizes = [s.st_size for s in stats]
    total = sum(sizes)
    digest = hashlib.sha256()
    for name, size in zip(files, sizes):
        digest.update(f"{os.path.relpath(name, source) if path.is_dir() else Path(name).name}:{size};".encode())
    if total <= FINGERPRINT_FULL_BYTES:
        for name in files:
            digest.update(Path(name).read_bytes())
        how = "all bytes"
    else:
        starts = np.cumsum([0] + sizes)
        for k in range(FINGERPRINT_SAMPLES):
            offset = (total - FINGERPRINT_BLOCK) * k // (FINGERPRINT_SAMPLES - 1)
            index = int(np.searchsorted(starts, offset, side="right")) - 1
            with open(files[index], "rb") as handle:
                handle.seek(offset - int(starts[index]))
                digest.update(handle.read(FINGERPRINT_BLOCK))
        how = f"{FINGERPRINT_SAMPLES} sampled blocks"
    newest = max((s.st_mtime_ns for s in stats), default=0)
    return f"{len(files)} files, {total} bytes, modified {newest} ns, sha256 of {how} {digest.hexdigest()}"


def chunk_size(chunk: int, geometry: Any, tile: int, context: int) -> int:
    """The chunk side actually used: a multiple of the model step (so chunk origins sit on the
    pooling grid), preferably of lcm(step, tile output) too (so tiles fill chunks without
    rounding up), and more than the context (so a border chunk holds the pixels its mirror needs)."""
    step = geometry.step
    out_tile = geometry.output_size(tile) - 2 * geometry.halo
    whole = math.lcm(step, max(out_tile, 1))
    size = max(chunk, context + 1)
    if whole <= 2 * size:
        return max(1, round(size / whole)) * whole
    return -(-size // step) * step


def _context(geometry: Any) -> int:
    need = geometry.margin + geometry.halo
    return -(-need // geometry.step) * geometry.step


def worker_device(device: str, worker: int | str | None, gpu_count: int) -> str:
    """The device of Dask worker `worker` (its index or LocalCluster name): with 'cuda' (or 'auto'
    on a GPU machine) and several GPUs, worker i gets GPU i mod n (a name without an index, e.g. a
    remote worker's address, picks one by its hash); otherwise, or outside a Dask worker (None:
    local threads), `device` unchanged."""
    if device not in ("cuda", "auto") or gpu_count < 2 or worker is None:
        return device
    try:
        index = int(str(worker).rsplit("-", 1)[-1])
    except (TypeError, ValueError):
        index = int(hashlib.sha256(str(worker).encode()).hexdigest(), 16)  # remote workers with names
    return f"cuda:{index % gpu_count}"


_LOCAL_ENGINES: dict[str, Any] = {}  # engines of the local threaded scheduler, dropped after each run
_ENGINE_LOCK = threading.Lock()


def _engine_for_worker(request: Any, threads: int | None) -> Any:
    """The worker's engine, built on first use and kept on the worker (one model load per worker).

    Tasks running in threads of one process share one engine: it is built under a lock (two
    threads must not export or load the same model at once; torch's ONNX exporter is not
    thread-safe). Dask starts workers with OMP_NUM_THREADS=1; `threads` gives each local worker
    its share of the cores.
    """
    from dataclasses import replace

    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        from distributed import get_worker

        holder: Any = get_worker()
        cache = holder.__dict__.setdefault("_segkit_engines", {})
    except (ImportError, ValueError):  # not on a dask worker (local threads): this process's cache
        holder, cache = None, _LOCAL_ENGINES
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = worker_device(request.options.device, getattr(holder, "name", None), gpus)
    key = f"{request}::{device}"
    with _ENGINE_LOCK:
        if key not in cache:
            on_device = replace(request, options=replace(request.options, device=device))
            cache[key] = load_prediction_engine(on_device, report=lambda _: None).engine
        return cache[key]


def axis_chunks(length: int, size: int, minimum: int) -> tuple[int, ...]:
    """Chunks of `size` along an axis, the last one merged into its neighbour when shorter than
    `minimum` (a border chunk must hold the pixels its mirror needs)."""
    sizes = [size] * (length // size) + ([length % size] if length % size else [])
    if len(sizes) > 1 and sizes[-1] < minimum:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return tuple(sizes)


def _predict_block(block: np.ndarray, *, block_info: dict | None = None, starts: tuple[tuple[int, ...], ...],
                   store: str, writes: tuple[tuple[str, Any], ...], request: Any, threads: int | None,
                   geometry: Any, tile: int, batch: int, blend: str, context: int, normalization: Any) -> np.ndarray:
    """One task: mirror at volume borders, tile on the worker's device, write the chunk into every
    array of `writes` ((array path, encoding) pairs, in order) and its marker."""
    import torch

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
    engine = _engine_for_worker(request, threads)
    targets = [(open_array(store, name, mode="r+"), spec) for name, spec in writes]
    for index in range(block.shape[0]):
        raw = torch.from_numpy(np.ascontiguousarray(block[index])[None]).to(engine.device)
        window = mirror_pad(normalization.apply(raw), pad)
        chunk_input = window[:, context:window.shape[-2] - context, context:window.shape[-1] - context]  # context may be 0
        # tiler.predict_planes is looked up per call: tests stop it mid-run
        values = next(tiler.predict_planes([chunk_input], engine, geometry, tile=tile, batch=batch, blend=blend,
                                           pad=partial(_pad_from_window, window=window, context=context,
                                                       ends=(y1 == height, x1 == width))))
        # one encoding after the other, each written before the next: an encoding may reuse `values`
        for target, spec in targets:
            channels = (slice(None),) * (target.ndim - 3)  # CZYX: every channel of the chunk
            target[(*channels, z0 + index, slice(y0, y1), slice(x0, x1))] = spec.finish(
                spec.encode(values).cpu().numpy())
    marker.parent.mkdir(exist_ok=True)
    marker.touch()
    return np.ones((1, 1, 1), np.uint8)


def _pad_from_window(plane: Any, plan: Any, *, window: Any, context: int,
                     ends: tuple[bool, bool] = (False, False)) -> Any:
    """The padded plane the tiler needs, cut from the window (the chunk plus `context` px of real
    neighbours, or of mirror at the volume's borders); the tiler may ask for more after the chunk than
    the context holds (its last tile rounds up to a valid size). At the volume's far end (`ends`, per
    axis y, x) that extra continues the mirror of the plane itself, as the single-machine tiler pads
    (a mirror of the window would mirror its mirrored context back, and the pixels of the chunk's last
    pooling cells see a few of them); after a real neighbour's context it only feeds outputs beyond the
    chunk, and a mirror of the window serves."""
    (before_y, after_y), (before_x, after_x) = plan.padding()
    extra_y, extra_x = max(0, after_y - context), max(0, after_x - context)
    if extra_y or extra_x:
        cut_y = context if ends[0] and extra_y else 0  # the mirrored context, mirrored afresh from the plane
        cut_x = context if ends[1] and extra_x else 0
        core = window[:, : window.shape[-2] - cut_y, : window.shape[-1] - cut_x]
        window = mirror_pad(core, ((0, extra_y + cut_y), (0, extra_x + cut_x)))
    height, width = plane.shape[-2:]
    return window[:, context - before_y : context + height + after_y, context - before_x : context + width + after_x]


def _label_plane(z: int, *, store: str, spec: Any) -> int:
    """One task of the instance stage: the watershed of a whole probability plane (YX, or CYX for
    object models) into the slice labels (ids 1..n); its marker holds n, the plane's count of ids."""
    marker = Path(store) / LABELS_DONE / str(z)
    if not marker.exists():
        source = open_array(store, PROBABILITY, mode="r")
        probability = np.asarray(source[:, z] if source.ndim == 4 else source[z], np.float32)
        labels = spec.finish(probability)
        open_array(store, SLICE_LABELS, mode="r+")[z] = labels
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(str(int(labels.max()) if labels.size else 0))
    return z


def _plane_offsets(store: str | Path, planes: int) -> list[int]:
    """Each plane's id offset, once every plane is labelled: the cumulative sum of the counts in the
    markers of the planes before it (the same on every run, whatever ran first)."""
    return id_offsets(int((Path(store) / LABELS_DONE / str(z)).read_text()) for z in range(planes))


def _shift_plane(z: int, *, store: str, target: str, offsets: list[int]) -> int:
    """One task of the id stage: plane z's slice labels, shifted by its offset, into `target` (the label
    image's level 0)."""
    marker = Path(store) / IDS_DONE / str(z)
    if not marker.exists():
        labels = open_array(store, SLICE_LABELS, mode="r")[z]
        open_array(store, target, mode="r+")[z] = shift_ids(labels, offsets[z])
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    return z


@dataclass(frozen=True)
class _DeviceHalf:
    """The chunk stage of an instance run: the spec's device half (the float32 probability, or an
    object model's three), whose host half (the watershed) runs later on whole planes (`_label_plane`)."""

    spec: Any

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def encode(self, values: Any) -> Any:
        return self.spec.encode(values)

    def finish(self, plane: np.ndarray) -> np.ndarray:
        return plane


@dataclass(frozen=True)
class StorePlan:
    """What a store holds and which encoding writes each of its arrays.

    The image ("0", "1", ...) holds probabilities: the output itself when the output is probabilities
    (uint8, float16 or a mask; one class or every class as channels), else the probabilities the labels
    were made of, as uint8 (NGFF label images belong to an image, and this one is what the labels were
    cut from: a viewer shows both). Labels are the label image labels/<name>: 'instances' (membrane
    models), 'objects' (object models) or 'classes' (argmax); the first two are labelled on whole planes
    after the chunks (from the float32 `scratch` probabilities), the class map is written by the chunks.
    """

    image: Any
    channels: int
    channel_names: tuple[str, ...] | None
    label: LabelImage | None = None
    #: the label image's level 0 written by the chunks themselves (class maps)
    chunk_labels: Any = None
    #: float32 probabilities kept until the watershed has labelled every plane (instances, objects)
    scratch: Any = None
    scratch_channels: int = 1

    @property
    def content(self) -> str:
        """What the root image holds: probabilities, or a threshold mask ('classes', as on the TIFF path)."""
        return output_content(self.image)

    @property
    def writes(self) -> tuple[tuple[str, Any], ...]:
        """(array, encoding) pairs a chunk task writes, in order: the encodings that leave the model's
        values as they are first, the image's last (its uint8 encoding rescales the values in place)."""
        writes: list[tuple[str, Any]] = []
        if self.chunk_labels is not None and self.label is not None:
            writes.append((f"labels/{self.label.name}/0", self.chunk_labels))
        if self.scratch is not None:
            writes.append((PROBABILITY, self.scratch))
        writes.append(("0", self.image))
        return tuple(writes)


def store_plan(spec: PlaneEncoding, classes: int, names: tuple[str, ...]) -> StorePlan:
    """The StorePlan of an output encoding, for a model of `classes` output classes named `names`."""
    named = names if len(names) == classes else None
    if isinstance(spec, ClassMapEncoding):
        class_names = named or tuple(f"class {k}" for k in range(classes))
        return StorePlan(ProbabilityEncoding("uint8", channel=None, channels=classes), classes, named,
                         LabelImage("classes", np.dtype(np.uint8), "classes", class_names), chunk_labels=spec)
    if isinstance(spec, InstanceEncoding):
        return StorePlan(ProbabilityEncoding("uint8", channel=spec.channel), 1, None,
                         LabelImage("instances", np.dtype(np.uint32)), scratch=_DeviceHalf(spec))
    if isinstance(spec, ObjectEncoding):
        return StorePlan(ProbabilityEncoding("uint8", channel=None, channels=OBJECT_CHANNELS), OBJECT_CHANNELS,
                         names if len(names) == OBJECT_CHANNELS else ("background", "interior", "boundary"),
                         LabelImage("objects", np.dtype(np.uint32)), scratch=_DeviceHalf(spec),
                         scratch_channels=OBJECT_CHANNELS)
    channels = getattr(spec, "channels", 1) if getattr(spec, "channel", 0) is None else 1
    return StorePlan(spec, channels, named if channels > 1 else None)


def predict_to_zarr(source: str, output: str | Path, request: EngineRequest, /, *, tile: int, batch: int = 4,
                    spec: PlaneEncoding | None = None, record: tuple[Any, Any] | None = None,
                    report: Callable[[str], object] = print, progress: Any = None) -> Path:
    """Predict `source` (TIFF stack, or zarr/OME-Zarr store) with the engine of `request` into an
    OME-Zarr store on Dask, at `tile` and `batch`, encoded by `spec` (default: uint8 probabilities).

    The request's options say the rest: `scheduler` is a dask.distributed address (tcp://host:8786);
    `workers` starts a local cluster of that many worker processes; neither: the current dask
    scheduler (threads); `chunk`, `blend`, `normalize`, `resume` and `overwrite` as their names say.
    The store is built under `<output>.partial` and renamed when every chunk (for labels, every plane's
    labels) and every pyramid level is written, its scratch arrays and markers removed and the result
    validated (NGFF 0.4, ome-zarr-models). `record`: the model's (record, geometry) when the caller
    already has them (else read from the model files). `progress` (a tqdm bar fits: `reset(total)`,
    `update(n)`) hears the tiles of each chunk as it finishes.
    """
    require("dask", feature="the Dask path (workers=N, scheduler=ADDRESS or an .ome.zarr output)", package="dask[distributed]")
    require("zarr", feature="OME-Zarr output", package="zarr")
    require("ome_zarr_models", feature="OME-Zarr output", package="ome-zarr-models")
    import dask
    import dask.array as da

    options = request.options
    blend, scheduler, workers = options.blend, options.scheduler, options.workers
    spec = spec or ProbabilityEncoding()
    output = Path(output)
    partial_store = resumable_path(output)
    check_output(output, kind="store", inputs=[source], overwrite=options.overwrite)  # not the input, not a file, writable
    info, geometry = record or model_record(request)
    geometry.check_tile(tile)
    context = _context(geometry)
    with open_volume(source) as stack:
        normalization, note = choose_normalization(stack, info, mode=options.normalize)
        if note:
            report(note)
        shape = tuple(stack.shape)
        calibration = getattr(stack, "calibration", None)
        dtype = stack.dtype
    size = chunk_size(options.chunk, geometry, tile, context)
    chunks = (1, min(size, shape[1]), min(size, shape[2]))
    layout = ((1,) * shape[0], axis_chunks(shape[1], chunks[1], context + 1), axis_chunks(shape[2], chunks[2], context + 1))
    starts = tuple(tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)])) for sizes in layout)
    instances = isinstance(spec, LABEL_ENCODINGS)  # labels of whole planes, after the chunks
    names = tuple(getattr(info, "classes", None) or ())
    plan = store_plan(spec, int(getattr(info, "output_classes", None) or max(len(names), 1)), names)
    # a channel axis in front (CZYX, chunks of one channel and plane): every class of a K-class model, or
    # the background / interior / boundary probabilities of an object model
    image = ((plan.channels, *shape), (1, *chunks)) if plan.channels > 1 else (shape, chunks)
    scratch = ((plan.scratch_channels, *shape), (1, *chunks)) if plan.scratch_channels > 1 else (shape, chunks)
    models = [request.model] + ([options.denoise] if options.denoise is not None else [])
    manifest = RunManifest("+".join(file_sha256(m) for m in models), str(Path(source).resolve()), tile,
                           normalization.to_dict(), shape, chunks,
                           repr(spec) + (", ids unique across the stack" if instances else "") + f"; store {LAYOUT}",
                           f"{options.engine} {options.amp} tta {options.tta} halo {options.halo} blend {blend}",
                           input=input_fingerprint(source))
    started_here = not partial_store.exists()
    if partial_store.exists():
        if not options.resume:
            raise OutputExistsError(f"{partial_store} holds an interrupted run; pass resume=True to finish it, "
                                    "or delete it")
        found = _found_manifest(partial_store)
        if found and found.input and found.source == manifest.source and found.input != manifest.input:
            raise SegkitError(f"resume: the input {source} changed since {partial_store} was started (its size, "
                              "modification time or content differ), so the chunks written so far belong to the old "
                              f"input; delete {partial_store} to start again")
        if found != manifest:
            what = ("another model" if found and found.model_sha256 != manifest.model_sha256
                    else "other settings (input, tile, normalisation, chunks, engine or output type)")
            raise SegkitError(f"resume: {partial_store} was started with {what}; delete it to start again")
        done = len(list((partial_store / DONE).glob("*"))) if (partial_store / DONE).exists() else 0
        report(f"resuming {partial_store}: {counted(done, 'chunk')} already written")
    else:
        create_ome_zarr(partial_store, *image, plan.image.dtype, calibration, plan.channel_names,
                        content=plan.content, label=plan.label)
        if plan.scratch is not None:
            create_array(partial_store, PROBABILITY, *scratch, plan.scratch.dtype)
        if instances:
            create_array(partial_store, SLICE_LABELS, shape, chunks, spec.dtype)
        (partial_store / MANIFEST).write_text(manifest.to_json())
        mark_complete(partial_store, complete=False)  # a renamed NAME.partial is still refused as input
    levels = len(level_shapes(shape[1], shape[2], chunks[1], chunks[2]))

    reader = plane_reader(source)
    stack_array = da.stack([da.from_delayed(dask.delayed(reader)(z), shape=shape[1:], dtype=dtype)
                            for z in range(shape[0])]).rechunk(layout)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers and not scheduler else None
    task = dict(starts=starts, store=str(partial_store), writes=plan.writes, request=request, threads=threads,
                geometry=geometry, tile=tile, batch=batch, blend=blend, context=context, normalization=normalization)
    # a plane smaller than the context is one chunk per axis: no neighbours to borrow from, the
    # mirror supplies it all (dask refuses a depth larger than the array)
    depth = {0: 0, 1: min(context, shape[1]), 2: min(context, shape[2])}
    flags = stack_array.map_overlap(_predict_block, depth=depth, boundary="none",
                                    trim=False, dtype=np.uint8, chunks=(1, 1, 1), **task)
    blocks = list(flags.to_delayed().ravel())
    # each chunk's tiles, for the progress bar (the tiler plans the chunk's own tiles)
    tiles = {block.key: tiler.plan_tiles((starts[1][cy + 1] - starts[1][cy], starts[2][cx + 1] - starts[2][cx]),
                                         geometry, tile=tile).n_tiles
             for block, (_, cy, cx) in zip(blocks, np.ndindex(flags.numblocks))}
    if progress is not None:
        progress.reset(total=sum(tiles.values()))
    store = str(partial_store)
    try:
        with _Executor(scheduler=scheduler, workers=workers) as executor:
            if not _is_complete(partial_store):
                executor.run(blocks, on_done=(lambda key: progress.update(tiles[key])) if progress is not None
                             else None)
                if instances and plan.label is not None:  # labels of whole planes, after all their chunks
                    executor.run([dask.delayed(_label_plane)(z, store=store, spec=spec) for z in range(shape[0])])
                    offsets = _plane_offsets(partial_store, shape[0])
                    target = f"labels/{plan.label.name}/0"
                    executor.run([dask.delayed(_shift_plane)(z, store=store, target=target, offsets=offsets)
                                  for z in range(shape[0])])
                # probabilities are averaged; masks and labels take every second pixel
                groups = [(".", "nearest" if plan.content == "classes" else "mean")]
                if plan.label is not None:
                    groups.append((f"labels/{plan.label.name}", "nearest"))
                for level in range(1, levels):
                    _build_level(executor, partial_store, groups, level, shape[0])
    except InputError:  # e.g. a damaged chunk of the input: fixing it changes the input, so resume could not go on
        if started_here:
            shutil.rmtree(partial_store, ignore_errors=True)
        raise
    except OSError as exc:  # a full disk or lost permission: one line; the store stays for resume
        if not is_write_error(exc, partial_store):
            raise
        raise OutputError(write_failure(partial_store, exc, f"the chunks written so far are kept in {partial_store} "
                                        "(rerun with resume=True to finish it)")) from exc
    finally:
        with _ENGINE_LOCK:
            _LOCAL_ENGINES.clear()  # the local scheduler's engines (and their device memory) go with the run
    _finish(partial_store, manifest)
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    partial_store.rename(output)
    release_claim(output)  # taken by check_output: no other run wrote the store meanwhile
    return output


def _found_manifest(store: Path) -> RunManifest | None:
    """The manifest of the run that started `store`: its manifest file, or (a run that finished writing but
    stopped before its rename) the copy in the group attribute `segkit.run`."""
    if (store / MANIFEST).exists():
        return RunManifest.from_json((store / MANIFEST).read_text())
    run = (zarr_attributes(store).get("segkit") or {}).get("run")
    return RunManifest.from_json(json.dumps(run)) if isinstance(run, dict) else None


def _is_complete(store: Path) -> bool:
    return (zarr_attributes(store).get("segkit") or {}).get("complete") is True


def _build_level(executor: "_Executor", store: Path, groups: list[tuple[str, str]], level: int, planes: int) -> None:
    """Pyramid level `level` of every image group ((path in the store, 'mean' or 'nearest')), one task per
    chunk of the level and plane, from level - 1; then the level is marked done (a resumed run skips it)."""
    import dask

    todo = [(group, method) for group, method in groups if not (store / LEVELS_DONE / f"{_slug(group)}.{level}").exists()]
    tasks = []
    for group, method in todo:
        target = open_array(store / group, str(level))
        for z in range(planes):
            for region in level_regions(*target.shape[-2:], *target.chunks[-2:]):
                tasks.append(dask.delayed(write_level_region)(str(store / group), level, z, region, method))
    if tasks:
        executor.run(tasks)
    (store / LEVELS_DONE).mkdir(exist_ok=True)
    for group, _ in todo:
        (store / LEVELS_DONE / f"{_slug(group)}.{level}").touch()


def _slug(group: str) -> str:
    return "image" if group == "." else group.replace("/", "-")


def _finish(store: Path, manifest: RunManifest) -> None:
    """Make a store whose every chunk, label and level is written its final self: marked complete (with
    the run's manifest as provenance), its scratch arrays, markers and manifest file removed, then
    validated as NGFF 0.4 with ome-zarr-models. Marked first: a run stopped in between finishes on resume."""
    mark_complete(store, run=json.loads(manifest.to_json()))
    for name in SCRATCH:
        path = store / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    validate_store(store)


class _Executor:
    """Runs lists of dask tasks (Delayed) on the run's scheduler, stage after stage: a dask.distributed
    cluster (`scheduler` address, or a LocalCluster of `workers` processes), or the local scheduler
    (dask's threads in a pool of our own, or one the caller configured). `run` tells `on_done(key)` as
    each task finishes (distributed: `as_completed` on its futures; local: a dask callback)."""

    def __init__(self, *, scheduler: str | None, workers: int | None) -> None:
        self.scheduler, self.workers = scheduler, workers
        self.client: Any = None
        self._closers: list[Any] = []

    def __enter__(self) -> "_Executor":
        if self.scheduler is not None or self.workers is not None:
            from distributed import Client, LocalCluster

            if self.scheduler is not None:
                self.client = Client(self.scheduler)
            else:
                cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True)
                self._closers.append(cluster)
                self.client = Client(cluster)
            self._closers.insert(0, self.client)
        return self

    def __exit__(self, *exc: object) -> None:
        for closer in self._closers:
            closer.close()

    def run(self, tasks: list[Any], on_done: Callable[[Any], None] | None = None) -> None:
        """Compute `tasks` (their results are dropped), telling `on_done(key)` as each finishes; raises the
        first task's error."""
        if tasks:
            _compute(tasks, client=self.client, on_done=on_done)


def _compute(tasks: list[Any], *, client: Any, on_done: Callable[[Any], None] | None) -> None:
    """Compute Delayed `tasks` on `client` (a dask.distributed Client), or without one on dask's local
    scheduler (the caller's configured one, or dask's threads in a pool of our own); `on_done(key)` hears
    each task that finished."""
    import dask
    import dask.threaded
    from dask.base import get_scheduler
    from dask.callbacks import Callback

    if client is None:
        configured = get_scheduler(collections=tasks)
        if configured is dask.threaded.get:
            # dask's default threads, in a pool of our own: when a task fails, dask raises at once while the
            # other threads still run their chunks; leaving the pool waits for them, so an interrupted run
            # returns only when nothing writes into its store any more
            keys = {task.key for task in tasks}
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool, Callback(posttask=_posttask(keys, on_done)):
                dask.compute(*tasks, pool=pool)
            return
        client = _client_of(configured)
        if client is None:  # a local scheduler the caller configured (synchronous, processes)
            with Callback(posttask=_posttask({task.key for task in tasks}, on_done)):
                dask.compute(*tasks)
            return
    from distributed import as_completed

    futures = client.compute(tasks)
    for future in as_completed(futures):
        future.result()  # raises the task's error
        if on_done is not None:
            on_done(future.key)


def _posttask(keys: set[Any], on_done: Callable[[Any], None] | None) -> Callable[..., None]:
    def heard(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if on_done is not None and key in keys:
            on_done(key)

    return heard


def _client_of(scheduler: Any) -> Any:
    """The dask.distributed Client whose `get` the caller configured as dask's scheduler; None for others."""
    owner = getattr(scheduler, "__self__", None)
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - the dask extra brings distributed
        return None
    return owner if isinstance(owner, Client) else None
