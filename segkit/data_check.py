"""The public data sets the recipes, tests and benchmarks read (ISBI 2012, BBBC039, AxonDeepSeg SEM): where
they live (`data_root`: $SEGKIT_DATA), what each folder must hold (the catalogue, `segkit/data/datasets.json`:
source, licence, citation, layout, split, and every file), and a check of a folder against that list
(`check_dataset`, what `segkit data check` prints). segkit downloads nothing.

A file is compared by what segkit reads of it, so a correct copy passes however it was saved: an image (TIFF)
by its shape, dtype, pixel size (where the reference copy has one) and the sha256 of its decoded pixels,
whatever its compression, strips, tiles or byte order; a text file (a split list) by its size and the
sha256 of its bytes. `catalog_entry` describes a file the way the catalogue does
(tools/make_data_catalog.py writes the catalogue with it).

Pure functions over paths and the catalogue; no torch, no global state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from segkit.errors import InputError
from segkit.io.calibration import tiff_calibration

#: The catalogue of data sets, shipped as package data (pyproject's package-data: data/*.json).
CATALOG = Path(__file__).parent / "data" / "datasets.json"

#: Bytes read at a time while hashing a text file (the progress callback is called once per chunk).
CHUNK = 1 << 20

#: File names segkit reads as images (TIFF only: `segkit.io.tiff` reads the recipes' images and labels).
IMAGE_SUFFIXES = (".tif", ".tiff")

#: Pixel sizes within this relative difference are the same (resolution tags store them as fractions).
PIXEL_SIZE_TOLERANCE = 1e-3

#: What reading a damaged or foreign file raises in tifffile and its codecs (imagecodecs' errors are
#: RuntimeErrors).
_READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, EOFError, RuntimeError,
                struct.error)


@dataclass(frozen=True)
class TextFile:
    """A text file a data set's folder must hold (a split list): its path in the folder (`/`-separated), size
    and the sha256 of its bytes."""

    path: str
    size: int
    sha256: str

    @property
    def nbytes(self) -> int:
        """Bytes hashed to check it."""
        return self.size


@dataclass(frozen=True)
class ImageFile:
    """An image (TIFF) a data set's folder must hold: its path in the folder, the shape and dtype of its first
    series as tifffile reads it, its pixel size in micrometres (None: not checked, the reference copy has
    none) and the sha256 of its decoded pixels (`pixels_sha256`)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    pixels_sha256: str
    pixel_size_um: float | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of its decoded pixels, hashed to check it."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


ExpectedFile = TextFile | ImageFile


@dataclass(frozen=True)
class DataSet:
    """A catalogue entry: the folder name under the data root, where the data comes from and what it holds."""

    name: str
    title: str
    source: str
    license: str
    citation: str
    layout: str
    split: str
    recipes: tuple[str, ...]
    files: tuple[ExpectedFile, ...]

    @property
    def images(self) -> int:
        """How many of its files are images."""
        return sum(isinstance(f, ImageFile) for f in self.files)

    @property
    def pixel_bytes(self) -> int:
        """Bytes of all its images' decoded pixels."""
        return sum(f.nbytes for f in self.files if isinstance(f, ImageFile))


@dataclass(frozen=True)
class Report:
    """What a folder holds of a data set: whether it exists, the files missing, those that differ (path, why),
    and whether the contents were hashed (False: `quick`: images' headers and text files' sizes only)."""

    dataset: DataSet
    folder: Path
    found: bool
    missing: tuple[str, ...]
    differing: tuple[tuple[str, str], ...]
    hashed: bool

    @property
    def complete(self) -> bool:
        """Every file present and as in the reference copy (its pixels or bytes too, when hashed)."""
        return not self.missing and not self.differing


def _expected(path: str, entry: dict[str, Any]) -> ExpectedFile:
    if "shape" in entry:
        size = entry.get("pixel_size_um")
        return ImageFile(path, tuple(int(n) for n in entry["shape"]), str(entry["dtype"]), entry["pixels_sha256"],
                         None if size is None else float(size))
    return TextFile(path, int(entry["size"]), entry["sha256"])


def load_catalog(path: Path | None = None) -> dict[str, DataSet]:
    """The data sets of the catalogue file (default: CATALOG), by folder name, in the file's order."""
    entries = json.loads((path or CATALOG).read_text(encoding="utf-8"))["datasets"]
    return {
        name: DataSet(name=name, title=e["title"], source=e["source"], license=e["license"], citation=e["citation"],
                      layout=e["layout"], split=e["split"], recipes=tuple(e["recipes"]),
                      files=tuple(_expected(p, entry) for p, entry in e["files"].items()))
        for name, e in entries.items()
    }


def data_root() -> Path:
    """The folder holding the data sets' folders (isbi2012/, bbbc039/, axondeepseg_sem/): $SEGKIT_DATA, else
    ../shared/data beside the segkit checkout (where the recipes' relative data.root points). Tests, tools and
    `segkit data check` all ask here."""
    return Path(os.environ.get("SEGKIT_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def resolve_root(root: Path | None) -> tuple[Path, str]:
    """The data root to check (`root` if given, else `data_root()`) and, for messages, where it came from."""
    if root is not None:
        return root, "--root"
    if os.environ.get("SEGKIT_DATA"):
        return data_root(), "$SEGKIT_DATA"
    return data_root(), "the default, ../shared/data beside the segkit checkout; set SEGKIT_DATA or pass --root"


def select(catalog: dict[str, DataSet], names: tuple[str, ...] | list[str]) -> list[DataSet]:
    """The data sets `names` asks for (all of them when empty); an unknown name is an InputError listing the
    known ones."""
    unknown = [name for name in names if name not in catalog]
    if unknown:
        raise InputError(f"unknown data set {unknown[0]!r}; name one of {', '.join(catalog)} (none: all of them)")
    return [catalog[name] for name in dict.fromkeys(names)] if names else list(catalog.values())


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The sha256 of a file's bytes, read in chunks; `progress(n)` after each chunk of n bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def pixels_sha256(tif: tifffile.TiffFile, progress: Callable[[int], None] | None = None) -> str:
    """The sha256 of an open TIFF's decoded pixels: the C-order, little-endian bytes of its first series as
    tifffile reads it (`tifffile.imread`), so the same for any compression, predictor, strips, tiles or byte
    order. Decoded page by page (`progress(n)` after each page of n bytes), so a stack never sits whole in
    memory; a series whose pages do not tile it (ImageJ's truncated pages) is read whole."""
    series = tif.series[0]
    pages = list(series.pages)
    if any(page is None for page in pages) or sum(math.prod(page.shape) for page in pages) != series.size:
        pages = [series]  # TiffPageSeries.asarray reads it whole, as imread does
    digest = hashlib.sha256()
    for page in pages:
        plane = page.asarray()
        plane = np.ascontiguousarray(plane, dtype=plane.dtype.newbyteorder("<"))
        digest.update(plane.data)
        if progress is not None:
            progress(plane.nbytes)
    return digest.hexdigest()


def _pixel_size_um(tif: tifffile.TiffFile) -> float | None:
    calibration = tiff_calibration(tif)
    return calibration.pixel_size_um if calibration is not None else None


def catalog_entry(path: Path) -> dict[str, Any]:
    """How the catalogue records a file: an image (.tif/.tiff) as {shape, dtype, pixel_size_um (when it has
    one), pixels_sha256}, any other file as {size, sha256} of its bytes."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return {"size": path.stat().st_size, "sha256": sha256_of(path)}
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        entry: dict[str, Any] = {"shape": list(series.shape), "dtype": np.dtype(series.dtype).name}
        size = _pixel_size_um(tif)
        if size is not None:
            entry["pixel_size_um"] = size
        entry["pixels_sha256"] = pixels_sha256(tif)
    return entry


def _describe(shape: tuple[int, ...], dtype: str) -> str:
    """(30, 512, 512), 'uint8' -> '30 x 512 x 512 uint8'."""
    return f"{' x '.join(str(n) for n in shape)} {dtype}"


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be read ({exc.strerror})"
    from segkit.io.tiff import tiff_problem  # only here: segkit.io.tiff's imports are heavier

    return f"cannot be read as a TIFF ({tiff_problem(str(exc))})"


def _image_differs(expected: ImageFile, path: Path, quick: bool, progress: Callable[[int], None] | None) -> str | None:
    """Why the image at `path` is not the expected one (None: it is): its header's shape, dtype and pixel size,
    then (unless `quick`) its decoded pixels."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype).name
            if (shape, dtype) != (expected.shape, expected.dtype):
                return f"{_describe(shape, dtype)}, expected {_describe(expected.shape, expected.dtype)}"
            if expected.pixel_size_um is not None:
                size = _pixel_size_um(tif)
                if size is None:
                    return f"no pixel size in its metadata, expected {expected.pixel_size_um:g} um"
                if not math.isclose(size, expected.pixel_size_um, rel_tol=PIXEL_SIZE_TOLERANCE):
                    return f"pixel size {size:g} um, expected {expected.pixel_size_um:g} um"
            if not quick and pixels_sha256(tif, progress) != expected.pixels_sha256:
                return "pixels differ from the reference"
    except _READ_ERRORS as exc:
        return _unreadable(exc)
    return None


def _text_differs(expected: TextFile, path: Path, quick: bool, progress: Callable[[int], None] | None) -> str | None:
    """Why the text file at `path` is not the expected one (None: it is): its size, then (unless `quick`) its
    sha256."""
    size = path.stat().st_size
    if size != expected.size:
        return f"{size} bytes, expected {expected.size}"
    if quick:
        return None
    try:
        digest = sha256_of(path, progress)
    except OSError as exc:
        return _unreadable(exc)
    return None if digest == expected.sha256 else "sha256 differs"


def bytes_to_hash(dataset: DataSet, folder: Path) -> int:
    """Bytes `check_dataset` will hash in `folder` (the decoded pixels of its images present, the bytes of its
    text files present with the expected size), for a progress bar's total."""
    total = 0
    for expected in dataset.files:
        path = folder / expected.path
        if path.is_file() and (isinstance(expected, ImageFile) or path.stat().st_size == expected.size):
            total += expected.nbytes
    return total


def check_dataset(dataset: DataSet, folder: Path, *, quick: bool = False,
                  progress: Callable[[int], None] | None = None, workers: int | None = None) -> Report:
    """Compare `folder` with the data set's file list: each file missing, or differing from the reference copy
    (an image's shape, dtype, pixel size and, unless `quick`, decoded pixels; a text file's size and, unless
    `quick`, sha256). Other files in the folder (a README, your own) are ignored. Files are checked by
    `workers` threads (default: the CPU count, at most 8; decoding and hashing release the GIL);
    `progress(n)` is called, one call at a time, after each decoded page or text chunk of n bytes."""
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            progress(n)  # type: ignore[misc]

    def differs(expected: ExpectedFile) -> str | None:
        path = folder / expected.path
        step = advance if progress is not None else None
        if isinstance(expected, ImageFile):
            return _image_differs(expected, path, quick, step)
        return _text_differs(expected, path, quick, step)

    present = [f for f in dataset.files if (folder / f.path).is_file()]
    found = {f.path for f in present}
    missing = tuple(f.path for f in dataset.files if f.path not in found)
    pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
    try:
        reasons = list(pool.map(differs, present))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: the files not started are not checked
    differing = tuple((f.path, why) for f, why in zip(present, reasons) if why is not None)
    return Report(dataset, folder, folder.is_dir(), missing, differing, hashed=not quick)


def _some(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def format_report(report: Report) -> str:
    """A report in lines: one for a complete set; for an incomplete one, what is missing or differs and where
    the data comes from (source, licence, layout)."""
    data = report.dataset
    checked = ("pixels and checksums checked" if report.hashed
               else "--quick: image headers and text sizes checked, pixels not decoded")
    if report.complete:
        return f"{data.name}: complete, {len(data.files)} files ({checked}) in {report.folder}"
    if len(report.missing) == len(data.files):
        state = ("missing: " + (f"{report.folder} does not exist" if not report.found
                                else f"none of its {len(data.files)} files is in {report.folder}"))
    else:
        parts = []
        if report.missing:
            parts.append(f"{len(report.missing)} of {len(data.files)} files missing ({_some(list(report.missing))})")
        if report.differing:
            why = _some([f"{path} ({reason})" for path, reason in report.differing])
            parts.append(f"{len(report.differing)} differ from the reference copy ({why})")
        state = f"incomplete in {report.folder}: " + "; ".join(parts)
    note = (["  note:     images are compared by their decoded pixels (any TIFF compression passes): a file that "
             "differs holds other data; docs/data.md says how each file was made from the source"]
            if report.differing else [])
    texts = len(data.files) - data.images
    return "\n".join([
        f"{data.name}: {state}",
        *note,
        f"  what:     {data.title}",
        f"  get it:   {data.source}",
        f"  licence:  {data.license}; cite {data.citation}",
        f"  layout:   {data.layout}",
        f"  files:    {data.images} TIFF image{'s' * (data.images != 1)} ({data.pixel_bytes / 1e6:.1f} MB of "
        f"pixels) and {texts} text file{'s' * (texts != 1)}, in {report.folder}",
        f"  recipes:  {', '.join('recipes/' + r for r in data.recipes)}",
    ])
