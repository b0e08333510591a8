"""The public data sets the recipes, tests and benchmarks read (ISBI 2012, BBBC039, AxonDeepSeg SEM): where
they live (`data_root`: $SEGKIT_DATA), what each folder must hold (the catalogue, `segkit/data/datasets.json`:
source, licence, citation, layout, split, and every file's size and sha256), and a check of a folder
against that list (`check_dataset`, what `segkit data check` prints). segkit downloads nothing.

Pure functions over paths and the catalogue; no torch, no global state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segkit.errors import InputError

#: The catalogue of data sets, shipped as package data (pyproject's package-data: data/*.json).
CATALOG = Path(__file__).parent / "data" / "datasets.json"

#: Bytes read at a time while hashing (the progress callback is called once per chunk).
CHUNK = 1 << 20


@dataclass(frozen=True)
class ExpectedFile:
    """One file a data set's folder must hold: its path in the folder (`/`-separated), size and sha256."""

    path: str
    size: int
    sha256: str


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
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Report:
    """What a folder holds of a data set: whether it exists, the files missing, those that differ (path, why),
    and whether the contents were hashed (False: `quick`, sizes only)."""

    dataset: DataSet
    folder: Path
    found: bool
    missing: tuple[str, ...]
    differing: tuple[tuple[str, str], ...]
    hashed: bool

    @property
    def complete(self) -> bool:
        """Every file present, with the reference copy's size (and sha256, when hashed)."""
        return not self.missing and not self.differing


def load_catalog(path: Path | None = None) -> dict[str, DataSet]:
    """The data sets of the catalogue file (default: CATALOG), by folder name, in the file's order."""
    entries = json.loads((path or CATALOG).read_text(encoding="utf-8"))["datasets"]
    return {
        name: DataSet(name=name, title=e["title"], source=e["source"], license=e["license"], citation=e["citation"],
                      layout=e["layout"], split=e["split"], recipes=tuple(e["recipes"]),
                      files=tuple(ExpectedFile(p, int(size), sha) for p, (size, sha) in e["files"].items()))
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
    """The sha256 of a file, read in chunks; `progress(n)` after each chunk of n bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def bytes_to_hash(dataset: DataSet, folder: Path) -> int:
    """Bytes `check_dataset` will hash in `folder` (its files present with the expected size), for a progress
    bar's total."""
    total = 0
    for expected in dataset.files:
        path = folder / expected.path
        if path.is_file() and path.stat().st_size == expected.size:
            total += expected.size
    return total


def check_dataset(dataset: DataSet, folder: Path, *, quick: bool = False,
                  progress: Callable[[int], None] | None = None) -> Report:
    """Compare `folder` with the data set's file list: each file missing, of another size, or (unless `quick`)
    of another sha256. Other files in the folder (a README, your own) are ignored."""
    missing: list[str] = []
    differing: list[tuple[str, str]] = []
    for expected in dataset.files:
        path = folder / expected.path
        if not path.is_file():
            missing.append(expected.path)
            continue
        size = path.stat().st_size
        if size != expected.size:
            differing.append((expected.path, f"{size} bytes, expected {expected.size}"))
        elif not quick:
            try:
                digest = sha256_of(path, progress)
            except OSError as exc:
                differing.append((expected.path, f"cannot be read ({exc.strerror or exc})"))
                continue
            if digest != expected.sha256:
                differing.append((expected.path, "sha256 differs"))
    return Report(dataset, folder, folder.is_dir(), tuple(missing), tuple(differing), hashed=not quick)


def _some(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def format_report(report: Report) -> str:
    """A report in lines: one for a complete set; for an incomplete one, what is missing or differs and where
    the data comes from (source, licence, layout)."""
    data = report.dataset
    checked = "sizes and sha256 checked" if report.hashed else "sizes checked, not hashed (--quick)"
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
    note = (["  note:     a copy saved otherwise (another TIFF compression) differs in bytes; segkit reads it, but "
             "docs/benchmarks.md measured the reference copy"] if report.differing else [])
    return "\n".join([
        f"{data.name}: {state}",
        *note,
        f"  what:     {data.title}",
        f"  get it:   {data.source}",
        f"  licence:  {data.license}; cite {data.citation}",
        f"  layout:   {data.layout}",
        f"  files:    {len(data.files)} files, {data.size / 1e6:.1f} MB, in {report.folder}",
        f"  recipes:  {', '.join('recipes/' + r for r in data.recipes)}",
    ])
