"""Zarr and OME-Zarr: read a volume plane by plane, create the OME-Zarr store the Dask path writes
into, and convert a store to a TIFF (ImageJ hyperstack, OME-TIFF above 4 GiB).

Stores are zarr format 2 with NGFF 0.4 metadata built with ome-zarr-models (`segkit.io.ngff`): an
image (a pyramid of levels "0", "1", ..., axes z, y, x, or c, z, y, x for outputs of several channels:
one per class of a K-class model) with the input's pixel sizes and units, and for labels a label image
labels/<name>; napari (napari-ome-zarr), Fiji (MoBIE, BigDataViewer) and neuroglancer open them. zarr
is optional (the `dask` extra): it is imported inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.errors import InputError
from segkit.io.calibration import Calibration, ngff_multiscales, read_content, zarr_attributes, zarr_calibration
from segkit.io.ngff import image_attributes, label_attributes, labels_group_attributes, level_shapes
from segkit.io.outputs import RESUMABLE_SUFFIX, check_output
from segkit.io.tiff import check_finite, open_stack, write_stack
from segkit.io.zarr_checks import (
    check_before_work,
    check_inside,
    check_metadata_files,
    node_kind,
    open_checked_array,
    read_checked,
)

#: dtypes a zarr input may have (those of a TIFF input).
ZARR_DTYPES = (np.uint8, np.uint16, np.float32)
#: A store the Dask path writes holds its run's manifest (`MANIFEST`) while it is NAME.partial; when
#: every chunk is written the manifest moves into the group attribute `segkit.run` and `segkit.complete`
#: becomes true (then NAME.partial is renamed to NAME). Stores of segkit's earlier layout kept the manifest
#: file and a COMPLETE file instead.
MANIFEST = "segkit_manifest.json"
COMPLETE = "segkit_complete"
#: Chunk keys z/y/x (nested folders), the only separator NGFF allows since 0.2 (napari reads big stores
#: of flat keys slowly).
NESTED = {"name": "v2", "separator": "/"}


def mark_complete(store: str | Path, run: dict[str, Any] | None = None, *, complete: bool = True) -> None:
    """Mark a store the Dask path is writing (complete=False, from its start) or finished writing (before
    its rename from NAME.partial): its group attribute `segkit` gets `complete` (and `run`: what produced
    it, the run's manifest).

    Parameters
    ----------
    store : str or Path
        The store folder (a zarr group).
    run : dict, optional
        The run's manifest, kept as provenance.
    complete : bool
        Whether every chunk, label and level is written.
    """
    require("zarr", feature="OME-Zarr output", package="zarr")
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    mark = dict(group.attrs.get("segkit") or {})
    mark["complete"] = complete
    if run is not None:
        mark["run"] = run
    group.attrs["segkit"] = mark


def check_complete(store: str | Path) -> None:
    """Refuse a store of an unfinished segkit run.

    Stores segkit did not write are taken as they are.

    Parameters
    ----------
    store : str or Path
        The store folder.

    Raises
    ------
    InputError
        When the store is NAME.partial, or a renamed .partial: its `segkit` attribute says
        `complete: false` (or, from segkit's earlier layout, it holds a manifest and no COMPLETE file);
        the message says to rerun the prediction with resume.
    """
    name = str(store).rstrip("/\\")
    if name.endswith(RESUMABLE_SUFFIX):
        final = name[: -len(RESUMABLE_SUFFIX)]
        raise InputError(f"{store} is the unfinished store of a prediction that stopped before the end; finish "
                         f"it by rerunning that prediction into {final} with resume, then use {final}")
    mark = zarr_attributes(store).get("segkit")
    if isinstance(mark, dict) and "complete" in mark:  # segkit's current stores say it in their attribute
        if mark["complete"] is not True:
            raise InputError(f"{store} is not marked complete (its segkit attribute says complete: false): the "
                             "prediction that wrote it did not finish; rerun it with resume, or predict it again")
        return
    if _written_with_complete_marks(Path(store)) and not (Path(store) / COMPLETE).exists():
        raise InputError(f"{store} is not marked complete (no {COMPLETE} in it): the prediction that wrote it "
                         "did not finish; rerun it with resume, or predict it again")


def _written_with_complete_marks(store: Path) -> bool:
    """Whether the segkit run that wrote `store` marks completion (its manifest records the input's
    fingerprint, as every run since the COMPLETE mark does); older runs' finished stores hold a
    manifest but no mark, and their rename from NAME.partial is what says they finished."""
    manifest = store / MANIFEST
    if not manifest.exists():
        return False
    try:
        return bool(json.loads(manifest.read_text()).get("input"))
    except (OSError, ValueError, AttributeError):
        return False


class ZarrStack:
    """A ZYX (or YX) zarr array, or the level 0 of an OME-Zarr group, with the plane interface of
    TiffStack, so normalisation and reading work the same for both inputs.

    Parameters
    ----------
    source : str or Path
        A zarr array, or an OME-Zarr group whose level-0 array (the first dataset of its multiscales,
        e.g. "0" or ome-zarr-py's "s0"; "0" when it has none) has axes (y, x) or (z, y, x).
    check_memory : bool
        Refuse, before any work, a plane or chunk larger than memory, more planes than can be planned,
        and chunk files that are not regular files of a chunk's size (`segkit.io.zarr_checks.check_before_work`);
        off where the caller checked already (a Dask task re-opening the store).

    Attributes
    ----------
    shape : tuple of (int, int, int)
        (Z, H, W); Z = 1 for a YX array.
    dtype : numpy.dtype
        uint8, uint16 or float32.
    array : zarr.Array
        The array read.

    Raises
    ------
    InputError
        When the source does not exist, is an unfinished segkit store, is not a zarr store, is a group
        without level 0, has a channel or other axis, is not a YX / ZYX array of uint8, uint16 or
        float32, or has metadata, sizes or chunk files that cannot be read (`segkit.io.zarr_checks`):
        one line naming the store, the field or chunk, the problem and the fix.
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """

    def __init__(self, source: str | Path, *, check_memory: bool = True) -> None:
        require("zarr", feature="zarr input", package="zarr")

        self.source = str(source)
        path = Path(source)
        if not path.exists():
            raise InputError(f"input {source} does not exist; check the path")
        check_metadata_files(path, source)  # before anything reads them (check_complete, level0_path)
        check_complete(path)
        kind = node_kind(path)
        if kind is None:
            raise InputError(f"{source} is not a zarr store (no .zarray, .zgroup or zarr.json in it); pass a TIFF or a "
                             "zarr array")
        folder = path
        if kind == "group":
            first = level0_path(path)
            check_inside(source, first)
            if node_kind(path / first) != "array":
                raise InputError(f"{source} is a zarr group without its level-0 array '{first}'; pass the array itself")
            axes = store_axes(path) or ()
            if "c" in axes:
                raise InputError(f"{source} has a channel axis ({', '.join(axes)}: e.g. one probability per class); "
                                 "prediction reads one channel: pass a YX or ZYX array")
            if set(axes) - {"z", "y", "x"}:
                raise InputError(f"{source} has axes {', '.join(axes)}; pass a YX or ZYX array")
            folder = path / first
        node = open_checked_array(folder, source)
        if node.ndim not in (2, 3) or node.dtype not in ZARR_DTYPES:
            raise InputError(f"{source}: a zarr input must be a YX or ZYX array of uint8, uint16 or float32, "
                             f"not {node.ndim}D {node.dtype}")
        if check_memory:  # a Dask task re-opening a store its client checked skips the walk over its chunks
            check_before_work(node, source, purpose="predict")
        self.array = node
        self.is_2d = node.ndim == 2
        self.shape: tuple[int, int, int] = (1, *node.shape) if self.is_2d else tuple(node.shape)
        self.dtype = np.dtype(node.dtype)
        self.resolution = None
        # the group's scale and units (NGFF); None for a bare array and a group that says none
        self.calibration = zarr_calibration(path)
        self.pixel_size = self.calibration.pixel_size_um if self.calibration is not None else None

    def __len__(self) -> int:
        return self.shape[0]

    def plane(self, index: int) -> np.ndarray:
        """One plane, checked for NaN/inf.

        Parameters
        ----------
        index : int
            Plane index in [0, Z).

        Returns
        -------
        (H, W) ndarray of uint8, uint16 or float32

        Raises
        ------
        IndexError
            When `index` is outside the stack.
        InputError
            When a float plane holds NaN or inf, a chunk is damaged or is not a regular file of a chunk's size.
        """
        if not 0 <= index < self.shape[0]:
            raise IndexError(index)
        return check_finite(read_checked(self.array, ... if self.is_2d else index, self.source), self.source, index)

    def __enter__(self) -> "ZarrStack":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def open_volume(source: str | Path, *, check_memory: bool = True) -> Any:
    """Open a TIFF stack, or a zarr / OME-Zarr store (a path ending in .zarr), plane by plane.

    Parameters
    ----------
    source : str or Path
        A TIFF, a folder or glob of TIFFs (see `segkit.io.tiff.open_stack`), or a zarr store.
    check_memory : bool
        As for `segkit.io.tiff.open_stack`; for a zarr store also the walk over its chunk files
        (`segkit.io.zarr_checks.check_before_work`).

    Returns
    -------
    TiffStack or ZarrStack
        Open; use it as a context manager.

    Raises
    ------
    InputError
        As `open_stack` or `ZarrStack` raise it.
    """
    source = str(source)
    if source.rstrip("/").lower().endswith(".zarr"):
        return ZarrStack(source, check_memory=check_memory)
    return open_stack(source, check_memory=check_memory)


def plane_reader(source: str) -> Callable[[int], np.ndarray]:
    """A function that reads one plane of `source`, picklable by cloudpickle.

    It opens the source per call, so a Dask task needs no open file handle (the client checked the plane
    size against memory once).

    Parameters
    ----------
    source : str
        As for `open_volume`.

    Returns
    -------
    callable
        `read(index)` -> (H, W) or (C, H, W) ndarray.
    """

    def read(index: int) -> np.ndarray:  # the client checked the plane size against memory once
        with open_volume(source, check_memory=False) as stack:
            return stack.plane(index)

    return read


def ome_zarr_attributes(shape: tuple[int, ...], calibration: Calibration | None,
                        channel_names: tuple[str, ...] | None = None, *, levels: int = 1,
                        content: str = "probabilities", dtype: Any = np.uint8) -> dict[str, Any]:
    """NGFF 0.4 multiscales metadata of a store's image (built with ome-zarr-models, `segkit.io.ngff`):
    axes z, y, x (with the calibration's unit where a size is known), after a channel axis c when
    `shape` has four axes (CZYX); one dataset per pyramid level; what the image holds.

    Parameters
    ----------
    shape : tuple of int
        ZYX, or CZYX.
    calibration : Calibration or None
        The input's pixel sizes (`segkit.io.calibration`); None: scale 1, no unit.
    channel_names : tuple of str, optional
        One per channel: they label the channels (the transitional 'omero' block napari reads).
    levels : int
        Pyramid levels.
    content : str
        What the image holds (`segkit.io.calibration.CONTENTS`), as `segkit: {content: ...}`.
    dtype : numpy dtype
        The image's dtype (the channels' display window).

    Returns
    -------
    dict
        The group attributes (`multiscales`, `segkit`, and `omero` for several channels).
    """
    channels = shape[0] if len(shape) == 4 else 1
    return image_attributes(calibration=calibration, levels=levels, content=content, channels=channels,
                            channel_names=channel_names, dtype=dtype,
                            downsampling="nearest" if content in ("classes", "labels") else "mean")


def store_axes(store: str | Path) -> tuple[str, ...] | None:
    """The axis names of an OME-Zarr store's multiscales metadata.

    Parameters
    ----------
    store : str or Path

    Returns
    -------
    tuple of str or None
        E.g. ('z', 'y', 'x'); None when the store is not a group or has no (or malformed) metadata.

    Raises
    ------
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    require("zarr", feature="OME-Zarr", package="zarr")
    import zarr

    try:
        multiscales = zarr.open_group(str(store), mode="r").attrs.get("multiscales")
        return tuple(axis["name"] if isinstance(axis, dict) else str(axis) for axis in multiscales[0]["axes"])
    except Exception:  # not a group, no or malformed metadata: the array's own shape is all there is
        return None


@dataclass(frozen=True)
class LabelImage:
    """A label image of a store, `labels/<name>` (NGFF image-label), beside the store's image.

    Attributes
    ----------
    name : str
        Its folder under labels/ ('instances', 'objects', 'classes').
    dtype : numpy.dtype
        uint32 ids (objects, instances) or uint8 class numbers.
    content : str
        'labels' (ids) or 'classes' (class numbers).
    class_names : tuple of str, optional
        For class maps: the names of classes 0, 1, ... (image-label properties and colours).
    """

    name: str
    dtype: np.dtype
    content: str = "labels"
    class_names: tuple[str, ...] | None = None


def level_chunks(chunks: tuple[int, ...], plane: tuple[int, int]) -> tuple[int, ...]:
    """The chunks of a pyramid level whose plane is `plane` (y, x): those of level 0, at most the plane."""
    return (*chunks[:-2], min(chunks[-2], plane[0]), min(chunks[-1], plane[1]))


def create_ome_zarr(path: str | Path, shape: tuple[int, ...], chunks: tuple[int, ...],
                    dtype: np.dtype | type | str, calibration: Calibration | None = None,
                    channel_names: tuple[str, ...] | None = None, *, content: str = "probabilities",
                    label: LabelImage | None = None) -> list[tuple[int, int]]:
    """Create an empty OME-Zarr store at `path` (zarr format 2, NGFF 0.4), replacing what is there.

    The image's pyramid levels "0", "1", ... (each half the one before in y and x, down to one chunk:
    `segkit.io.ngff.level_shapes`), filled with 0, with their multiscales metadata; with `label`,
    also the label image labels/<name> (its own pyramid, image-label metadata) and the labels group.

    Parameters
    ----------
    path : str or Path
        The store folder.
    shape : tuple of int
        Level 0's shape: ZYX, or CZYX (one channel per class).
    chunks : tuple of int
        Chunk shape, one entry per axis of `shape`; every level is chunked alike.
    dtype : numpy.dtype, type or str
    calibration : Calibration or None
        The pixel sizes written into the metadata (x, y, z and unit); None: scale 1, no unit.
    channel_names : tuple of str, optional
        Channel labels.
    content : str
        What the image holds (`segkit.io.calibration.CONTENTS`).
    label : LabelImage, optional
        The label image to create beside the image (ZYX, chunked as the image's planes).

    Returns
    -------
    list of (int, int)
        The plane size (y, x) of every level.

    Raises
    ------
    MissingDependencyError
        When zarr or ome-zarr-models is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    require("zarr", feature="OME-Zarr output", package="zarr")
    import zarr

    shapes = level_shapes(shape[-2], shape[-1], chunks[-2], chunks[-1])
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    for level, plane in enumerate(shapes):
        group.create_array(str(level), shape=(*shape[:-2], *plane), chunks=level_chunks(chunks, plane), dtype=dtype,
                           fill_value=0, chunk_key_encoding=NESTED)
    group.attrs.update(ome_zarr_attributes(tuple(shape), calibration, channel_names, levels=len(shapes),
                                           content=content, dtype=dtype))
    if label is not None:
        labels = group.create_group("labels")
        image = labels.create_group(label.name)
        for level, plane in enumerate(shapes):
            image.create_array(str(level), shape=(*shape[-3:-2], *plane), chunks=level_chunks(chunks[-3:], plane),
                               dtype=label.dtype, fill_value=0, chunk_key_encoding=NESTED)
        image.attrs.update(label_attributes(calibration=calibration, levels=len(shapes), name=label.name,
                                            content=label.content, class_names=label.class_names))
        labels.attrs.update(labels_group_attributes([label.name], label.content))
    return shapes


def create_array(store: str | Path, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: np.dtype | type | str) -> None:
    """Add an array `name` (filled with 0) to an existing zarr group.

    Parameters
    ----------
    store : str or Path
        The store (a folder).
    name : str
        The array's name in the group.
    shape, chunks : tuple of int
    dtype : numpy.dtype, type or str

    Raises
    ------
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    require("zarr", feature="OME-Zarr output", package="zarr")
    import zarr

    zarr.open_group(str(store), mode="r+").create_array(name, shape=tuple(shape), chunks=tuple(chunks),
                                                         dtype=dtype, fill_value=0, chunk_key_encoding=NESTED)


def open_array(store: str | Path, name: str = "0", *, mode: str = "r") -> Any:
    """The array `name` of a zarr group.

    Parameters
    ----------
    store : str or Path
        The store (a folder).
    name : str
        The array's name; default the level 0, "0".
    mode : str
        zarr's mode: 'r' to read, 'r+' to write into it.

    Returns
    -------
    zarr.Array

    Raises
    ------
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    require("zarr", feature="OME-Zarr", package="zarr")
    import zarr

    return zarr.open_array(str(Path(store) / name), mode=mode)


def level0_path(store: str | Path) -> str:
    """The path of an OME-Zarr group's level 0: its multiscales' first dataset ("0" in segkit's stores,
    "s0" in ome-zarr-py's); "0" when the group says none."""
    attributes = zarr_attributes(store)
    multiscales = ngff_multiscales(attributes)
    try:
        return str(multiscales[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return "0"


def open_level0(store: str | Path, *, mode: str = "r") -> Any:
    """The level-0 array of an OME-Zarr store (`level0_path`): `open_array(store, level0_path(store), mode=mode)`.

    Parameters and errors as in `open_array`, and an InputError when the store has no level-0 array.
    """
    return open_array(store, _level0_name(store), mode=mode)


def _level0_name(store: str | Path, source: str | Path | None = None) -> str:
    """`level0_path(store)`, refused when it leads out of the store (`source`: the store the user named, for
    the message) or names nothing."""
    first = level0_path(store)
    check_inside(source or store, first)
    if not (Path(store) / first).exists():
        raise InputError(f"{store} is not a segkit OME-Zarr store (no level 0 array); pass a store from "
                         "`segkit predict ... -o out.ome.zarr`")
    return first


def label_names(store: str | Path) -> list[str]:
    """The label images of an OME-Zarr store (the NGFF `labels` list of its labels group); [] when none."""
    names = zarr_attributes(Path(store) / "labels").get("labels")
    return [str(name) for name in names] if isinstance(names, list) else []


def convert_zarr_to_tiff(store: str | Path, output: str | Path, *, overwrite: bool = False,
                         compression: str = "zlib", report: Callable[[str], object] | None = None,
                         labels: bool | str = False) -> Path:
    """Stream the level 0 of an OME-Zarr store's image (or of one of its label images) into a tiled
    TIFF (`segkit.io.tiff.write_stack`: ImageJ hyperstack, OME-TIFF above 4 GiB), plane by plane.

    YX and ZYX images are written as they are, a CZYX image (one channel per class) as a ZCYX TIFF
    (ImageJ's order: channel fastest).

    Parameters
    ----------
    store : str or Path
        An OME-Zarr store (e.g. from `segkit predict ... -o out.ome.zarr`).
    output : str or Path
        The TIFF to write.
    overwrite : bool
        Replace an existing output.
    compression : str
        One of `segkit.io.tiff.COMPRESSIONS`.
    report : callable, optional
        Hears about stale temporary files of the output that were removed.
    labels : bool or str
        Write a label image (labels/<name>) instead of the image: True for the store's first (segkit's
        stores hold one: instances, objects or classes), or its name.

    Returns
    -------
    Path
        The written TIFF.

    Raises
    ------
    InputError
        When the store is of an unfinished run, has no level 0, holds axes other than YX, ZYX or CZYX,
        has no (such) label image when `labels` asks for one, or has metadata, sizes or chunk files that
        cannot be read (`segkit.io.zarr_checks`: before any work; a chunk that cannot be decoded is named
        when it is reached, and no TIFF is left).
    OutputExistsError, OutputError
        When the output cannot be written (it exists, it is the input, its folder is missing or
        read-only), before any work.
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    if Path(store).exists():
        check_metadata_files(store, store)  # before anything reads them
        check_complete(store)
    image = Path(store)
    if labels:
        check_metadata_files(image / "labels", store)
        names = label_names(store)
        name = labels if isinstance(labels, str) else (names[0] if names else "")
        if name not in names:
            have = f"it has {', '.join(names)}" if names else "it has none"
            raise InputError(f"{store} has no label image{' ' + name if name else ''} ({have}); convert its "
                             "image without asking for labels")
        check_inside(store, f"labels/{name}", "a label image")
        image = image / "labels" / name
        check_metadata_files(image, store)
    array = open_checked_array(image / _level0_name(image, store), store)
    axes = store_axes(image)
    if array.ndim == 4 and axes not in (None, ("c", "z", "y", "x")):
        raise InputError(f"{store} has axes {', '.join(axes or ())}; convert writes YX, ZYX or CZYX stores")
    if array.ndim not in (2, 3, 4):
        raise InputError(f"{store} holds a {array.ndim}D array; convert writes YX, ZYX or CZYX stores")
    check_before_work(array, store, purpose="convert", output=output)
    check_output(output, kind="tiff", inputs=[store], overwrite=overwrite, report=report)
    if array.ndim == 4:
        channels, depth, height, width = array.shape
        planes: Any = (plane for z in range(depth) for plane in read_checked(array, (slice(None), z), store))
        return write_stack(output, planes, shape=(depth, channels, height, width), axes="ZCYX", dtype=array.dtype,
                           overwrite=overwrite, compression=compression, calibration=zarr_calibration(image),
                           content=read_content(image))
    planes = ((read_checked(array, ..., store),) if array.ndim == 2
              else (read_checked(array, z, store) for z in range(array.shape[0])))
    return write_stack(output, planes, shape=tuple(array.shape), dtype=array.dtype, overwrite=overwrite,
                       compression=compression, calibration=zarr_calibration(image), content=read_content(image))
