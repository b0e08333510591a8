"""`data.scale`: training images and labels resized by a factor (so objects have the size the model sees
best), the factor recorded in the checkpoint, and prediction and scoring resizing each input for the model
and its output back to the input's size. Tiny images and a base-4 depth-2 U-Net: seconds on two CPU cores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

import segkit
from segkit.checkpoint import save_checkpoint
from segkit.config import validate_recipe
from segkit.errors import CheckpointError, SegkitError
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults, check_record
from segkit.training.datasets import load_examples

TILE = 92  # a valid input of the depth-2 U-Net (margin 20, step 4): 52 px output


def _write(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **{"photometric": "minisblack", **kwargs})
    return path


def _recipe(tmp_path: Path, data: dict, **train) -> dict:
    return validate_recipe({
        "model": {"name": "unet", "params": {"base": 4, "depth": 2}},
        "data": {"root": str(tmp_path), "raw": "images", "labels": "labels", "tile": 64, **data},
        "augment": {"elastic": False},
        "train": {"epochs": 1, "iters_per_epoch": 2, "batch": 2, "val_batch": 4, "device": "cpu", "amp": False,
                  "lr": 1e-3, "out": str(tmp_path / "run"), **train},
    })


def _classes_image(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, uint8 classes 0-2): two rectangles of different brightness on a background."""
    rng = np.random.default_rng(seed)
    classes = np.zeros((size, size), np.uint8)
    classes[8:8 + size // 3, 6:6 + size // 3] = 1
    classes[size // 2:size // 2 + size // 4, size // 2:size // 2 + size // 3] = 2
    image = np.array([30, 120, 220], np.float32)[classes] + rng.normal(0, 8, classes.shape)
    return np.clip(image, 0, 255).astype(np.uint8), classes


def _checkpoint(tmp_path: Path, *, scale=None, pixel_size=None, name="model") -> tuple[Path, object, CheckpointInfo]:
    """A semantic 3-class base-4 depth-2 U-Net (random weights) recording `scale` and `pixel_size`."""
    import torch

    from segkit.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", base=4, depth=2, classes=3).eval()
    info = CheckpointInfo(kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 2, "classes": 3},
                          geometry=model.geometry, normalization=Normalization(100.0, 60.0),
                          classes=["background", "dim", "bright"],
                          inference=InferenceDefaults(tile=TILE, labels_kind="semantic", input_dtype="uint8",
                                                      pixel_size=pixel_size, scale=scale))
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model, info)
    return path, model, info


def _probabilities(model, image: np.ndarray, normalization: Normalization) -> np.ndarray:
    """(K, H, W) probabilities of one (H, W) uint8 image by the tiler, as the model sees it."""
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_arrays

    engine = TorchEngine(model, device="cpu", channel="all")
    (out,) = predict_arrays([normalization.apply(image[None])], engine, model.geometry, tile=TILE)
    return np.asarray(out)


def _upsampled(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(values)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


# -- 1. training data: every split resized by data.scale, labels keep their ids ----------------------------

def test_load_examples_with_scale_halves_images_and_labels(tmp_path):
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ids = np.zeros((64, 64), np.uint16)
    ids[8:24, 8:24], ids[32:56, 30:60] = 7, 300  # object ids, not 1..N
    for name in ("a", "b"):
        _write(tmp_path / "images" / f"{name}.tif", image)
        _write(tmp_path / "labels" / f"{name}.tif", ids)
    split = {"labels_kind": "instances", "train_files": ["a"], "val_files": ["b"], "test_files": ["b"]}
    data = _recipe(tmp_path, {**split, "scale": 0.5})["data"]
    for which in ("train", "val"):
        (example,) = load_examples(data, which)
        assert example.image.shape == (1, 32, 32) and example.labels.shape == (32, 32)
        assert example.image.dtype == np.uint16 and example.labels.dtype == np.uint16
        assert set(np.unique(example.labels)) == {0, 7, 300}
        assert (example.labels[4:12, 4:12] == 7).all() and (example.labels[16:28, 15:30] == 300).all()
        # area averaging of a ramp: each pixel is the mean of its 2 x 2 block
        assert example.image[0, 0, 0] == pytest.approx((0 + 1 + 64 + 65) / 4, abs=1)
    (doubled,) = load_examples(_recipe(tmp_path, {**split, "scale": 2.0})["data"], "train")
    assert doubled.image.shape == (1, 128, 128) and set(np.unique(doubled.labels)) == {0, 7, 300}
    (same,) = load_examples(_recipe(tmp_path, {**split, "scale": 1.0005})["data"], "train")  # within 1e-3: as is
    np.testing.assert_array_equal(same.image[0], image)
    np.testing.assert_array_equal(same.labels, ids)


def test_scale_applies_after_pixel_size(tmp_path):
    image = np.arange(48 * 48, dtype=np.uint16).reshape(48, 48)
    labels = np.zeros((48, 48), np.uint8)
    labels[:, 24:] = 1
    # 0.5 um per pixel, rescaled to 1 um per pixel (half), then resized by 0.5 (half again)
    _write(tmp_path / "images" / "a.tif", image, resolution=(2.0, 2.0), resolutionunit="MICROMETER")
    _write(tmp_path / "labels" / "a.tif", labels)
    data = _recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "train_files": ["a"], "val_files": ["a"],
                              "test_files": ["a"], "pixel_size": 1.0, "scale": 0.5})["data"]
    (example,) = load_examples(data, "train")
    assert example.image.shape == (1, 12, 12) and example.labels.shape == (12, 12)
    assert example.pixel_size == pytest.approx(2.0)  # its pixels are twice as wide as data.pixel_size's
    assert set(np.unique(example.labels)) == {0, 1}


# -- 2. the checkpoint record --------------------------------------------------------------------------------

def test_scale_is_recorded_only_when_set_and_old_records_read():
    assert "scale" not in InferenceDefaults(tile=92).to_dict()
    assert InferenceDefaults(scale=0.5).to_dict()["scale"] == 0.5
    assert InferenceDefaults.from_dict({"tile": 92}).scale is None  # a record written before data.scale
    assert InferenceDefaults.from_dict({"scale": 0.25, "from_the_future": 1}).scale == 0.25


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), "half", True])
def test_check_record_refuses_a_bad_scale_in_one_line(tmp_path, value):
    _, _, info = _checkpoint(tmp_path)
    info.inference = info.inference.replace(scale=value)
    with pytest.raises(CheckpointError) as caught:
        check_record(info, "m.safetensors")
    message = str(caught.value)
    assert "\n" not in message and "inference scale" in message and "above 0" in message, message


def test_check_record_accepts_a_positive_scale(tmp_path):
    path, _, info = _checkpoint(tmp_path, scale=0.5)
    check_record(info, "m.safetensors")
    from segkit.checkpoint import read_info

    assert read_info(path).inference.scale == 0.5


# -- 3. prediction: planes resized for the model, output back to the input's size ----------------------------

def test_scaled_checkpoint_predicts_on_the_resized_plane_and_returns_the_input_size(tmp_path):
    from segkit.io.resample import rescale

    checkpoint, model, info = _checkpoint(tmp_path, scale=0.5)
    image, _ = _classes_image(64, 0)
    source = _write(tmp_path / "img.tif", image)
    messages: list[str] = []
    segkit.predict(source, tmp_path / "p.tif", model=checkpoint, device="cpu", report=messages.append)
    written = tifffile.imread(tmp_path / "p.tif")
    assert written.shape == (3, 64, 64)
    # the model ran on the 32 x 32 plane: its probabilities, enlarged to 64 x 64, are what was written
    half = rescale(image, 0.5)
    assert half.shape == (32, 32)
    expected = _upsampled(_probabilities(model, half, info.normalization), (64, 64))
    assert np.abs(written.astype(int) - np.rint(expected * 255)).max() <= 1
    unscaled = np.rint(_probabilities(model, image, info.normalization) * 255)
    assert np.abs(written.astype(int) - unscaled).max() > 10  # the test tells the two apart
    header = next(m for m in messages if "->" in m)
    assert "training scale 0.5" in header and "rescaled by 0.5" in header, header


def test_scale_and_pixel_size_multiply(tmp_path):
    from segkit.inference.api import rescale_factor
    from segkit.io.tiff import open_stack

    checkpoint, _, info = _checkpoint(tmp_path, scale=0.5, pixel_size=0.1)
    fine = _write(tmp_path / "fine.tif", _classes_image(80, 1)[0], imagej=True, resolution=(20.0, 20.0),
                  metadata={"unit": "um"})  # 0.05 um per pixel: half the training data's
    coarse = _write(tmp_path / "coarse.tif", _classes_image(80, 2)[0], imagej=True, resolution=(5.0, 5.0),
                    metadata={"unit": "um"})  # 0.2 um per pixel: twice the training data's
    with open_stack(fine) as stack:
        assert rescale_factor(stack, info) == pytest.approx(0.25)
    with open_stack(coarse) as stack:
        assert rescale_factor(stack, info) is None  # 2 x 0.5: as it is
    messages: list[str] = []
    segkit.predict(fine, tmp_path / "f.tif", model=checkpoint, device="cpu", argmax=True, report=messages.append)
    assert tifffile.imread(tmp_path / "f.tif").shape == (80, 80)
    header = next(m for m in messages if "->" in m)
    assert "pixel size 0.05 um" in header and "training scale 0.5" in header and "rescaled by 0.25" in header
    messages.clear()
    segkit.predict(coarse, tmp_path / "c.tif", model=checkpoint, device="cpu", argmax=True, report=messages.append)
    assert tifffile.imread(tmp_path / "c.tif").shape == (80, 80)
    assert not any("rescaled" in m for m in messages)
    # without a recorded scale nothing changes for a stack of the training pixel size
    _, _, plain = _checkpoint(tmp_path, pixel_size=0.1, name="plain")
    with open_stack(fine) as stack:
        assert rescale_factor(stack, plain) == pytest.approx(0.5)


def test_many_files_count_the_tiles_the_model_runs(tmp_path):
    from segkit.inference.api import model_view
    from segkit.inference.files import count_file_tiles, plan_file_jobs

    checkpoint, model, info = _checkpoint(tmp_path, scale=2.0)
    for name in ("a", "b"):
        _write(tmp_path / "in" / f"{name}.tif", _classes_image(64, 3)[0])
    jobs, _ = plan_file_jobs([str(tmp_path / "in")], tmp_path / "out")
    plain, _ = count_file_tiles(jobs, model.geometry, TILE)
    seen, _ = count_file_tiles(jobs, model.geometry, TILE, view=lambda stack: model_view(stack, info))
    assert set(plain.values()) == {4} and set(seen.values()) == {9}  # 64 px -> 128 px: 3 x 3 tiles of 52 px
    messages: list[str] = []
    result = segkit.predict(str(tmp_path / "in"), f"{tmp_path / 'out'}/", model=checkpoint, device="cpu", argmax=True,
                            report=messages.append)
    assert len(result.outputs) == 2 and not result.failed
    assert all(tifffile.imread(p).shape == (64, 64) for p in result.outputs)
    assert any("18 tiles" in m for m in messages), messages
    assert sum("training scale 2" in m for m in messages) == 2, messages


def test_dask_path_refuses_a_scaled_model_in_one_line(tmp_path):
    checkpoint, _, _ = _checkpoint(tmp_path, scale=0.5)
    source = _write(tmp_path / "img.tif", _classes_image(64, 0)[0][None], metadata={"axes": "ZYX"})
    with pytest.raises(SegkitError) as caught:
        segkit.predict(source, tmp_path / "out.ome.zarr", model=checkpoint, device="cpu", report=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message and "training scale" in message and "write a TIFF" in message, message
    assert not (tmp_path / "out.ome.zarr").exists()


def test_onnx_export_records_the_scale_and_predicts_alike(tmp_path):
    pytest.importorskip("onnxruntime")
    from segkit.checkpoint import load_model
    from segkit.export import export_onnx, read_onnx_metadata, write_onnx

    checkpoint, _, _ = _checkpoint(tmp_path, scale=0.5)
    model, info = load_model(checkpoint)
    onnx_bytes, _ = export_onnx(model, info, tile=TILE)
    write_onnx(onnx_bytes, tmp_path / "m.onnx")
    assert read_onnx_metadata(tmp_path / "m.onnx")[0].inference.scale == 0.5
    source = _write(tmp_path / "img.tif", _classes_image(64, 0)[0])
    messages: list[str] = []
    segkit.predict(source, tmp_path / "a.tif", model=checkpoint, device="cpu", report=lambda _: None)
    segkit.predict(source, tmp_path / "b.tif", model=tmp_path / "m.onnx", device="cpu", report=messages.append)
    assert any("rescaled by 0.5" in m for m in messages)
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert a.shape == b.shape == (3, 64, 64) and np.abs(a.astype(int) - b).max() <= 1


def test_package_refuses_a_scaled_checkpoint_in_one_line(tmp_path):
    pytest.importorskip("bioimageio.spec")
    from segkit.bioimageio.write import PackageError, package_checkpoint

    checkpoint, _, _ = _checkpoint(tmp_path, scale=0.5)
    with pytest.raises(PackageError) as caught:
        package_checkpoint(checkpoint, tmp_path / "p.zip", author="A. Person")
    message = str(caught.value)
    assert "\n" not in message and "resized by 0.5" in message and "segkit export" in message, message
    assert not (tmp_path / "p.zip").exists()


# -- 4. scoring: each image at its own resolution -------------------------------------------------------------

def _semantic_folders(tmp_path: Path, names: list[str], size: int = 64) -> dict:
    for seed, name in enumerate(names):
        image, classes = _classes_image(size, seed)
        _write(tmp_path / "images" / f"{name}.tif", image)
        _write(tmp_path / "labels" / f"{name}.tif", classes)
    return {"labels_kind": "semantic", "classes": 3, "class_names": ["background", "dim", "bright"],
            "train_files": names[:2], "val_files": names[2:3], "test_files": names[3:]}


def test_score_split_scores_a_scaled_checkpoint_at_the_labels_size(tmp_path, monkeypatch):
    from segkit.io.resample import rescale
    from segkit.training import validation

    data = _recipe(tmp_path, {**_semantic_folders(tmp_path, ["a", "b", "c", "d"]), "scale": 0.5})["data"]
    checkpoint, model, info = _checkpoint(tmp_path, scale=0.5)
    seen: list[tuple[int, ...]] = []
    real = validation.probabilities

    def recording(model, images, **kwargs):
        seen.extend(image.shape for image in images)
        return real(model, images, **kwargs)

    monkeypatch.setattr(validation, "probabilities", recording)
    result = validation.score_split(str(checkpoint), data, "test")
    assert seen == [(1, 32, 32)] and result["images"] == 1  # the model saw the halved image
    image, classes = _classes_image(64, 3)
    expected = rescale(_probabilities(model, rescale(image, 0.5), info.normalization), 1.0, shape=(64, 64))
    want = validation.semantic_scores([expected], [classes], classes=3, ignore=None)  # at the labels' 64 x 64
    assert result["scores"] == pytest.approx(want, nan_ok=True)


def test_training_with_scale_records_it_and_scores_at_full_size(tmp_path):
    from segkit.checkpoint import read_info
    from segkit.training.loop import train
    from segkit.training.validation import score_split

    recipe = _recipe(tmp_path, {**_semantic_folders(tmp_path, ["a", "b", "c", "d"], size=96), "scale": 0.5})
    files = train(recipe, progress=False, echo=lambda _: None)
    assert read_info(files.best).inference.scale == 0.5
    result = score_split(str(files.best), recipe["data"], "test")
    assert result["images"] == 1
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in result["scores"].values())


def test_watershed_sizes_follow_the_resize_back_to_the_input():
    """Settings chosen at the model's resolution apply at the input's: a model trained at scale 0.5 sees
    objects half as wide, so at the input's size distances double and sizes quadruple."""
    from segkit.instances import ObjectParams

    params = ObjectParams(seed_distance=1.5, min_seed_size=4, min_size=10)
    bigger = params.resized(2.0)
    assert (bigger.seed_distance, bigger.min_seed_size, bigger.min_size) == (3.0, 16, 40)
    assert params.resized(1.0) is params
    assert params.resized(0.1).min_seed_size == 1  # never below one pixel


def test_prediction_runs_the_watershed_with_sizes_at_the_input_resolution():
    """An instance model trained at scale 0.5: its stored watershed sizes are the model's; the objects of a
    prediction (resized back to the input) get them doubled (distances) and quadrupled (areas)."""
    from types import SimpleNamespace

    from segkit.inference.api import rescale_factor
    from segkit.inference.encodings import stack_encoding
    from segkit.inference.options import PredictOptions
    from segkit.instances import ObjectParams
    from segkit.models import create_model

    model = create_model("unet", base=4, depth=2, classes=3)
    stored = ObjectParams(seed_distance=1.5, min_seed_size=4, min_size=10).to_dict()
    info = CheckpointInfo(kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 2, "classes": 3},
                          geometry=model.geometry, normalization=Normalization(100.0, 60.0),
                          classes=["background", "interior", "boundary"],
                          inference=InferenceDefaults(tile=TILE, labels_kind="instances", scale=0.5, watershed=stored))
    stack = SimpleNamespace(pixel_size=None)
    spec = stack_encoding(info, PredictOptions(), stack, rescale_factor(stack, info))
    assert (spec.params.seed_distance, spec.params.min_seed_size, spec.params.min_size) == (3.0, 16, 40)
    unscaled = CheckpointInfo(kind="segmenter", model="unet", model_kwargs=info.model_kwargs, geometry=info.geometry,
                              normalization=info.normalization, classes=info.classes,
                              inference=info.inference.replace(scale=None))
    plain = stack_encoding(unscaled, PredictOptions(), stack, rescale_factor(stack, unscaled))
    assert plain.params.min_size == 10
