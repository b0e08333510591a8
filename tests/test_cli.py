import json

import numpy as np
import pytest
import tifffile

from tests.helpers import assert_plane_matches_library, assert_user_error, run

COMMANDS = ["train", "predict", "evaluate", "models", "demo", "train-denoiser", "denoise", "export", "segment", "convert", "init"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_import_and_help_stay_light():
    import subprocess
    import sys

    code = ("import sys, segkit, segkit.cli; from click.testing import CliRunner; "
            "CliRunner().invoke(segkit.cli.main, ['--help']); "
            "print(sorted(m for m in ('torch', 'albumentations', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_models_lists_every_architecture():
    from segkit.models import list_models

    result = run("models")
    assert result.exit_code == 0
    for name in list_models():
        assert name in result.output
    assert "31.03 M" in result.output and "188 + 16k" in result.output and "572 -> 388" in result.output
    assert "134.27 M" in result.output and "halo 96" in result.output


def test_predict_end_to_end_matches_library(tmp_path, uint8_stack, tiny_checkpoint):


    out = tmp_path / "out.tif"
    result = run("predict", uint8_stack, "-o", out, "-m", tiny_checkpoint, "--tile", 220, "--batch", 3, "-q")
    assert result.exit_code == 0, result.output
    written = tifffile.imread(out)
    assert written.shape == (3, 70, 91) and written.dtype == np.uint8
    assert_plane_matches_library(written, uint8_stack, tiny_checkpoint, index=1, tile=220)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].resolution == pytest.approx((1 / 40, 1 / 40))  # 250 px/cm: px per micron (ImageJ)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif", "stack.tif"]


def test_predict_float16_and_mask(tmp_path, uint8_stack, tiny_checkpoint):
    assert run("predict", uint8_stack, "-o", tmp_path / "f.tif", "-m", tiny_checkpoint, "--output-type", "float16",
               "-q").exit_code == 0
    probability = tifffile.imread(tmp_path / "f.tif")
    assert probability.dtype == np.float32 and 0 <= probability.min() and probability.max() <= 1  # no float16 in ImageJ
    np.testing.assert_array_equal(probability, probability.astype(np.float16))  # float16 values
    assert run("predict", uint8_stack, "-o", tmp_path / "m.tif", "-m", tiny_checkpoint, "--threshold", 0.5,
               "-q").exit_code == 0
    mask = tifffile.imread(tmp_path / "m.tif")
    np.testing.assert_array_equal(mask, np.where(probability.astype(np.float32) >= 0.5, 255, 0))
    # 'auto' takes the checkpoint's validated threshold (0.5 in the tiny checkpoint)
    assert run("predict", uint8_stack, "-o", tmp_path / "a.tif", "-m", tiny_checkpoint, "--threshold", "auto",
               "-q").exit_code == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), mask)
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "b.tif", "-m", tiny_checkpoint, "--threshold",
                          "high"), "threshold 'high'")
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "b.tif", "-m", tiny_checkpoint, "--threshold",
                          "1.5"), "between 0 and 1")


def _bad_inputs(tmp_path):
    def write(name, data, **kw):
        tifffile.imwrite(tmp_path / name, data, **kw)
        return tmp_path / name

    truncated = write("trunc.tif", np.ones((6, 64, 64), np.uint8), compression="zlib", photometric="minisblack")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    nan = np.ones((3, 30, 30), np.float32)
    nan[2, 1, 1] = np.inf
    with pytest.warns(UserWarning):
        empty = write("empty.tif", np.zeros((0, 10, 10), np.uint8))
    (tmp_path / "text.tif").write_text("not an image")
    return {
        "missing": (tmp_path / "missing.tif", "does not exist"),
        "not tiff": (tmp_path / "text.tif", "not a readable TIFF"),
        "truncated": (truncated, "truncated"),
        "rgb": (write("rgb.tif", np.zeros((30, 30, 3), np.uint8), photometric="rgb"), "RGB"),
        "channels": (write("ch.tif", np.zeros((2, 2, 30, 30), np.uint8), imagej=True, metadata={"axes": "ZCYX"}),
                     "multi-channel"),
        "empty": (empty, "empty"),
        "nan": (write("nan.tif", nan, photometric="minisblack"), "NaN or inf"),
    }


@pytest.mark.parametrize("case", ["missing", "not tiff", "truncated", "rgb", "channels", "empty", "nan"])
def test_predict_bad_input(tmp_path, tiny_checkpoint, case):
    source, message = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("predict", source, "-o", out_dir / "o.tif", "-m", tiny_checkpoint, "-q")
    assert_user_error(result, message)
    assert list(out_dir.iterdir()) == []  # no partial output left behind


def test_predict_bad_tile_checkpoint_and_existing_output(tmp_path, uint8_stack, tiny_checkpoint):
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tiny_checkpoint, "--tile", 570),
                      "556", "572")
    assert not (tmp_path / "o.tif").exists()
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 64)
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", fake), "not a segkit checkpoint")
    (tmp_path / "o.tif").write_bytes(b"old")
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tiny_checkpoint), "--overwrite")
    assert (tmp_path / "o.tif").read_bytes() == b"old"
    assert run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tiny_checkpoint, "--overwrite",
               "-q").exit_code == 0


def test_existing_output_refusal_names_the_flag_on_the_cli_and_the_keyword_in_python(tmp_path, uint8_stack,
                                                                                    tiny_checkpoint):
    import segkit
    from segkit.errors import OutputExistsError

    out = tmp_path / "o.tif"
    out.write_bytes(b"old")
    result = run("predict", uint8_stack, "-o", out, "-m", tiny_checkpoint)
    assert_user_error(result, "already exists", "pass --overwrite")
    with pytest.raises(OutputExistsError, match="pass overwrite=True") as refused:
        segkit.predict(uint8_stack, out, model=tiny_checkpoint)
    # the same refusal, the keyword in Python and the flag on the command line
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line == f"error: {refused.value}".replace("overwrite=True", "--overwrite")
    assert out.read_bytes() == b"old"


def test_cli_message_names_the_flags_of_the_invoked_command():
    from segkit.cli import cli_message, main, option_names

    options = option_names(main.commands["predict"])
    assert {"overwrite", "skip_existing", "device", "tile", "resume"} <= options and "sources" not in options
    assert (cli_message("pass overwrite=True, or skip_existing=True to do only the rest", options)
            == "pass --overwrite, or --skip-existing to do only the rest")
    assert (cli_message("device='cuda:0' needs the CUDA provider; use device='cpu'", options)
            == "--device cuda:0 needs the CUDA provider; use --device cpu")
    assert (cli_message("tile 570 is not valid; use tile 556 or 572, or export again with tile=236", options)
            == "tile 570 is not valid; use --tile 556 or 572, or export again with --tile 236")
    evaluate = option_names(main.commands["evaluate"])
    assert (cli_message("slices=(3, 9) exceeds 5 slices; use slices=(START, STOP); threshold=2.0 is out", evaluate)
            == "--slices 3:9 exceeds 5 slices; use --slices START:STOP; --threshold 2.0 is out")
    # names the command lacks, recipe keys, longer names and False/None stay as they are
    untouched = ("opset=12 and fp16=True; set train.out=<new folder>; train.time_limit_min=5 reached; "
                 "overwrite=False; device=None; my_device='cpu'; WatershedParams(threshold=0.5)")
    assert cli_message(untouched, evaluate - {"threshold"}) == untouched
    # training has no --tile: the recipe key names the tile
    assert (cli_message("pass resume=True; use tile 556 or 572", option_names(main.commands["train"]), recipe=True)
            == "pass --resume; use data.tile 556 or 572")


def test_predict_checkpoint_of_another_model(tmp_path, uint8_stack, tiny_unet):
    from segkit.checkpoint import save_checkpoint
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    info = CheckpointInfo("segmenter", "unet", {"base": 16}, tiny_unet.geometry, Normalization(0, 1))
    save_checkpoint(tmp_path / "other.safetensors", tiny_unet, info)
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tmp_path / "other.safetensors"),
                      "do not match")
    assert not (tmp_path / "o.tif").exists()


def test_evaluate_known_answer_and_json(tmp_path):
    labels = np.full((2, 10, 10), 255, np.uint8)
    labels[:, :, 5] = 0
    prediction = np.where(labels == 0, 255, 0).astype(np.uint8)
    prediction[1, 4, 5] = 0  # slice 1 has a gap that merges the two cells
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "pred.tif", prediction, photometric="minisblack")
    result = run("evaluate", tmp_path / "pred.tif", tmp_path / "labels.tif", "--json", tmp_path / "s.json", "--sweep")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["scores"]["pixel_error"] == pytest.approx(0.005)
    assert report["per_slice"][0]["adapted_rand_error"] == pytest.approx(0, abs=1e-12)
    assert report["per_slice"][1]["adapted_rand_error"] > 0.3
    assert "best threshold" in result.output
    one = run("evaluate", tmp_path / "pred.tif", tmp_path / "labels.tif", "--slices", "1:2", "--json", "-")
    assert json.loads(one.output)["scores"]["pixel_error"] == pytest.approx(0.01)


def test_evaluate_swapped_arguments(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.random.default_rng(0).random((1, 8, 8), dtype=np.float32),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", np.full((1, 8, 8), 3, np.uint8), photometric="minisblack")
    assert_user_error(run("evaluate", tmp_path / "l.tif", tmp_path / "p.tif"), "look like probabilities")
    assert_user_error(run("evaluate", tmp_path / "p.tif", tmp_path / "l.tif"), "all membrane or all cell")


def test_train_cli_with_overrides(tmp_path):
    from segkit.demo import SAMPLE_RAW

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: unet, params: {base: 4}}\n"
        f"data: {{root: '{SAMPLE_RAW.parent}', raw: isbi_test_raw.tif, labels: isbi_test_labels.tif, tile: 204,"
        " train_slices: [0, 2], val_slices: [2, 3], test_slices: [3, 5]}\n"
        "train: {epochs: 5, iters_per_epoch: 1, batch: 1, device: cpu}\n"
    )
    result = run("train", recipe, "train.epochs=1", f"train.out={tmp_path / 'run'}", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "best.safetensors").exists() and "epoch 1:" in result.output
    assert_user_error(run("train", recipe, "train.epochz=1"), "train.epochz", "did you mean 'epochs'")


def test_demo(tmp_path):
    result = run("demo", "-o", tmp_path / "demo", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "scores.json").read_text())
    assert report["slices"] == 5
    assert report["scores"]["pixel_error"] < 0.15  # a trained model, not noise (chance is ~0.3)
    assert (tmp_path / "demo" / "overlay.png").stat().st_size > 10_000
    assert tifffile.imread(tmp_path / "demo" / "prediction.tif").shape == (5, 512, 512)
    assert tifffile.imread(tmp_path / "demo" / "instances.tif").dtype == np.uint32
    # the watershed settings stored in the bundled model (chosen on validation slices) beat components
    assert report["instances"]["scores"]["adapted_rand_error"] < report["scores"]["adapted_rand_error"] / 1.5
    assert "neuron instances" in result.output
    # it says which thresholds it used (issue 13, item 18)
    assert "at membrane threshold 0.8 (the bundled model's)" in result.output and "seed distance" in result.output
    assert_user_error(run("demo", "-o", tmp_path / "demo"), "--overwrite")


def test_predict_default_output_and_folder(tmp_path, tiny_checkpoint):
    folder = tmp_path / "sections"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"s{i}.tif", np.full((40, 50), 60 * i, np.uint8))
    assert run("predict", folder, "-m", tiny_checkpoint, "-q").exit_code == 0
    assert tifffile.imread(tmp_path / "sections_membranes.tif").shape == (2, 40, 50)
    assert_user_error(run("predict", str(folder / "*.tif"), "-m", tiny_checkpoint), "-o")
    assert run("predict", str(folder / "*.tif"), "-o", tmp_path / "g.tif", "-m", tiny_checkpoint, "-q").exit_code == 0


def test_predict_2d_image_gives_2d_output(tmp_path, tiny_checkpoint):
    tifffile.imwrite(tmp_path / "image.tif", np.full((33, 45), 90, np.uint16), photometric="minisblack")
    result = run("predict", tmp_path / "image.tif", "-m", tiny_checkpoint, "-q")
    assert result.exit_code == 0, result.output
    assert "uint16 but the model was trained on uint8" in result.stderr  # auto normalisation says so
    assert tifffile.imread(tmp_path / "image_membranes.tif").shape == (33, 45)


@pytest.mark.parametrize("registered", __import__("segkit.models", fromlist=["list_models"]).list_models("segmenter"))
def test_every_registered_model_predicts_through_the_cli(tmp_path, uint8_stack, registered):
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo
    from tests.helpers import randomize_zero_layers, tiny

    torch.manual_seed(0)
    name, kwargs = tiny(registered)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    g = model.geometry
    tile = g.nearest_valid(max(g.min_input + g.step, 2 * g.halo + g.step + 2 * g.margin))[1]
    save_checkpoint(tmp_path / "m.safetensors", model,
                    CheckpointInfo("segmenter", name, kwargs, g, Normalization(120.0, 40.0), inference={"tile": tile}))
    result = run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tmp_path / "m.safetensors",
                 "--output-type", "float16", "-q")
    assert result.exit_code == 0, result.output
    out = tifffile.imread(tmp_path / "o.tif").astype(np.float32)
    assert out.shape == (3, 70, 91) and np.isfinite(out).all() and np.ptp(out) > 0


def test_blend_and_halo_options(tmp_path, uint8_stack, tiny_checkpoint):
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo
    from tests.helpers import randomize_zero_layers

    torch.manual_seed(0)
    model = randomize_zero_layers(create_model("fcn8s", width=4, fc=16, halo=16)).eval()
    save_checkpoint(tmp_path / "fcn.safetensors", model, CheckpointInfo(
        "segmenter", "fcn8s", {"width": 4, "fc": 16, "halo": 16}, model.geometry, Normalization(120, 40)))
    outputs = {}
    for blend, halo in (("cosine", "16"), ("gaussian", "16"), ("cosine", "0")):
        out = tmp_path / f"{blend}{halo}.tif"
        result = run("predict", uint8_stack, "-o", out, "-m", tmp_path / "fcn.safetensors", "--tile", 64,
                     "--blend", blend, "--halo", halo, "--output-type", "float16", "-q")
        assert result.exit_code == 0, result.output
        outputs[blend + halo] = tifffile.imread(out).astype(np.float32)
    assert not np.array_equal(outputs["cosine16"], outputs["gaussian16"])
    assert not np.array_equal(outputs["cosine16"], outputs["cosine0"])
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "u.tif", "-m", tiny_checkpoint, "--halo", 8),
                      "--halo 8 applies to same-padding")
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "u.tif", "-m", tmp_path / "fcn.safetensors",
                          "--tile", 48), "multiple", "32")


def test_evaluate_says_which_argument_is_which(tmp_path):
    """Item 9 of issue 23: PREDICTION first, LABELS (truth) second, in --help and in the header line;
    truth-first tools (skimage, StarDist) are named as ordering them the other way."""
    help_text = " ".join(run("evaluate", "--help").output.split())
    assert "PREDICTION LABELS" in help_text
    assert "PREDICTION first (what segkit wrote), LABELS second (the ground truth)" in help_text
    assert "adapted_rand_error(image_true, image_test)" in help_text and "matching(y_true, y_pred)" in help_text
    labels = np.full((1, 10, 10), 255, np.uint8)
    labels[:, :, 5] = 0
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "pred.tif", np.where(labels == 0, 255, 0).astype(np.uint8), photometric="minisblack")
    result = run("evaluate", tmp_path / "pred.tif", tmp_path / "labels.tif")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (f"prediction: {tmp_path / 'pred.tif'}, "
                                             f"labels (truth): {tmp_path / 'labels.tif'}")
    as_json = run("evaluate", tmp_path / "pred.tif", tmp_path / "labels.tif", "--json", "-")
    report = json.loads(as_json.output)  # JSON only: its keys say which is which
    assert report["prediction"] == str(tmp_path / "pred.tif") and report["labels"] == str(tmp_path / "labels.tif")


def test_no_empty_progress_bar_comes_before_the_header_or_an_error(tmp_path, uint8_stack, tiny_checkpoint):
    """Issue 25 (new user): every predict drew an empty `0tile [00:00, ?tile/s]` bar before its header, and
    before errors too."""
    result = run("predict", uint8_stack, "-o", tmp_path / "out.tif", "-m", tiny_checkpoint, "--tile", 236)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"{uint8_stack} -> ")
    failed = run("predict", tmp_path / "missing.tif", "-o", tmp_path / "x.tif")
    assert failed.exit_code == 2 and failed.stderr.startswith("error: ")
