"""Issue 13, training and recipes: items 10 (recipe inputs), 11 (missing recipe checks), 12 (Ctrl-C and
SIGTERM during training), 14 (time limit per iteration), 15 (data paths), 16 (recipe words in training
errors) and 20 (a GPU recipe on the CPU)."""

from __future__ import annotations

import _thread
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from segkit.config import load_recipe, validate_recipe
from segkit.errors import ConfigError, InputError
from tests.helpers import REPO, assert_user_error, data_root, run, tiny_recipe

REPO = REPO


def _quiet(_: str) -> None:
    return None


def _recipe_file(tmp_path: Path, **train) -> Path:
    """The tiny training recipe (tests.helpers.tiny_recipe) as a YAML file."""
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, **train)))
    return path


# -- 10: recipe inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, value, message", [
    ("train", "workers", -1, "train.workers: must be 0 or more, got -1"),
    ("train", "seed", -3, "train.seed: must be 0 or more"),
    ("train", "lr", float("nan"), "train.lr: must be a finite number"),
    ("train", "time_limit_min", 0, "train.time_limit_min: must be positive"),
    ("augment", "noise_std", 2.0, r"augment.noise_std: must be in \[0, 1\]"),
    # 11: checks that were missing
    ("loss", "border_sigma", -1.0, "loss.border_sigma: must be positive, got -1"),
    ("train", "val_threshold", 1.5, r"train.val_threshold: must be in \(0, 1\), got 1.5"),
    ("train", "val_threshold", -0.1, r"train.val_threshold: must be in \(0, 1\)"),
    ("train", "val_threshold", 0, r"train.val_threshold: must be in \(0, 1\)"),
])
def test_recipe_values_out_of_range_are_refused(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe({section: {key: value}})


@pytest.mark.parametrize("slices, message", [
    ({"val_slices": [20, 26]}, r"data.val_slices \[20, 26\] and data.test_slices \[25, 30\] overlap \(slices 25-25\)"),
    ({"train_slices": [0, 21]}, r"data.train_slices \[0, 21\] and data.val_slices \[20, 25\] overlap"),
    ({"train_slices": [0, 30]}, "data.train_slices .* overlap"),
])
def test_overlapping_splits_are_refused(slices, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe({"data": slices})


def test_a_denoiser_may_train_on_the_whole_stack():
    """Noise2Void learns from raw slices alone: its train range may cover the validation and test ones."""
    from segkit.config import DENOISE_SCHEMA

    recipe = validate_recipe({"data": {"train_slices": [0, 30]}, "train": {"mode": "blind_spot"}}, DENOISE_SCHEMA)
    assert recipe["data"]["train_slices"] == [0, 30]


def test_a_recipe_that_is_a_list_plus_overrides_is_one_line(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- data\n")
    assert_user_error(run("train", path, "train.epochs=1"), f"recipe {path} holds a list, not a mapping of sections")


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "model:\n  params:\n" + "".join(f"    {line}\n" for line in lines)


@pytest.mark.parametrize("name, content, fragment", [
    ("bomb.yaml", _alias_bomb(), "holds more than 100000 values with its aliases expanded"),
    ("loop.yaml", "model: &a {params: *a}\n", "an alias refers to the value that holds it"),
    ("deep.yaml", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("big.yaml", "# padding\n" * 120_000, "MB; recipes are small YAML files"),
    ("latin1.yaml", "train: {out: caf\xe9}\n".encode("latin-1"), "is not UTF-8 text"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 30 else "")
def test_hostile_recipe_files_fail_fast_with_one_short_line(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    started = time.monotonic()
    result = run("train", path)
    assert time.monotonic() - started < 5
    assert_user_error(result, f"recipe {path}", fragment)
    assert len(result.stderr) < 400


def test_messages_never_print_whole_values(tmp_path):
    path = _recipe_file(tmp_path)
    huge = "[" + "1, " * 20_000 + "1]"
    result = run("train", path, f"train.epochs={huge}")
    assert_user_error(result, "train.epochs: expected int, got list ([1, 1, 1, 1, ...])")
    assert len(result.stderr) < 200
    result = run("train", path, "x" * 10_000)
    assert_user_error(result, "must look like section.key=value")
    assert len(result.stderr) < 200
    with pytest.raises(ConfigError) as caught:
        validate_recipe({"train": {"out": ["y" * 10_000]}})
    assert len(str(caught.value)) < 150


# -- 11: labels of one class -------------------------------------------------------------------------

@pytest.mark.parametrize("value, what", [(255, "hold only interior pixels"),
                                         (0, "hold only membrane pixels")])
def test_labels_of_one_class_are_refused_before_training(tmp_path, value, what):
    from segkit.training.loop import train

    recipe = tiny_recipe(tmp_path)
    raw = tifffile.imread(Path(recipe["data"]["root"]) / recipe["data"]["raw"])
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "labels.tif", np.full_like(raw, value))
    recipe["data"].update(root=str(tmp_path), raw="raw.tif", labels="labels.tif")
    with pytest.raises(InputError, match=rf"data.labels: slices 0-2 \(data.train_slices\) of .*labels.tif {re.escape(what)}, "):
        train(recipe, progress=False, echo=_quiet)
    assert not (tmp_path / "run" / "last.safetensors").exists()


# -- 12: an interrupt anywhere in an iteration keeps the last checkpoint -------------------------------

class _Interrupt(torch.autograd.Function):
    """Identity whose backward raises KeyboardInterrupt: Ctrl-C while gradients are computed."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["sampling", "forward", "backward", "validation", "saving the best checkpoint"])
def test_an_interrupt_anywhere_keeps_the_last_checkpoint(tmp_path, monkeypatch, where):
    import segkit.training.loop as loop
    import segkit.training.validation as validation
    from segkit.checkpoint import load_model

    calls = {"n": 0}

    def third_call_interrupts() -> bool:  # epoch 1 has 2 iterations: the 3rd call is in epoch 2
        calls["n"] += 1
        return calls["n"] == 3 if where not in ("validation", "saving the best checkpoint") else calls["n"] == 1

    from segkit.training.losses import segmentation_loss as real_loss

    real_stream, real_save = loop.patch_stream, loop.save_checkpoint
    if where in ("forward", "backward"):
        def loss(*args, **kwargs):
            value = real_loss(*args, **kwargs)
            if third_call_interrupts():
                if where == "forward":
                    raise KeyboardInterrupt
                return _Interrupt.apply(value)
            return value
        monkeypatch.setattr("segkit.training.losses.segmentation_loss", loss)
    elif where == "sampling":
        def stream(*args, **kwargs):
            inner = real_stream(*args, **kwargs)

            class Interrupting(torch.utils.data.IterableDataset):
                def __iter__(self):
                    for item in inner:
                        if third_call_interrupts():
                            raise KeyboardInterrupt
                        yield item
            return Interrupting()
        monkeypatch.setattr(loop, "patch_stream", stream)
    elif where == "validation":
        def validate(*args, **kwargs):
            if third_call_interrupts():
                raise KeyboardInterrupt
        monkeypatch.setattr(validation, "validate", validate)
    else:
        def save(path, *args, **kwargs):
            if Path(path).name == "best.safetensors" and third_call_interrupts():
                (Path(path).parent / ".best.safetensors.partial").write_bytes(b"cut short")
                raise KeyboardInterrupt
            return real_save(path, *args, **kwargs)
        monkeypatch.setattr(loop, "save_checkpoint", save)

    messages: list[str] = []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    foreign = run_dir / ".best.onnx.123@host.0a1b.partial"  # `segkit export` writing beside the checkpoints
    foreign.write_bytes(b"another program's temporary file")
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_recipe(tmp_path, batch=1), progress=False, echo=messages.append)
    assert messages[-1] == f"interrupted; last checkpoint kept in {run_dir} (continue with resume=True)"
    load_model(run_dir / "last.safetensors")  # a complete checkpoint
    assert (run_dir / "last.optimizer.safetensors").exists()
    assert [p.name for p in run_dir.iterdir() if "partial" in p.name] == [foreign.name]  # only this run's removed


def test_backward_on_the_cpu_stops_at_the_next_layer_on_an_interrupt():
    """The whole backward pass is one C++ call; the no-op hook per parameter returns to Python after each
    layer, so a signal that arrives during it stops it there (without them: after all layers)."""
    from segkit.models import create_model
    from segkit.training.runs import make_interruptible

    started = threading.Event()

    class Started(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            started.set()
            return grad

    def interrupt_when_started():
        started.wait(10)
        _thread.interrupt_main()  # as a signal does: KeyboardInterrupt at the next Python instruction

    torch.manual_seed(0)
    model = create_model("unet", base=8)
    assert len(make_interruptible(model, "cpu")) == len(list(model.parameters()))
    assert make_interruptible(model, "cuda:0") == []
    loss = Started.apply(model(torch.randn(1, 1, 380, 380))).mean()
    # Ctrl-C raises KeyboardInterrupt here whatever earlier tests (Dask clusters, CLI runs) did to SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            loss.backward()
            time.sleep(10)  # (without the hooks the interrupt lands here, after the whole backward; a loaded
            # machine may take seconds to run the interrupting thread, so wait long enough for it)
    finally:
        signal.signal(signal.SIGINT, previous)
    first_layer = next(model.parameters())
    assert first_layer.grad is None  # stopped before the gradient reached the first layer


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_training_keeps_the_last_checkpoint(tmp_path):
    path = _recipe_file(tmp_path, epochs=1, iters_per_epoch=100_000, batch=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "segkit.cli", "train", str(path), "-q"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stdout:  # training runs once the first iterations are timed
            lines.append(line)
            if line.startswith("timing: "):
                break
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and stopped_after < 20
    assert f"interrupted; last checkpoint kept in {tmp_path / 'run'} (continue with --resume)" in stdout
    assert (tmp_path / "run" / "last.safetensors").exists()
    assert not [p.name for p in (tmp_path / "run").iterdir() if "partial" in p.name]


# -- 14: train.time_limit_min is checked every iteration ---------------------------------------------

def test_the_time_limit_stops_inside_an_epoch_and_saves(tmp_path):
    """The limit is checked after every iteration; the epoch it cuts short is validated and saved like
    any other, so resuming with the same limit moves on (epochs longer than the limit still progress)."""
    from segkit.training.loop import train

    messages: list[str] = []
    recipe = tiny_recipe(tmp_path, epochs=3, iters_per_epoch=50, batch=1, time_limit_min=1e-6)
    files = train(recipe, progress=False, echo=messages.append)
    assert any(m.startswith("stopping in epoch 1 after 1 of 50 iterations: train.time_limit_min=1e-06 reached; "
                            f"the short epoch was validated and saved in {files.root}") for m in messages), messages
    assert any(m.startswith("epoch 1:") for m in messages) and files.best.exists() and files.last.exists()
    train(recipe, resume=True, progress=False, echo=messages.append)
    assert any(m.startswith("stopping in epoch 2 after 1 of 50 iterations") for m in messages), messages


# -- 15: data paths ------------------------------------------------------------------------------------

def test_relative_data_paths_follow_the_recipe_file(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("data: {root: ../data}\nmodel: {init_from: runs/a/best.safetensors}\ntrain: {out: runs/b}\n")
    monkeypatch.chdir(tmp_path / "data")
    recipe = load_recipe(path)
    assert recipe["data"]["root"] == str(tmp_path / "data")  # the recipe's folder, not the working directory
    assert recipe["model"]["init_from"] == "runs/a/best.safetensors" and recipe["train"]["out"] == "runs/b"
    assert load_recipe(path, ["data.root=elsewhere"])["data"]["root"] == "elsewhere"  # overrides: the shell's


def test_missing_data_names_the_override_that_fixes_it(tmp_path, monkeypatch):
    from segkit.training.loop import train

    recipe = tiny_recipe(tmp_path)
    found = tmp_path / "datasets" / "isbi"
    found.mkdir(parents=True)
    (found / recipe["data"]["raw"]).write_bytes(b"")
    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path / "datasets"))
    recipe["data"]["root"] = str(tmp_path / "moved" / "isbi")
    with pytest.raises(InputError, match=f"data.root {tmp_path / 'moved' / 'isbi'} does not exist; pass "
                                         f"data.root={found} "):
        train(recipe, progress=False, echo=_quiet)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    recipe["data"]["root"] = str(tmp_path)
    with pytest.raises(InputError, match=r"data.raw: .* does not exist; pass data.raw=<a file in"):
        train(recipe, progress=False, echo=_quiet)


def test_the_data_location_is_set_by_segkit_data(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("SEGKIT_DATA")
    assert data_root() == REPO.parent / "shared" / "data"


# -- 16: training errors name recipe keys, not predict flags -------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_error_names_the_recipe_key(tmp_path):
    result = run("train", _recipe_file(tmp_path), "train.device=cuda")
    assert_user_error(result, "train.device=cuda was asked for but CUDA is not available here; set train.device=cpu")
    assert "--device" not in result.stderr


@pytest.mark.parametrize("command", ["train", "train-denoiser"])
def test_train_tile_error_names_the_recipe_key(tmp_path, command):
    path = _recipe_file(tmp_path)
    if command == "train-denoiser":
        from segkit.demo import SAMPLE_RAW

        path.write_text(f"model: {{name: denoiser, params: {{base: 4}}}}\n"
                        f"data: {{root: '{SAMPLE_RAW.parent}', raw: {SAMPLE_RAW.name}, train_slices: [0, 3], "
                        f"val_slices: [3, 4], test_slices: [4, 5]}}\ntrain: {{device: cpu, out: '{tmp_path / 'den'}'}}\n")
    result = run(command, path, "data.tile=101", "train.epochs=1", "train.iters_per_epoch=1")
    assert_user_error(result, "data.tile 101 is not a valid input size", "use data.tile ")
    assert "--tile" not in result.stderr


@pytest.mark.parametrize("override, fragments", [
    ("data.tile=100012", ("data.tile 100012 needs at least", "GB of activations", "use data.tile ")),  # was MemoryError
    ("model.params.base=100000", ("model.params:", "TB of parameters", "choose smaller model.params")),  # was 360 GB alloc
])
def test_a_tile_or_model_too_big_for_memory_is_refused_before_allocating(tmp_path, override, fragments):
    result = run("train", _recipe_file(tmp_path), override, "train.epochs=1", "train.iters_per_epoch=1")
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run" / "last.safetensors").exists()


# -- 20: a GPU recipe on the CPU ---------------------------------------------------------------------

def test_a_gpu_recipe_on_the_cpu_says_so_and_how_long_it_takes(tmp_path, monkeypatch):
    from segkit.training.loop import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    messages: list[str] = []
    recipe = tiny_recipe(tmp_path, device="auto", amp=True, epochs=2, iters_per_epoch=3, batch=1)
    train(recipe, progress=False, echo=messages.append)
    text = "\n".join(messages)
    assert "training unet (0.12 M parameters) on cpu: training slices 0-2, validation slice 3; " \
           "3 iterations x batch 1 = 3 patches of 236 px per epoch, 2 epochs" in text
    assert "warning: no GPU here (train.device=auto), so this recipe trains on the CPU" in text
    assert "note: train.amp is ignored on the CPU" in text
    assert "warning: this recipe is sized for a GPU: on this CPU one epoch (3 iterations at " in text
    assert "s) takes about " in text and "of validation; the 2 epochs to go take about" in text
    assert "left]" in text  # the epoch lines say what is left


def test_workers_are_capped_at_the_cpu_cores(monkeypatch):
    from segkit.training import runs

    monkeypatch.setattr(runs, "cpu_cores", lambda: 2)
    notes: list[str] = []
    assert runs.loader_workers(6, notes.append) == 2
    assert notes == ["note: train.workers=6 is more than the 2 CPU cores here; using 2 workers"]
    assert runs.loader_workers(2, notes.append) == 2 and len(notes) == 1


def test_a_model_switch_given_as_text_is_refused_before_training(tmp_path):
    """`batch_norm: 'false'` (quoted) trained with BatchNorm: a string taken as true (issue 25, finding 9)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe_file(tmp_path).read_text())
    result = run("train", path, "model.params.batch_norm='false'", "train.epochs=1", "train.iters_per_epoch=1")
    assert_user_error(result, "model.params.batch_norm: expected true or false", "without quotes")
    assert not (tmp_path / "run" / "last.safetensors").exists()
