"""Issue 25, new-user papercuts of training: a progress bar during validation, a time limit that counts
validation (and an end summary that never says "about 0.0 s left"), a timing estimate that respects the
time limit, and the amp note only when the recipe asked for amp. The epoch runner is driven here by a fake
clock, so these tests take no training time."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from segkit.config import DENOISE_SCHEMA, apply_overrides, validate_recipe
from segkit.training import runs
from segkit.training.runs import Clock, RunFiles, announce, plan_epochs, run_epochs, timing_text
from segkit.training.targets import LabelRule
from segkit.training.validation import instance_epoch, membrane_epoch
from tests.helpers import tiny_recipe


class FakeTime:
    """A group of one process whose clock is `now` (seconds): steps and validations advance it."""

    main, world = True, 1

    def __init__(self) -> None:
        self.now = 0.0

    def sync(self, clock: Clock) -> None:
        clock.agreed_elapsed = self.now

    def largest(self, value: float) -> float:
        return value

    def check_same(self, model) -> None:
        pass

    def barrier(self) -> None:
        pass

    @contextmanager
    def deferred_signals(self):
        yield


def _run(tmp_path, monkeypatch, *, limit_min, epochs=10, iters=5, step_s=1.0, validation_s=10.0, estimate=None,
         progress=False):
    """run_epochs on a fake clock: each step takes `step_s`, each validation `validation_s`. Returns the lines
    printed, the fake group and what the bars validation was given show (None: hidden)."""
    monkeypatch.setattr(runs, "plot_curve", lambda *args, **kwargs: True)
    tmp_path.mkdir(exist_ok=True)
    group, lines, bars = FakeTime(), [], []
    train = {"epochs": epochs, "iters_per_epoch": iters, "time_limit_min": limit_min, "device": "cpu"}
    plan = plan_epochs(RunFiles(tmp_path), torch.nn.Linear(1, 1), train, "cpu", progress=progress, echo=lines.append,
                       log_fields=["epoch"], loss_label="loss", curve_metrics=(), metric_label="score", group=group)
    plan.estimate_validation = estimate

    def step(epoch: int) -> float:
        group.now += step_s
        return 0.5

    def finish(epoch, losses, started, bar):
        bars.append((bar.desc, bar.unit, bar.leave) if not bar.disable else None)
        group.now += validation_s
        return {"epoch": epoch, "seconds": len(losses) * step_s + validation_s}, False, f"{len(losses)} steps"

    run_epochs(plan, start_epoch=1, history=[], step=step, finish=finish, save_best=lambda: None,
               save_last=lambda epoch: None)
    return lines, group, bars


def test_the_time_limit_counts_validation_and_stops_before_an_epoch_that_would_pass_it(tmp_path, monkeypatch):
    """train.time_limit_min=2 ran 4.5 min: validation was not counted. Epochs of 5 s + 10 s validation in 1 min:
    four fit; the fifth would end at 75 s."""
    lines, group, _ = _run(tmp_path, monkeypatch, limit_min=1.0)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 4 and group.now == 60.0
    assert epochs[2].endswith("[15 s; about 15 s left]")
    assert epochs[3] == "epoch 4: 5 steps  [15 s]"  # the last line says no time left, never "about 0.0 s left"
    assert lines[-1] == ("stopping after epoch 4: another epoch with its validation (about 15 s) would end after "
                         "train.time_limit_min=1 (60 s spent; continue with resume=True)")


def test_an_epoch_is_cut_short_to_leave_time_for_its_validation(tmp_path, monkeypatch):
    """Before the first validation its estimate (`estimate_validation`, asked once the first iterations are
    timed) is kept free; afterwards the last validation's time."""
    asked = []
    lines, group, _ = _run(tmp_path, monkeypatch, limit_min=0.5, iters=40, validation_s=8.0,
                           estimate=lambda: asked.append(1) or 8.0)
    assert asked == [1]  # estimated once per run, after the timed iterations
    assert lines[-1].startswith("stopping in epoch 1 after 23 of 40 iterations: train.time_limit_min=0.5 reached;")
    assert group.now == 31.0  # 23 steps, then 8 s of validation: within a second of the 30 s
    without = _run(tmp_path / "b", monkeypatch, limit_min=0.5, iters=40, validation_s=8.0)[1]
    assert without.now == 39.0  # without the estimate the epoch ran to the limit and validation came after


def test_validation_has_its_progress_bar_on_stderr_unless_quiet(tmp_path, monkeypatch):
    _, _, bars = _run(tmp_path, monkeypatch, limit_min=None, epochs=2, iters=1, progress=True)
    assert bars == [("validation 1/2", "tile", False), ("validation 2/2", "tile", False)]  # tqdm: on stderr
    _, _, quiet = _run(tmp_path / "q", monkeypatch, limit_min=None, epochs=1, iters=1, progress=False)
    assert quiet == [None]  # quiet: a disabled bar


class Recorder:
    """A tqdm-like bar that records what it is told."""

    unit = "tile"

    def __init__(self) -> None:
        self.calls = []

    def reset(self, total):
        self.calls.append(("reset", self.unit, total))

    def update(self, n):
        self.calls.append(("update", self.unit, n))


def test_validation_reports_tiles_then_the_watershed_settings_tried():
    from segkit.models import create_model

    model = create_model("unet", base=4, depth=2, classes=3).eval()  # 92 px tiles -> 52 px: 2 x 3 per image
    image = np.zeros((1, 100, 150), np.float32)
    labels = np.zeros((100, 150), np.int64)
    labels[20:40, 20:40] = 1
    bar = Recorder()
    instance_epoch(model, [image, image], [labels, labels], rule=LabelRule.from_data({"labels_kind": "instances"}),
                   tile=92, batch=5, device="cpu", val_threshold=0.5, progress=bar)
    tiles = [c for c in bar.calls if c[1] == "tile"]
    assert tiles == [("reset", "tile", 12), *[("update", "tile", 5)] * 2, ("update", "tile", 2)]
    settings = [c for c in bar.calls if c[1] == "setting"]
    assert settings == [("reset", "setting", 10), *[("update", "setting", 1)] * 10]
    membrane = Recorder()
    membrane_epoch(create_model("unet", base=4, depth=2).eval(), [image], [labels], rule=None, tile=92, batch=4,
                   device="cpu", val_threshold=0.5, progress=membrane)
    assert membrane.calls == [("reset", "tile", 6), ("update", "tile", 4), ("update", "tile", 2)]


def test_the_timing_estimate_respects_the_time_limit():
    """The small ISBI recipe said "the 40 epochs to go about 8 h 53 min" under a 28 min time limit."""
    clock = Clock(28, timed_iterations=3)
    clock.done, clock.agreed_elapsed, clock.validation_s = 3, 10.0, 20.0
    text = timing_text(clock, per_iteration=4.0, iters=200, epochs_left=40)
    assert text == ("one epoch (200 iterations at 4.00 s) takes about 13 min plus about 20 s of validation; "
                    "train.time_limit_min=28 (28 min) stops the run after about 2 of the 40 epochs to go (all would "
                    "take about 9 h 06 min)")
    assert timing_text(Clock(None, timed_iterations=3), per_iteration=1.0, iters=10, epochs_left=1) == (
        "one epoch (10 iterations at 1.00 s) takes about 10 s plus validation; the 1 epoch to go takes about 10 s")
    clock.validation_s = 2000.0
    assert "validation alone outlasts what train.time_limit_min=28 (28 min) leaves (28 min)" in timing_text(
        clock, per_iteration=4.0, iters=200, epochs_left=40)


@pytest.mark.parametrize("amp, noted", [({}, False), ({"amp": False}, False), ({"amp": True}, True)])
def test_the_amp_note_only_when_the_recipe_asks_for_amp(tmp_path, amp, noted):
    """`note: train.amp is ignored on the CPU` was printed for recipes that never set it."""
    lines = []
    recipe = tiny_recipe(tmp_path, **amp)
    announce(lines.append, model=torch.nn.Linear(1, 1), name="unet", device="cpu", requested_device="cpu",
             amp=recipe["train"]["amp"], data="training slices 0-2", iters=1, batch=1, tile=92, epochs=1)
    assert any("train.amp is ignored on the CPU" in line for line in lines) == noted


def test_train_amp_left_out_is_null_and_means_on_a_gpu():
    assert validate_recipe({})["train"]["amp"] is None and validate_recipe({}, DENOISE_SCHEMA)["train"]["amp"] is None
    assert validate_recipe(apply_overrides({}, ["train.amp=true"]))["train"]["amp"] is True
