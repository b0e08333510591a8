"""Counts in words: "1 slice", never "1 slices" (issue 25), through the one helper every message uses."""

from __future__ import annotations

import numpy as np
import tifffile

from segkit.words import counted, plural
from tests.helpers import assert_user_error, run


def test_counted_says_one_in_the_singular():
    assert [counted(n, "slice") for n in (0, 1, 2)] == ["0 slices", "1 slice", "2 slices"]
    assert plural("class") == "classes" and plural("patch") == "patches" and plural("process") == "processes"
    assert plural("entry") == "entries" and plural("day") == "days" and plural("GPU") == "GPUs"
    assert plural("epoch") == "epochs" and plural("training epoch") == "training epochs"
    assert counted(1, "input channel") == "1 input channel" and counted(3, "input channel") == "3 input channels"
    assert counted(2, "child", "children") == "2 children"


def test_evaluate_of_one_slice_says_one_slice(tmp_path):
    truth = np.zeros((1, 16, 16), np.uint8)
    truth[:, :, 8:] = 1
    tifffile.imwrite(tmp_path / "truth.tif", truth, photometric="minisblack")
    result = run("evaluate", tmp_path / "truth.tif", tmp_path / "truth.tif", "--labels-kind", "semantic", "--classes", 2)
    assert result.exit_code == 0, result.output
    assert "1 slice: mean Dice 1.0000" in result.stdout
    assert_user_error(run("evaluate", tmp_path / "truth.tif", tmp_path / "truth.tif", "--labels-kind", "semantic",
                          "--classes", 2, "--slices", "0:2"), "exceeds the 1 slice of the label stack")


def test_training_and_output_messages_count_in_words():
    import torch

    from segkit.io.outputs import _count
    from segkit.training.runs import announce

    heard = []
    announce(heard.append, model=torch.nn.Linear(1, 1), name="unet", device="cpu", requested_device="cpu", amp=False,
             data="training slice 0", iters=1, batch=1, tile=236, epochs=1)
    assert "1 iteration x batch 1 = 1 patch of 236 px per epoch, 1 epoch" in heard[0]
    assert _count([tmp for tmp in ("a",)]) == "1 temporary file"
