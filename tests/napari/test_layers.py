"""segkit.napari.layers: the axes of image layers and the layers results become (pure functions, no viewer)."""

from __future__ import annotations

import numpy as np
import pytest

from segkit.errors import InputError
from segkit.napari.layers import input_axes, layer_type, result_layer


@pytest.mark.parametrize(("shape", "rgb", "channels", "axes"), [
    ((64, 64), False, 1, "YX"),
    ((3, 64, 64), False, 1, "ZYX"),
    ((3, 64, 64), False, 3, "CYX"),
    ((2, 64, 64), False, 3, "ZYX"),
    ((5, 3, 64, 64), False, 3, "ZCYX"),
    ((3, 5, 64, 64), False, 3, "CZYX"),
    ((64, 64, 3), True, 3, "YXC"),
    ((4, 64, 64, 3), True, 3, "ZYXC"),
])
def test_input_axes(shape, rgb, channels, axes):
    assert input_axes(shape, rgb=rgb, channels=channels) == axes


@pytest.mark.parametrize(("shape", "channels"), [((2, 3, 64, 64), 1), ((2, 2, 64, 64), 3), ((1, 2, 3, 8, 8), 1)])
def test_input_axes_refuses_other_shapes_in_one_line(shape, channels):
    with pytest.raises(InputError, match=r"is not a plane or a stack") as caught:
        input_axes(shape, channels=channels)
    assert "\n" not in str(caught.value)


def test_layer_types():
    assert [layer_type(k) for k in ("probabilities", "intensities", "classes", "labels")] == [
        "image", "image", "labels", "labels"]
    with pytest.raises(ValueError):
        layer_type("mask")


def test_a_stack_result_keeps_the_input_scale_and_translation():
    labels = np.zeros((3, 8, 8), np.uint32)
    data, kwargs, kind = result_layer(labels, kind="labels", axes="ZYX", source_axes="ZYX", scale=(2.0, 0.5, 0.25),
                                      translate=(1.0, 2.0, 3.0), name="raw instances")
    assert kind == "labels" and data is labels
    assert kwargs == {"name": "raw instances", "scale": [2.0, 0.5, 0.25], "translate": [1.0, 2.0, 3.0]}


def test_class_probabilities_become_one_image_layer_per_class_placed_like_the_input():
    # input: a 2-channel stack (napari scale has a C entry); output: 3 class probabilities per plane
    result = np.zeros((4, 3, 8, 8), np.float32)
    data, kwargs, kind = result_layer(result, kind="probabilities", axes="ZCYX", source_axes="ZCYX",
                                      scale=(3.0, 1.0, 0.5, 0.5), translate=(0.0, 0.0, 5.0, 6.0), name="p",
                                      channel_names=["bg", "cell", "edge"])
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["name"] == ["p bg", "p cell", "p edge"]
    assert kwargs["scale"] == [3.0, 0.5, 0.5] and kwargs["translate"] == [0.0, 5.0, 6.0]


def test_an_rgb_input_has_no_scale_entry_for_its_colours():
    result = np.zeros((8, 8), np.uint8)
    _, kwargs, kind = result_layer(result, kind="classes", axes="YX", source_axes="YXC", scale=(0.5, 0.25),
                                   translate=(0.0, 1.0), name="m")
    assert kind == "labels" and kwargs["scale"] == [0.5, 0.25] and kwargs["translate"] == [0.0, 1.0]
