"""Streaming TIFF input and output: one plane at a time in, one plane at a time out.

Reading never loads a whole stack: a plane of an uncompressed contiguous stack is read straight
from its file offset, other stacks are decoded page by page. (Memory-mapping would make every
touched page of the file count in the process's resident memory, which then grows with the
stack; offset reads keep it flat.) Compressed pages are decoded with their blocks or strips spread over
all cores.

Writing produces what Fiji, ImageJ, Bio-Formats and napari open as intended: an ImageJ hyperstack
(classic TIFF, strips, ImageJ's description with slices, channels, unit and z spacing) below 4 GiB,
an OME-TIFF (BigTIFF, tiles, OME-XML physical sizes) above, both recording the input's calibration
and what the output holds. The file is written under a temporary name that is renamed only when
every plane is written, so a failure never leaves a file that looks complete; its strips or tiles
are compressed in parallel, about one plane at a time.
"""

from __future__ import annotations

import difflib
import glob
import logging
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from segkit import memory
from segkit._optional import require
from segkit.errors import InputError, SegkitError
from segkit.io.calibration import (
    CONTENT_KEY,
    CONTENTS,
    Calibration,
    calibration_from_resolution,
    description_metadata,
    tiff_calibration,
)
from segkit.io.outputs import atomic_path, check_output
from segkit.words import counted

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)
#: Label stacks (ground truth, instances) may also be 32-bit integers (float is refused with its own message).
LABEL_DTYPES = SUPPORTED_DTYPES + (np.uint32, np.int32)
_TIFF_ERRORS = (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError, EOFError,
                RuntimeError, struct.error)


@dataclass(frozen=True)
class Resolution:
    """The resolution tags of an input, as stored (outputs carry a `Calibration` instead, which also
    knows z and every unit dialect).

    Attributes
    ----------
    x, y : float
        TIFF XResolution and YResolution: pixels per unit.
    unit : int
        TIFF ResolutionUnit code: 1 none, 2 inch, 3 centimeter.
    unit_name : str or None
        The ImageJ unit the resolution counts pixels per when ResolutionUnit is none (e.g. 'um'); None
        when the file has none.
    """

    x: float
    y: float
    unit: int  # TIFF ResolutionUnit code: 1 none, 2 inch, 3 centimeter
    unit_name: str | None = None  # ImageJ unit ('um', 'micron', 'nm', ...), None when the file has none

    @property
    def pixel_size_um(self) -> float | None:
        """Micrometres per pixel (x; the mean of x and y where they differ by more than 1 %), or None
        where the file holds no calibration: no known unit, or a TIFF default (1 pixel per unit without
        an ImageJ unit, 72 dpi, a screen default).
        """
        calibration = calibration_from_resolution(float(self.x), float(self.y), int(self.unit), self.unit_name)
        return calibration.pixel_size_um if calibration is not None else None


class TiffStack:
    """A read-only ZYX view of one TIFF file or of a list of 2D TIFF files.

    Planes are read one at a time, never the whole stack; each is returned as a fresh numpy array.
    Use it as a context manager (or call `close`), or open it with `open_stack`.

    Parameters and errors as in `open_stack`.

    Attributes
    ----------
    shape : tuple of (int, int, int)
        (Z, H, W); Z = 1 for a 2D image.
    channels : int
        Channels of each plane: 1 for grayscale; CYX, ZCYX and RGB/RGBA images have more.
    dtype : numpy.dtype
        uint8, uint16 or float32 (labels also uint32, int32).
    resolution : Resolution or None
        The resolution tags, as stored.
    calibration : Calibration or None
        Pixel sizes x, y (and z where the file says) with their unit (`segkit.io.calibration`), carried
        to outputs; None where the file holds no calibration.
    pixel_size : float or None
        Micrometres per pixel in the plane, or None where the file holds no calibration.
    """

    def __init__(self, source: str | Path, *, labels: bool = False, workers: int | None = None,
                 check_memory: bool = True) -> None:
        self.source = str(source)
        self._labels = labels
        self._dtypes = LABEL_DTYPES if labels else SUPPORTED_DTYPES
        self._workers = _worker_count(workers)  # threads decoding one compressed page
        self._check_memory = check_memory
        self._files = list_tiff_files(self.source)
        self._handles: list[tifffile.TiffFile] = []
        self._contiguous: tuple[str, int, np.dtype] | None = None  # (path, data offset, dtype with byte order)
        try:
            if len(self._files) == 1:
                self._open_single(self._files[0])
            else:
                self._open_many(self._files)
        except BaseException:
            self.close()  # no file handle outlives a refused input
            raise

    # -- opening ---------------------------------------------------------------------------
    def _open_single(self, path: str) -> None:
        tif = _open_tiff(path)
        self._handles.append(tif)
        with _fail_on_tifffile_errors(path):
            layout = _image_layout(tif, path, self._dtypes, labels=self._labels)
            page_count = len(tif.pages)
        series, shape = layout.series, layout.shape
        if len(series.pages) > page_count:
            raise InputError(f"{path}: series needs {counted(len(series.pages), 'page')} but the file has {page_count}; the file is truncated")
        self._set_layout(layout, is_2d=layout.is_2d)
        self.resolution = _resolution(tif)
        with _fail_on_tifffile_errors(path):
            self.calibration: Calibration | None = tiff_calibration(tif)
        self.pixel_size: float | None = self.calibration.pixel_size_um if self.calibration is not None else None
        self._pages = list(series.pages)
        if series.dataoffset is not None and series.pages[0].compression == 1:
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            needed = series.dataoffset + int(np.prod(series.shape, dtype=np.int64)) * dtype.itemsize
            if Path(path).stat().st_size < needed:
                raise InputError(f"{path} is truncated: its pixel data needs {needed} bytes, the file has "
                                 f"{Path(path).stat().st_size}; re-export the file")
            self._contiguous = (path, int(series.dataoffset), dtype)
        elif len(self._pages) != layout.page_table.size:
            per_plane = layout.page_table.shape[1]
            planes = counted(shape[0], "plane") + (f" of {per_plane} channels" if per_plane > 1 else "")
            raise InputError(
                f"{path}: stack of {planes} stored in {len(self._pages)} pages is not supported; "
                "re-save it as one page per plane" + (" and channel" if per_plane > 1 else "")
            )
        self._check_plane_memory(path)

    def _open_many(self, paths: list[str]) -> None:
        first = _open_tiff(paths[0])
        self._handles.append(first)
        with _fail_on_tifffile_errors(paths[0]):
            layout = _image_layout(first, paths[0], self._dtypes, labels=self._labels)
        if layout.shape[0] != 1:
            raise InputError(f"{paths[0]}: a folder or glob must hold 2D images, this one has {layout.shape[0]} planes")
        self._set_layout(layout, is_2d=False)
        self.shape = (len(paths), *layout.shape[1:])
        self.resolution = _resolution(first)
        with _fail_on_tifffile_errors(paths[0]):
            calibration = tiff_calibration(first)
        # files of a folder hold no slice spacing of the stack they make up
        self.calibration = Calibration(calibration.x, calibration.y, None, calibration.unit) if (
            calibration is not None and (calibration.x or calibration.y)) else None
        self.pixel_size = self.calibration.pixel_size_um if self.calibration is not None else None
        self._pages = []
        self._check_plane_memory(paths[0])

    def _set_layout(self, layout: _Layout, *, is_2d: bool) -> None:
        self.shape: tuple[int, int, int] = layout.shape
        self.channels: int = layout.channels
        self.is_2d = is_2d
        self.dtype = np.dtype(layout.series.dtype)
        self._page_table = layout.page_table
        self._page_axes = layout.page_axes
        # elements of one page: a channel's (Y, X), or all samples of an RGB page
        self._page_size = self.shape[1] * self.shape[2] * (self.channels if layout.page_axes != "YX" else 1)

    def _check_plane_memory(self, path: str) -> None:
        """Refuse, before any work, planes that cannot be held in memory (a header may claim any size).
        Skipped when the opener says so (a Dask task re-opening a stack its client already checked)."""
        if not self._check_memory:
            return

        if self.channels == 1:
            problem = memory.plane_problem(self.shape[1:], self.dtype.itemsize)
            if problem is not None:
                raise InputError(f"{path}: {problem}")
            return
        # every channel is held as stored and in float32 (normalised, padded); the output has one plane's size
        height, width = self.shape[1:]
        extra = (self.channels - 1) * height * width * (self.dtype.itemsize + 4 * (memory.PLANE_FLOAT32_COPIES - 1))
        need = memory.plane_bytes(self.shape[1:], self.dtype.itemsize) + extra
        available = memory.available_memory()
        if available is not None and need > available:
            raise InputError(
                f"{path}: one plane is {counted(self.channels, 'channel')} of {height} x {width} px and processing it needs "
                f"about {memory.format_bytes(need)} (the channels as float32, their padded copy and the output), but "
                f"{memory.format_bytes(available)} of memory is available; crop or split the planes into smaller "
                "images (e.g. with Fiji or tifffile), or use a machine with more memory"
            )

    # -- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.shape[0]

    def plane(self, index: int) -> np.ndarray:
        """One plane, decoded and checked.

        Parameters
        ----------
        index : int
            Plane index in [0, Z).

        Returns
        -------
        (H, W) or (C, H, W) ndarray of uint8, uint16 or float32
            (H, W) for a single-channel stack, (C, H, W) (channel first, contiguous) for a multi-channel
            one, in the stack's dtype (label stacks also uint32 or int32).

        Raises
        ------
        IndexError
            When `index` is outside the stack.
        InputError
            When the plane cannot be decoded (a truncated or corrupt file), a file of a folder differs from the
            first one, or a float plane holds NaN or inf.
        """
        if not 0 <= index < self.shape[0]:
            raise IndexError(index)
        page_axes = self._page_axes
        try:
            if self._contiguous is not None:
                data = self._read_contiguous_plane(index)
            elif self._pages:
                data = _decode_pages(self._pages, self._page_table[index], self._workers)
            else:
                data, page_axes = self._read_file_plane(index)
        except _TIFF_ERRORS as exc:
            raise InputError(
                f"{self.source}: plane {index} cannot be decoded ({tiff_problem(str(exc))}); the file is truncated "
                "or corrupt: re-export it or copy it again"
            ) from exc
        return check_finite(self._as_plane(data, page_axes), self.source, index)

    def _as_plane(self, data: np.ndarray, page_axes: str) -> np.ndarray:
        """Pages as read, as (H, W) or (C, H, W)."""
        height, width = self.shape[1:]
        data = np.asarray(data)
        if self.channels == 1:
            return data.reshape(height, width)
        if page_axes == "YXS":  # samples interleaved: channel first
            data = data.reshape(height, width, self.channels).transpose(2, 0, 1)
        return np.ascontiguousarray(data.reshape(self.channels, height, width))

    def _read_contiguous_plane(self, index: int) -> np.ndarray:
        path, offset, dtype = self._contiguous  # type: ignore[misc]
        pages, count = self._page_table[index], self._page_size
        if len(pages) == 1 or bool(np.all(np.diff(pages) == 1)):  # one read: YX, ZYX, CYX, ZCYX, RGB
            data = np.fromfile(path, dtype=dtype, count=count * len(pages),
                               offset=offset + int(pages[0]) * count * dtype.itemsize)
        else:  # channels apart (CZYX): one read per channel
            parts = [np.fromfile(path, dtype=dtype, count=count, offset=offset + int(page) * count * dtype.itemsize)
                     for page in pages]
            data = np.concatenate(parts) if all(part.size == count for part in parts) else np.empty(0, dtype)
        if data.size != count * len(pages):
            raise InputError(f"{path}: plane {index} is cut short; the file is truncated")
        return data.astype(dtype.newbyteorder("="), copy=False)

    def _read_file_plane(self, index: int) -> tuple[np.ndarray, str]:
        """File `index` of a folder or glob, checked to match the first file: its pages and their axes."""
        path = self._files[index]
        with _open_tiff(path) as tif:
            layout = _image_layout(tif, path, self._dtypes, labels=self._labels)
            if (layout.shape != (1, *self.shape[1:]) or layout.channels != self.channels
                    or np.dtype(layout.series.dtype) != self.dtype):
                raise InputError(
                    f"{path}: shape {layout.shape[1:]} / {counted(layout.channels, 'channel')} / dtype {layout.series.dtype} "
                    f"differs from the first file's {self.shape[1:]} / {counted(self.channels, 'channel')} / {self.dtype}; "
                    "all files of a folder must match"
                )
            return _decode_pages(list(layout.series.pages), layout.page_table[0], self._workers), layout.page_axes

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.shape[0]):
            yield self.plane(index)

    def close(self) -> None:
        """Close the open file handles (the context manager does it on exit)."""
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "TiffStack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_finite(plane: np.ndarray, source: str, index: int) -> np.ndarray:
    """`plane`, unless it is a float plane holding NaN or inf.

    Parameters
    ----------
    plane : (H, W) or (C, H, W) ndarray
        A plane as read.
    source : str
        The file it came from, for the message.
    index : int
        Its plane index, for the message.

    Returns
    -------
    (H, W) or (C, H, W) ndarray
        `plane` itself.

    Raises
    ------
    InputError
        When a float plane holds NaN or inf (the message names the fix).
    """
    if plane.dtype.kind == "f" and not np.isfinite(plane).all():
        raise InputError(f"{source}: plane {index} contains NaN or inf values; replace them "
                         "(e.g. numpy.nan_to_num) before segmenting")
    return plane


def open_stack(source: str | Path, *, labels: bool = False, workers: int | None = None,
               check_memory: bool = True) -> TiffStack:
    """Open a TIFF, a folder of 2D TIFFs or a glob of them as a lazy ZYX stack.

    Single-channel or multi-channel (CYX, ZCYX, RGB/RGBA: `channels` > 1, planes (C, H, W)).

    Parameters
    ----------
    source : str or Path
        A 2D or ZYX TIFF (CYX / ZCYX / RGB for several channels), a folder of 2D TIFFs, or a glob of
        them (sorted by name).
    labels : bool
        Also admit 32-bit integer label stacks (uint32, int32; single-channel only).
    workers : int, optional
        Threads that decode one compressed page; default: up to 4.
    check_memory : bool
        Refuse, before any work, planes that do not fit in memory (off where a caller checked already,
        e.g. a Dask task re-opening a stack its client opened).

    Returns
    -------
    TiffStack
        Open; use it as a context manager.

    Raises
    ------
    InputError
        When the source does not exist, is not a readable TIFF, is damaged or truncated, holds an
        unsupported dtype or layout (4D, pages of differing sizes, several stacks in one file, a folder
        of stacks), or when one plane would not fit in memory; the message names the fix.
    """
    return TiffStack(source, labels=labels, workers=workers, check_memory=check_memory)


#: Default threads for decoding a page and for compressing blocks: measured on a 16-core machine
#: (4 Mpx uint8 planes), decoding was fastest on 4 threads and zlib/zstd writing on 8; more threads
#: only contend.
DECODE_WORKERS, ENCODE_WORKERS = 4, 8


def _worker_count(workers: int | None, default: int = DECODE_WORKERS) -> int:
    return max(1, workers if workers is not None else min(os.cpu_count() or 1, default))


def _decode_pages(pages: list, indices: np.ndarray, workers: int) -> np.ndarray:
    """The pages at `indices` (one plane: one page, or one page per channel), stacked when several."""
    if len(indices) == 1:
        return _decode(pages[int(indices[0])], workers)
    first = _decode(pages[int(indices[0])], workers)
    data = np.empty((len(indices), *first.shape), first.dtype)
    data[0] = first
    for j, page in enumerate(indices[1:], 1):
        data[j] = _decode(pages[int(page)], workers)
    return data


def _decode(page: Any, workers: int) -> np.ndarray:
    """A page's pixels; a compressed page's blocks or strips are decoded on `workers` threads
    (tifffile's own default is half the cores, and one thread for small blocks)."""
    if page.compression == 1:
        return page.asarray()
    return page.asarray(maxworkers=workers)


def list_tiff_files(source: str) -> list[str]:
    """The files a source names: a folder's .tif/.tiff files or a glob's matches (sorted), or the file itself.

    Parameters
    ----------
    source : str
        A file, a folder or a glob (`*`, `?`, `[`).

    Returns
    -------
    list of str

    Raises
    ------
    InputError
        When the folder holds no TIFF, the glob matches nothing, or the file does not exist.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
        if not files:
            if path.suffix.lower() == ".zarr":  # a zarr store is a folder too: only the Dask path reads it
                raise InputError(f"{source} is a zarr store, which segkit reads into OME-Zarr: name the output "
                                 "NAME.ome.zarr (then `segkit convert NAME.ome.zarr NAME.tif` for a TIFF)")
            raise InputError(f"folder {source} holds no .tif/.tiff files; point to a TIFF file or a folder of them")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise InputError(f"no files match {source!r}; check the pattern (quote it in the shell)")
        return files
    if not path.exists():
        raise InputError(f"input {source} does not exist; check the path")
    return [source]


class _ErrorRecorder(logging.Handler):
    """tifffile's errors, and its warnings about page offsets (a damaged first page offset is only a
    warning, after which the file looks empty)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or "invalid offset to first page" in message:
            self.messages.append(message)


#: tifffile's words for damage (after its object names are dropped), and what they mean to a user.
_TIFFFILE_PROBLEMS = (
    ("page offset", "a page offset points outside the file"),
    ("offset to page", "a page offset points outside the file"),
    ("offset to first page", "the offset of its first page points outside the file"),
    ("value offset", "a tag's value points outside the file"),
    ("IFD", "a page directory (IFD) is cut short or corrupt"),
    ("tag list", "a page directory (IFD) is cut short or corrupt"),
    ("number of tags", "a page directory (IFD) claims an impossible number of tags"),
    ("data type", "a tag has an unknown data type"),
    ("cannot be reshaped", "the pixel data of a page is cut short or corrupt"),
    ("ByteCounts", "a page lacks or miscounts the tags that locate its pixel data"),
    ("StripOffsets", "a page lacks or miscounts the tags that locate its pixel data"),
    ("data offset", "a page lacks the tags that locate its pixel data"),
    ("series", "its stack description (ImageJ or tifffile metadata) does not match its pages"),
    ("BigTIFF", "its BigTIFF header is corrupt"),
)


def tiff_problem(message: str) -> str:
    """A tifffile error or log message in a user's words, without tifffile's object names.

    Parameters
    ----------
    message : str
        E.g. "<tifffile.TiffPages @8> invalid page offset 12496".

    Returns
    -------
    str
        E.g. "a page offset points outside the file"; an unknown message's first line, at most 120
        characters.
    """
    text = re.sub(r"<[^<>]*>\s*", "", str(message)).strip()
    for key, meaning in _TIFFFILE_PROBLEMS:
        if key in text:
            return meaning
    text = text.splitlines()[0] if text else "unknown error"
    return text if len(text) <= 120 else text[:117] + "..."


@contextmanager
def _fail_on_tifffile_errors(path: str) -> Iterator[None]:
    """tifffile logs damaged page chains and returns what it could read; segkit refuses instead."""
    logger = logging.getLogger("tifffile")
    recorder = _ErrorRecorder()
    logger.addHandler(recorder)
    try:
        yield
    except _TIFF_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # permissions, a vanished mount: not damage
            raise InputError(f"{path} cannot be read ({exc.strerror}); check that it exists and is readable") from exc
        raise InputError(f"{path} is damaged or truncated: {tiff_problem(str(exc))}; re-export the file or "
                         "copy it again") from exc
    finally:
        logger.removeHandler(recorder)
    if recorder.messages:
        raise InputError(f"{path} is damaged or truncated: {tiff_problem(recorder.messages[0])}; re-export the "
                         "file or copy it again")


def check_regular_file(path: str | Path) -> None:
    """Refuse a path that is not a regular file (a FIFO, a device, a socket): reading one blocks forever
    or never ends (/dev/zero). Symlinks to regular files are fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a missing file is reported where it is opened, with its own message
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(f"{path} is {kind}, not an image file; point to a TIFF file or a folder of them")


def _open_tiff(path: str) -> tifffile.TiffFile:
    check_regular_file(path)
    try:
        with _fail_on_tifffile_errors(path):
            return tifffile.TiffFile(path)
    except InputError as exc:
        problem = exc.__cause__
        if isinstance(problem, tifffile.TiffFileError) and "not a TIFF file" in str(problem):
            size = Path(path).stat().st_size
            what = "it is empty (0 bytes)" if size == 0 else "it does not start with a TIFF header"
            raise InputError(f"{path} is not a readable TIFF file: {what}; segkit reads TIFF (.tif/.tiff) "
                             "images") from problem
        raise


@dataclass(frozen=True)
class _Layout:
    """Where a file's planes are: its series, the stack's (Z, H, W) shape and channel count, and for
    each plane the indices of its pages in the series (one page, or one page per channel)."""

    series: Any
    shape: tuple[int, int, int]
    channels: int
    page_table: np.ndarray  # (Z, pages per plane): C for CYX/ZCYX, else 1
    page_axes: str  # the axes of one page: YX, YXS (RGB, contiguous) or SYX (RGB, planar)
    is_2d: bool


def _image_layout(tif: tifffile.TiffFile, path: str, dtypes: tuple[type, ...] = SUPPORTED_DTYPES, *,
                  labels: bool = False) -> _Layout:
    """The first series, checked to be a 2D image or a ZYX stack, single-channel or with one channel
    axis (CYX, ZCYX, RGB/RGBA samples), and where its planes are."""
    if not tif.series or not tif.pages:
        raise InputError(f"{path}: the TIFF holds no images (empty stack); export at least one plane")
    series = _one_series(tif, path)
    axes, shape = series.axes, tuple(series.shape)
    if any(n == 0 for n in shape):
        raise InputError(f"{path}: the stack is empty (shape {shape}); export at least one plane")
    sizes = dict(zip(axes, shape))
    samples, channels = sizes.get("S", 1), sizes.get("C", 1)
    if labels and samples > 1:
        raise InputError(f"{path}: RGB/multi-sample labels ({samples} samples per pixel); save the labels as a "
                         "single-channel image")
    if labels and channels > 1:
        raise InputError(f"{path}: multi-channel labels ({channels} channels, axes {axes}); save the labels as a "
                         "single-channel image")
    if samples > 1 and channels > 1:
        raise InputError(f"{path}: image with {channels} channels of {samples} samples per pixel (axes {axes}); "
                         "segkit reads one channel axis: save it as a ZCYX stack of single-sample channels, or "
                         "as RGB planes")
    page_axes = next((a for a in ("YXS", "SYX", "YX") if axes.endswith(a)), None)
    if page_axes is None or axes.count("S") > 1 or axes.count("C") > 1:
        raise InputError(f"{path}: unsupported axes {axes}; expected YX, ZYX, CYX, ZCYX or RGB (YXS); re-save "
                         "it in one of these layouts (e.g. with Fiji or tifffile)")
    lead = axes[: len(axes) - len(page_axes)]
    lead_shape = shape[: len(lead)]
    if "S" in lead:
        raise InputError(f"{path}: unsupported axes {axes} (samples outside the pages); re-save it as CYX, "
                         "ZCYX or RGB (YXS)")
    extra = [(a, n) for a, n in zip(lead, lead_shape) if n > 1 and a != "C"]
    if len(extra) > 1:
        split = " and ".join(a for a, _ in extra[:-1])
        raise InputError(f"{path}: {sum(n > 1 for n in shape)}D image (axes {axes}, shape {shape}); expected a 2D image or "
                         f"a ZYX stack, optionally with channels (CYX, ZCYX, RGB): split it into one stack per "
                         f"{split} (e.g. with Fiji or tifffile)")
    if np.dtype(series.dtype) not in [np.dtype(d) for d in dtypes]:
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise InputError(f"{path}: dtype {series.dtype} is not supported; convert to one of {names}")
    depth = extra[0][1] if extra else 1
    # page indices in the series (C order of the leading axes), kept along Z and C, Z first
    kept = [a for a, n in zip(lead, lead_shape) if n > 1]
    count = int(np.prod(lead_shape, dtype=np.int64))
    table = np.arange(count).reshape(lead_shape)[tuple(slice(None) if n > 1 else 0 for n in lead_shape)]
    if kept[:1] == ["C"] and len(kept) == 2:
        table = table.T
    return _Layout(series, (depth, sizes["Y"], sizes["X"]), max(samples, channels), table.reshape(depth, -1),
                   page_axes, not extra)


@dataclass(frozen=True)
class _PageStack:
    """Equal 2D pages written as separate images (one `TiffWriter.write` per plane, ImageJ's
    "append"), read as one ZYX stack, as Fiji shows them: the part of a tifffile series segkit uses."""

    pages: list
    shape: tuple[int, int, int]
    dtype: np.dtype
    axes: str = "ZYX"
    dataoffset: None = None


def _one_series(tif: tifffile.TiffFile, path: str) -> Any:
    """The file's one image: its first series, or equal 2D pages written as separate images, as one
    stack. A file of several different images (pages of other sizes or dtypes, or stacks of
    their own) is refused, naming its pages: reading its first image alone would drop the others
    silently. Reduced-resolution pages (pyramid levels, thumbnails) are not images of their own."""
    images = [s for s in tif.series if not getattr(s.pages[0], "is_reduced", False)] if len(tif.series) > 1 else []
    if len(images) < 2:
        return tif.series[0]
    kinds = {(tuple(s.shape[-2:]), np.dtype(s.dtype)) for s in images}
    if len(kinds) == 1 and all(len(s.pages) == 1 and s.axes[-2:] == "YX" and len(s.shape) == 2 for s in images):
        pages = [s.pages[0] for s in images]
        return _PageStack(pages, (len(pages), *images[0].shape[-2:]), np.dtype(images[0].dtype))
    parts = []
    for series in images[:4]:
        indices = [page.index for page in series.pages if page is not None]
        plane = "x".join(str(n) for n in series.shape[-2:])
        parts.append(f"{_page_ranges(indices)} ({plane} {np.dtype(series.dtype).name})")
    more = f", ... ({len(images)} images in all)" if len(images) > 4 else ""
    if len(kinds) > 1:
        raise InputError(f"{path} holds pages of different shapes or dtypes: {', '.join(parts)}{more}; segkit reads "
                         "a stack of equal pages: split the file into one TIFF per image (e.g. with tifffile or "
                         "Fiji's Stack Splitter) and segment each")
    raise InputError(f"{path} holds {len(images)} separate images: {', '.join(parts)}{more}; segkit reads one "
                     "stack: re-save them as one stack, or split the file into one TIFF per image (e.g. with "
                     "tifffile or Fiji)")


def _page_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 4] -> 'pages 0-2, 4'; [3] -> 'page 3'."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:4]) + (", ..." if len(runs) > 4 else "")
    return ("pages " if len(indices) > 1 else "page ") + text


def _resolution(tif: tifffile.TiffFile) -> Resolution | None:
    page = tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    try:
        x, y = page.resolution
        return Resolution(float(x), float(y), int(page.resolutionunit), _metadata_unit(tif))
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _metadata_unit(tif: tifffile.TiffFile) -> str | None:
    """The length unit of the resolution tags stored by ImageJ (its description's `unit`), or by
    write_stack (the `unit` of tifffile's JSON description); None where there is none."""
    unit = description_metadata(tif).get("unit")
    if unit is None:
        return None
    return str(unit).strip() or None


def pixel_size_um(path: str | Path) -> float | None:
    """Micrometres per pixel of one TIFF file from its resolution tags and unit.

    Parameters
    ----------
    path : str or Path
        A TIFF file.

    Returns
    -------
    float or None
        From OME-XML's physical sizes, the ImageJ unit, or ResolutionUnit centimetre / inch; None where
        the file holds no calibration (see `segkit.io.calibration.tiff_calibration`).

    Raises
    ------
    InputError
        When the file is not a readable TIFF or is damaged.
    """
    path = str(path)
    with _open_tiff(path) as tif, _fail_on_tifffile_errors(path):
        calibration = tiff_calibration(tif)
    return calibration.pixel_size_um if calibration is not None else None


# -- writing -------------------------------------------------------------------------------

def check_output_path(path: str | Path, *, overwrite: bool) -> Path:
    """Check an output path before any work (`segkit.io.outputs.check_output`, any file name).

    Parameters
    ----------
    path : str or Path
        The output file.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path

    Raises
    ------
    OutputExistsError
        When the file exists and `overwrite` is false.
    OutputError
        When a folder is where the file goes, or the output folder is missing, read-only or full.
    """
    return check_output(path, kind=None, overwrite=overwrite)


#: write_stack's compressions; zlib is TIFF's "Adobe deflate" (tag 8), which every reader (Fiji too) opens.
COMPRESSIONS = ("zlib", "zstd", "lzw", "none")
#: tifffile's name and arguments for each (level 1: the fastest, and far smaller than uncompressed).
_CODECS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "zlib": ("zlib", {"level": 1}), "zstd": ("zstd", {"level": 1}), "lzw": ("lzw", {}), "none": (None, {}),
}
#: The compressions ImageJ's own TIFF reader decodes (ij/io/TiffDecoder: none, LZW, PackBits, deflate).
#: zstd is not one of them: a zstd output is written as OME-TIFF, which Fiji opens through Bio-Formats
#: (6.11 or later reads zstd), and tifffile/napari with imagecodecs.
IMAGEJ_COMPRESSIONS = ("zlib", "lzw", "none")
#: Bytes a classic TIFF's 32-bit offsets address: an ImageJ hyperstack must stay below this.
CLASSIC_TIFF_LIMIT = 2**32
#: How much each compression can grow incompressible pixel data, at worst: deflate falls back to stored
#: blocks (zlib's deflateBound: +0.03 %); LZW's codes reach 12 bits per 8-bit symbol (+50 %; random
#: bytes measured +37 % with imagecodecs). The format is chosen before the first plane is compressed,
#: so the choice has to hold for any pixel values.
_WORST_GROWTH = {"zlib": 1.001, "lzw": 1.5, "none": 1.0}
#: Bytes around the pixels, at most: a page's directory and tag values (under 1 KiB; ImageJ's description
#: and tifffile's tags are on the first page only), 8 per strip (its offset and byte count), the header.
_PAGE_OVERHEAD, _STRIP_OVERHEAD, _FILE_OVERHEAD = 1024, 8, 65536
#: Strips of about 256 KiB (tifffile's default), at least 16 KiB: each strip is one compression job.
_STRIP_BYTES, _MIN_STRIP_BYTES = 262144, 16384
#: Axes write_stack takes, by rank; a channel axis is stored after Z (ImageJ's XYCZT order, channel fastest).
_AXES = {2: ("YX",), 3: ("ZYX", "CYX"), 4: ("ZCYX",)}


def stored_dtype(dtype: np.dtype | type | str) -> np.dtype:
    """The dtype write_stack stores for `dtype`: float16 as float32 (neither ImageJ nor OME-XML has a
    16-bit float pixel type; float32 holds every float16 value exactly), others unchanged."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def output_format(shape: tuple[int, ...], dtype: np.dtype | type | str, compression: str = "zlib", *,
                  limit: int = CLASSIC_TIFF_LIMIT) -> str:
    """Which format write_stack writes: 'imagej' (a classic-TIFF hyperstack that ImageJ's own reader,
    Fiji's File > Open, opens with its calibration) where the file is sure to stay below `limit`, else
    'ome' (an OME-TIFF BigTIFF, which Bio-Formats reads).

    Parameters
    ----------
    shape : tuple of int
        YX, ZYX, CYX or ZCYX.
    dtype : numpy.dtype or type
        The dtype asked for (float16 counts as the float32 it is stored as).
    compression : str
        One of `COMPRESSIONS`; zstd always gives 'ome' (ImageJ cannot decode it).
    limit : int
        Largest classic TIFF file, in bytes (tests pass a small one to get the OME path).

    Returns
    -------
    str
        'imagej' or 'ome'.

    Notes
    -----
    The decision is made before any plane is compressed, so it uses the uncompressed size times the
    compression's worst-case growth on incompressible data, plus every page directory and strip
    entry: a classic TIFF that ran past 4 GiB would fail at its end (its offsets are 32-bit), after
    all the work. A stack that would compress to much less than 4 GiB may therefore still be written
    as OME-TIFF.
    """
    if compression not in IMAGEJ_COMPRESSIONS:
        return "ome"
    dtype = stored_dtype(dtype)
    height, width = shape[-2:]
    pages = int(np.prod(shape[:-2], dtype=np.int64))
    strips = -(-height // min(height, -(-_MIN_STRIP_BYTES // (width * dtype.itemsize))))  # at most: the smallest strips
    pixels = pages * height * width * dtype.itemsize
    need = pixels * _WORST_GROWTH[compression] + pages * (_PAGE_OVERHEAD + strips * _STRIP_OVERHEAD) + _FILE_OVERHEAD
    return "imagej" if need < limit else "ome"


def _rows_per_strip(height: int, row_bytes: int, workers: int) -> int:
    """Rows of one strip: about 256 KiB (tifffile's default), but at least `workers` strips a plane
    (each strip is a compression job: a plane of few strips would leave threads idle), and strips no
    smaller than 16 KiB (smaller ones compress worse and cost a directory entry each)."""
    rows = -(-_STRIP_BYTES // max(1, row_bytes))
    rows = min(rows, max(-(-height // workers), -(-_MIN_STRIP_BYTES // max(1, row_bytes))))
    return max(1, min(rows, height))


def write_stack(
    path: str | Path,
    planes: Iterable[np.ndarray],
    /,
    *,
    shape: tuple[int, ...],
    dtype: np.dtype | type,
    axes: str | None = None,
    calibration: Calibration | None = None,
    content: str | None = None,
    overwrite: bool = False,
    block: int = 256,
    compression: str = "zlib",
    compression_level: int = 1,
    workers: int | None = None,
    imagej_limit: int = CLASSIC_TIFF_LIMIT,
) -> Path:
    """Write planes, as they arrive, to a TIFF that Fiji, ImageJ, Bio-Formats and napari open (atomically).

    Below 4 GiB (`output_format`) the file is an ImageJ hyperstack: classic TIFF, strips, axes in the
    ImageJ description (slices, channels), the calibration as resolution tags with ImageJ's `unit` and
    `spacing` (z), in micrometres. Larger ones, and zstd outputs, are OME-TIFF: BigTIFF, `block` x
    `block` tiles, the calibration as OME-XML physical sizes in the calibration's own unit. Both record
    `content` (`segkit.io.calibration.read_content`). float16 is stored as float32 (`stored_dtype`).

    The file is written under a temporary name and renamed when every plane is written. Strips or tiles
    are compressed on `workers` threads, about one plane's worth at a time, so memory does not grow with
    the stack.

    Parameters
    ----------
    path : str or Path
        The output file (.tif / .tiff).
    planes : iterable of (Y, X) ndarray
        One (Y, X) plane per item, in C-order of the leading axes: for ZCYX, z0c0, z0c1, ..., z1c0, ...
        (channel fastest, as ImageJ/Fiji expect: one page per plane in that order).
    shape : tuple of int
        ZYX, YX for a single 2D image (stored without a Z axis), or with a channel axis ZCYX / CYX.
    dtype : numpy.dtype or type
        The dtype of the planes; they are cast to `stored_dtype(dtype)`.
    axes : str, optional
        'YX', 'ZYX', 'CYX' or 'ZCYX'; by default ZYX or YX by rank.
    calibration : Calibration, optional
        The pixel sizes x, y, z and their unit (the input's, `TiffStack.calibration`); None writes none.
    content : str, optional
        What the planes hold, one of `segkit.io.calibration.CONTENTS` ('probabilities', 'classes',
        'labels', 'intensities'), so readers (the napari plugin) open labels as labels.
    overwrite : bool
        Replace an existing file.
    block : int
        Tile size in px of the OME-TIFF (a multiple of 16).
    compression : str
        One of `COMPRESSIONS`: 'zlib' (default; every reader opens it), 'lzw', 'none', or 'zstd' (the
        fastest; written as OME-TIFF since ImageJ's own reader cannot decode it).
    compression_level : int
        Level of zlib and zstd.
    workers : int, optional
        Compression threads; default: up to 8.
    imagej_limit : int
        Largest file written as an ImageJ hyperstack (classic TIFF), in bytes.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    SegkitError
        When `compression` is unknown (naming the closest choice).
    MissingDependencyError
        When zstd or lzw is asked for without imagecodecs.
    OutputExistsError, OutputError
        From `check_output_path`, before anything is written.
    ValueError
        When a plane has another shape than (Y, X), the number of planes does not match `shape`, `axes`
        does not fit `shape`, or `content` is unknown (a programming error, not a user's).
    """
    dtype = stored_dtype(dtype)
    axes = _check_axes(shape, axes)
    if content is not None and content not in CONTENTS:
        raise ValueError(f"content {content!r}: expected one of {', '.join(CONTENTS)}")
    codec, codec_args = _codec(compression, compression_level)
    path = check_output_path(path, overwrite=overwrite)
    height, width = shape[-2:]
    out = _Output(tuple(shape), axes, dtype, calibration if calibration and not calibration.is_empty else None,
                  content, codec, codec_args, _worker_count(workers, ENCODE_WORKERS))
    pages = _CheckedPlanes(planes, (height, width), dtype, int(np.prod(shape[:-2], dtype=np.int64)))
    with atomic_path(path) as tmp:
        if output_format(shape, dtype, compression, limit=imagej_limit) == "imagej":
            _write_imagej(tmp, pages, out)
        else:
            _write_ome(tmp, pages, out, block)
        # tifffile stops pulling at the pages `shape` holds: a plane beyond them is an error too (this also
        # runs the count check of the exhausted planes), and the temporary file is removed
        if next(pages, None) is not None:
            raise ValueError(f"more planes than shape {tuple(shape)} holds")
    return path


@dataclass(frozen=True)
class _Output:
    """What write_stack writes, whatever the format."""

    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype
    calibration: Calibration | None
    content: str | None
    codec: str | None
    codec_args: dict[str, Any]
    workers: int


class _CheckedPlanes:
    """The planes cast to `dtype`, each checked to be (Y, X), and their number to be `count_expected`.

    An iterator object, not a generator: tifffile closes a generator it stops pulling from, and the
    caller must still be able to ask for one plane more (`write_stack` refuses a plane beyond the shape)."""

    def __init__(self, planes: Iterable[np.ndarray], plane_shape: tuple[int, int], dtype: np.dtype,
                 count_expected: int) -> None:
        self._planes = iter(planes)
        self._shape, self._dtype, self._expected = plane_shape, dtype, count_expected
        self.count = 0

    def __iter__(self) -> "_CheckedPlanes":
        return self

    def __next__(self) -> np.ndarray:
        try:
            plane = next(self._planes)
        except StopIteration:
            if self.count != self._expected:
                raise ValueError(f"got {counted(self.count, 'plane')}, expected {self._expected}") from None
            raise
        if plane.shape != self._shape:
            raise ValueError(f"plane of shape {plane.shape}, expected {self._shape}")
        self.count += 1
        return np.ascontiguousarray(plane, dtype=self._dtype)


def _compression_args(out: _Output, chunks_per_plane: int, chunk_bytes: int) -> dict[str, Any]:
    """tifffile's compression arguments: `out.workers` threads (at most two per chunk of a plane), and
    batches of one plane's chunks. tifffile pulls max(maxworkers, buffersize // chunk bytes) chunks
    from the planes, encodes them on maxworkers threads, writes them and repeats; its default
    buffersize (512 MiB) would hold about a hundred 4 Mpx planes, one plane keeps memory flat in the
    number of planes (and starts compressing as soon as the first plane arrives)."""
    if out.codec is None:
        return {}
    return {"compression": out.codec, "compressionargs": out.codec_args,
            "maxworkers": min(out.workers, 2 * chunks_per_plane), "buffersize": chunks_per_plane * chunk_bytes}


def _write_imagej(tmp: Path, pages: Iterable[np.ndarray], out: _Output) -> None:
    """An ImageJ hyperstack: classic TIFF (ImageJ's opener reads no BigTIFF), strips (it rejects tiles),
    one page per plane in ImageJ's order, and ImageJ's description. The description is made with
    tifffile's `imagej_description` and written as a plain one, which tifffile allows for every dtype
    (its `imagej=True` refuses uint32: ImageJ opens uint32 label stacks as 32-bit images, exact up to
    2**24 ids)."""
    height, width = out.shape[-2:]
    row_bytes = width * out.dtype.itemsize
    rows = _rows_per_strip(height, row_bytes, out.workers)
    extra = _compression_args(out, -(-height // rows), rows * row_bytes)
    if extra:
        extra["rowsperstrip"] = rows
    metadata: dict[str, Any] = {}
    calibration = out.calibration.in_unit("micrometer") if out.calibration is not None else None
    if calibration is not None and calibration.x is not None and calibration.y is not None:
        # ImageJ counts pixels per its `unit`; Bio-Formats reads `spacing` as micrometres whatever the unit
        # (7.3.1, measured), so the file states micrometres for both to agree. Without x and y a unit would
        # turn the TIFF default of 1 pixel per unit into an invented 1 um pixel: no calibration is written then.
        extra.update(resolution=(1.0 / calibration.x, 1.0 / calibration.y), resolutionunit=1)
        metadata["unit"] = calibration.imagej_unit
        if calibration.z is not None and "Z" in out.axes:
            metadata["spacing"] = calibration.z
    if out.content == "probabilities" and out.dtype.kind == "f":
        metadata.update(min=0.0, max=1.0)  # the display range of probabilities, not of the first slice
    if out.content is not None:
        metadata[CONTENT_KEY] = out.content
    description = tifffile.imagej_description(out.shape, axes=out.axes, **metadata)
    with tifffile.TiffWriter(tmp, bigtiff=False) as writer:
        writer.write(pages, shape=out.shape, dtype=out.dtype, photometric="minisblack", description=description,
                     metadata=None, **extra)


def _write_ome(tmp: Path, pages: Iterable[np.ndarray], out: _Output, block: int) -> None:
    """An OME-TIFF: BigTIFF, `block` x `block` tiles, OME-XML with the axes, the physical sizes in the
    calibration's unit and `segkit_content=...` in the image's Description."""
    height, width = out.shape[-2:]
    blocks_per_plane = -(-height // block) * -(-width // block)
    extra = _compression_args(out, blocks_per_plane, block * block * out.dtype.itemsize)
    metadata: dict[str, Any] = {"axes": out.axes}
    calibration = out.calibration
    if calibration is not None:
        for axis, size in (("X", calibration.x), ("Y", calibration.y), ("Z", calibration.z)):
            if size is not None and axis in out.axes:
                metadata.update({f"PhysicalSize{axis}": size, f"PhysicalSize{axis}Unit": calibration.ome_unit})
        if calibration.x is not None and calibration.y is not None:  # for readers of the tags alone: per cm
            cm = calibration.in_unit("centimeter")
            extra.update(resolution=(1.0 / cm.x, 1.0 / cm.y), resolutionunit=3)
    if out.content is not None:
        metadata["Description"] = f"{CONTENT_KEY}={out.content}"

    def tiles() -> Iterator[np.ndarray]:
        for plane in pages:
            for y in range(0, height, block):
                for x in range(0, width, block):
                    yield plane[y : y + block, x : x + block]

    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as writer:
        writer.write(tiles(), shape=out.shape, dtype=out.dtype, tile=(block, block), photometric="minisblack",
                     metadata=metadata, **extra)


def _check_axes(shape: tuple[int, ...], axes: str | None) -> str:
    choices = _AXES.get(len(shape))
    if choices is None:
        raise ValueError(f"shape must be YX, ZYX, CYX or ZCYX, got {shape}")
    axes = choices[0] if axes is None else axes.upper()
    if axes not in choices:
        raise ValueError(f"axes {axes!r} for shape {shape}: expected one of {', '.join(choices)} "
                         "(a channel axis goes after Z: ZCYX, channel fastest, as ImageJ stores it)")
    return axes


def _codec(compression: str, level: int) -> tuple[str | None, dict[str, Any]]:
    """tifffile's compression name and arguments for one of COMPRESSIONS (SegkitError otherwise)."""
    if compression not in _CODECS:
        close = difflib.get_close_matches(str(compression), COMPRESSIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SegkitError(f"unknown compression {compression!r}{hint}; choose one of {', '.join(COMPRESSIONS)}")
    codec, args = _CODECS[compression]
    if compression in ("zstd", "lzw"):  # tifffile encodes these with imagecodecs only
        require("imagecodecs", feature=f"{compression} compression", package="imagecodecs")
    return codec, ({**args, "level": level} if "level" in args else dict(args))
