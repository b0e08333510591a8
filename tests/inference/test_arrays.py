"""Arrays in, arrays out (segkit.Model, segkit.predict_array): the same numbers as segkit.predict writes
for the same data saved as a TIFF (probabilities, K-class probabilities, argmax, masks, instances,
denoised intensities, channels, pixel size, stack statistics, tiny images), one load per Model, the
axes rules, cancel between tile batches (arrays and files), and every bad input as one line."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile

import segkit
from segkit.errors import Cancelled, InputError, SegkitError
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults
from tests.helpers import REPO, assert_ids_unique_across_slices

quiet = dict(report=None)
DEMO_TILE = 252  # the demo U-Net's smallest tile covering a 64 x 64 plane in one tile (output 68)


def _checkpoint(tmp_path, *, kind="semantic", in_channels=1, classes=3, pixel_size=None, scale=None,
                normalization=None, name="model"):
    """A tiny U-Net (base 4, depth 2, tile 92) of K classes, trained (nominally) on uint8."""
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", base=4, depth=2, classes=classes, in_channels=in_channels).eval()
    normalization = normalization or Normalization(*(((100.0,) * in_channels, (30.0,) * in_channels)
                                                     if in_channels > 1 else (100.0, 30.0)))
    names = {"semantic": ["background", "myelin", "axon"], "instances": ["background", "interior", "boundary"]}[kind]
    info = CheckpointInfo(kind="segmenter", model="unet",
                          model_kwargs={"base": 4, "depth": 2, "classes": classes, "in_channels": in_channels},
                          geometry=model.geometry, normalization=normalization, classes=names[:classes],
                          inference=InferenceDefaults(tile=92, labels_kind=kind, pixel_size=pixel_size, scale=scale,
                                                      input_dtype="uint8"))
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="module")
def semantic(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("semantic"))


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("two"), in_channels=2,
                       normalization=Normalization((100.0, 50.0), (30.0, 10.0)))


@pytest.fixture(scope="module")
def demo():
    return segkit.Model(device="cpu", tile=DEMO_TILE, **quiet)


@pytest.fixture(scope="module")
def raw():
    """Two 64 x 64 crops of the bundled ISBI slices (uint8 EM, membranes and cells)."""
    return tifffile.imread(REPO / "segkit" / "data" / "isbi_test_raw.tif")[:2, 100:164, 200:264].copy()


def _uint8(shape, seed=3):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _through_tiff(tmp_path, data, model=None, name="out.tif", tiff_kwargs=None, **settings):
    """What segkit.predict writes for `data` saved as a TIFF, read back."""
    source = tmp_path / f"in_{name}"
    tifffile.imwrite(source, data, **({"photometric": "minisblack"} | (tiff_kwargs or {})))
    segkit.predict(source, tmp_path / name, model=model, device="cpu", report=lambda _: None, **settings)
    return tifffile.imread(tmp_path / name)


# -- the same numbers as the file path ---------------------------------------------------------

def test_demo_probabilities_are_the_tiff_paths(tmp_path, demo, raw):
    written = _through_tiff(tmp_path, raw, tile=DEMO_TILE)
    assert written.dtype == np.uint8 and written.shape == (2, 64, 64)
    same = demo.predict(raw, output_type="uint8")
    np.testing.assert_array_equal(same, written)
    probabilities = demo.predict(raw)
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 64, 64)
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0 and probabilities.std() > 0.05
    # the uint8 encoding is floor(255 p + 0.5) of these very values
    assert np.abs(np.floor(probabilities.astype(np.float64) * 255 + 0.5) - written).max() <= 1
    plane = demo.predict(raw[1])  # a 2D image: (H, W) back
    assert plane.shape == (64, 64) and np.abs(plane - probabilities[1]).max() < 1e-5
    assert demo.output_kind() == "probabilities" and demo.output_axes("ZYX") == "ZYX" and demo.output_axes("YX") == "YX"


def test_masks_and_instances_are_the_tiff_paths(tmp_path, demo, raw):
    mask = demo.predict(raw, threshold=0.5)
    np.testing.assert_array_equal(mask, _through_tiff(tmp_path, raw, name="mask.tif", tile=DEMO_TILE, threshold=0.5))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert demo.output_kind(threshold=0.5) == "classes"

    labels = demo.predict(raw, instances=True)
    assert labels.dtype == np.uint32 and labels.shape == (2, 64, 64) and labels.max() > 2
    assert_ids_unique_across_slices(labels)
    np.testing.assert_array_equal(labels, _through_tiff(tmp_path, raw, name="inst.tif", tile=DEMO_TILE, instances=True))
    assert demo.output_kind(instances=True) == "labels" and demo.output_axes("ZYX", instances=True) == "ZYX"


def test_class_probabilities_argmax_and_a_class_mask_are_the_tiff_paths(tmp_path, semantic):
    data = _uint8((2, 60, 70))
    model = segkit.Model(semantic, device="cpu", **quiet)
    probabilities = model.predict(data)
    assert probabilities.shape == (2, 3, 60, 70) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    written = _through_tiff(tmp_path, data, semantic)
    assert written.shape == (2, 3, 60, 70)
    np.testing.assert_array_equal(model.predict(data, output_type="uint8"), written)
    assert model.output_axes("ZYX") == "ZCYX" and model.output_axes("YX") == "CYX"

    classes = model.predict(data, argmax=True)
    np.testing.assert_array_equal(classes, _through_tiff(tmp_path, data, semantic, name="c.tif", argmax=True))
    assert classes.dtype == np.uint8 and (classes == probabilities.argmax(1)).mean() > 0.999
    assert model.output_kind(argmax=True) == "classes" and model.output_axes("ZYX", argmax=True) == "ZYX"

    axon = model.predict(data, class_index=2, threshold=0.4)
    np.testing.assert_array_equal(axon, _through_tiff(tmp_path, data, semantic, name="a.tif", class_index=2,
                                                      threshold=0.4))
    one = model.predict(data[0])  # one plane of K classes: (K, H, W)
    assert one.shape == (3, 60, 70) and np.abs(one - probabilities[0]).max() < 1e-5


def test_channels_first_or_last_and_their_axes(tmp_path, two_channel):
    data = _uint8((2, 2, 40, 50))  # ZCYX
    model = segkit.Model(two_channel, device="cpu", **quiet)
    written = _through_tiff(tmp_path, data, two_channel, tiff_kwargs={"metadata": {"axes": "ZCYX"}}, argmax=True)
    np.testing.assert_array_equal(model.predict(data, argmax=True), written)
    np.testing.assert_array_equal(model.predict(data.transpose(0, 2, 3, 1), "ZYXC", argmax=True), written)
    np.testing.assert_array_equal(model.predict(data.transpose(1, 0, 2, 3), "czyx", argmax=True), written)
    plane = model.predict(data[0], argmax=True)  # 3D, one end is the model's 2 channels: CYX
    np.testing.assert_array_equal(plane, written[0])
    np.testing.assert_array_equal(model.predict(data[0].transpose(1, 2, 0), argmax=True), written[0])  # YXC
    assert model.input_axes((2, 40, 50)) == "CYX" and model.input_axes((40, 50, 2)) == "YXC"
    both_ends = _uint8((2, 9, 2))
    with pytest.raises(InputError, match="axes='CYX' or axes='YXC'"):
        model.predict(both_ends)
    assert model.predict(both_ends, "CYX").shape == (3, 9, 2)


def test_pixel_size_and_training_scale_rescale_as_the_tiff_path(tmp_path):
    data = _uint8((1, 80, 90))
    sized = _checkpoint(tmp_path, pixel_size=0.1, name="sized")
    tiff = {"imagej": True, "resolution": (1 / 0.05, 1 / 0.05), "metadata": {"unit": "um"}}
    written = _through_tiff(tmp_path, data, sized, name="s.tif", tiff_kwargs=tiff, argmax=True)
    model = segkit.Model(sized, device="cpu", argmax=True, **quiet)
    np.testing.assert_array_equal(model.predict(data, pixel_size=0.05), written.reshape(1, 80, 90))
    assert not np.array_equal(model.predict(data), written.reshape(1, 80, 90))  # without it: not rescaled

    scaled = _checkpoint(tmp_path, scale=0.5, name="scaled")  # trained on images resized by 0.5 (data.scale)
    written = _through_tiff(tmp_path, data, scaled, name="t.tif", argmax=True)
    np.testing.assert_array_equal(segkit.predict_array(data, scaled, device="cpu", argmax=True, **quiet),
                                  written.reshape(1, 80, 90))


def test_other_dtypes_use_the_stack_statistics_as_the_tiff_path(tmp_path, semantic):
    data = _uint8((2, 60, 70)).astype(np.float32) * 3 + 7  # a float32 array for a model trained on uint8
    messages: list[str] = []
    model = segkit.Model(semantic, device="cpu", argmax=True, report=messages.append)
    classes = model.predict(data)
    assert any("normalising with this stack's statistics" in m for m in messages)
    np.testing.assert_array_equal(classes, _through_tiff(tmp_path, data, semantic, argmax=True))
    np.testing.assert_array_equal(model.predict(data.astype(np.float64)), classes)  # read as float32
    np.testing.assert_array_equal(model.predict(data.astype(np.int32)), classes)
    checkpoint_stats = model.predict(data, normalize="checkpoint")
    assert not np.array_equal(checkpoint_stats, classes)


def test_an_image_smaller_than_a_tile_is_mirror_padded_as_the_tiff_path(tmp_path, semantic):
    data = _uint8((5, 7))
    probabilities = segkit.predict_array(data, semantic, device="cpu", output_type="uint8", **quiet)
    assert probabilities.shape == (3, 5, 7)
    np.testing.assert_array_equal(probabilities, _through_tiff(tmp_path, data, semantic))


def test_denoiser_intensities_are_the_tiff_paths(tmp_path, tiny_denoiser):
    data = _uint8((2, 40, 50))
    model = segkit.Model(tiny_denoiser, kind="denoiser", device="cpu", **quiet)
    denoised = model.predict(data)
    assert denoised.dtype == np.uint8 and denoised.shape == (2, 40, 50)
    np.testing.assert_array_equal(denoised, _through_tiff(tmp_path, data, tiny_denoiser, kind="denoiser"))
    assert model.output_kind() == "intensities" and model.output_axes("YX") == "YX"
    assert model.predict(data, output_type="float32").dtype == np.float32


def test_an_onnx_file_runs_on_arrays_as_on_files(tmp_path, two_channel):
    pytest.importorskip("onnxruntime")
    from segkit.checkpoint import load_model
    from segkit.export import export_onnx, write_onnx

    module, info = load_model(two_channel)
    write_onnx(export_onnx(module, info, tile=92)[0], tmp_path / "m.onnx")
    data = _uint8((2, 60, 70))
    model = segkit.Model(tmp_path / "m.onnx", device="cpu", **quiet)
    assert "onnx" in model.engine.lower()
    written = _through_tiff(tmp_path, data, tmp_path / "m.onnx", tiff_kwargs={"metadata": {"axes": "CYX"}})
    np.testing.assert_array_equal(model.predict(data, output_type="uint8"), written)


# -- one load, repr, exports ---------------------------------------------------------------------

def test_a_model_loads_once_for_many_calls(monkeypatch, semantic):
    import segkit.inference.api as api

    loads: list[object] = []
    real = api.load_prediction_engine

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "load_prediction_engine", counting)
    model = segkit.Model(semantic, device="cpu", **quiet)
    engine = model._forward.forward
    calls: list[int] = []
    original = engine.__call__

    class Counting:  # the held engine, counting its forwards
        device, label = engine.device, engine.label

        def __call__(self, x):
            calls.append(len(x))
            return original(x)

    model._forward.forward = Counting()
    data = _uint8((1, 60, 70))
    for settings in ({}, {"argmax": True}, {"class_index": 1}):
        model.predict(data, **settings)
    assert len(loads) == 1 and len(calls) == 3  # one load; one 1-tile batch per call, on the held engine
    assert "segmenter, 1 input channel, 3 outputs, tile 92" in repr(model) and "probabilities" in repr(model)
    assert model.info.classes == ["background", "myelin", "axon"] and model.channels == 1
    assert model.geometry.is_valid_input(model.tile)


def test_tile_auto_is_measured_once(semantic):
    messages: list[str] = []
    model = segkit.Model(semantic, device="cpu", tile="auto", argmax=True, report=messages.append)
    data = _uint8((1, 60, 70))
    fixed = segkit.Model(semantic, device="cpu", argmax=True, **quiet).predict(data)
    for _ in range(2):
        assert (model.predict(data) == fixed).mean() > 0.999  # a valid-conv model: any tile, the same output
    assert sum("tile auto: measuring" in m for m in messages) == 1  # measured at the first call only


def test_import_segkit_stays_light_and_exports_the_array_api():
    code = ("import sys, segkit; assert 'torch' not in sys.modules; "
            "assert {'Model', 'predict_array'} <= set(segkit.__all__); "
            "from segkit import Model, predict_array; print(Model.__name__, predict_array.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["Model", "predict_array"]


# -- cancel and progress ---------------------------------------------------------------------------

class _Progress:
    """A progress bar that sets `cancel` at its first update (after the first tile batch)."""

    def __init__(self, cancel: threading.Event | None = None):
        self.cancel, self.total, self.updates = cancel, None, []

    def reset(self, total=None):
        self.total = total

    def update(self, n=1):
        self.updates.append(n)
        if self.cancel is not None:
            self.cancel.set()


def test_progress_counts_every_tile(semantic):
    progress = _Progress()
    segkit.predict_array(_uint8((3, 60, 70)), semantic, device="cpu", batch=5, progress=progress, **quiet)
    assert progress.total == 12 and progress.updates == [5, 5, 2]  # 2 x 2 tiles of 92 px per plane, batches of 5


def test_cancel_stops_an_array_prediction_after_the_first_batch(semantic):
    cancel = threading.Event()
    progress = _Progress(cancel)
    model = segkit.Model(semantic, device="cpu", batch=1, **quiet)
    with pytest.raises(Cancelled, match="prediction cancelled"):
        model.predict(_uint8((6, 60, 70)), progress=progress, cancel=cancel)
    assert progress.total == 24 and progress.updates == [1]  # stopped after the first of 24 batches
    cancel.clear()
    assert model.predict(_uint8((2, 60, 70)), cancel=cancel).shape == (2, 3, 60, 70)  # usable afterwards
    cancel.set()
    with pytest.raises(Cancelled):
        model.predict(_uint8((2, 60, 70)), cancel=cancel)


def test_cancel_stops_a_file_prediction_and_leaves_no_output(tmp_path, semantic):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, _uint8((6, 60, 70)), photometric="minisblack")
    cancel = threading.Event()
    progress = _Progress(cancel)
    with pytest.raises(Cancelled):
        segkit.predict(source, tmp_path / "out.tif", model=semantic, device="cpu", batch=1, progress=progress,
                       cancel=cancel, report=lambda _: None)
    assert progress.updates == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]  # no output, no temporary file
    second = tmp_path / "in2.tif"
    second.write_bytes(source.read_bytes())
    cancel.clear()
    progress, lines = _Progress(cancel), []
    with pytest.raises(Cancelled):  # many files: the first is cancelled, the second never starts
        segkit.predict([source, second], tmp_path / "many", model=semantic, device="cpu", batch=1, progress=progress,
                       cancel=cancel, report=lines.append)
    assert progress.updates == [1] and not any("failed" in line for line in lines)
    assert not list((tmp_path / "many").iterdir())


# -- bad input: one line each --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(semantic):
    return segkit.Model(semantic, device="cpu", **quiet)


@pytest.mark.parametrize("image, axes, message", [
    (np.zeros(10, np.uint8), None, "is 1D (shape (10,)); segkit takes 2D (YX), 3D (ZYX, CYX) or 4D (ZCYX)"),
    (np.zeros((2, 2, 2, 8, 8), np.uint8), None, "is 5D"),
    (np.zeros((8, 8), np.uint8), "ZYX", "axes 'ZYX' name 3 axes but the array has 2"),
    (np.zeros((2, 8, 8), np.uint8), "TYX", "axes 'TYX' are not valid"),
    (np.zeros((2, 8, 8), np.uint8), "CYX", "is a multi-channel image (2 channels) but the model was trained on "
                                           "single-channel"),
    (np.zeros((64, 64, 3), np.uint8), None, "looks like an RGB image (channels last)"),
    (np.zeros((8, 8), bool), None, "is boolean"),
    (np.zeros((8, 8), np.complex64), None, "is complex"),
    (np.array([["a", "b"], ["c", "d"]]), None, "is not numeric"),
    (np.zeros((0, 8), np.uint8), None, "is empty (shape (0, 8))"),
    (np.stack([np.zeros((8, 8), np.float32), np.full((8, 8), np.nan, np.float32)]), None,
     "the array: plane 1 contains NaN or inf values"),
    (np.full((8, 8), np.inf), None, "plane 0 contains NaN or inf"),
    ("image.tif", None, "is a path: predict_array and Model.predict take numpy arrays; for files use segkit.predict"),
])
def test_bad_arrays_are_one_line(small, image, axes, message):
    with pytest.raises(InputError) as caught:
        small.predict(image, axes)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_channel_count_the_model_does_not_take_is_one_line(two_channel):
    model = segkit.Model(two_channel, device="cpu", **quiet)
    with pytest.raises(InputError, match=r"shape \(3, 8, 8\) has no axis of 2 channels"):
        model.predict(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(SegkitError, match="single-channel image but the model was trained on 2-channel images"):
        model.predict(np.zeros((8, 8), np.uint8))


def test_bad_settings_are_one_line(tmp_path, small, semantic):
    for call, message in [
        (lambda: segkit.predict_array("x.tif", tmp_path / "missing.safetensors"), "for files use segkit.predict"),
        (lambda: segkit.Model(semantic, tiel=92), "unknown setting 'tiel' (did you mean 'tile'?)"),
        (lambda: segkit.Model(semantic, compression="zstd"), "compression applies to files written by segkit.predict"),
        (lambda: segkit.Model(semantic, output_type="uint16"), "unknown output type 'uint16'"),
        (lambda: segkit.Model(semantic, instances=True, **quiet), "instances need a model trained on instance labels"),
        (lambda: small.predict(np.zeros((8, 8), np.uint8), device="cuda"), "device is fixed when the Model is made"),
        (lambda: small.predict(np.zeros((8, 8), np.uint8), class_index=7), "class_index=7 is not a class"),
        (lambda: small.predict(np.zeros((8, 8), np.uint8), pixel_size=-1), "pixel_size -1 must be a positive number"),
        (lambda: small.output_axes(None), "output_axes needs the input's axes"),
    ]:
        with pytest.raises(SegkitError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert small.predict(np.zeros((8, 8), np.uint8), device="cpu").shape == (3, 8, 8)  # repeating one is fine


def test_tile_auto_measures_a_multi_channel_model_with_its_channels(tmp_path, two_channel):
    reports = []
    model = segkit.Model(two_channel, tile="auto", report=reports.append)
    data = _uint8((2, 48, 48))
    assert model.predict(data, axes="CYX", argmax=True).shape == (48, 48)
    chosen = [line for line in reports if line.startswith("tile auto: tile")]
    assert chosen and "out of memory" not in chosen[0]


def test_a_numpy_scalar_pixel_size_is_taken_and_a_bool_is_not(semantic):
    from segkit.errors import InputError
    from segkit.inference.arrays import as_stack

    data = _uint8((1, 40, 40))
    assert as_stack(data, "ZYX", 1, pixel_size=np.float32(0.5))[0].pixel_size == 0.5
    assert as_stack(data, "ZYX", 1, pixel_size=np.int64(2))[0].pixel_size == 2.0
    with pytest.raises(InputError, match="pixel_size"):
        as_stack(data, "ZYX", 1, pixel_size=True)
