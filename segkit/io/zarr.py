"""Zarr and OME-Zarr: read a volume plane by plane, create the OME-Zarr store the Dask path writes
into, and convert a store to a tiled BigTIFF.

Stores are zarr format 2 with NGFF 0.4 multiscales metadata (one level, array "0", axes z, y, x, or
c, z, y, x for outputs of several channels: one per class of a K-class model), which napari, Fiji
(MoBIE / n5-viewer) and neuroglancer open. zarr is optional (the `dask` extra):
it is imported inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.errors import InputError
from segkit.io.calibration import read_content, zarr_calibration
from segkit.io.outputs import RESUMABLE_SUFFIX, check_output
from segkit.io.tiff import Resolution, check_finite, open_stack, write_stack

#: dtypes a zarr input may have (those of a TIFF input).
ZARR_DTYPES = (np.uint8, np.uint16, np.float32)
#: A store the Dask path writes holds its run's manifest (`MANIFEST`) from the
#: start, and COMPLETE once every chunk is written (then `NAME.partial` is renamed to NAME).
MANIFEST = "segkit_manifest.json"
COMPLETE = "segkit_complete"


def mark_complete(store: str | Path) -> None:
    """Mark a store the Dask path finished writing (before its rename from NAME.partial).

    Parameters
    ----------
    store : str or Path
        The store folder; a `segkit_complete` file is written into it.
    """
    (Path(store) / COMPLETE).write_text("every chunk of this store was written by segkit\n")


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
        When the store is NAME.partial, or holds a segkit manifest and no COMPLETE mark (a renamed
        .partial); the message says to rerun the prediction with resume.
    """
    name = str(store).rstrip("/\\")
    if name.endswith(RESUMABLE_SUFFIX):
        final = name[: -len(RESUMABLE_SUFFIX)]
        raise InputError(f"{store} is the unfinished store of a prediction that stopped before the end; finish "
                         f"it by rerunning that prediction into {final} with resume, then use {final}")
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
        A zarr array, or an OME-Zarr group whose level-0 array "0" has axes (y, x) or (z, y, x).

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
        without level 0, has a channel or other axis, or is not a YX / ZYX array of uint8, uint16 or
        float32.
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """

    def __init__(self, source: str | Path) -> None:
        require("zarr", feature="zarr input", package="zarr")
        import zarr

        self.source = str(source)
        path = Path(source)
        if not path.exists():
            raise InputError(f"input {source} does not exist; check the path")
        check_complete(path)
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:  # zarr raises several types for a folder that is not a store
            raise InputError(f"{source} is not a zarr store ({type(exc).__name__}); pass a TIFF or a zarr array") from exc
        if not hasattr(node, "shape"):
            if "0" not in node:
                raise InputError(f"{source} is a zarr group without a level-0 array '0'; pass the array itself")
            axes = store_axes(path) or ()
            if "c" in axes:
                raise InputError(f"{source} has a channel axis ({', '.join(axes)}: e.g. one probability per class); "
                                 "prediction reads one channel: pass a YX or ZYX array")
            if set(axes) - {"z", "y", "x"}:
                raise InputError(f"{source} has axes {', '.join(axes)}; pass a YX or ZYX array")
            node = node["0"]
        if node.ndim not in (2, 3) or node.dtype not in ZARR_DTYPES:
            raise InputError(f"{source}: a zarr input must be a YX or ZYX array of uint8, uint16 or float32, "
                             f"not {node.ndim}D {node.dtype}")
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
            When a float plane holds NaN or inf.
        """
        if not 0 <= index < self.shape[0]:
            raise IndexError(index)
        return check_finite(np.asarray(self.array[...] if self.is_2d else self.array[index]), self.source, index)

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
        As for `segkit.io.tiff.open_stack` (TIFF only).

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
        return ZarrStack(source)
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


def ome_zarr_attributes(shape: tuple[int, ...], resolution_um: tuple[float, float] | None,
                        channel_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """NGFF 0.4 multiscales metadata: one level, axes z, y, x (micrometres when known), after a channel
    axis c when `shape` has four axes (CZYX).

    Parameters
    ----------
    shape : tuple of int
        ZYX, or CZYX.
    resolution_um : tuple of (float, float) or None
        Pixel size (y, x) in micrometres; None: unit scale, no unit.
    channel_names : tuple of str, optional
        One per channel: they label the channels (the transitional 'omero' block napari reads).

    Returns
    -------
    dict
        The group attributes (`multiscales`, and `omero` with channel names).
    """
    scale = [1.0, *(resolution_um or (1.0, 1.0))]
    axes = [{"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if resolution_um is not None:
        for axis in axes[1:]:
            axis["unit"] = "micrometer"
    if len(shape) == 4:
        axes, scale = [{"name": "c", "type": "channel"}, *axes], [1.0, *scale]
    attrs: dict[str, Any] = {"multiscales": [{"version": "0.4", "name": "segkit", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]}
    if len(shape) == 4 and channel_names and len(channel_names) == shape[0]:
        attrs["omero"] = {"version": "0.4", "channels": [{"label": str(name), "active": True}
                                                          for name in channel_names]}
    return attrs


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


def resolution_um(resolution: Resolution | None) -> tuple[float, float] | None:
    """Pixel size (y, x) in micrometres from TIFF resolution tags, when they are in pixels per centimetre.

    Parameters
    ----------
    resolution : Resolution or None

    Returns
    -------
    tuple of (float, float) or None
        None for other units or no resolution.
    """
    if resolution is not None and resolution.unit == 3 and resolution.x > 0 and resolution.y > 0:
        return (1e4 / resolution.y, 1e4 / resolution.x)
    return None


def create_ome_zarr(path: str | Path, shape: tuple[int, ...], chunks: tuple[int, ...],
                    dtype: np.dtype | type | str, resolution: Resolution | None,
                    channel_names: tuple[str, ...] | None = None) -> None:
    """Create an empty OME-Zarr store at `path`, replacing what is there.

    A zarr v2 group holding the level-0 array "0" (filled with 0) and its multiscales attributes.

    Parameters
    ----------
    path : str or Path
        The store folder.
    shape : tuple of int
        ZYX, or CZYX (one channel per class).
    chunks : tuple of int
        Chunk shape, one entry per axis of `shape`.
    dtype : numpy.dtype, type or str
    resolution : Resolution or None
        Pixel size written into the metadata (see `resolution_um`).
    channel_names : tuple of str, optional
        Channel labels.

    Raises
    ------
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    require("zarr", feature="OME-Zarr output", package="zarr")
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0)
    group.attrs.update(ome_zarr_attributes(tuple(shape), resolution_um(resolution), channel_names))


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
                                                         dtype=dtype, fill_value=0)


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


def open_level0(store: str | Path, *, mode: str = "r") -> Any:
    """The level-0 array of an OME-Zarr store: `open_array(store, "0", mode=mode)`.

    Parameters and errors as in `open_array`, and an InputError when the store has no level-0 array.
    """
    if not (Path(store) / "0").exists():
        raise InputError(f"{store} is not a segkit OME-Zarr store (no level 0 array); pass a store from "
                         "`segkit predict ... -o out.ome.zarr`")
    return open_array(store, "0", mode=mode)


def convert_zarr_to_tiff(store: str | Path, output: str | Path, *, overwrite: bool = False,
                         compression: str = "zlib", report: Callable[[str], object] | None = None) -> Path:
    """Stream the level-0 array of an OME-Zarr store into a tiled BigTIFF, plane by plane.

    YX and ZYX stores are written as they are, a CZYX store (one channel per class) as a ZCYX TIFF
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

    Returns
    -------
    Path
        The written TIFF.

    Raises
    ------
    InputError
        When the store is of an unfinished run, has no level 0, or holds axes other than YX, ZYX or CZYX.
    OutputExistsError, OutputError
        When the output cannot be written (it exists, it is the input, its folder is missing or
        read-only), before any work.
    MissingDependencyError
        When zarr is not installed (the `dask` extra: `pip install -e '.[dask]'`).
    """
    if Path(store).exists():
        check_complete(store)
    array = open_level0(store)
    axes = store_axes(store)
    if array.ndim == 4 and axes not in (None, ("c", "z", "y", "x")):
        raise InputError(f"{store} has axes {', '.join(axes or ())}; convert writes YX, ZYX or CZYX stores")
    if array.ndim not in (2, 3, 4):
        raise InputError(f"{store} holds a {array.ndim}D array; convert writes YX, ZYX or CZYX stores")
    check_output(output, kind="tiff", inputs=[store], overwrite=overwrite, report=report)
    if array.ndim == 4:
        channels, depth, height, width = array.shape
        planes: Any = (plane for z in range(depth) for plane in np.asarray(array[:, z]))
        return write_stack(output, planes, shape=(depth, channels, height, width), axes="ZCYX", dtype=array.dtype,
                           overwrite=overwrite, compression=compression, calibration=zarr_calibration(store),
                           content=read_content(store))
    planes = ((np.asarray(array[...]),) if array.ndim == 2
              else (np.asarray(array[z]) for z in range(array.shape[0])))
    return write_stack(output, planes, shape=tuple(array.shape), dtype=array.dtype, overwrite=overwrite,
                       compression=compression, calibration=zarr_calibration(store), content=read_content(store))
