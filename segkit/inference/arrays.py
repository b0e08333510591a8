"""Arrays in, arrays out: `Model` holds a loaded model for repeated calls on numpy arrays, and
`predict_array` is its one-shot form.

An array goes through the pipeline a TIFF goes through (`segkit.inference.pipeline.run_stack`):
the same loading and option checks (`segkit.inference.api`), tiling, normalisation (the
checkpoint's statistics, or the whole array's, computed as for a stack), pixel-size and training
scale rescaling, test-time augmentation, device fitting and output encodings. Only the two ends
differ: planes are read from the array, and the encoded planes are gathered into the array
returned instead of a TIFF. So `Model.predict(image)` holds the numbers `segkit.predict` writes
for `image` saved as a TIFF (probabilities as float32 unless an `output_type` is asked for).

What `Model.predict` returns, by `Model.output_kind` (axes by `Model.output_axes`; an input
without a Z axis gives the same without Z):

| kind | with | dtype | axes |
|---|---|---|---|
| probabilities | segmenters (default) | float32 in [0, 1]; uint8 0-255 or float16 with `output_type` | ZYX; models of K classes ZCYX |
| classes | `argmax` (0..K-1), or a `threshold` mask (0 / 255) | uint8 | ZYX |
| labels | `instances`, or models trained on instance labels | uint32, 0 background, ids unique across the stack | ZYX |
| intensities | denoisers (`kind='denoiser'`) | the input's dtype (`output_type` 'same'), or float32 | ZYX |

Inputs are numpy arrays (or anything `numpy.asarray` takes) of axes YX, ZYX, CYX or ZCYX, or
channels last (YXC, ZYXC) with `axes=`. uint8, uint16 and float32 are used as they are (the
dtypes segkit reads from TIFFs); other integer and float dtypes are converted to float32 plane
by plane (so the automatic normalisation uses the array's statistics unless the model was
trained on float32).
"""

from __future__ import annotations

import difflib
import numbers
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from segkit.errors import InputError, SegkitError
from segkit.inference.api import (
    check_cancel,
    check_channels_fit_model,
    fit_to_device,
    load_for_prediction,
    model_view,
    rescale_factor,
)
from segkit.inference.device_fit import BackoffForward, with_smaller_tiles
from segkit.inference.encodings import (
    PlaneEncoding,
    ProbabilityEncoding,
    model_encoding,
    output_content,
    stack_encoding,
)
from segkit.inference.options import PredictOptions
from segkit.inference.pipeline import choose_normalization, count_tiles, run_stack
from segkit.inference.progress import Progress, check_progress, progress_to
from segkit.io.tiff import SUPPORTED_DTYPES, check_finite
from segkit.words import counted

#: What `Model.output_kind` answers.
OUTPUT_KINDS = ("probabilities", "classes", "labels", "intensities")
#: Settings that shape the loaded engine: fixed when a `Model` is made (a call may repeat, not change, them).
ENGINE_SETTINGS = ("engine", "denoise", "device", "amp", "compile_model", "halo", "tta", "kind", "tile")
#: Settings of files and clusters (`segkit.predict`): an array has no output file, compression or Dask path.
FILE_SETTINGS = ("compression", "workers", "scheduler", "chunk", "resume", "overwrite", "skip_existing")
#: The name arrays go by in messages (where a file path would be).
SOURCE = "the array"
_DEFAULTS = {f.name: f.default for f in fields(PredictOptions)}


def _quiet(_: str) -> None:
    return None


# -- the array as a stack ------------------------------------------------------------------------

class ArrayStack:
    """A (Z, C, H, W) array seen as the stack prediction reads (the interface of
    `segkit.io.tiff.TiffStack`): planes (H, W) or (C, H, W), each a fresh contiguous copy in `dtype`.

    Parameters
    ----------
    data : (Z, C, H, W) ndarray
        The image (a view of the caller's array: nothing is copied until a plane is read).
    is_2d : bool
        Whether the caller's array had no Z axis (the output drops it again).
    dtype : numpy.dtype
        The dtype planes are read in (uint8, uint16 or float32).
    pixel_size : float, optional
        Micrometres per pixel (as a TIFF's calibration), for models trained at a known pixel size.
    """

    def __init__(self, data: np.ndarray, *, is_2d: bool, dtype: np.dtype, pixel_size: float | None = None) -> None:
        self.data = data
        depth, self.channels, height, width = data.shape
        self.shape = (depth, height, width)
        self.is_2d = is_2d
        self.dtype = np.dtype(dtype)
        self.pixel_size = pixel_size
        self.resolution = None
        self.source = SOURCE

    def __len__(self) -> int:
        return self.shape[0]

    def plane(self, index: int) -> np.ndarray:
        """Plane `index` as (H, W) (one channel) or (C, H, W), a fresh C-contiguous copy in `dtype`."""
        if not 0 <= index < self.shape[0]:
            raise IndexError(index)
        plane = self.data[index, 0] if self.channels == 1 else self.data[index]
        return np.array(plane, dtype=self.dtype, order="C")

    def check_finite(self) -> None:
        """Refuse a float array holding NaN or inf (as the TIFF path refuses such a plane), naming the plane."""
        if self.data.dtype.kind != "f":
            return
        for index in range(len(self)):
            check_finite(np.asarray(self.data[index], dtype=self.dtype), SOURCE, index)


def read_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array's planes are read in: uint8, uint16 and float32 as they are (native byte
    order), every other integer or float dtype as float32; bool, complex and non-numbers refused."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        raise InputError(f"{SOURCE} is boolean (a mask?); segkit segments intensities: pass the image itself, or "
                         "image.astype(numpy.uint8) for a 0/1 picture")
    if dtype.kind == "c":
        raise InputError(f"{SOURCE} is complex ({dtype}); segkit segments real intensities: pass numpy.abs(image) "
                         "or its real part")
    if dtype.kind not in "uif":
        raise InputError(f"{SOURCE} has dtype {dtype}, which is not numeric; pass intensities (uint8, uint16 or "
                         "float32)")
    native = dtype.newbyteorder("=")
    return native if native in [np.dtype(d) for d in SUPPORTED_DTYPES] else np.dtype(np.float32)


def parse_axes(axes: str, ndim: int | None = None) -> str:
    """`axes` in capitals, checked: Z, C, Y, X once each (S, tifffile's samples, counts as C), Y and X
    present, one letter per array axis when `ndim` is given."""
    text = str(axes).upper().replace("S", "C")
    if (not text or set(text) - set("ZCYX") or len(set(text)) != len(text) or "Y" not in text
            or "X" not in text):
        raise InputError(f"axes {axes!r} are not valid: use the letters Z, C, Y and X once each, with Y and X, e.g. "
                         "'YX', 'ZYX', 'CYX', 'ZCYX', 'YXC'")
    if ndim is not None and len(text) != ndim:
        raise InputError(f"axes {axes!r} name {len(text)} axes but {SOURCE} has {ndim}; give one letter per axis "
                         "(e.g. 'YX' for (H, W), 'ZYX' for (Z, H, W), 'CYX' for (C, H, W))")
    return text


def input_axes(shape: tuple[int, ...], axes: str | None, channels: int) -> str:
    """The axes of an array of `shape` for a model of `channels` input channels: `axes` checked, or
    told from the rank (YX, ZCYX) and, for 3D arrays, from the model (ZYX for one channel; CYX or YXC
    where one end holds the model's channel count). Ambiguous or impossible shapes raise one line."""
    shape = tuple(int(n) for n in shape)
    if axes is not None:
        return parse_axes(axes, len(shape))
    if len(shape) == 2:
        return "YX"
    if len(shape) == 4:
        return "ZCYX"
    if len(shape) != 3:
        raise InputError(f"{SOURCE} is {len(shape)}D (shape {shape}); segkit takes 2D (YX), 3D (ZYX, CYX) or "
                         "4D (ZCYX) arrays: index or squeeze the other axes")
    if channels == 1:
        if shape[-1] in (3, 4) and shape[0] > 4:
            raise InputError(f"{SOURCE} of shape {shape} looks like an RGB image (channels last), but the model takes "
                             "single-channel images: convert it to grayscale, or pass axes='ZYX' if it is a stack")
        return "ZYX"
    first, last = shape[0] == channels, shape[-1] == channels
    if first != last:
        return "CYX" if first else "YXC"
    if first:
        raise InputError(f"{SOURCE} of shape {shape} could hold the model's {channels} channels first or last: say "
                         "which with axes='CYX' or axes='YXC'")
    raise InputError(f"{SOURCE} of shape {shape} has no axis of {channels} channels, but the model takes "
                     f"{channels}-channel images: give (C, H, W) or (H, W, C) planes, or say the axes with axes=")


def as_stack(image: Any, axes: str | None, channels: int, *,
             pixel_size: float | None = None) -> tuple[ArrayStack, str]:
    """The array `image` as an `ArrayStack` (a view, axes put in ZCYX order) and its axes, checked.

    Raises
    ------
    InputError
        A path or a non-array, an empty array, a wrong rank, axes that do not fit the shape, a dtype
        that is not real numbers, NaN or inf values, a pixel size that is not a positive number.
    """
    if isinstance(image, (str, Path)):
        raise InputError(f"{str(image)!r} is a path: predict_array and Model.predict take numpy arrays; for files "
                         "use segkit.predict(path, output, model=...)")
    data = np.asarray(image)
    if data.size == 0:
        raise InputError(f"{SOURCE} is empty (shape {data.shape}); pass an image of at least one pixel")
    dtype = read_dtype(data.dtype)
    text = input_axes(data.shape, axes, channels)
    order = [text.index(a) for a in "ZCYX" if a in text]
    data = np.transpose(data, order)
    if "Z" not in text:
        data = data[None]
    if "C" not in text:
        data = data[:, None]
    if pixel_size is not None and not (isinstance(pixel_size, numbers.Real) and not isinstance(pixel_size, bool)
                                       and np.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(f"pixel_size {pixel_size!r} must be a positive number (micrometres per pixel)")
    stack = ArrayStack(data, is_2d="Z" not in text, dtype=dtype,
                       pixel_size=float(pixel_size) if pixel_size is not None else None)
    stack.check_finite()
    return stack, text


# -- settings and encodings ----------------------------------------------------------------------

def array_options(settings: Mapping[str, Any]) -> tuple[PredictOptions, bool]:
    """`settings` as PredictOptions (checked as `segkit.predict` checks them), and whether
    probabilities come back as float32 (arrays' default: `output_type` left out or 'float32')."""
    unknown = [name for name in settings if name not in _DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(_DEFAULTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SegkitError(f"unknown setting {unknown[0]!r}{hint}; the settings are PredictOptions' fields: "
                          f"{', '.join(_DEFAULTS)}")
    for name in FILE_SETTINGS:
        if name in settings and settings[name] != _DEFAULTS[name]:
            raise SegkitError(f"{name} applies to files written by segkit.predict; leave it out for arrays")
    settings = dict(settings)
    float32 = settings.get("kind", "segmenter") == "segmenter" and str(settings.get("output_type") or "float32") == "float32"
    if float32:
        settings["output_type"] = None
    return PredictOptions(**settings), float32


@dataclass(frozen=True)
class Float32Probabilities:
    """Probabilities returned as float32 in [0, 1] (class `channel`, or every class: `channels`)."""

    channel: int | None = 0
    channels: int = 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def encode(self, values: Any) -> Any:
        probability = values if self.channel is None else values[self.channel]
        return probability.float().clamp_(0.0, 1.0)

    def finish(self, plane: np.ndarray) -> np.ndarray:
        return plane


def array_encoding(info: Any, options: PredictOptions, stack: Any, factor: float | None, float32: bool) -> PlaneEncoding:
    """The file path's encoding for this stack (`stack_encoding`), with float32 probabilities in place of
    uint8 ones where `float32` (arrays' default)."""
    spec = stack_encoding(info, options, stack, factor)
    if float32 and isinstance(spec, ProbabilityEncoding) and spec.kind == "uint8":
        return Float32Probabilities(spec.channel, spec.channels)
    return spec


def _gather(planes: Iterator[np.ndarray], count: int, dtype: np.dtype) -> np.ndarray:
    """The finished planes, in order, as one (Z, ...) array of `dtype`."""
    out: np.ndarray | None = None
    for index, plane in enumerate(planes):
        if out is None:
            out = np.empty((count, *plane.shape), dtype)
        out[index] = plane
    return out  # run_stack hands over one plane per input plane, at least one


# -- the model -----------------------------------------------------------------------------------

class Model:
    """A model loaded once and held for predictions on numpy arrays (no reload per call).

    Parameters
    ----------
    model : path or engine, optional
        A checkpoint (.safetensors), an ONNX file, a bioimage.io package (.zip or rdf.yaml), ``"demo"`` (the
        bundled U-Net; a file named demo wins), or an already built engine (the engine protocol plus
        `geometry`); default: the bundled demo U-Net.
    report : callable or None
        Receives notes (an ONNX export, normalising by the array's statistics, an out-of-memory
        back-off); default: print; None: silent.
    **settings
        Fields of `segkit.inference.options.PredictOptions`, checked as `segkit.predict` checks them:
        device, engine, amp, tile, batch, normalize, tta, halo, denoise, kind, blend, instances,
        threshold, argmax, class_index, output_type (for segmenters also 'float32', the default
        here). File settings (compression, overwrite, workers, ...) are refused. `engine`, `denoise`,
        `device`, `amp`, `compile_model`, `halo`, `tta`, `kind` and `tile` shape the loaded engine and
        are fixed here; the others may also be given per call.

    Attributes
    ----------
    info : CheckpointInfo
        The model's record (kind, classes, normalisation, training defaults).
    geometry : Geometry
        Its geometry (valid tiles, margin, halo, step).
    channels : int
        Input channels the model takes.
    tile : int
        The input tile it runs at (with tile 'auto': measured per plane size at the first call).
    engine : str
        The engine and device, in words.
    name : str
        The model in words (its path, or the bundled demo U-Net by name).

    Raises
    ------
    SegkitError
        A bad or unknown setting, a model file that is missing or cannot be read, options that do not
        fit the model (an ONNX graph and amp, a tile it cannot take): one line.

    Examples
    --------
    >>> import segkit
    >>> model = segkit.Model("model.safetensors", device="cuda")           # doctest: +SKIP
    >>> probabilities = model.predict(image)                                  # doctest: +SKIP
    >>> labels = model.predict(stack, axes="ZYX", instances=True)             # doctest: +SKIP
    """

    def __init__(self, model: str | Path | Any | None = None, *, report: Callable[[str], object] | None = print,
                 **settings: Any) -> None:
        self._report = report if report is not None else _quiet
        self._settings = dict(settings)
        options, _ = array_options(self._settings)
        self._loaded, self.name = load_for_prediction(model, options, report=self._report)
        self.options = options
        engine = self._loaded.engine
        self._forward = BackoffForward(engine, report=self._report, release=getattr(engine, "release_memory", None))
        self._fits: dict[tuple, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.output_kind()  # the output settings fit this model (argmax of a membrane model fails here, as in predict)

    # -- what it is ------------------------------------------------------------------------
    @property
    def info(self) -> Any:
        return self._loaded.info

    @property
    def geometry(self) -> Any:
        return self._loaded.geometry

    @property
    def channels(self) -> int:
        return int(self.info.input_channels)

    @property
    def tile(self) -> int:
        return int(self._loaded.tile)

    @property
    def engine(self) -> str:
        return str(getattr(self._loaded.engine, "label", type(self._loaded.engine).__name__))

    def __repr__(self) -> str:
        return (f"segkit.Model({self.name}: {self.info.kind}, {counted(self.channels, 'input channel')}, "
                f"{counted(self.info.output_classes, 'output')}, "
                f"tile {self.tile}, on {self.engine}; returns {self.output_kind()})")

    # -- what a call returns -------------------------------------------------------------
    def output_kind(self, **settings: Any) -> str:
        """What `predict` returns with these settings.

        Parameters
        ----------
        **settings
            As for `predict`.

        Returns
        -------
        str
            'probabilities' (float32 by default), 'classes' (argmax class numbers, or a threshold's
            0/255 mask: uint8), 'labels' (instances or objects: uint32) or 'intensities' (a denoiser's).
        """
        options, _ = self._call_options(settings)
        if options.kind == "denoiser":
            return "intensities"
        return output_content(model_encoding(self.info, options))

    def output_axes(self, axes: str, **settings: Any) -> str:
        """The axes of what `predict` returns for an input of `axes`, with these settings.

        Parameters
        ----------
        axes : str
            The input's axes, e.g. 'YX', 'ZYX', 'CYX', 'ZCYX', 'YXC' (`input_axes` tells them from a
            shape).
        **settings
            As for `predict`.

        Returns
        -------
        str
            'YX' or 'ZYX' (a Z axis where the input has one), with a class axis for probabilities of
            K classes: 'CYX' or 'ZCYX' (the order of segkit's TIFFs).
        """
        if axes is None:
            raise InputError("output_axes needs the input's axes, e.g. 'YX' or 'ZYX' (Model.input_axes(shape) tells "
                             "them from a shape)")
        spatial = "ZYX" if "Z" in parse_axes(axes) else "YX"
        options, _ = self._call_options(settings)
        if options.kind == "denoiser":
            return spatial
        if getattr(model_encoding(self.info, options), "channels", 1) > 1:
            return spatial[:-2] + "CYX"
        return spatial

    def input_axes(self, shape: tuple[int, ...], axes: str | None = None) -> str:
        """The axes `predict` reads an array of `shape` with (`axes` checked, or told from the rank and
        the model's channel count: YX, ZYX, CYX/YXC, ZCYX); raises InputError where `axes=` is needed."""
        return input_axes(tuple(shape), axes, self.channels)

    # -- prediction ----------------------------------------------------------------------
    def predict(self, image: Any, axes: str | None = None, *, pixel_size: float | None = None,
                progress: Progress | bool = True, cancel: threading.Event | None = None,
                **settings: Any) -> np.ndarray:
        """Predict a numpy array and return the result as a numpy array.

        Parameters
        ----------
        image : ndarray
            (H, W), (Z, H, W), (C, H, W) or (Z, C, H, W); channels last with `axes`. uint8, uint16
            and float32 are used as they are; other real dtypes are read as float32.
        axes : str, optional
            The image's axes (letters Z, C, Y, X as in StarDist and tifffile: 'YX', 'ZYX', 'CYX',
            'ZCYX', 'YXC', 'ZYXC'). Default: YX for 2D, ZCYX for 4D; a 3D array is ZYX for a
            single-channel model and CYX or YXC for a model of C channels where one end of the shape is
            C (otherwise `axes` is required).
        pixel_size : float, optional
            Micrometres per pixel, as a TIFF's calibration: a model trained at another pixel size
            gets its planes resampled, and its output back to the image's size.
        progress : bool or Progress
            True (default): a progress bar of the tiles on stderr (tqdm.auto: a widget in notebooks);
            False: none; or a bar of your own, reset to the number of tiles, then updated per batch (a
            tqdm bar fits), and left open.
        cancel : threading.Event, optional
            When set (from another thread, or from `progress`), the prediction stops after the
            current tile batch and raises `segkit.errors.Cancelled`.
        **settings
            PredictOptions fields for this call (normalize, batch, blend, instances, threshold,
            argmax, class_index, output_type, ...); those fixed by the Model may only be repeated.

        Returns
        -------
        ndarray
            The image's Z axis (if any) and (H, W), by `output_kind`: float32 probabilities in [0, 1]
            (uint8 0-255 or float16 with `output_type`), with a class axis after Z for models of K
            classes ('CYX' / 'ZCYX'); uint8 classes (argmax) or 0/255 masks (threshold); uint32 labels,
            ids unique across the stack; or a denoiser's intensities (the input's dtype, or float32).

        Raises
        ------
        InputError
            An input that is not a numeric array of a supported shape, axes that do not fit it, a
            channel count other than the model's, NaN or inf values: one line.
        SegkitError
            A bad setting, or one the Model fixes changed for this call.
        Cancelled
            `cancel` was set.
        """
        check_progress(progress)
        options, float32 = self._call_options(settings)
        info, geometry = self.info, self.geometry
        stack, _ = as_stack(image, axes, self.channels, pixel_size=pixel_size)
        check_channels_fit_model(stack, info, SOURCE)
        # one call at a time: the pipeline sets torch's CPU threads while it runs
        with self._lock, progress_to(progress) as bar:
            check_cancel(cancel)
            normalization, note = choose_normalization(stack, info, mode=options.normalize)
            if note:
                self._report(f"{SOURCE}: {note}")
            factor = rescale_factor(stack, info)
            spec = array_encoding(info, options, stack, factor, float32)
            tile, batch = self._fit(options, stack.shape[1:])
            seen = model_view(stack, info)  # the planes as the model sees them, for the tile count

            def on_tiles(count: int) -> None:
                if bar is not None:
                    bar.update(count)
                check_cancel(cancel)

            def run(size: int) -> np.ndarray:
                if bar is not None:
                    bar.reset(total=count_tiles(seen, geometry, size))
                return run_stack(stack, self._forward, geometry, lambda planes: _gather(planes, len(stack), spec.dtype),
                                 normalization=normalization, tile=size, batch=batch, blend=str(options.blend),
                                 spec=spec, on_tiles=on_tiles, rescale=factor)

            out = with_smaller_tiles(run, tile, geometry, report=self._report)
        return out[0] if stack.is_2d else out

    def _call_options(self, settings: Mapping[str, Any]) -> tuple[PredictOptions, bool]:
        """This call's options: the Model's settings updated by `settings`, which may not change those
        that shape the loaded engine."""
        for name in ENGINE_SETTINGS:
            if name in settings and str(getattr(array_options({name: settings[name]})[0], name)) != str(
                    getattr(self.options, name)):
                raise SegkitError(f"{name} is fixed when the Model is made (it shapes the loaded engine); make "
                                  f"another segkit.Model(..., {name}=...) to change it")
        return array_options({**self._settings, **settings})

    def _fit(self, options: PredictOptions, plane_shape: tuple[int, int]) -> tuple[int, int]:
        """The (tile, batch) for planes of `plane_shape`, fitted to the device once per batch setting
        (and, with tile 'auto', per plane size)."""
        key = (options.batch, tuple(plane_shape) if options.tile == "auto" else None)
        if key not in self._fits:
            self._fits[key] = fit_to_device(self._loaded, tuple(plane_shape), options, report=self._report)
        return self._fits[key]


def predict_array(image: Any, model: str | Path | Any | None = None, axes: str | None = None, *,
                  pixel_size: float | None = None, progress: Progress | bool = True,
                  cancel: threading.Event | None = None, report: Callable[[str], object] | None = print,
                  **settings: Any) -> np.ndarray:
    """Predict one numpy array: ``Model(model, **settings).predict(image, axes)`` in one call.

    Parameters
    ----------
    image : ndarray
        (H, W), (Z, H, W), (C, H, W) or (Z, C, H, W) (see `Model.predict`); not a path (for files use
        `segkit.predict`).
    model : path or engine, optional
        As for `Model`; default: the bundled demo U-Net.
    axes, pixel_size, progress, cancel
        As for `Model.predict`.
    report : callable or None
        As for `Model`.
    **settings
        PredictOptions fields, as for `Model`.

    Returns
    -------
    ndarray
        As `Model.predict` returns (the module docstring has the table of kinds, dtypes and axes).

    Raises
    ------
    InputError, SegkitError, Cancelled
        As for `Model` and `Model.predict`; a path for `image` is refused before the model loads.

    Examples
    --------
    >>> import numpy as np, segkit
    >>> image = np.zeros((64, 64), np.uint8)
    >>> probabilities = segkit.predict_array(image, device="cpu", report=None)  # doctest: +SKIP
    >>> probabilities.shape, probabilities.dtype                                # doctest: +SKIP
    ((64, 64), dtype('float32'))
    """
    if isinstance(image, (str, Path)):
        as_stack(image, axes, 1)  # raises: a path is not an array
    check_progress(progress)  # before the model loads
    return Model(model, report=report, **settings).predict(image, axes, pixel_size=pixel_size, progress=progress,
                                                           cancel=cancel)
