"""napari's reader for segkit's outputs (File > Open, or dropping a file on the viewer).

It claims only files segkit wrote: a TIFF or an OME-Zarr store whose metadata says what it holds
(`segkit.io.calibration.read_content`: probabilities, classes, labels or intensities); napari's own readers
keep every other file. Probabilities and intensities open as image layers, classes and objects as labels
layers, and an OME-Zarr store's `labels/<name>` groups (NGFF label images) as labels layers beside its image.
Every layer gets the file's calibration (`read_calibration`) as its scale; an OME-Zarr pyramid opens as
multiscale data, large TIFFs lazily through zarr where it is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segkit.io.calibration import ngff_multiscales, read_calibration, read_content, zarr_attributes
from segkit.napari.layers import layer_type

LayerData = tuple[Any, dict[str, Any], str]

#: TIFFs larger than this are opened lazily (a zarr view of the file) when zarr is installed.
LAZY_BYTES = 1 << 30
_TIFF_SUFFIXES = (".tif", ".tiff")


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader for `path` when every path is a segkit output, else None (napari then asks other readers).

    Parameters
    ----------
    path : str or sequence of str
        What napari asks to open: a file, an OME-Zarr folder, or several of them.

    Returns
    -------
    callable or None
        `read_segkit_outputs`, or None for files segkit did not write.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(is_segkit_output(p) for p in paths):
        return None
    return read_segkit_outputs


def is_segkit_output(path: str | Path) -> bool:
    """Whether `path` is a TIFF or an OME-Zarr store (a folder ending in .zarr) that segkit wrote.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    bool
        True when its metadata records what it holds (one of `segkit.io.calibration.CONTENTS`).
    """
    path = Path(path)
    if path.is_dir():
        return path.name.lower().endswith(".zarr") and read_content(path) is not None
    return path.suffix.lower() in _TIFF_SUFFIXES and path.is_file() and read_content(path) is not None


def read_segkit_outputs(path: str | Sequence[str]) -> list[LayerData]:
    """The layers of one or more segkit outputs.

    Parameters
    ----------
    path : str or sequence of str

    Returns
    -------
    list of (data, keyword arguments, layer type)
        napari's layer data tuples: 'image' for probabilities and intensities, 'labels' for classes and
        objects, each with the file's scale.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for item in paths:
        item = Path(item)
        layers.extend(read_zarr_output(item) if item.is_dir() else read_tiff_output(item))
    return layers


def _name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _layer(data: Any, axes: str, content: str, scale: Sequence[float], name: str, *, multiscale: bool = False,
           channel_names: Sequence[str] | None = None) -> LayerData:
    """One layer data tuple: the layer type by content, the channel axis (if any) split into image layers."""
    kind = layer_type(content)
    kwargs: dict[str, Any] = {"name": name, "metadata": {"segkit_content": content}}
    if multiscale:
        kwargs["multiscale"] = True
    if "C" in axes and kind == "image":
        channel = axes.index("C")
        count = (data[0] if multiscale else data).shape[channel]
        names = list(channel_names or [])
        if len(names) != count:
            names = [str(i) for i in range(count)]
        kwargs["channel_axis"] = channel
        kwargs["name"] = [f"{name} {label}" for label in names]
        scale = [s for axis, s in zip(axes, scale) if axis != "C"]
    kwargs["scale"] = list(scale)
    level0 = data[0] if multiscale else data
    if content == "probabilities":  # fixed limits: no pass over a large (or lazy) array to find them
        kwargs["contrast_limits"] = [0, 255] if np.dtype(level0.dtype) == np.uint8 else [0.0, 1.0]
    return data, kwargs, kind


# -- TIFF -------------------------------------------------------------------------------------------

def _tiff_axes(axes: str) -> str:
    """tifffile's series axes in segkit's letters: S (samples) is a channel axis, I and Q (unnamed) are Z."""
    text = axes.upper().replace("S", "C").replace("I", "Z").replace("Q", "Z")
    return text if len(set(text)) == len(text) else axes.upper()


def read_tiff_output(path: str | Path) -> list[LayerData]:
    """The layer of a segkit TIFF output (ImageJ hyperstack or OME-TIFF).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of (data, keyword arguments, layer type)
        One tuple (several for an image with a channel axis: napari splits it by `channel_axis`).
    """
    import tifffile

    path = Path(path)
    content = read_content(path) or "intensities"
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = _tiff_axes(series.axes)
        nbytes = int(np.prod(series.shape, dtype=np.int64)) * np.dtype(series.dtype).itemsize
        data = _lazy_tiff(path) if nbytes > LAZY_BYTES else None
        if data is None:
            data = series.asarray()
    calibration = read_calibration(path)
    scale = calibration.scale(axes) if calibration is not None else (1.0,) * len(axes)
    return [_layer(data, axes, content, scale, _name(path))]


def _lazy_tiff(path: Path) -> Any:
    """A zarr view of a large TIFF's first series (read tile by tile as napari draws), or None without zarr."""
    try:
        import tifffile
        import zarr
    except ImportError:
        return None
    store = tifffile.imread(path, aszarr=True)
    return zarr.open(store, mode="r")


# -- OME-Zarr ---------------------------------------------------------------------------------------

def _multiscale(group: Path) -> tuple[list[Any], str, tuple[str, ...]] | None:
    """A group's multiscale levels (zarr arrays), its axes in segkit's letters and channel labels; None
    without multiscales metadata."""
    import zarr

    attributes = zarr_attributes(group)
    multiscales = ngff_multiscales(attributes)
    if not multiscales:
        return None
    first = multiscales[0]
    axes = "".join((axis["name"] if isinstance(axis, dict) else str(axis))[0].upper() for axis in first["axes"])
    levels = [zarr.open_array(str(group / dataset["path"]), mode="r") for dataset in first["datasets"]]
    omero = attributes.get("omero") or (attributes.get("ome") or {}).get("omero") or {}
    labels = tuple(str(channel.get("label", i)) for i, channel in enumerate(omero.get("channels", [])))
    return levels, axes, labels


def read_zarr_output(path: str | Path) -> list[LayerData]:
    """The layers of a segkit OME-Zarr store: its image (by its content), and each NGFF label image under
    `labels/` as a labels layer.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of (data, keyword arguments, layer type)

    Raises
    ------
    MissingDependencyError
        When zarr is not installed (the `dask` extra).
    """
    from segkit._optional import require

    require("zarr", feature="opening OME-Zarr outputs in napari", package="zarr")
    path = Path(path)
    content = read_content(path) or "intensities"
    label_names = [str(name) for name in zarr_attributes(path / "labels").get("labels", [])]
    layers: list[LayerData] = []
    image = _multiscale(path)
    if image is not None:
        levels, axes, channels = image
        # a store whose objects are in labels/ holds an image they belong to (NGFF: labels annotate an image)
        own = content if content != "labels" or not label_names else "intensities"
        if own in ("classes", "labels") and "C" in axes:
            own = "probabilities"
        layers.append(_zarr_layer(path, levels, axes, own, _name(path), channels))
    for name in label_names:
        group = path / "labels" / name
        found = _multiscale(group)
        if found is not None:
            levels, axes, _ = found
            layers.append(_zarr_layer(group, levels, axes, "labels", f"{_name(path)} {name}", ()))
    return layers


def _zarr_layer(group: Path, levels: list[Any], axes: str, content: str, name: str,
                channels: Sequence[str]) -> LayerData:
    calibration = read_calibration(group)
    scale = calibration.scale(axes) if calibration is not None else (1.0,) * len(axes)
    data: Any = levels if len(levels) > 1 else levels[0]
    return _layer(data, axes, content, scale, name, multiscale=len(levels) > 1, channel_names=channels)
