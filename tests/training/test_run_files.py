"""The files a training run writes: every one through the one write path (`io.outputs.atomic_path`), so
a planted link at a predictable temporary name is never followed, and an interrupted run's cleanup
removes the temporary files killed runs left."""

import os
import subprocess
import sys

import torch

from segkit.io.outputs import temporary_path
from segkit.training.runs import RunFiles, plan_epochs, plot_curve, save_optimizer, write_logs, write_recipe

HISTORY = [{"epoch": 1, "train_loss": 0.5, "dice_mean": 0.25, "seconds": 1.0, "lr": 1e-3},
           {"epoch": 2, "train_loss": 0.4, "dice_mean": 0.5, "seconds": 1.0, "lr": 1e-3}]


def _write_everything(files: RunFiles) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_optimizer(files.optimizer, optimizer, {"epoch": 2})
    write_logs(files, HISTORY, ["epoch", "train_loss", "dice_mean"])
    plot_curve(HISTORY, files.curve, loss_label="loss", metrics=("dice_mean",), metric_label="score")
    write_recipe(files, {"train": {"epochs": 2}})


def test_a_planted_link_at_the_old_temporary_names_is_not_followed(tmp_path):
    files = RunFiles(tmp_path / "run")
    files.root.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    old_names = [p.with_name(f".{p.name}.partial") for p in (files.optimizer, files.log_csv, files.log_json,
                                                               files.recipe)]
    old_names.append(files.curve.with_name(f".{files.curve.stem}.partial.png"))
    for name in old_names:
        name.symlink_to(victim)
    _write_everything(files)
    assert victim.read_text() == "not yours"
    assert all(name.is_symlink() for name in old_names)  # left as they were, never written through
    assert files.log_csv.read_text().splitlines() == ["epoch,train_loss,dice_mean", "1,0.5,0.25", "2,0.4,0.5"]
    assert '"epoch": 2' in files.log_json.read_text()
    assert files.curve.read_bytes().startswith(b"\x89PNG")
    assert files.recipe.read_text() == "train:\n  epochs: 2\n"
    assert not any(p.is_symlink() for p in (files.optimizer, files.log_csv, files.log_json, files.curve, files.recipe))
    # no temporary file of the new scheme is left behind
    assert sorted(p.name for p in files.root.iterdir() if p.name.endswith(".partial") and not p.is_symlink()) == []


def test_remove_partials_removes_what_killed_runs_left_and_nothing_else(tmp_path):
    files = RunFiles(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has finished
    killed = temporary_path(files.best).with_name(temporary_path(files.best).name.replace(f"{os.getpid()}@",
                                                                                           f"{dead_pid}@"))
    old = files.log_csv.with_name(f".{files.log_csv.name}.partial")  # an older segkit's fixed name
    foreign = tmp_path / ".best.onnx.123@host.0a1b2c3d.partial"  # `segkit export` writing beside the checkpoints
    for path in (killed, old, foreign):
        path.write_bytes(b"cut short")
    notes: list[str] = []
    files.remove_partials(notes.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]
    assert notes == [f"removed 1 temporary file left by runs that were killed before they finished: {killed}"]


def test_plan_epochs_reads_the_train_section(tmp_path):
    train = {"epochs": 7, "iters_per_epoch": 2, "time_limit_min": None, "device": "cuda"}
    plan = plan_epochs(RunFiles(tmp_path), None, train, "cpu", progress=False, echo=print, log_fields=["epoch"],
                       loss_label="mse", curve_metrics=("psnr",), metric_label="PSNR (dB)")
    assert (plan.epochs, plan.iters, plan.gpu_recipe_on_cpu, plan.log_fields) == (7, 2, True, ["epoch"])
    assert not plan_epochs(RunFiles(tmp_path), None, train | {"device": "cpu"}, "cpu", progress=False, echo=print,
                           log_fields=[], loss_label="", curve_metrics=(), metric_label="").gpu_recipe_on_cpu
