"""tools/bench_train.py: the four timed parts of a training step on a tiny model and data set, its JSON
line, where it finds the data, and its one-line error for a recipe that does not exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import REPO
from tools.bench_train import load, parse_args

SCRIPT = REPO / "tools" / "bench_train.py"
RECIPE = REPO / "recipes" / "em_neurons.yaml"

#: every key of the JSON line, and those that are rates or ratios (positive numbers)
FIELDS = {"tool", "recipe", "overrides", "device", "device_name", "torch", "threads", "model", "params_m", "batch",
          "tile", "out_tile", "channels", "classes", "amp", "augment_on_device", "workers", "ema",
          "seconds_per_part", "warmup", "model_only_tiles_per_s", "loader_patches_per_s",
          "augment_device_tiles_per_s", "full_step_tiles_per_s", "full_step_over_model_only",
          "loader_over_model_only", "augment_device_over_model_only", "iterations", "timed_seconds"}
RATES = ("model_only_tiles_per_s", "loader_patches_per_s", "augment_device_tiles_per_s", "full_step_tiles_per_s",
         "full_step_over_model_only", "loader_over_model_only", "augment_device_over_model_only")
PARTS = {"model_only", "augment_device", "loader", "full_step"}


def tiny_stack(root: Path) -> Path:
    """A 6-slice 64 x 64 EM-like stack with membrane labels (0 membrane, 255 cell), as isbi2012 holds."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.where(rng.random((6, 64, 64)) < 0.2, 0, 255).astype(np.uint8)
    raw = np.where(labels > 0, 180, 60).astype(np.uint8) + rng.integers(0, 40, labels.shape, dtype=np.uint8)
    tifffile.imwrite(root / "train-volume.tif", raw)
    tifffile.imwrite(root / "train-labels.tif", labels)
    return root


def tiny_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.train_slices=[0,4]", "data.val_slices=[4,5]", "data.test_slices=[5,6]",
            "model.params={base: 4, depth: 2, batch_norm: true}", "data.tile=60", "train.batch=2",
            "train.workers=1"]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize("on_device", [False, True])
def test_json_line_has_every_part_with_positive_rates(tmp_path: Path, on_device: bool) -> None:
    root = tiny_stack(tmp_path / "isbi2012")
    done = run_tool(str(RECIPE), *tiny_overrides(root), f"augment.on_device={str(on_device).lower()}",
                    "--seconds", "1", "--warmup", "1", "--device", "cpu", "--threads", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == FIELDS
    for key in RATES:
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert set(result["iterations"]) == PARTS and all(n >= 1 for n in result["iterations"].values())
    # each part ran for its budget (one iteration past it at most), not for the warm-up only
    assert all(1.0 <= s < 30 for s in result["timed_seconds"].values()), result["timed_seconds"]
    assert (result["device"], result["batch"], result["tile"], result["out_tile"]) == ("cpu", 2, 60, 20)
    assert (result["workers"], result["threads"], result["amp"]) == (1, 1, "none")
    assert result["augment_on_device"] is on_device and result["recipe"] == str(RECIPE)
    ratio = result["full_step_tiles_per_s"] / result["model_only_tiles_per_s"]
    assert result["full_step_over_model_only"] == pytest.approx(ratio, rel=0.01)


def test_missing_recipe_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_tool(str(tmp_path / "nope.yaml"), "--seconds", "1", "--device", "cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.yaml does not exist" in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_cuda_without_a_gpu_is_one_line_and_exit_2() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_tool(str(RECIPE), "--seconds", "1", "--device", "cuda")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], done.stderr


def test_recipe_or_overrides_first() -> None:
    args = parse_args(["train.batch=2", "--seconds", "3"])
    assert (args.recipe, args.overrides, args.seconds) == (str(RECIPE), ["train.batch=2"], 3.0)
    args = parse_args(["recipes/nuclei_bbbc039.yaml", "train.batch=2"])
    assert (args.recipe, args.overrides) == ("recipes/nuclei_bbbc039.yaml", ["train.batch=2"])


def test_data_come_from_segkit_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    tiny_stack(shared / "isbi2012")
    monkeypatch.setenv("SEGKIT_DATA", str(shared))
    recipe = load(str(RECIPE), [], "cpu")
    assert Path(recipe["data"]["root"]) == shared / "isbi2012" and recipe["train"]["device"] == "cpu"
    # an explicit data.root wins over $SEGKIT_DATA
    other = tiny_stack(tmp_path / "other" / "isbi2012")
    assert Path(load(str(RECIPE), [f"data.root={other}"], "cpu")["data"]["root"]) == other
