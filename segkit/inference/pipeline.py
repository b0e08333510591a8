"""Stack prediction: TIFF planes in, normalised, overlap-tiled through an engine, TIFF planes out.

A reader thread decodes planes ahead of the engine and a writer thread compresses and writes
behind it, each through a bounded queue, so the engine never waits for the disk and host memory
stays fixed whatever the number of planes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from segkit.checkpoint import CheckpointInfo, Normalization
from segkit.errors import SegkitError
from segkit.inference.tiler import Forward, plan_tiles, predict_planes
from segkit.io.tiff import TiffStack, write_stack
from segkit.models.geometry import Geometry

OUTPUT_TYPES = ("uint8", "float16", "mask")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class OutputSpec:
    """How probabilities are stored: uint8 0-255, float16, or a 0/255 mask at `threshold`."""

    kind: str = "uint8"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_TYPES:
            raise SegkitError(f"unknown output type {self.kind!r}; choose one of {', '.join(OUTPUT_TYPES)}")
        if not 0.0 < self.threshold < 1.0:
            raise SegkitError(f"threshold {self.threshold} must be between 0 and 1 (exclusive)")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.kind == "float16" else np.uint8)

    def encode(self, probability: np.ndarray) -> np.ndarray:
        if self.kind == "float16":
            return probability.astype(np.float16)
        if self.kind == "mask":
            return np.where(probability >= self.threshold, 255, 0).astype(np.uint8)
        return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class IntensityOutput:
    """How a denoiser's output (normalised units) is stored: back in raw units, as `dtype`.

    Integer dtypes are rounded and clipped to their range, so a denoised uint8 stack stays uint8.
    """

    normalization: Normalization
    dtype: np.dtype

    def encode(self, plane: np.ndarray) -> np.ndarray:
        raw = plane * self.normalization.std + self.normalization.mean
        if self.dtype.kind in "ui":
            limits = np.iinfo(self.dtype)
            return np.clip(np.rint(raw), limits.min, limits.max).astype(self.dtype)
        return raw.astype(self.dtype)


def stack_normalization(stack: TiffStack, *, max_planes: int = 16, max_pixels: int = 4_000_000) -> Normalization:
    """Mean/std of a stack from up to `max_planes` evenly spaced, subsampled planes (one pass)."""
    indices = np.unique(np.linspace(0, len(stack) - 1, min(len(stack), max_planes)).astype(int))
    per_plane = max(1, max_pixels // len(indices))
    samples = []
    for index in indices:
        plane = stack.plane(int(index))
        stride = max(1, int(np.sqrt(plane.size / per_plane)))
        samples.append(plane[::stride, ::stride].astype(np.float64).ravel())
    values = np.concatenate(samples)
    return Normalization(mean=float(values.mean()), std=float(max(values.std(), 1e-6)))


def choose_normalization(stack: TiffStack, info: CheckpointInfo, *, mode: str = "auto") -> tuple[Normalization, str]:
    """The normalisation to use and a note for the user ('' when there is nothing to say).

    checkpoint: the training data's statistics; stack: this stack's, computed once; auto: the
    checkpoint's unless the stack's dtype differs from the training data's (then the stack's).
    """
    if mode not in ("auto", "checkpoint", "stack"):
        raise SegkitError(f"unknown normalisation {mode!r}; choose auto, checkpoint or stack")
    trained_dtype = info.inference.get("input_dtype")
    if mode == "stack":
        return stack_normalization(stack), ""
    if mode == "auto" and trained_dtype and trained_dtype != str(stack.dtype):
        return stack_normalization(stack), (
            f"input is {stack.dtype} but the model was trained on {trained_dtype}: "
            "normalising with this stack's statistics"
        )
    return info.normalization, ""


def normalized_planes(stack: TiffStack, normalization: Normalization, *, prefetch: int = 2) -> Iterator[np.ndarray]:
    """Planes as float32 (x - mean) / std, decoded ahead by a reader thread."""
    buffer: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def read() -> None:
        try:
            for index in range(len(stack)):
                if stop.is_set():
                    return
                plane = stack.plane(index).astype(np.float32)
                plane -= normalization.mean
                plane /= normalization.std
                buffer.put(plane)
            buffer.put(done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            buffer.put(exc)

    reader = threading.Thread(target=read, name="segkit-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.05)


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

    def stream() -> Iterator[T]:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

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

    worker = threading.Thread(target=run, name="segkit-writer", daemon=True)
    worker.start()

    def put(item: object) -> None:
        while worker.is_alive():
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
    except BaseException as exc:
        put(_Failure(exc))
        worker.join()
        raise
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def count_tiles(stack: TiffStack, geometry: Geometry, tile: int) -> int:
    return plan_tiles(stack.shape[1:], geometry, tile=tile).n_tiles * len(stack)


def predict_stack(
    stack: TiffStack,
    forward: Forward,
    geometry: Geometry,
    output: str | Path,
    /,
    *,
    normalization: Normalization,
    tile: int,
    batch: int = 4,
    blend: str = "cosine",
    spec: OutputSpec | IntensityOutput = OutputSpec(),
    overwrite: bool = False,
    on_tiles: Callable[[int], None] | None = None,
) -> Path:
    """Run every plane of `stack` through `forward` and write channel 0, encoded by `spec`, to
    `output` (atomically): a class probability (OutputSpec) or denoised intensities (IntensityOutput)."""
    plan_tiles(stack.shape[1:], geometry, tile=tile)  # fail on a bad tile before any work
    planes = normalized_planes(stack, normalization)
    probabilities = predict_planes(planes, forward, geometry, tile=tile, batch=batch, blend=blend, on_tiles=on_tiles)
    encoded = (spec.encode(p[0]) for p in probabilities)
    shape = stack.shape[1:] if stack.is_2d else stack.shape

    def write(planes: Iterable[np.ndarray]) -> Path:
        return write_stack(output, planes, shape=shape, dtype=spec.dtype, resolution=stack.resolution,
                           overwrite=overwrite)

    return consume_behind(write, encoded)
