import json

import numpy as np
import pytest
import tifffile
import torch

from segkit.checkpoint import save_checkpoint
from segkit.config import DENOISE_SCHEMA, validate_recipe
from segkit.demo import SAMPLE_RAW
from segkit.errors import ConfigError
from segkit.inference.engines import TorchEngine
from segkit.inference.tiler import pad_plane, plan_tiles, predict_plane
from segkit.models import create_model
from segkit.models.compose import compose_geometry, compose_with_denoiser
from segkit.models.geometry import valid_unet_geometry
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo
from tests.helpers import assert_user_error, run


@pytest.mark.parametrize("kwargs", [{"skip": True}, {"skip": False}, {"upsampling": "transpose"}, {"depth": 3}])
def test_denoiser_variants_keep_the_declared_geometry(kwargs):
    model = create_model("denoiser", base=4, **kwargs).eval()
    g = model.geometry
    assert g.margin > 0 and g.halo == 0 and model.out_channels == 1
    with torch.no_grad():
        out = model(torch.zeros(1, 1, g.min_input + 2 * g.step, g.min_input + 2 * g.step))
    assert out.shape[-1] == g.output_size(g.min_input + 2 * g.step)
    has_transposed = any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    assert has_transposed == (kwargs.get("upsampling") == "transpose")


def test_margins_add_when_composed():
    g = compose_geometry(valid_unet_geometry(2), valid_unet_geometry(4))
    assert g.margin == 20 + 92 and g.step == 16
    assert g.is_valid_input(572 + 40) and not g.is_valid_input(572)


@pytest.fixture
def denoiser_and_segmenter(tmp_path):
    torch.manual_seed(0)
    den = create_model("denoiser", base=4)
    seg = create_model("unet", base=4)
    save_checkpoint(tmp_path / "den.safetensors", den, CheckpointInfo(
        "denoiser", "denoiser", {"base": 4}, den.geometry, Normalization(110.0, 30.0), classes=[],
        inference={"tile": 108, "input_dtype": "uint8"}))
    save_checkpoint(tmp_path / "seg.safetensors", seg, CheckpointInfo(
        "segmenter", "unet", {"base": 4}, seg.geometry, Normalization(120.0, 40.0),
        inference={"tile": 220, "input_dtype": "uint8", "threshold": 0.5}))
    return tmp_path / "den.safetensors", tmp_path / "seg.safetensors"


def test_tiled_denoise_plus_segment_equals_whole_plane(denoiser_and_segmenter):
    model, info = compose_with_denoiser(*denoiser_and_segmenter)
    assert info.normalization == Normalization(110.0, 30.0) and info.inference.tile == 220 + 40
    engine = TorchEngine(model, device="cpu")
    plane = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 150, 133)).astype(np.float32))
    plan = plan_tiles((150, 133), info.geometry, tile=260)
    assert plan.n_tiles > 1
    tiled = predict_plane(plane, engine, info.geometry, tile=260, batch=3)
    whole = engine(pad_plane(plane, plan)[None])[0][:, :150, :133]
    assert tiled.shape == (1, 150, 133) and (tiled - whole).abs().max() < 1e-5


def tiny_denoise_recipe(tmp_path, **train):
    return validate_recipe({
        "model": {"name": "denoiser", "params": {"base": 8, "depth": 2}},
        "data": {"root": str(SAMPLE_RAW.parent), "raw": SAMPLE_RAW.name, "tile": 108,
                 "train_slices": [0, 3], "val_slices": [3, 4], "test_slices": [4, 5]},
        "train": {"epochs": 3, "iters_per_epoch": 15, "batch": 4, "device": "cpu", "out": str(tmp_path / "den"),
                  **train},
    }, DENOISE_SCHEMA)


def test_tiny_training_run_learns_to_denoise(tmp_path):
    from segkit.training.denoise_loop import train_denoiser

    files = train_denoiser(tiny_denoise_recipe(tmp_path), progress=False, echo=lambda _: None)
    history = json.loads(files.log_json.read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["psnr"] > history[0]["psnr"]
    assert files.best.exists() and files.curve.exists()


def test_blind_spot_mode_and_recipe_errors(tmp_path):
    from segkit.training.denoise_loop import train_denoiser

    recipe = tiny_denoise_recipe(tmp_path, epochs=1, mode="blind_spot")
    recipe["corruption"]["noise"] = "none"  # Noise2Void on the data's own noise
    files = train_denoiser(recipe, progress=False, echo=lambda _: None)
    assert np.isfinite(json.loads(files.log_json.read_text())[0]["train_loss"])
    with pytest.raises(ConfigError, match="nothing to learn"):
        train_denoiser(tiny_denoise_recipe(tmp_path / "b", mode="supervised") | {
            "corruption": {"noise": "none", "sigma": 0.1, "gain": 1.0, "fraction": 0.1}}, progress=False)
    segmenter_recipe = tiny_denoise_recipe(tmp_path / "c")
    segmenter_recipe["model"] = {"name": "unet", "params": {}}
    with pytest.raises(ConfigError, match="segmenter"):
        train_denoiser(segmenter_recipe, progress=False)


def test_cli_denoise_predict_with_pre_stage_and_kind_errors(tmp_path, uint8_stack, denoiser_and_segmenter):
    den, seg = denoiser_and_segmenter
    assert run("denoise", uint8_stack, "-m", den, "-q").exit_code == 0
    denoised = tifffile.imread(tmp_path / "stack_denoised.tif")
    assert denoised.shape == (3, 70, 91) and denoised.dtype == np.uint8
    assert run("denoise", uint8_stack, "-m", den, "-o", tmp_path / "f.tif", "--output-type", "float32",
               "-q").exit_code == 0
    as_float = tifffile.imread(tmp_path / "f.tif")
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(np.clip(np.rint(as_float), 0, 255).astype(np.uint8), denoised)
    result = run("predict", uint8_stack, "-m", seg, "--denoise", den, "-o", tmp_path / "p.tif", "-q")
    assert result.exit_code == 0, result.output
    assert tifffile.imread(tmp_path / "p.tif").shape == (3, 70, 91)
    assert_user_error(run("predict", uint8_stack, "-m", den, "-o", tmp_path / "x.tif"), "denoiser checkpoint",
                      "segkit denoise")
    assert_user_error(run("denoise", uint8_stack, "-m", seg, "-o", tmp_path / "x.tif"), "segmenter checkpoint")
    assert_user_error(run("predict", uint8_stack, "-m", seg, "--denoise", seg, "-o", tmp_path / "x.tif"),
                      "segmenter checkpoint")
    assert not (tmp_path / "x.tif").exists()


def test_cli_train_denoiser(tmp_path):
    recipe = tmp_path / "d.yaml"
    recipe.write_text(
        "model: {name: denoiser, params: {base: 4}}\n"
        f"data: {{root: '{SAMPLE_RAW.parent}', raw: isbi_test_raw.tif, tile: 108, train_slices: [0, 2],"
        " val_slices: [2, 3], test_slices: [3, 5]}\n"
        "train: {epochs: 1, iters_per_epoch: 2, batch: 2, device: cpu}\n"
    )
    result = run("train-denoiser", recipe, f"train.out={tmp_path / 'run'}", "corruption.noise=poisson_gaussian", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "best.safetensors").exists() and "val PSNR" in result.output
    assert_user_error(run("train-denoiser", recipe, "corruption.noise=pink"), "corruption.noise", "not one of")


def test_segmentation_training_with_frozen_denoiser_in_front(tmp_path, denoiser_and_segmenter, uint8_stack):
    from segkit.checkpoint import load_model
    from segkit.training.loop import train
    from tests.helpers import tiny_recipe

    den_path, _ = denoiser_and_segmenter
    den_before, _ = load_model(den_path, expect_kind="denoiser")
    recipe = tiny_recipe(tmp_path, epochs=1)
    recipe["model"]["denoiser"] = str(den_path)
    recipe["data"]["tile"] = 236 + 40  # the segmenter's tile plus the denoiser's margins
    files = train(recipe, progress=False, echo=lambda _: None)
    model, info = load_model(files.best)
    assert info.model == "denoised" and info.geometry.margin == 92 + 20
    assert info.normalization == Normalization(110.0, 30.0)  # the input is normalised as the denoiser's
    for name, tensor in den_before.state_dict().items():  # frozen: the denoiser did not change
        torch.testing.assert_close(model.denoiser.state_dict()[name], tensor)
    result = run("predict", uint8_stack, "-m", files.best, "-o", tmp_path / "p.tif", "-q")  # needs nothing else
    assert result.exit_code == 0, result.output
    assert tifffile.imread(tmp_path / "p.tif").shape == (3, 70, 91)


def test_denoiser_training_resumes(tmp_path):
    from segkit.errors import SegkitError
    from segkit.training.denoise_loop import train_denoiser

    files = train_denoiser(tiny_denoise_recipe(tmp_path, epochs=1, iters_per_epoch=3), progress=False,
                           echo=lambda _: None)
    with pytest.raises(SegkitError, match="pass resume=True"):
        train_denoiser(tiny_denoise_recipe(tmp_path, epochs=1, iters_per_epoch=3), progress=False)
    messages = []
    train_denoiser(tiny_denoise_recipe(tmp_path, epochs=2, iters_per_epoch=3), resume=True, progress=False,
                   echo=messages.append)
    assert any("resuming" in m for m in messages)
    assert [row["epoch"] for row in json.loads(files.log_json.read_text())] == [1, 2]
