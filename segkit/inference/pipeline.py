"""Stack prediction: TIFF planes in, onto the engine's device once, tiled there, encoded there,
TIFF planes out.

    reader thread: decode plane (parallel for compressed TIFFs) -> pinned host buffer -> device
                   copy on a side stream (CUDA), in the plane's stored dtype
    this thread:   mirror-pad -> normalise -> tiles -> engine -> place/blend -> encode, all on the
                   device; only the encoded plane is copied back (pinned buffer, its own stream)
    writer thread: waits for that copy (the one synchronisation per plane), finishes the plane on
                   the host where an output needs it (watershed), compresses it in parallel, writes

Each hand-over is a bounded queue, so the engine never waits for the disk and host memory stays
fixed whatever the number of planes. On the CPU the same code runs without pinning or streams.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from segkit.errors import SegkitError
from segkit.inference.encodings import PlaneEncoding, ProbabilityEncoding, finish_planes, output_content
from segkit.inference.tiler import Forward, TilePlan, pad_plane, plan_tiles, predict_planes
from segkit.io.resample import rescale
from segkit.io.tiff import ENCODE_WORKERS, TiffStack, write_stack
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization, stack_normalization, stack_sample
from segkit.record import CheckpointInfo

T = TypeVar("T")
R = TypeVar("R")


def choose_normalization(stack: TiffStack, info: CheckpointInfo, *, mode: str = "auto") -> tuple[Normalization, str]:
    """The normalisation to use and a note for the user ('' when there is nothing to say).

    checkpoint: the training data's statistics; stack: this stack's, computed once; auto: the
    checkpoint's unless the stack's dtype differs from the training data's (then the stack's).
    Percentile models (fluorescence) normalise each stack by its own percentiles (auto, stack), or by
    the training images' typical percentiles (checkpoint)."""
    if mode not in ("auto", "checkpoint", "stack"):
        raise SegkitError(f"unknown normalisation {mode!r}; choose auto, checkpoint or stack")
    trained_dtype = info.inference.input_dtype
    rule = info.normalization
    if rule.percentiles is not None:  # a percentile rule: this stack's percentiles, or the training data's typical
        if mode == "checkpoint":
            return Normalization(rule.mean, rule.std, clip=rule.clip), ""
        sample = stack_sample(stack)
        return rule.for_image(sample if sample.shape[1] > 1 else sample[:, 0]), ""
    if mode == "stack":
        return stack_normalization(stack), ""
    if mode == "auto" and trained_dtype and trained_dtype != str(stack.dtype):
        return stack_normalization(stack), (
            f"input is {stack.dtype} but the model was trained on {trained_dtype}: "
            "normalising with this stack's statistics"
        )
    return info.normalization, ""


def _queued_items(buffer: queue.Queue, done: object) -> Iterator[Any]:
    """The items a thread puts into `buffer`, until it puts `done`; a `_Failure` it puts is raised here."""
    while True:
        item = buffer.get()
        if item is done:
            return
        if isinstance(item, _Failure):
            raise item.error
        yield item


def read_ahead(produce: Iterable[T], *, depth: int = 2, name: str = "segkit-reader") -> Iterator[T]:
    """Items of `produce`, computed ahead by a thread of their own through a bounded queue; an
    error in that thread is re-raised here, and leaving early stops it."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for item in produce:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            buffer.put(_Failure(exc))

    reader = threading.Thread(target=run, name=name, daemon=True)
    reader.start()
    try:
        yield from _queued_items(buffer, done)
    finally:
        stop.set()
        while reader.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.05)


@dataclass(frozen=True)
class _Copy:
    """A tensor being copied between host and device, and the CUDA event the copy completes at
    (None: no copy, the tensor is already there)."""

    tensor: Any
    ready: Any

    def numpy(self) -> np.ndarray:
        """The host tensor as numpy, once its copy is complete (the writer's one wait per plane)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensor.numpy()


def _uploads(stack: Any, device: Any) -> Iterator[_Copy]:
    """Each raw plane, in its stored dtype, copied once to `device`: from a pinned buffer on a side
    stream on CUDA (so the copy overlaps the engine), as a view of the numpy plane on the CPU."""
    import torch

    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    for index in range(len(stack)):
        raw = stack.plane(index)
        host = torch.from_numpy(raw if raw.ndim == 3 else raw[None])
        if not cuda:
            yield _Copy(host, None)
            continue
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        with torch.cuda.stream(stream):
            on_device = pinned.to(device, non_blocking=True)
            ready = stream.record_event()
        yield _Copy(on_device, ready)


def raw_planes(stack: Any, device: Any, *, prefetch: int = 2) -> Iterator[Any]:
    """Planes as (C, H, W) tensors on `device`, in their stored dtype (normalised later, after
    padding: `_pad_and_normalize`); decoding and the host-to-device copy run ahead in a reader thread."""
    import torch

    uploads = read_ahead(_uploads(stack, device), depth=prefetch)
    try:
        for upload in uploads:
            raw = upload.tensor
            if upload.ready is not None:
                torch.cuda.current_stream(device).wait_event(upload.ready)
                raw.record_stream(torch.cuda.current_stream(device))
            yield raw
    finally:
        uploads.close()


def _downloads(encoded: Iterable[Any], device: Any) -> Iterator[_Copy]:
    """Start copying each encoded plane back into a pinned buffer on a stream of its own (CUDA),
    so the copy overlaps the next plane's compute; on the CPU the tensor is already there."""
    import torch

    if device.type != "cuda":
        for tensor in encoded:
            yield _Copy(tensor, None)
        return
    stream = torch.cuda.Stream(device)
    for tensor in encoded:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)
            ready = stream.record_event()
        yield _Copy(host, ready)


def consume_behind(consume: Callable[[Iterable[T]], R], items: Iterable[T], *, depth: int = 2) -> R:
    """Run `consume(stream)` in a thread of its own while this thread produces `items` into a
    bounded queue; returns what `consume` returns.

    This is how writing (zlib compression + disk) happens behind the engine instead of between
    its batches. An error on either side stops both: a producer error is raised inside
    `consume`'s stream (so an atomic writer deletes its temporary file) and then re-raised here.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    result: list = []
    failure: list[BaseException] = []
    # set when `consume` has returned or raised (its atomic write renamed or deleted its file); waited
    # for instead of join(): on Python 3.11 a join interrupted by Ctrl-C marks the thread as stopped
    # while it still runs, and a second join returns at once
    finished = threading.Event()

    def stream() -> Iterator[T]:
        return _queued_items(buffer, done)

    def run() -> None:
        try:
            result.append(consume(stream()))
        except BaseException as exc:  # handed to the producer thread, re-raised there
            failure.append(exc)
            while True:  # unblock a producer waiting on a full queue
                try:
                    buffer.get_nowait()
                except queue.Empty:
                    break
        finally:
            finished.set()

    worker = threading.Thread(target=run, name="segkit-writer", daemon=True)
    worker.start()

    def put(item: object) -> None:
        while not finished.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        for item in items:
            if failure:
                break
            put(item)
        else:
            put(done)
    except BaseException as exc:  # an error here, or Ctrl-C / SIGTERM (KeyboardInterrupt, main thread only)
        stop = _Failure(exc)
        _through_interrupts(lambda: (put(stop), finished.wait()))
        raise
    # An interrupt while the writer finishes the last planes: let it finish (its file is complete),
    # then re-raise. Leaving it running would let the process exit under it, with its temporary file.
    _through_interrupts(finished.wait)
    if failure:
        raise failure[0]
    return result[0]


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def _through_interrupts(call: Callable[[], object]) -> None:
    """`call()` to its end through one KeyboardInterrupt (Ctrl-C, or SIGTERM in the CLI), which is
    re-raised after: the writer thread must hear of the stop and be waited for, or its atomic write
    could not delete its temporary file. A second interrupt stops the wait at once (the user insists;
    a temporary file may then be left, which the next run writing that output removes)."""
    interrupt: BaseException | None = None
    while True:
        try:
            call()
            break
        except KeyboardInterrupt as exc:
            if interrupt is not None:
                raise
            interrupt = exc
    if interrupt is not None:
        raise interrupt


def _pad_and_normalize(raw: Any, plan: TilePlan, *, normalization: Normalization) -> Any:
    """The padded, normalised plane the tiler cuts tiles from. Mirror padding commutes with
    normalisation (a per-pixel map), so narrow stored types are padded first: for uint8 that moves a
    quarter of the bytes and saves a float32 pass (torch cannot pad uint16: normalised first)."""
    import torch

    if raw.dtype in (torch.uint8, torch.int8, torch.int16, torch.float16, torch.float32):
        return normalization.apply(pad_plane(raw, plan))
    return pad_plane(normalization.apply(raw), plan)


_UINT8_PROBABILITIES = ProbabilityEncoding()  # predict_stack's default encoding


def count_tiles(stack: TiffStack, geometry: Geometry, tile: int) -> int:
    return plan_tiles(stack.shape[1:], geometry, tile=tile).n_tiles * len(stack)


def predict_stack(
    stack: Any,
    forward: Forward,
    geometry: Geometry,
    output: str | Path,
    /,
    *,
    normalization: Normalization,
    tile: int,
    batch: int = 4,
    blend: str = "cosine",
    spec: PlaneEncoding = _UINT8_PROBABILITIES,
    overwrite: bool = False,
    compression: str = "zlib",
    on_tiles: Callable[[int], None] | None = None,
    rescale: float | None = None,
) -> Path:
    """Run every plane of `stack` through the engine `forward` on its device and write the planes,
    encoded by `spec` (class probabilities, classes, denoised intensities or instances), to `output`
    atomically (a failure on any side leaves no output). `rescale`: planes are resampled by this
    factor for the model (another pixel size than its training data's) and its outputs back."""
    shape: tuple[int, ...] = stack.shape[1:] if stack.is_2d else stack.shape
    channels = getattr(spec, "channels", 1)
    axes = None
    if channels > 1:  # a channel axis after Z (ImageJ's order): ZCYX, or CYX for a 2D image
        shape, axes = (*shape[:-2], channels, *shape[-2:]), "CYX" if stack.is_2d else "ZCYX"
    workers = _compression_workers(forward.device)

    def write(planes: Iterable[np.ndarray]) -> Path:
        if channels > 1:
            planes = (channel for plane in planes for channel in plane)
        return write_stack(output, planes, shape=shape, dtype=spec.dtype, axes=axes, content=output_content(spec),
                           calibration=getattr(stack, "calibration", None),  # rescaled or not: the input's size
                           overwrite=overwrite, compression=compression, workers=workers)

    return run_stack(stack, forward, geometry, write, normalization=normalization, tile=tile, batch=batch,
                     blend=blend, spec=spec, on_tiles=on_tiles, rescale=rescale)


def run_stack(
    stack: Any,
    forward: Forward,
    geometry: Geometry,
    consume: Callable[[Iterator[np.ndarray]], R],
    /,
    *,
    normalization: Normalization,
    tile: int,
    batch: int = 4,
    blend: str = "cosine",
    spec: PlaneEncoding = _UINT8_PROBABILITIES,
    on_tiles: Callable[[int], None] | None = None,
    rescale: float | None = None,
) -> R:
    """Run every plane of `stack` through the engine `forward` on its device and hand the planes,
    encoded and finished by `spec`, in stack order, to `consume` in a thread of its own (the writer:
    `predict_stack` writes a TIFF, `segkit.inference.arrays` fills an array); returns what it returns.

    An error on either side stops both and is raised here (an exception raised by `on_tiles`, such as
    `segkit.errors.Cancelled`, stops the run between tile batches). `rescale`: planes are resampled by
    this factor for the model and its outputs back to the stack's size."""
    original = stack
    if rescale is not None:
        stack = RescaledStack(stack, rescale)
    plan = plan_tiles(stack.shape[-2:], geometry, tile=tile)  # fails on a bad tile before any work
    device = forward.device
    if device.type == "cpu":
        forward = _AllThreads(forward)
    depth = _planes_in_flight(batch, plan.n_tiles)
    planes = raw_planes(stack, device, prefetch=depth)
    values = predict_planes(planes, forward, geometry, tile=tile, batch=batch, blend=blend, on_tiles=on_tiles,
                            pad=partial(_pad_and_normalize, normalization=normalization))
    if rescale is not None:
        values = (_resize(v, original.shape[-2:]) for v in values)
    encoded = _downloads((spec.encode(v) for v in values), device)

    def finish(downloads: Iterable[_Copy]) -> R:  # label ids unique across the stack
        return consume(finish_planes(spec, (download.numpy() for download in downloads)))

    try:
        with _one_thread_outside_the_engine(device):
            return consume_behind(finish, encoded, depth=depth)
    finally:  # stop the reader thread now, also after a failure (a traceback cycle would keep it alive)
        planes.close()


class RescaledStack:
    """A stack seen at another pixel size: each plane resampled by `factor` as it is read (area
    averaging when shrinking, linear when enlarging), for a model trained at another pixel size."""

    def __init__(self, stack: Any, factor: float) -> None:
        self.stack, self.factor = stack, factor
        z, h, w = stack.shape
        self.shape = (z, max(1, round(h * factor)), max(1, round(w * factor)))
        self.dtype, self.is_2d, self.resolution = stack.dtype, stack.is_2d, stack.resolution
        self.channels = getattr(stack, "channels", 1)

    def __len__(self) -> int:
        return len(self.stack)

    def plane(self, index: int) -> np.ndarray:
        return rescale(self.stack.plane(index), self.factor, shape=self.shape[1:])


def _resize(values: Any, size: tuple[int, int]) -> Any:
    """(K, h, w) model outputs resampled (bilinear) to the plane's own (H, W)."""
    import torch.nn.functional as F

    return F.interpolate(values[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def _planes_in_flight(batch: int, tiles_per_plane: int) -> int:
    """Queue depth for the reader and the writer: the planes one batch spans, plus two. A batch that
    spans several planes finishes them together; with shorter queues this thread would wait for
    the writer (that is, for the device to finish the batch) before it could start the next batch,
    and the device would idle meanwhile."""
    return -(-batch // tiles_per_plane) + 2


def _compression_workers(device: Any) -> int | None:
    """Threads compressing the output (None: write_stack's default). On the CPU this thread keeps a
    core busy (`_one_thread_outside_the_engine`), so compression gets the others: more threads
    than cores only take turns (2 cores, tools/bench_null_before.py --after: median 112-118 ->
    119-127 Mpx/s)."""
    if device.type != "cpu":
        return None

    return max(1, min(ENCODE_WORKERS, (os.cpu_count() or 1) - 1))


@contextmanager
def _one_thread_outside_the_engine(device: Any) -> Iterator[None]:
    """On the CPU, this thread's own tensor work (normalise, pad, blend, encode: memory-bound, a
    second thread hardly helps it) runs on one thread, leaving the other cores to the writer's
    compression; the engine gets every thread back for each forward (`_AllThreads`). Measured on
    2 cores (tools/bench_null_before.py --after): 81-88 -> 103-116 Mpx/s. Restored on exit."""
    if device.type != "cpu":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _AllThreads:
    """An engine wrapper for the CPU: the forward runs with all of torch's threads, as it would
    outside the pipeline (see `_one_thread_outside_the_engine`)."""

    def __init__(self, engine: Any) -> None:
        import torch

        self.engine = engine
        self.device = engine.device
        self.label = getattr(engine, "label", "engine")
        self.threads = torch.get_num_threads()

    def __call__(self, x: Any) -> Any:
        import torch

        inside = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.engine(x)
        finally:
            torch.set_num_threads(inside)
