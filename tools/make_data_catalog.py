"""Write segkit's data set catalogue, segkit/data/datasets.json, from the reference copies of the data sets.

Usage: python tools/make_data_catalog.py [--root DIR] [--catalog PATH]

For each data set the catalogue names (isbi2012, bbbc039, axondeepseg_sem), every file of its folder under
the data root (default: $SEGKIT_DATA, the reference copies docs/benchmarks.md measured) is recorded as
`segkit data check` compares it (segkit.data_check.catalog_entry): a TIFF image (.tif/.tiff) by its shape,
dtype, pixel size (where it has one) and the sha256 of its decoded pixels, so any compression of the same
pixels passes; a text file (.txt: the split lists) by its size and the sha256 of its bytes. The folders'
README.md (notes on the copy) is left out; any other file is refused, naming it. The sets' other fields
(title, source, licence, citation, layout, split, recipes) are kept as the catalogue has them: edit them
there. One line per file keeps the catalogue small (about 90 KB) and its diffs readable.

The catalogue is written under a temporary name and renamed, so a failed run leaves the old one. Prints one
line per set and the catalogue's size. Redo it when a reference copy changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from segkit.data_check import CATALOG, IMAGE_SUFFIXES, catalog_entry, data_root

ABOUT = ("The public data sets segkit's recipes, tests and benchmarks read, one folder each under $SEGKIT_DATA. "
         "files: path in the folder -> for a TIFF image its shape and dtype (tifffile's first series), pixel size "
         "in micrometres (where the reference copy has one) and pixels_sha256, the sha256 of its decoded pixels "
         "(C-order, little-endian bytes), so any TIFF compression of the same pixels matches; for a text file its "
         "size in bytes and sha256. The reference copy is the one docs/benchmarks.md measured. segkit downloads "
         "nothing; `segkit data check` compares a folder with this list. Written by tools/make_data_catalog.py.")

#: Notes on a copy, not data: left out of the catalogue.
SKIPPED = ("README.md",)
#: Text files (split lists), recorded by their bytes.
TEXT_SUFFIXES = (".txt",)


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a data set's folder (by `/`-separated path, sorted) as the catalogue records it."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} does not exist; pass --root, the folder holding the data sets' folders")
    files: dict[str, dict[str, Any]] = {}
    for path in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix()):
        name = path.relative_to(folder).as_posix()
        if name in SKIPPED:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES + TEXT_SUFFIXES:
            raise SystemExit(f"error: {path} is neither a TIFF image nor a .txt list; segkit reads neither, so it "
                             "has no place in a data set's folder: move it out")
        files[name] = catalog_entry(path)
    return files


def format_catalog(about: str, datasets: dict[str, dict[str, Any]]) -> str:
    """The catalogue as JSON text: the sets' fields indented, one line per file."""
    lines = ["{", f'  "about": {json.dumps(about)},', '  "datasets": {']
    for i, (name, entry) in enumerate(datasets.items()):
        lines.append(f"    {json.dumps(name)}: {{")
        for key, value in entry.items():
            if key != "files":
                lines.append(f"      {json.dumps(key)}: {json.dumps(value)},")
        files = [f"        {json.dumps(path)}: {json.dumps(record)}" for path, record in entry["files"].items()]
        lines += ['      "files": {', ",\n".join(files), "      }", "    }" + ("," if i < len(datasets) - 1 else "")]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def make_catalog(root: Path, catalog: Path) -> dict[str, int]:
    """Rewrite `catalog`'s file lists from the folders under `root`; the number of files of each set."""
    datasets = json.loads(catalog.read_text(encoding="utf-8"))["datasets"]
    for name, entry in datasets.items():
        entry["files"] = folder_files(root / name)
    tmp = catalog.with_name(f".{catalog.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(format_catalog(ABOUT, datasets), encoding="utf-8")
        os.replace(tmp, catalog)
    finally:
        tmp.unlink(missing_ok=True)
    return {name: len(entry["files"]) for name, entry in datasets.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="the data root (default: $SEGKIT_DATA)")
    parser.add_argument("--catalog", type=Path, default=CATALOG, help=f"the catalogue to rewrite (default: {CATALOG})")
    args = parser.parse_args(argv)
    root = args.root or data_root()
    for name, count in make_catalog(root, args.catalog).items():
        print(f"{name}: {count} files from {root / name}")
    print(f"wrote {args.catalog} ({args.catalog.stat().st_size / 1000:.1f} KB)")


if __name__ == "__main__":
    sys.exit(main())
