"""`segkit evaluate`: which threshold it scores at and says it used (issue 25: scoring the demo's own
prediction gave 0.1224 at 0.5 instead of the demo's 0.0846 at the bundled model's 0.8), and the hint
that PREDICTION and LABELS may be swapped when --slices does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from segkit.demo import SAMPLE_LABELS
from segkit.evaluation import evaluate_stacks, membrane_threshold
from segkit.inference.loading import default_model_path
from tests.helpers import assert_user_error, run

STORED = 0.8  # the bundled model's threshold, chosen on validation slices 20-24


@pytest.fixture
def soft_prediction(tmp_path):
    """Two 96 x 96 crops of the bundled labels and a probability map whose membranes sit between 0.5 and 0.8
    in places, so thresholds 0.5 and 0.8 score differently (as the demo's prediction does)."""
    labels = tifffile.imread(SAMPLE_LABELS)[:2, :96, :96]
    membrane = labels == 0
    rng = np.random.default_rng(0)
    probability = np.where(membrane, rng.uniform(0.55, 1.0, labels.shape), rng.uniform(0.0, 0.7, labels.shape))
    paths = {"labels": tmp_path / "labels.tif", "prediction": tmp_path / "prediction.tif"}
    tifffile.imwrite(paths["labels"], labels, photometric="minisblack")
    tifffile.imwrite(paths["prediction"], np.rint(probability * 255).astype(np.uint8), photometric="minisblack")
    return paths


def _pixel_error(output: str) -> float:
    return float(next(line for line in output.splitlines() if "pixel_error" in line).split()[-1])


def test_evaluate_with_the_model_scores_at_its_stored_threshold(soft_prediction):
    """`-m demo` scores at the bundled model's threshold, as `segkit demo` does (run_demo scores with
    evaluate_stacks at that threshold), and says so; without it, 0.5, said to be the default."""
    prediction, labels = soft_prediction["prediction"], soft_prediction["labels"]
    demo_score = evaluate_stacks(str(prediction), str(labels), threshold=STORED)["scores"]["pixel_error"]
    default_score = evaluate_stacks(str(prediction), str(labels), threshold=0.5)["scores"]["pixel_error"]
    assert abs(demo_score - default_score) > 0.01  # the two thresholds really differ here

    with_model = run("evaluate", prediction, labels, "-m", "demo")
    assert with_model.exit_code == 0, with_model.output
    assert "threshold 0.80 (stored in demo, the bundled U-Net)" in with_model.stdout
    assert _pixel_error(with_model.stdout) == pytest.approx(demo_score, abs=1e-4)
    # the same by the checkpoint's path, and by --threshold auto
    by_path = run("evaluate", prediction, labels, "--model", default_model_path(), "--threshold", "auto")
    assert f"threshold 0.80 (stored in {default_model_path()})" in by_path.stdout
    assert _pixel_error(by_path.stdout) == pytest.approx(demo_score, abs=1e-4)

    plain = run("evaluate", prediction, labels)
    assert "threshold 0.50 (the default; --model MODEL scores at a model's stored threshold)" in plain.stdout
    assert _pixel_error(plain.stdout) == pytest.approx(default_score, abs=1e-4)
    given = run("evaluate", prediction, labels, "-m", "demo", "--threshold", "0.6")
    assert "threshold 0.60 (from --threshold)" in given.stdout  # a number wins over the model's

    report = json.loads(run("evaluate", prediction, labels, "-m", "demo", "--json", "-").stdout)
    assert report["threshold"] == STORED and report["threshold_from"] == "stored in demo, the bundled U-Net"


def test_evaluate_watershed_takes_the_models_watershed_settings(soft_prediction):
    result = run("evaluate", soft_prediction["prediction"], soft_prediction["labels"], "--watershed", "-m", "demo")
    assert result.exit_code == 0, result.output
    assert ("watershed {'threshold': 0.3, 'seed_distance': 4.0, 'min_seed_size': 10, 'min_size': 50} "
            "(stored in demo, the bundled U-Net)") in result.stdout


def test_threshold_choices_that_cannot_work_are_one_line(soft_prediction, tiny_unet):
    prediction, labels = soft_prediction["prediction"], soft_prediction["labels"]
    assert_user_error(run("evaluate", prediction, labels, "--threshold", "auto"),
                      "--threshold auto takes the threshold stored in a model", "--model MODEL")
    assert_user_error(run("evaluate", prediction, labels, "--threshold", "high"), "--threshold high must be a number")
    assert_user_error(run("evaluate", prediction, labels, "-m", prediction.parent / "missing.safetensors"),
                      "does not exist", "'demo', the bundled U-Net")
    assert_user_error(run("evaluate", prediction, labels, "--instances", "-m", "demo"), "--instances", "-m")
    # a checkpoint that stores no threshold: the default, and says why
    from segkit.checkpoint import save_checkpoint
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    bare = prediction.parent / "bare.safetensors"
    save_checkpoint(bare, tiny_unet, CheckpointInfo("segmenter", "unet", {"base": 4, "depth": 4}, tiny_unet.geometry,
                                                    Normalization(120.0, 40.0)))
    assert membrane_threshold(None, bare) == (0.5, f"the default: {bare} stores none")
    assert "threshold 0.50 (the default: " in run("evaluate", prediction, labels, "-m", bare).stdout


def test_swapped_arguments_with_slices_get_the_hint(tmp_path, soft_prediction):
    """Issue 25: `evaluate LABELS PREDICTION --slices 25:30` said only that the slices exceed the stack."""
    labels = np.concatenate([tifffile.imread(soft_prediction["labels"])] * 3)  # 6 labelled slices
    tifffile.imwrite(tmp_path / "all_labels.tif", labels, photometric="minisblack")
    prediction = soft_prediction["prediction"]  # 2 slices: labels 4:6 predicted
    assert run("evaluate", prediction, tmp_path / "all_labels.tif", "--slices", "4:6").exit_code == 0
    swapped = run("evaluate", tmp_path / "all_labels.tif", prediction, "--slices", "4:6")
    assert_user_error(swapped, "--slices 4:6 exceeds the 2 slices of the label stack", "swapped?",
                      "pass the prediction first")
    assert_user_error(run("evaluate", tmp_path / "all_labels.tif", prediction, "--slices", "0:1"),
                      "prediction has 6 planes", "swapped?")
    # the same counts in the right order: no hint, the usual fix
    too_far = run("evaluate", prediction, soft_prediction["labels"], "--slices", "1:5")
    assert_user_error(too_far, "exceeds the 2 slices")
    assert "were the prediction and the labels swapped" not in too_far.stderr
