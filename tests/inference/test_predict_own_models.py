"""Prediction with models trained on the user's own data: K classes (probabilities with a channel
axis, one class, argmax), objects from instance-label models, C-channel input, percentile
normalisation, pixel size, ONNX export of such models."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import segkit
from segkit.checkpoint import save_checkpoint
from segkit.errors import SegkitError
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults

quiet = dict(report=lambda _: None)


def _checkpoint(tmp_path, *, kind: str, classes: int = 3, in_channels: int = 1, pixel_size=None,
                normalization=None, watershed=None, name="model"):
    import torch

    from segkit.models import create_model

    normalization = normalization or Normalization(100.0, 30.0)
    torch.manual_seed(0)
    model = create_model("unet", base=4, depth=2, classes=classes, in_channels=in_channels).eval()
    names = {"semantic": ["background", "myelin", "axon"], "instances": ["background", "interior", "boundary"]}[kind]
    info = CheckpointInfo(kind="segmenter", model="unet",
                          model_kwargs={"base": 4, "depth": 2, "classes": classes, "in_channels": in_channels},
                          geometry=model.geometry, normalization=normalization, classes=names[:classes],
                          inference=InferenceDefaults(tile=92, labels_kind=kind, pixel_size=pixel_size,
                                                      input_dtype="uint8", watershed=watershed))
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model, info)
    return path, model


def _image(tmp_path, name="img.tif", shape=(2, 60, 70), **kwargs):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / name
    tifffile.imwrite(path, data, **kwargs)
    return path, data


def _direct(model, planes: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Class probabilities of whole (C, H, W) planes, by the tiler on the CPU (the reference)."""
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_arrays

    engine = TorchEngine(model, device="cpu", channel="all")
    return np.stack(list(predict_arrays([normalization.apply(p) for p in planes], engine, model.geometry, tile=92)))


def test_semantic_model_writes_every_class_as_a_channel_axis(tmp_path):
    checkpoint, model = _checkpoint(tmp_path, kind="semantic")
    source, data = _image(tmp_path, photometric="minisblack")
    result = segkit.predict(source, tmp_path / "probs.tif", model=checkpoint, device="cpu", **quiet)
    assert "probabilities of 3 classes" in result.writes
    with tifffile.TiffFile(tmp_path / "probs.tif") as tif:
        assert tif.series[0].axes == "ZCYX" and tif.series[0].shape == (2, 3, 60, 70)
        written = tif.asarray()
    want = _direct(model, data, Normalization(100.0, 30.0))
    assert np.abs(written.astype(np.float64) - np.round(want * 255)).max() <= 1


def test_one_class_argmax_and_bad_class(tmp_path):
    checkpoint, model = _checkpoint(tmp_path, kind="semantic")
    source, data = _image(tmp_path, photometric="minisblack")
    want = _direct(model, data, Normalization(100.0, 30.0))
    segkit.predict(source, tmp_path / "axon.tif", model=checkpoint, device="cpu", class_index=2, **quiet)
    axon = tifffile.imread(tmp_path / "axon.tif")
    assert axon.shape == (2, 60, 70) and np.abs(axon - np.round(want[:, 2] * 255)).max() <= 1
    result = segkit.predict(source, tmp_path / "classes.tif", model=checkpoint, device="cpu", argmax=True, **quiet)
    classes = tifffile.imread(tmp_path / "classes.tif")
    assert classes.dtype == np.uint8 and "argmax" in result.writes
    assert (classes == want.argmax(1)).mean() > 0.999
    with pytest.raises(SegkitError, match="class_index=5 is not a class of this model"):
        segkit.predict(source, tmp_path / "x.tif", model=checkpoint, device="cpu", class_index=5, **quiet)
    with pytest.raises(SegkitError, match="give class_index too"):
        segkit.predict(source, tmp_path / "x.tif", model=checkpoint, device="cpu", threshold=0.5, **quiet)
    with pytest.raises(SegkitError, match="trained on semantic classes"):
        segkit.predict(source, tmp_path / "x.tif", model=checkpoint, device="cpu", instances=True, **quiet)


def test_instance_model_writes_objects_with_its_watershed(tmp_path):
    from segkit.instances import ObjectParams, object_watershed

    params = ObjectParams(seed_threshold=0.4, seed_distance=0.0, min_seed_size=1, min_size=0)
    checkpoint, model = _checkpoint(tmp_path, kind="instances", watershed=params.to_dict())
    source, data = _image(tmp_path, photometric="minisblack")
    result = segkit.predict(source, tmp_path / "objects.tif", model=checkpoint, device="cpu", **quiet)
    assert "objects" in result.writes and "seed threshold 0.4" in result.writes
    objects = tifffile.imread(tmp_path / "objects.tif")
    want = _direct(model, data, Normalization(100.0, 30.0))
    assert objects.dtype == np.uint32
    np.testing.assert_array_equal(objects[0], object_watershed(want[0], params))


def test_object_watershed_separates_touching_objects():
    from segkit.instances import ObjectParams, object_watershed

    probabilities = np.zeros((3, 40, 60), np.float32)
    probabilities[0] = 1.0
    for x0 in (10, 30):  # two touching 20 px squares, a boundary column between them
        probabilities[:, 10:30, x0:x0 + 20] = np.array([0.0, 0.9, 0.1])[:, None, None]
    probabilities[:, 10:30, 29:31] = np.array([0.0, 0.2, 0.8])[:, None, None]
    labels = object_watershed(probabilities, ObjectParams(seed_distance=1.0, min_size=5))
    assert labels.max() == 2 and labels[20, 15] != labels[20, 45] and labels[0, 0] == 0
    assert (labels > 0).sum() == 20 * 40


def test_channel_mismatch_is_one_line(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path, kind="semantic", in_channels=2,
                                normalization=Normalization((100.0, 50.0), (30.0, 10.0)))
    gray, _ = _image(tmp_path, "gray.tif", photometric="minisblack")
    with pytest.raises(SegkitError, match="single-channel image but the model was trained on 2-channel images"):
        segkit.predict(gray, tmp_path / "x.tif", model=checkpoint, device="cpu", **quiet)


def test_two_channel_input_uses_per_channel_normalisation(tmp_path):
    normalization = Normalization((100.0, 50.0), (30.0, 10.0))
    checkpoint, model = _checkpoint(tmp_path, kind="semantic", in_channels=2, normalization=normalization)
    source, data = _image(tmp_path, "cyx.tif", shape=(2, 60, 70), photometric="minisblack", metadata={"axes": "CYX"})
    segkit.predict(source, tmp_path / "probs.tif", model=checkpoint, device="cpu", **quiet)
    written = tifffile.imread(tmp_path / "probs.tif")
    assert written.shape == (3, 60, 70)
    want = _direct(model, data[None], normalization)[0]
    assert np.abs(written.astype(np.float64) - np.round(want * 255)).max() <= 1


def test_rgb_input_runs_a_three_channel_model(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path, kind="semantic", in_channels=3,
                                normalization=Normalization((100.0,) * 3, (30.0,) * 3))
    source, _ = _image(tmp_path, "rgb.tif", shape=(60, 70, 3), photometric="rgb")
    segkit.predict(source, tmp_path / "classes.tif", model=checkpoint, device="cpu", argmax=True, **quiet)
    assert tifffile.imread(tmp_path / "classes.tif").shape == (60, 70)


def test_percentile_normalisation_is_computed_per_input(tmp_path):
    checkpoint, model = _checkpoint(tmp_path, kind="semantic",
                                    normalization=Normalization(10.0, 100.0, percentiles=(1.0, 99.8), clip=True))
    rng = np.random.default_rng(0)
    data = (rng.random((1, 60, 70)) * 4000 + 500).astype(np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", data, photometric="minisblack")
    segkit.predict(tmp_path / "u16.tif", tmp_path / "probs.tif", model=checkpoint, device="cpu", **quiet)
    low, high = np.percentile(data.astype(np.float64), (1.0, 99.8))
    want = _direct(model, data, Normalization(low, high - low, clip=True))
    assert np.abs(tifffile.imread(tmp_path / "probs.tif") - np.round(want[0] * 255)).max() <= 1


def test_input_of_another_pixel_size_is_rescaled_and_back(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path, kind="semantic", pixel_size=0.1)
    source, _ = _image(tmp_path, "cal.tif", shape=(1, 80, 90), photometric="minisblack", imagej=True,
                       resolution=(1 / 0.05, 1 / 0.05), metadata={"unit": "um"})
    messages: list[str] = []
    segkit.predict(source, tmp_path / "c.tif", model=checkpoint, device="cpu", argmax=True, report=messages.append)
    assert any("rescaled by 0.5" in m for m in messages)
    assert tifffile.imread(tmp_path / "c.tif").shape == (80, 90)
    same, _ = _image(tmp_path, "same.tif", shape=(1, 80, 90), photometric="minisblack", imagej=True,
                     resolution=(10.0, 10.0), metadata={"unit": "um"})
    messages.clear()
    segkit.predict(same, tmp_path / "d.tif", model=checkpoint, device="cpu", argmax=True, report=messages.append)
    assert not any("rescaled" in m for m in messages)


def test_onnx_export_of_a_class_model_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from segkit.checkpoint import load_model
    from segkit.export import export_onnx, write_onnx

    checkpoint, _ = _checkpoint(tmp_path, kind="semantic", in_channels=2,
                                normalization=Normalization((100.0, 50.0), (30.0, 10.0)))
    model, info = load_model(checkpoint)
    onnx_bytes, record = export_onnx(model, info, tile=92)
    assert record.parity["max_abs_diff_random"] < 1e-4
    write_onnx(onnx_bytes, tmp_path / "m.onnx")
    source, _ = _image(tmp_path, "cyx.tif", shape=(2, 60, 70), photometric="minisblack", metadata={"axes": "CYX"})
    segkit.predict(source, tmp_path / "a.tif", model=checkpoint, device="cpu", **quiet)
    segkit.predict(source, tmp_path / "b.tif", model=tmp_path / "m.onnx", device="cpu", **quiet)
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert a.shape == b.shape == (3, 60, 70) and np.abs(a.astype(int) - b).max() <= 1


def test_cli_predict_class_and_evaluate_kinds(tmp_path):
    from click.testing import CliRunner

    from segkit.cli import main

    checkpoint, _ = _checkpoint(tmp_path, kind="semantic")
    source, _ = _image(tmp_path, photometric="minisblack")
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(source), "-m", str(checkpoint), "--argmax", "-o",
                                  str(tmp_path / "c.tif"), "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    classes = tifffile.imread(tmp_path / "c.tif")
    tifffile.imwrite(tmp_path / "truth.tif", classes, photometric="minisblack")
    result = runner.invoke(main, ["evaluate", str(tmp_path / "c.tif"), str(tmp_path / "truth.tif"),
                                  "--labels-kind", "semantic", "--classes", "3"])
    assert result.exit_code == 0 and "mean Dice 1.0000" in result.output, result.output
    result = runner.invoke(main, ["evaluate", str(tmp_path / "c.tif"), str(tmp_path / "truth.tif"),
                                  "--labels-kind", "semantic"])
    assert result.exit_code != 0 and "needs --classes" in result.output
    objects = np.zeros((1, 40, 40), np.uint16)
    objects[0, 5:15, 5:15], objects[0, 20:30, 20:30] = 1, 2
    tifffile.imwrite(tmp_path / "objects.tif", objects, photometric="minisblack")
    result = runner.invoke(main, ["evaluate", str(tmp_path / "objects.tif"), str(tmp_path / "objects.tif"),
                                  "--labels-kind", "instances"])
    assert result.exit_code == 0 and "F1@0.5 1.0000" in result.output, result.output


def test_percentile_models_normalise_by_the_stack_or_the_training_data(tmp_path):
    from segkit.checkpoint import read_info
    from segkit.inference.pipeline import choose_normalization
    from segkit.io.tiff import open_stack

    checkpoint, _ = _checkpoint(tmp_path, kind="semantic",
                                normalization=Normalization(10.0, 100.0, percentiles=(1.0, 99.0), clip=True))
    data = np.arange(100 * 100, dtype=np.uint16).reshape(1, 100, 100)
    tifffile.imwrite(tmp_path / "ramp.tif", data, photometric="minisblack")
    info = read_info(checkpoint)
    with open_stack(tmp_path / "ramp.tif") as stack:
        own = choose_normalization(stack, info, mode="auto")[0]
        assert own.mean == pytest.approx(99.99, rel=1e-3) and own.clip
        assert choose_normalization(stack, info, mode="stack")[0] == own
        trained = choose_normalization(stack, info, mode="checkpoint")[0]
        assert (trained.mean, trained.std, trained.clip, trained.percentiles) == (10.0, 100.0, True, None)
