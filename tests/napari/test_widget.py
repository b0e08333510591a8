"""The dock widget in a real napari viewer (pytest-qt, napari's make_napari_viewer, headless under Xvfb):
it docks from the plugin, runs the bundled demo U-Net on a 2D image and a 3-slice stack in a worker thread and
adds the right layer kinds where the input is, stops on Cancel, and reports a bad model in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.napari.conftest import PLUGIN, needs_viewer

pytestmark = needs_viewer

RAW = Path(__file__).resolve().parents[2] / "segkit" / "data" / "isbi_test_raw.tif"
TIMEOUT_MS = 120_000  # a loaded demo U-Net takes about 2 s for three 64 x 64 planes on two CPU cores


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    return np.ascontiguousarray(tifffile.imread(RAW)[:3, 100:164, 200:264])


@pytest.fixture
def viewer_and_widget(make_napari_viewer, qtbot, segkit_plugin):
    """A viewer with segkit's widget docked from the plugin (as Plugins > segkit > Segment does), its model
    (the bundled demo U-Net, on the CPU) described."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    ready = []
    widget.outputs_ready.connect(lambda: ready.append(True))
    widget._device.value = "cpu"  # described again; the first description (device auto) is then stale, ignored
    qtbot.waitUntil(lambda: bool(ready), timeout=TIMEOUT_MS)
    return viewer, widget


def run_and_wait(qtbot, widget, *, cancel: bool = False) -> str:
    """Press Run (and Cancel as soon as the first progress arrives), wait for the end; the final state."""
    states: list[str] = []
    widget.run_finished.connect(states.append)
    if cancel:
        widget._relay.progressed.connect(lambda done, total: widget._cancel.clicked())
    widget._run.clicked()
    if not states:  # running in the worker thread (a bad choice fails at once, in the GUI thread)
        assert widget.worker is not None and widget._cancel.enabled and not widget._run.enabled
    qtbot.waitUntil(lambda: bool(states), timeout=TIMEOUT_MS)
    return states[0]


def test_the_widget_docks_from_the_plugin_and_offers_the_demo_models_outputs(viewer_and_widget):
    from segkit.napari.widget import PredictWidget

    viewer, widget = viewer_and_widget
    assert isinstance(widget, PredictWidget)
    assert widget.model_path is None  # the bundled demo U-Net
    # the membrane U-Net: probabilities, a thresholded mask and instances; no argmax (it has no K classes)
    assert list(widget._output.choices) == ["probabilities", "mask (threshold)", "instances"]
    viewer.add_image(np.zeros((64, 64), np.uint8), name="raw")
    assert widget._image.value is viewer.layers["raw"]  # the layer box follows the viewer's layers


def test_a_2d_image_gives_a_probability_image_layer_with_the_input_scale(viewer_and_widget, qtbot, stack):
    viewer, widget = viewer_and_widget
    viewer.add_image(stack[0], name="raw", scale=(0.5, 0.25), translate=(10.0, 20.0))
    widget._image.value = viewer.layers["raw"]
    widget._output.value = "probabilities"
    assert run_and_wait(qtbot, widget) == "done"
    layer = viewer.layers["raw probabilities"]
    assert layer._type_string == "image"
    assert layer.data.shape == (64, 64) and layer.data.dtype == np.float32
    assert 0.0 <= float(layer.data.min()) and float(layer.data.max()) <= 1.0 and float(layer.data.std()) > 0
    np.testing.assert_allclose(layer.scale, (0.5, 0.25))
    np.testing.assert_allclose(layer.translate, (10.0, 20.0))
    assert widget._progress.value == widget._progress.max > 0  # the tiles were counted


def test_a_stack_gives_instances_as_a_labels_layer_with_the_input_scale(viewer_and_widget, qtbot, stack):
    viewer, widget = viewer_and_widget
    viewer.add_image(stack, name="raw", scale=(2.0, 0.5, 0.5))
    widget._image.value = viewer.layers["raw"]
    widget._output.value = "instances"
    assert run_and_wait(qtbot, widget) == "done"
    layer = viewer.layers["raw instances"]
    assert layer._type_string == "labels"
    assert layer.data.shape == (3, 64, 64) and np.issubdtype(layer.data.dtype, np.integer)
    ids = [set(np.unique(plane)) - {0} for plane in layer.data]
    assert all(ids) and not (ids[0] & ids[1])  # objects in every plane, ids unique across the stack
    np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))


def test_a_mask_is_a_labels_layer(viewer_and_widget, qtbot, stack):
    viewer, widget = viewer_and_widget
    viewer.add_image(stack, name="raw")
    widget._output.value = "mask (threshold)"
    assert run_and_wait(qtbot, widget) == "done"
    layer = viewer.layers["raw mask"]
    assert layer._type_string == "labels" and set(np.unique(layer.data)) <= {0, 255}


def test_cancel_stops_a_run_and_adds_nothing(viewer_and_widget, qtbot, stack, notifications):
    viewer, widget = viewer_and_widget
    viewer.add_image(stack, name="raw")
    assert run_and_wait(qtbot, widget, cancel=True) == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["raw"]
    assert widget._run.enabled and not widget._cancel.enabled and widget.worker is None
    assert any("cancelled" in message for _, message in notifications)


def test_a_bad_model_file_is_one_notification_not_a_crash(viewer_and_widget, qtbot, stack, tmp_path, notifications):
    viewer, widget = viewer_and_widget
    viewer.add_image(stack[0], name="raw")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    ready = []
    widget.outputs_ready.connect(lambda: ready.append(True))
    widget._model_file.value = broken
    qtbot.waitUntil(lambda: bool(ready), timeout=TIMEOUT_MS)
    assert run_and_wait(qtbot, widget) == "failed"
    widget._model_file.value = tmp_path / "missing.safetensors"
    assert run_and_wait(qtbot, widget) == "failed"
    errors = [message for severity, message in notifications if severity == "error"]
    assert any("broken.safetensors" in message for message in errors)
    assert any("missing.safetensors" in message and "does not exist" in message for message in errors)
    assert all("\n" not in message and "Traceback" not in message for message in errors)
    assert [layer.name for layer in viewer.layers] == ["raw"]  # no result, the viewer goes on
    widget._model_file.value = None  # back to the demo model: the widget still runs
    assert run_and_wait(qtbot, widget) == "done"


def test_a_denoiser_offers_intensities_as_an_image_layer(viewer_and_widget, qtbot, stack, tiny_denoiser):
    viewer, widget = viewer_and_widget
    viewer.add_image(stack, name="raw", scale=(2.0, 0.5, 0.5))
    ready = []
    widget.outputs_ready.connect(lambda: ready.append(True))
    widget._model_file.value = tiny_denoiser
    qtbot.waitUntil(lambda: bool(ready), timeout=TIMEOUT_MS)
    assert list(widget._output.choices) == ["intensities"]
    assert run_and_wait(qtbot, widget) == "done"
    layer = viewer.layers["raw intensities"]
    assert layer._type_string == "image" and layer.data.shape == (3, 64, 64) and layer.data.dtype == np.uint8
    np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))


def test_a_packages_code_runs_only_with_trust_model_code_ticked(viewer_and_widget, qtbot, stack, tmp_path,
                                                                 notifications):
    """A foreign package whose only weights need its own Python code (a pytorch_state_dict architecture file):
    refused, with the message in a notification, while Trust model code is off (its default); run once ticked."""
    pytest.importorskip("bioimageio.core", reason="needs the bioimageio extra: pip install 'segkit-bio[bioimageio]'")
    from tests.bioimageio.test_packages import foreign_package

    package, _, _ = foreign_package(tmp_path, classes=1, onnx=False)
    viewer, widget = viewer_and_widget
    assert widget._trust.value is False
    assert "runs only when this is ticked: it can do anything your account can" in widget._trust.tooltip
    viewer.add_image(stack[0], name="raw")
    ready = []
    widget.outputs_ready.connect(lambda: ready.append(True))
    widget._model_file.value = package
    qtbot.waitUntil(lambda: bool(ready), timeout=TIMEOUT_MS)
    assert run_and_wait(qtbot, widget) == "failed"
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors and all("weights.pytorch_state_dict.architecture.source: tiny_net.py is code that segkit would run"
                          in message and "only with Trust model code ticked" in message for message in errors), errors
    assert [layer.name for layer in viewer.layers] == ["raw"]
    ready.clear()
    widget._trust.value = True  # described again, with the opt-in
    qtbot.waitUntil(lambda: bool(ready), timeout=TIMEOUT_MS)
    assert run_and_wait(qtbot, widget) == "done"
    layer = viewer.layers["raw probabilities"]
    assert layer.data.shape == (64, 64) and float(layer.data.std()) > 0
    assert any("running the Python code of package foreign.zip" in message and "with Trust model code ticked" in message
               for _, message in notifications)
    assert any("tiles of 64 px, the size of the package's test input" in message and "Tile auto measures" in message
               for _, message in notifications)  # the tile the package records, in the widget's words
