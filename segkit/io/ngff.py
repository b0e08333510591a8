"""NGFF (OME-Zarr) metadata of the stores segkit writes, built and validated with ome-zarr-models.

A store is an image (multiscales: a pyramid of levels "0", "1", ... halved in y and x, never in z)
and, for outputs that are labels, a `labels/<name>` label image with NGFF `image-label` metadata
(also a pyramid). Every level's scale is the input's pixel size (x, y, z, from its Calibration)
times the level's factor, and every spatial axis whose size is known carries the unit.

The metadata is built from ome-zarr-models' pydantic models (`ome_zarr_models.v04`), so what is
written is what that library accepts, and `validate_store` checks a finished store with the same
models (the arrays exist and have as many dimensions as axes, image-label metadata, the labels list).

Version: NGFF 0.4 on zarr format 2, not 0.5 on zarr format 3. 0.4 is the version the viewers users
open these stores in read most widely today: napari-ome-zarr, Fiji's MoBIE and BigDataViewer /
n5-viewer, neuroglancer and ome-zarr-py all read it, while some of them do not yet read 0.5 (whose
only gain for segkit, sharding, matters for stores of millions of chunks).

ome-zarr-models (the `dask` extra) is imported inside the functions that need it: this module is light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.errors import InputError
from segkit.io.calibration import Calibration

NGFF_VERSION = "0.4"
#: The colours of class labels 1, 2, ... (class 0, the background, is transparent); RGBA.
CLASS_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
#: The omero channel colours of a store with several channels (hex RGB, as NGFF's omero block wants).
CHANNEL_COLOURS = ("FFFFFF", "FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF")


def _models() -> Any:
    return require("ome_zarr_models.v04", feature="OME-Zarr metadata", package="ome-zarr-models")


def level_shapes(height: int, width: int, chunk_y: int, chunk_x: int) -> list[tuple[int, int]]:
    """The plane size (y, x) of every pyramid level: level 0 is the full plane, each next one half
    of the one before (rounded up), down to the first level that fits in one chunk.

    Parameters
    ----------
    height, width : int
        Level 0's plane.
    chunk_y, chunk_x : int
        The chunk size in y and x (every level is chunked alike).

    Returns
    -------
    list of (int, int)
        At least one level (the plane itself when it fits in one chunk).
    """
    shapes = [(int(height), int(width))]
    while shapes[-1][0] > chunk_y or shapes[-1][1] > chunk_x:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def _axes(calibration: Calibration | None, channels: bool) -> list[Any]:
    """NGFF axes: c (channel) when asked, then z, y, x (space) with the calibration's unit where the
    size of that axis is known (no unit where it is not: the scale is then in pixels)."""
    models = _models()
    axes = [models.axes.Axis(name="c", type="channel")] if channels else []
    for name in ("z", "y", "x"):
        known = calibration is not None and getattr(calibration, name) is not None
        axes.append(models.axes.Axis(name=name, type="space", unit=calibration.unit if known else None))
    return axes


def level_scales(calibration: Calibration | None, levels: int, channels: bool) -> list[list[float]]:
    """Each level's scale: the pixel size per axis (1 for the channel axis and unknown sizes), times
    2**level in y and x."""
    z, y, x = (calibration or Calibration()).scale("ZYX")
    return [([1.0] if channels else []) + [z, y * 2.0**level, x * 2.0**level] for level in range(levels)]


def level_translations(calibration: Calibration | None, levels: int, channels: bool,
                       method: str) -> list[list[float] | None]:
    """Each level's translation: None for level 0 and for 'nearest' levels (their pixel 0 is level 0's
    pixel 0); for 'mean' levels the centre of their first pixel, (2**level - 1) / 2 pixels of level 0 in
    y and x (as ome-zarr-py writes it), so image and labels stay aligned at every level."""
    _, y, x = (calibration or Calibration()).scale("ZYX")
    if method != "mean":
        return [None] * levels
    return [None] + [([0.0] if channels else []) + [0.0, y * (2.0**level - 1) / 2, x * (2.0**level - 1) / 2]
                     for level in range(1, levels)]


def _multiscale(calibration: Calibration | None, levels: int, channels: bool, name: str, kind: str) -> Any:
    models = _models()
    datasets = [models.multiscales.Dataset.build(path=str(level), scale=scale, translation=translation)
                for level, (scale, translation) in enumerate(zip(level_scales(calibration, levels, channels),
                                                                 level_translations(calibration, levels, channels,
                                                                                    kind)))]
    return models.multiscales.Multiscale(axes=_axes(calibration, channels), datasets=datasets, name=name,
                                         type=kind, version=NGFF_VERSION)


def _dump(attributes: Any) -> dict[str, Any]:
    return attributes.model_dump(by_alias=True, exclude_none=True, mode="json")


def image_attributes(*, calibration: Calibration | None, levels: int, content: str, channels: int = 1,
                     channel_names: tuple[str, ...] | None = None, dtype: Any = np.uint8,
                     name: str = "segkit", downsampling: str = "mean") -> dict[str, Any]:
    """The group attributes of a store's image: NGFF 0.4 multiscales (axes [c,] z, y, x; one dataset
    per level with its scale), an omero block naming the channels of a store of several, and
    `segkit: {content: ...}` (what the image holds, `segkit.io.calibration.CONTENTS`).

    Parameters
    ----------
    calibration : Calibration or None
        The input's pixel sizes; None: scale 1, no units.
    levels : int
        Pyramid levels ("0" .. levels - 1).
    content : str
        'probabilities', 'classes', 'labels' or 'intensities'.
    channels : int
        1: axes z, y, x; more: a leading channel axis c.
    channel_names : tuple of str, optional
        One per channel (the omero labels napari and Fiji show).
    dtype : numpy dtype
        The image's dtype: the display window of each channel (0-255 for uint8, 0-1 for floats).
    name : str
        The multiscales name.
    downsampling : str
        How the levels were made ('mean', 'nearest'): the multiscales `type`.

    Returns
    -------
    dict
        JSON-ready attributes, as ome-zarr-models serialises its `ImageAttrs`.
    """
    models = _models()
    omero = None
    if channels > 1:
        names = channel_names if channel_names and len(channel_names) == channels else tuple(
            f"channel {c}" for c in range(channels))
        top = 255.0 if np.dtype(dtype) == np.uint8 else 1.0
        window = models.omero.Window(min=0.0, max=top, start=0.0, end=top)
        omero = models.omero.Omero(channels=[
            models.omero.Channel(color=CHANNEL_COLOURS[c % len(CHANNEL_COLOURS)], window=window, label=str(label),
                                 active=True) for c, label in enumerate(names)])
    attributes = models.image.ImageAttrs(
        multiscales=[_multiscale(calibration, levels, channels > 1, name, downsampling)], omero=omero,
        segkit={"content": content})
    return _dump(attributes)


def label_attributes(*, calibration: Calibration | None, levels: int, name: str, content: str = "labels",
                     class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The attributes of a label image `labels/<name>`: NGFF 0.4 multiscales (axes z, y, x, as the
    image's) and `image-label` (version, the source image two levels up, and for class maps a
    colour and the class name of every class), and `segkit: {content: ...}`.

    Parameters
    ----------
    calibration : Calibration or None
    levels : int
    name : str
        The label image's name (its folder under labels/).
    content : str
        'labels' (objects or instances, ids unique across the stack) or 'classes' (class numbers).
    class_names : tuple of str, optional
        For class maps: the name of class 0, 1, ...; they become the label values' properties, and
        classes 1.. get colours (0, the background, is transparent).

    Returns
    -------
    dict
        JSON-ready attributes, as ome-zarr-models serialises its `ImageLabelAttrs`.
    """
    models = _models()
    types = models.image_label_types
    colors = properties = None
    if class_names:
        colors = tuple(types.Color(label_value=value, rgba=(0, 0, 0, 0) if value == 0 else
                                   (*CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)], 255))
                       for value in range(len(class_names)))
        properties = tuple(types.Property(label_value=value, **{"class": str(class_name)})
                           for value, class_name in enumerate(class_names))
    label = models.image_label.Label(version=NGFF_VERSION, colors=colors, properties=properties,
                                     source=types.Source(image="../../"))
    attributes = models.image_label.ImageLabelAttrs(
        image_label=label, multiscales=[_multiscale(calibration, levels, False, name, "nearest")],
        segkit={"content": content})
    return _dump(attributes)


def labels_group_attributes(names: list[str], content: str) -> dict[str, Any]:
    """The attributes of the `labels` group: the NGFF list of its label images, and what they hold."""
    return _dump(_models().labels.LabelsAttrs(labels=list(names), segkit={"content": content}))


def validate_store(path: str | Path) -> list[str]:
    """Validate an OME-Zarr store with ome-zarr-models (NGFF 0.4): the image and each of its label images.

    Parameters
    ----------
    path : str or Path
        The store.

    Returns
    -------
    list of str
        The names of its label images (empty when it has none).

    Raises
    ------
    InputError
        When the store is not valid NGFF 0.4 (ome-zarr-models' reason, in one line).
    MissingDependencyError
        When ome-zarr-models is not installed (the `dask` extra).
    """
    models = _models()
    import pydantic
    import zarr

    where = str(path)
    try:
        image = models.image.Image.from_zarr(zarr.open_group(str(path), mode="r", zarr_format=2))
        labels = image.labels
        names = list(labels.attributes.labels) if labels is not None else []
        for name in names:
            where = f"{path}/labels/{name}"
            models.image_label.ImageLabel.from_zarr(zarr.open_group(where, mode="r", zarr_format=2))
    except (pydantic.ValidationError, ValueError, KeyError, FileNotFoundError) as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"{where} is not valid OME-Zarr (NGFF {NGFF_VERSION}): {reason[:300]}") from exc
    return names
