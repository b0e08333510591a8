"""The learning-rate schedule, AdamW and the weight average (EMA) of training runs."""

import math

import numpy as np
import pytest
import torch

from segkit.config import validate_recipe
from segkit.training.runs import Schedule, WeightAverage, build_optimizer, scheduled_lr


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert scheduled_lr(1e-3, 0.0, warmup=0.1) == pytest.approx(1e-4)  # starts at a tenth
    assert scheduled_lr(1e-3, 0.05, warmup=0.1) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # linear
    assert scheduled_lr(1e-3, 0.1, warmup=0.1) == pytest.approx(1e-3)  # peak after the warm-up
    assert scheduled_lr(1e-3, 0.55, warmup=0.1) == pytest.approx(0.5e-3)  # half way through the decay
    assert scheduled_lr(1e-3, 1.0, warmup=0.1) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(1e-3, 1.7, warmup=0.1) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    # no warm-up: cosine from the start
    assert scheduled_lr(2e-3, 0.25, warmup=0.0) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)))
    assert scheduled_lr(1e-3, 0.8, warmup=0.1, schedule="constant") == 1e-3  # the old behaviour


def test_schedule_follows_iterations_or_the_time_limit_whichever_ends_first():
    recipe = validate_recipe({"train": {"lr": 1e-3, "epochs": 4, "iters_per_epoch": 25, "warmup": 0.0}})["train"]
    schedule = Schedule.from_recipe(recipe)
    assert schedule.planned == 100 and schedule.kind == "cosine"  # the new default
    assert schedule.lr(50, elapsed=0.0) == pytest.approx(0.5e-3)  # iteration 50 of 100
    timed = Schedule.from_recipe({**recipe, "time_limit_min": 10.0})
    assert timed.lr(10, elapsed=300.0) == pytest.approx(0.5e-3)  # 5 of 10 minutes: half way, at iteration 10
    assert timed.lr(75, elapsed=60.0) == pytest.approx(scheduled_lr(1e-3, 0.75, warmup=0.0))
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model.parameters(), recipe)
    assert schedule.apply(optimizer, 100, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    constant = Schedule.from_recipe({**recipe, "schedule": "constant"})
    assert constant.lr(50, 0.0) == 1e-3


def test_adamw_with_decoupled_weight_decay_is_the_default():
    recipe = validate_recipe({})["train"]
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), recipe)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01
    adam = build_optimizer(torch.nn.Linear(2, 2).parameters(), {**recipe, "optimizer": "adam"})
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0.0
    chosen = build_optimizer(torch.nn.Linear(2, 2).parameters(), {**recipe, "weight_decay": 0.05})
    assert chosen.param_groups[0]["weight_decay"] == 0.05


def test_weight_average_follows_the_ema_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    average = WeightAverage(model, decay=0.9)
    start = model[0].weight.detach().clone()
    average.update(model)  # the first update copies
    assert torch.equal(average.model[0].weight, start)
    expected = start.clone()
    for n in range(1, 40):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics
        average.update(model)
        kept = min(0.9, (1 + n) / (10 + n))
        expected = kept * expected + (1 - kept) * model[0].weight.detach()
    assert torch.allclose(average.model[0].weight, expected, atol=1e-5)
    assert not torch.allclose(average.model[0].weight, model[0].weight)  # it lags the trained weights
    assert average.updates == 40
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    # BatchNorm statistics are averaged too, not left at their initial values
    assert not torch.allclose(average.model[1].running_mean, torch.zeros(3))


def test_training_validates_and_saves_the_weight_average(tmp_path):
    from segkit.checkpoint import load_model
    from segkit.training.loop import train
    from segkit.training.runs import WEIGHTS_PREFIX, load_optimizer
    from tests.helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path, epochs=1, iters_per_epoch=3, ema_decay=0.5)
    files = train(recipe, progress=False, echo=lambda _: None)
    saved, _ = load_model(files.last)
    from safetensors import safe_open

    with safe_open(str(files.optimizer), framework="pt") as handle:
        trained = {k[len(WEIGHTS_PREFIX):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(WEIGHTS_PREFIX)}
    assert trained, "the trained weights are kept beside the optimizer state"
    name = next(k for k in trained if k.endswith("weight") and trained[k].ndim == 4)
    assert not torch.equal(saved.state_dict()[name], trained[name])  # the checkpoint holds the average
    # resume: the trained weights return to the model, the average to the average
    files = train({**recipe, "train": {**recipe["train"], "epochs": 2}}, resume=True, progress=False,
                  echo=lambda _: None)
    history = __import__("json").loads(files.log_json.read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    # without an average (the old behaviour) the checkpoint holds the trained weights and nothing else is kept
    plain = train(tiny_recipe(tmp_path / "plain", epochs=1, iters_per_epoch=2, ema_decay=0.0), progress=False,
                  echo=lambda _: None)
    meta = load_optimizer(plain.optimizer, torch.optim.AdamW(load_model(plain.last)[0].parameters()))
    assert "averaged_updates" not in meta
    with safe_open(str(plain.optimizer), framework="pt") as handle:
        assert not any(k.startswith(WEIGHTS_PREFIX) for k in handle.keys())


def test_training_logs_the_scheduled_learning_rate(tmp_path):
    import json

    from segkit.training.loop import train
    from tests.helpers import tiny_recipe

    files = train(tiny_recipe(tmp_path, epochs=2, iters_per_epoch=2, warmup=0.0), progress=False, echo=lambda _: None)
    rows = json.loads(files.log_json.read_text())
    # the lr of the last step of each epoch: iteration 1 (after 1 of 4) and 3 (after 3 of 4)
    assert rows[0]["lr"] == pytest.approx(scheduled_lr(1e-3, 1 / 4, warmup=0.0))
    assert rows[1]["lr"] == pytest.approx(scheduled_lr(1e-3, 3 / 4, warmup=0.0))
    constant = train(tiny_recipe(tmp_path / "c", epochs=1, iters_per_epoch=2, schedule="constant"), progress=False,
                     echo=lambda _: None)
    assert json.loads(constant.log_json.read_text())[0]["lr"] == pytest.approx(1e-3)


def test_recipe_refuses_unknown_schedule_and_bad_ema():
    from segkit.errors import ConfigError

    with pytest.raises(ConfigError, match="train.schedule"):
        validate_recipe({"train": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match="train.ema_decay"):
        validate_recipe({"train": {"ema_decay": 1.0}})
    with pytest.raises(ConfigError, match="data.foreground_fraction"):
        validate_recipe({"data": {"foreground_fraction": 1.5}})
    assert np.isclose(validate_recipe({})["data"]["foreground_fraction"], 0.33)
