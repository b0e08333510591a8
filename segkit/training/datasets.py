"""Example sets: a recipe's `data` section as whole labelled images per split (folders, globs, split
files, stacks): which files, paired how, rescaled how. Cutting patches from them is patches.py's.

Two forms, one result (a list of `Example`s per split):
- by name: `data.raw` and `data.labels` are folders (or globs) of images and labels paired by file
  name, and `data.<split>_files` names each split's images (a split file such as train.txt, a glob,
  or a list);
- by range: `data.<split>_slices` [start, stop) picks planes of one stack (the ISBI 2012 form) or
  files of a folder in name order.
Every image is (C, H, W) in its stored dtype; labels are (H, W) integers, checked against the
label kind before anything trains.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segkit.errors import InputError
from segkit.io.resample import rescale
from segkit.io.tiff import list_tiff_files, open_stack
from segkit.training.patches import data_source
from segkit.words import counted

SPLITS = ("train", "val", "test")


@dataclass
class Example:
    """One labelled image: `image` (C, H, W) as stored, `labels` (H, W), and where it came from."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    pixel_size: float | None = None  # micrometres per pixel, from the file's metadata
    source: str = ""  # the file (and plane) it was read from, for messages


def split_names(data: dict[str, Any], split: str) -> list[str] | None:
    """The image names `data.<split>_files` lists (None: the split is chosen by slice range)."""
    spec = data[f"{split}_files"]
    if spec is None:
        return None
    key = f"data.{split}_files"
    if isinstance(spec, list):
        names = [str(n) for n in spec]
    elif spec.lower().endswith(".txt"):
        path = Path(spec) if Path(spec).is_absolute() else Path(data["root"]) / spec
        if not path.is_file():
            raise InputError(f"{key}: split file {path} does not exist; name a file of image names (one per line) "
                             f"in data.root, a glob or a list of names")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    else:
        names = [spec]  # a glob of names, matched against the image files
    if not names:
        raise InputError(f"{key}: {spec} lists no images; a split needs at least one image")
    return names


def _without_tiff_suffix(name: str) -> str | None:
    """`name` without its .tif/.tiff/.ome.tif(f) suffix (None: it has none)."""
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _stem(path: str) -> str:
    name = Path(path).name
    stripped = _without_tiff_suffix(name)
    return stripped if stripped is not None else Path(name).stem


def _match_names(names: list[str], files: list[str], key: str, folder: str) -> list[str]:
    """The files `names` select (by stem or file name, globs allowed), in the order named."""
    by_stem = {_stem(f): f for f in files}
    chosen: list[str] = []
    missing: list[str] = []
    for name in names:
        if any(ch in name for ch in "*?["):
            hits = sorted(f for f in files if fnmatch.fnmatch(Path(f).name, name) or fnmatch.fnmatch(_stem(f), name))
            if not hits:
                missing.append(name)
            chosen += hits
            continue
        # a name is a file's stem or its file name: "img.v2" names img.v2.tif, never img.tif
        hit = by_stem.get(name) or by_stem.get(_without_tiff_suffix(name) or name)
        if hit is None:
            missing.append(name)
        else:
            chosen.append(hit)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{key}: no image named {shown} in {folder}; check the names against the files there "
                         "(names are file names with or without .tif)")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"{key}: names the same image twice; list each image once")
    return chosen


def _image_files(source: str) -> list[str]:
    return list_tiff_files(source)


def _is_one_file(source: str) -> bool:
    return Path(source).is_file()


def split_sources(data: dict[str, Any], split: str) -> list[tuple[str, str, int | None]]:
    """(image file, label file, plane or None for every plane) of each image of one split."""
    raw, labels = data_source(data, "raw"), data_source(data, "labels")
    names = split_names(data, split)
    if names is not None:
        if _is_one_file(raw):
            raise InputError(f"data.{split}_files names images, but data.raw {raw} is one file; point data.raw to "
                             f"the folder of images, or choose planes with data.{split}_slices")
        images = _match_names(names, _image_files(raw), f"data.{split}_files", raw)
        return [(image, _label_file(image, labels), None) for image in images]
    start, stop = data[f"{split}_slices"]
    if _is_one_file(raw):
        with open_stack(raw, check_memory=False) as stack:
            depth = len(stack)
        if stop > depth:
            raise InputError(f"data.{split}_slices: [{start}, {stop}) exceeds the {counted(depth, 'slice')} of {raw}")
        return [(raw, labels, z) for z in range(start, stop)]
    files = _image_files(raw)
    if stop > len(files):
        raise InputError(f"data.{split}_slices: [{start}, {stop}) exceeds the {counted(len(files), 'image')} in {raw}; "
                         f"use a range within 0-{len(files)}, or name the images with data.{split}_files")
    return [(image, _label_file(image, labels), None) for image in files[start:stop]]


def _label_file(image: str, labels: str) -> str:
    """The label file of an image: the file of the same name (stem) in the labels folder or glob."""
    if _is_one_file(labels):
        raise InputError(f"data.labels {labels} is one file but data.raw is a folder of images; point data.labels "
                         "to the folder of label images (same file names)")
    stem = _stem(image)
    matches = [f for f in _image_files(labels) if _stem(f) == stem]
    if not matches:
        raise InputError(f"no label image for {Path(image).name} in {labels}; each image needs a label file of the "
                         "same name")
    return matches[0]


def load_examples(data: dict[str, Any], split: str) -> list[Example]:
    """Every labelled image of one split, read and paired (checked: sizes agree, labels are integers,
    channels agree), rescaled to `data.pixel_size` when set, then resized by `data.scale` when set (so
    every split is at the model's resolution)."""
    sources = split_sources(data, split)
    if not sources:
        raise InputError(f"the {split} split is empty; give data.{split}_files or data.{split}_slices at least one image")
    examples: list[Example] = []
    grouped: dict[tuple[str, str], list[int | None]] = {}
    for image_path, label_path, plane in sources:  # a stack's planes are read through one open file
        grouped.setdefault((image_path, label_path), []).append(plane)
    for (image_path, label_path), planes in grouped.items():
        with open_stack(image_path) as images, open_stack(label_path, labels=True) as labels:
            if labels.dtype.kind == "f":
                raise InputError(f"{label_path}: labels are {labels.dtype}; labels must be integers (classes or "
                                 "object ids): save them as uint8/uint16/uint32")
            plane = planes[0]
            indices = list(range(len(images))) if plane is None else [int(p) for p in planes if p is not None]
            if len(labels) != len(images) and (plane is None or len(labels) != 1):
                raise InputError(f"{label_path} has {len(labels)} planes but {image_path} has {len(images)}; pair each "
                                 "image with labels of the same size")
            pixel_size = getattr(images, "pixel_size", None)
            for z in indices:
                image = images.plane(z)
                image = image[None] if image.ndim == 2 else image
                label = labels.plane(z if len(labels) > 1 else 0)
                where = image_path if len(images) == 1 else f"{image_path} plane {z}"
                if label.shape != image.shape[-2:]:
                    raise InputError(f"{where} is {image.shape[-2]} x {image.shape[-1]} px but its labels "
                                     f"{label_path} are {label.shape[0]} x {label.shape[1]}; pair each image with "
                                     "labels of the same size")
                name = _stem(image_path) if len(images) == 1 else f"{_stem(image_path)}[{z}]"
                examples.append(Example(name, image, label, pixel_size, where))
    check_example_channels(examples, data)
    if data.get("pixel_size") is not None:
        examples = [rescale_example(e, data["pixel_size"]) for e in examples]
    if data.get("scale") is not None:
        examples = [scale_example(e, data["scale"]) for e in examples]
    return examples


def check_example_channels(examples: list[Example], data: dict[str, Any]) -> int:
    """The channel count all images of a dataset share, checked against `data.channels` when set.

    (Not `inference.api.check_channels`, which checks one input against a model.)

    Parameters
    ----------
    examples : list of Example
        The labelled images, each `image` (C, H, W).
    data : dict
        The recipe's `data` section.

    Returns
    -------
    int
        The channels C every image has.

    Raises
    ------
    InputError
        Two images have different channels, or `data.channels` disagrees with the images.
    """
    counts = {e.image.shape[0] for e in examples}
    if len(counts) > 1:
        first = next(e for e in examples if e.image.shape[0] != examples[0].image.shape[0])
        raise InputError(f"{first.source} has {first.image.shape[0]} channels but {examples[0].source} has "
                         f"{examples[0].image.shape[0]}; every image of a dataset needs the same channels")
    count = counts.pop()
    if data.get("channels") is not None and data["channels"] != count:
        raise InputError(f"data.channels is {data['channels']} but the images have {counted(count, 'channel')} "
                         f"({examples[0].source}); set data.channels={count} or leave it out")
    return count


def rescale_example(example: Example, pixel_size: float) -> Example:
    """The example resampled to `pixel_size` micrometres per pixel (images by area/linear interpolation,
    labels by nearest neighbour); refused when the image's own pixel size is unknown."""
    if example.pixel_size is None:
        raise InputError(f"{example.source} has no pixel size in its metadata (TIFF resolution tags), so it cannot "
                         f"be rescaled to data.pixel_size={pixel_size:g} um; calibrate it (e.g. Fiji's Image > "
                         "Properties) or leave data.pixel_size out")
    factor = example.pixel_size / pixel_size
    if abs(factor - 1.0) < 1e-3:
        return example
    image, labels = rescale(example.image, factor), rescale(example.labels, factor, labels=True)
    return Example(example.name, image, labels, pixel_size, example.source)


def scale_example(example: Example, factor: float) -> Example:
    """The example resized by `factor` (`data.scale`: 0.5 halves each side; images by area/linear
    interpolation, labels by nearest neighbour, so ids and classes are kept); a factor within 1e-3 of 1
    leaves it as it is. Its pixel size, when known, grows as its pixels do."""
    if abs(factor - 1.0) < 1e-3:
        return example
    image, labels = rescale(example.image, factor), rescale(example.labels, factor, labels=True)
    pixel_size = example.pixel_size / factor if example.pixel_size is not None else None
    return Example(example.name, image, labels, pixel_size, example.source)
