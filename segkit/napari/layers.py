"""Between napari layers and segkit arrays: which axes an image layer has, and which layers a result makes.

Pure functions over arrays and tuples, no Qt and no napari import, so they are tested without a viewer.
A napari "layer data tuple" is `(data, keyword arguments, layer type)`; `viewer._add_layer_from_data(*t)` or
a reader hands it to napari, which builds the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segkit.errors import InputError
from segkit.words import counted

#: The kind of layer each output kind becomes: values to look at (image) or ids to colour (labels).
LAYER_TYPES = {"probabilities": "image", "intensities": "image", "classes": "labels", "labels": "labels"}


def layer_type(kind: str) -> str:
    """The napari layer type ('image' or 'labels') for an output kind.

    Parameters
    ----------
    kind : str
        'probabilities', 'intensities' (an image layer), 'classes' or 'labels' (a labels layer).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        For another kind (a programming error: segkit only writes these four).
    """
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
    return LAYER_TYPES[kind]


def input_axes(shape: Sequence[int], *, rgb: bool = False, channels: int = 1) -> str:
    """The axes of an image layer's data, as segkit names them (tifffile letters), in the layer's order.

    A 3D layer is a stack of planes (ZYX) unless the model takes `channels` > 1 channels and the first axis
    has that many (CYX); a 4D layer is ZCYX or CZYX by where the channel count fits. An RGB(A) layer keeps
    its colour axis last (YXC, ZYXC).

    Parameters
    ----------
    shape : sequence of int
        The layer data's shape.
    rgb : bool
        The layer is RGB(A) (napari's `layer.rgb`): the last axis holds the colours.
    channels : int
        The number of input channels the model takes.

    Returns
    -------
    str
        E.g. 'YX', 'ZYX', 'CYX', 'ZCYX', 'YXC'.

    Raises
    ------
    InputError
        When the shape fits none of these (a time series, a 5D layer, a 4D layer without an axis of
        `channels`).
    """
    shape = tuple(int(n) for n in shape)
    if rgb:
        return {3: "YXC", 4: "ZYXC"}.get(len(shape)) or _unsupported(shape, channels)
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "CYX" if channels > 1 and shape[0] == channels else "ZYX"
    if len(shape) == 4 and channels > 1:
        if shape[1] == channels:
            return "ZCYX"
        if shape[0] == channels:
            return "CZYX"
    return _unsupported(shape, channels)


def _unsupported(shape: tuple[int, ...], channels: int) -> str:
    need = f"; a 4D layer needs an axis of the model's {counted(channels, 'channel')}" if len(shape) == 4 else ""
    raise InputError(f"an image layer of shape {shape} is not a plane or a stack of planes (YX, ZYX, CYX, ZCYX)"
                     f"{need}; choose another layer or split it (napari: Layers > Split Stack)")


def result_layer(result: np.ndarray, *, kind: str, axes: str, source_axes: str, scale: Sequence[float],
                 translate: Sequence[float], name: str, channel_names: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, dict[str, Any], str]:
    """The layer data tuple of a prediction: an image layer for probabilities and intensities, a labels layer
    for classes and objects, placed where the input layer is (its scale and translation per axis).

    Parameters
    ----------
    result : numpy.ndarray
        What the model returned.
    kind : str
        'probabilities', 'intensities', 'classes' or 'labels'.
    axes : str
        The result's axes (e.g. 'ZYX', 'CYX' for one probability per class).
    source_axes : str
        The input layer's axes (from `input_axes`), in the order of `scale` and `translate`.
    scale, translate : sequence of float
        The input layer's (napari's `layer.scale`, `layer.translate`; without an RGB layer's colour axis).
    name : str
        The new layer's name.
    channel_names : sequence of str, optional
        Names of the result's channels (a probability per class): each channel becomes its own image layer
        (napari's `channel_axis`), named after its class.

    Returns
    -------
    tuple
        (data, keyword arguments, 'image' or 'labels').

    Raises
    ------
    ValueError
        When `axes` does not match the result's rank (a programming error).
    """
    if len(axes) != result.ndim:
        raise ValueError(f"result of shape {result.shape} with axes {axes!r}")
    # a channel axis of the data is a layer dimension (it has a scale entry), an RGB layer's colour axis is not
    letters = source_axes if len(source_axes) == len(scale) else source_axes.replace("C", "")
    place = {axis: (float(s), float(t)) for axis, s, t in zip(letters, scale, translate)}
    kept = [axis for axis in axes if axis != "C"]
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": [place.get(axis, (1.0, 0.0))[0] for axis in kept],
        "translate": [place.get(axis, (1.0, 0.0))[1] for axis in kept],
    }
    kind_type = layer_type(kind)
    data = result
    if "C" in axes:
        if kind_type == "labels":  # one labels layer per channel would be unreadable: the channel goes first
            raise ValueError(f"{kind} with a channel axis ({axes!r}) has no labels layer")
        count = result.shape[axes.index("C")]
        if count == 1:
            data = np.take(result, 0, axis=axes.index("C"))
        else:
            names = list(channel_names or ())
            if len(names) != count:
                names = [f"channel {i}" for i in range(count)]
            kwargs["channel_axis"] = axes.index("C")
            kwargs["name"] = [f"{name} {label}" for label in names]
    if kind_type == "labels" and not np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.uint32)
    return data, kwargs, kind_type
