"""Issue 24 item 3: training on several processes (`torchrun --nproc-per-node N -m segkit train ...`, or
`srun`), on the CPU with gloo and 2 processes: the same weights as one process with the global batch
(2 processes started as srun starts them), rank 0 alone writing, resume from one process to two and
back, a clean stop of both ranks on SIGTERM to torchrun; and the parts that need no second process
(ranks from torchrun's and SLURM's variables, the learning-rate rule, signals)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segkit.errors import ConfigError, SegkitError
from segkit.training import ddp
from tests.helpers import REPO, tiny_recipe

posix_only = pytest.mark.skipif(sys.platform == "win32" or not torch.distributed.is_available(),
                                reason="POSIX signals and torch.distributed")

#: Difference allowed between the weights of 2 processes x batch 1 and 1 process x batch 2 on the same
#: patches. Plain SGD (no Adam, whose g / sqrt(v) magnifies rounding where gradients are near 0) keeps the
#: update linear in the gradient, so the two runs differ only by float32 rounding of the gradient sums
#: (DDP adds the two halves' gradients, one process sums all pixels at once): ~1e-7 relative per step,
#: far below 1e-6 absolute after a few steps of lr 1e-3 (measured: 3e-8 at most). The epoch compared moves
#: the weights by ~6e-3, and ranks drawing the same patches make the check fail, so it cannot pass by
#: accident (the first is asserted below).
ATOL = 2e-6


def _quiet(_: str) -> None:
    return None


def _recipe(tmp_path: Path, out: str, **train) -> dict:
    settings = {"batch": 2, "epochs": 1, "iters_per_epoch": 2, "optimizer": "sgd", "momentum": 0.9,
                "val_tile": 572, **train}  # few large validation tiles: seconds
    recipe = tiny_recipe(tmp_path, out=str(tmp_path / out), **settings)
    recipe["model"]["params"]["batch_norm"] = False  # per-rank BatchNorm statistics differ by design
    recipe["data"]["tile"] = 188  # the smallest U-Net tile (4 x 4 output pixels): fast steps
    return recipe


def _torchrun(tmp_path: Path, recipe: dict, *overrides: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node 2 -m segkit train recipe.yaml -q OVERRIDES`, as users run it."""
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "segkit", "train", str(path), "-q", *overrides]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _srun(tmp_path: Path, recipe: dict, *overrides: str, rank1: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """What `srun --ntasks 2 segkit train recipe.yaml -q OVERRIDES` starts on one node: 2 processes told
    their rank by SLURM's variables (no torchrun; the rendezvous is MASTER_ADDR:MASTER_PORT). `rank1`:
    overrides for rank 1 alone."""
    import socket

    path = tmp_path / "srun.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with socket.socket() as probe:  # a free port (SLURM jobs get 20000 + job id mod 20000)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_JOB_ID="4242", MASTER_PORT=str(port))
    return [subprocess.Popen([sys.executable, "-m", "segkit", "train", str(path), "-q", *overrides,
                              *(rank1 if rank else ())], cwd=tmp_path,
                             env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's (averaged) weights and the trained weights kept beside the optimizer state."""
    from safetensors.torch import load_file

    weights = {f"last.{k}": v for k, v in load_file(str(run / "last.safetensors")).items()}
    weights.update({k: v for k, v in load_file(str(run / "last.optimizer.safetensors")).items()
                    if k.startswith("weights.")})
    return weights


def _union_stream(real):
    """One process drawing what the 2 ranks draw: per batch of 2, rank 0's next patch, then rank 1's (their
    streams are seeded (train.seed, first epoch, rank))."""

    def stream(slices, *, seed, **kwargs):
        assert len(seed) == 2  # the single process's own seed (train.seed, first epoch)
        ranks = [real(slices, seed=(*seed, rank), **kwargs) for rank in (0, 1)]

        class Union(torch.utils.data.IterableDataset):
            def __iter__(self):
                streams = [iter(s) for s in ranks]
                while True:
                    for one in streams:
                        yield next(one)

        return Union()

    return stream


@posix_only
def test_two_processes_train_as_one_process_with_the_global_batch_and_resume_both_ways(tmp_path, monkeypatch):
    import segkit.training.loop as loop
    from segkit.checkpoint import load_model

    # one process trains epoch 1; its run is continued by 2 processes x batch 1, and by 1 process x batch 2
    start = loop.train(_recipe(tmp_path, "start"), progress=False, echo=_quiet).root
    for name in ("two", "one"):
        shutil.copytree(start, tmp_path / name)
    ranks = _srun(tmp_path, _recipe(tmp_path, "two", batch=1), "--resume", "train.epochs=2")
    (stdout, stderr), (rank1_out, rank1_err) = (rank.communicate(timeout=300) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [0, 0], stderr[-3000:] + rank1_err[-3000:]
    assert ("2 iterations x 2 processes (srun, gloo on the CPU) x batch 1 per process = global batch 2 = 4 "
            "patches of 188 px per epoch") in stdout
    assert "learning rate 0.001 (train.lr_scaling=none: not scaled)" in stdout
    assert "note: the run trained on 1 process(es) with a global batch of 2 so far, now on 2 with a global batch " \
           "of 2" in stdout
    # rank 0 alone validates, writes and speaks
    assert "epoch 2: " in stdout and "last checkpoint: " in stdout and "epoch 1: " not in stdout
    assert rank1_out == "" and "error" not in rank1_err

    seeds = [ddp.stream_seed(0, 2, ddp.Ranks(rank=r, world=2)) for r in (0, 1)]
    assert seeds == [(0, 2, 0), (0, 2, 1)] and ddp.stream_seed(0, 2, ddp.Ranks()) == (0, 2)
    monkeypatch.setattr(loop, "patch_stream", _union_stream(loop.patch_stream))
    loop.train(_recipe(tmp_path, "one", epochs=2), resume=True, progress=False, echo=_quiet)

    two, one, before = _weights(tmp_path / "two"), _weights(tmp_path / "one"), _weights(start)
    assert two.keys() == one.keys() and not any(k.startswith(("last.module.", "weights.module.")) for k in two)
    moved = max(float((two[k] - before[k]).abs().max()) for k in two)
    assert moved > 100 * ATOL  # epoch 2 changed the weights: equal results are not the unchanged start
    for key in two:
        torch.testing.assert_close(two[key], one[key], atol=ATOL, rtol=1e-5, msg=key)
    logs = [yaml.safe_load((tmp_path / name / "log.json").read_text()) for name in ("two", "one")]
    assert [row["epoch"] for row in logs[0]] == [1, 2]
    assert logs[0][1]["patches_per_s"] > 0  # the throughput of both processes, for the scaling figure
    # the logged loss of 2 processes is their mean, the loss of the global batch
    assert logs[0][1]["train_loss"] == pytest.approx(logs[1][1]["train_loss"], rel=1e-5)

    # and back: the 2-process run continues on one process (plain module weights, no 'module.' keys)
    monkeypatch.undo()
    messages: list[str] = []
    loop.train(_recipe(tmp_path, "two", epochs=3), resume=True, progress=False, echo=messages.append)
    assert "note: the run trained on 2 process(es) with a global batch of 2 so far, now on 1 with a global " \
           "batch of 2" in messages
    assert any(m.startswith("epoch 3: ") for m in messages)
    load_model(tmp_path / "two" / "best.safetensors")


@posix_only
def test_a_rank_that_fails_stops_the_other_with_one_line(tmp_path):
    """Rank 1 fails once the processes have met (its data is missing); rank 0, waiting for it in a collective,
    stops at once with one line instead of waiting for train.dist_timeout_min or printing a traceback."""
    ranks = _srun(tmp_path, _recipe(tmp_path, "run"), rank1=("data.raw=missing.tif",))
    started = time.monotonic()
    (_, stderr), (_, rank1_err) = (rank.communicate(timeout=300) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [2, 2]
    assert "error: data.raw: " in rank1_err and "missing.tif does not exist" in rank1_err
    assert stderr.strip().splitlines()[-1].startswith(
        "error: rank 0: the other training processes stopped answering (one of them failed or was stopped"), stderr
    assert "Traceback" not in stderr and time.monotonic() - started < 120


def _segkit_processes(marker: str) -> list[int]:
    """Processes whose command line names `marker` (the test's own recipe file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@posix_only
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_sigterm_to_the_launcher_stops_both_ranks_with_a_usable_checkpoint(tmp_path):
    from segkit.checkpoint import load_model
    from segkit.training.loop import train

    recipe = _recipe(tmp_path, "run", batch=1, iters_per_epoch=100_000)
    process = _torchrun(tmp_path, recipe)
    try:
        for line in process.stdout:  # both ranks train once the first iterations are timed
            if line.startswith("timing: "):
                break
        assert len(_segkit_processes(str(tmp_path / "ddp.yaml"))) >= 3  # the launcher and its 2 ranks
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    # each rank stopped by itself at the same step (torchrun would SIGKILL them after its 30 s shutdown timeout)
    assert stopped_after < 25, stderr[-3000:]
    assert stderr.count("interrupted by SIGTERM: segkit train stopped (exit code 143)") == 2, stderr[-3000:]
    assert "Traceback" not in stderr.split("interrupted by SIGTERM")[0]  # the ranks' (torchrun prints its own)
    assert stdout.count("interrupted; last checkpoint kept in ") == 1
    assert not _segkit_processes(str(tmp_path / "ddp.yaml"))
    run = tmp_path / "run"
    assert not [p.name for p in run.iterdir() if "partial" in p.name]
    load_model(run / "last.safetensors")
    # the checkpoint of the interrupted 2-process run goes on in one process
    messages: list[str] = []
    train({**recipe, "train": {**recipe["train"], "iters_per_epoch": 1}}, resume=True, progress=False,
          echo=messages.append)
    assert any(m.startswith("epoch 1: ") for m in messages), messages


# -- the parts without a second process ------------------------------------------------------------------

def test_ranks_come_from_torchrun_or_slurm():
    assert ddp.ranks_from_environment({}) == ddp.Ranks()
    torchrun = ddp.ranks_from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (torchrun.rank, torchrun.local_rank, torchrun.world, torchrun.launcher) == (3, 1, 4, "torchrun")
    assert torchrun.distributed and not torchrun.main and torchrun.address is None
    srun = ddp.ranks_from_environment({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
                                       "SLURM_NNODES": "2", "SLURM_JOB_ID": "123456", "MASTER_ADDR": "node01"})
    assert (srun.rank, srun.local_rank, srun.world, srun.launcher) == (5, 1, 8, "srun")
    assert srun.address == "tcp://node01:23456"  # 20000 + job id mod 20000: jobs sharing a node differ
    one_node = ddp.ranks_from_environment({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
                                           "SLURM_NNODES": "1", "MASTER_PORT": "29999"})
    assert one_node.address == "tcp://127.0.0.1:29999"
    # a batch script of --ntasks 4 that runs a step of one task trains as one process
    assert not ddp.ranks_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4",
                                           "SLURM_STEP_NUM_TASKS": "1"}).distributed
    with pytest.raises(SegkitError, match=r"MASTER_ADDR is not set for this multi-node SLURM job; .*scontrol show "
                                          "hostnames"):
        ddp.ranks_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"})
    with pytest.raises(SegkitError, match="RANK='x' is not a whole number"):
        ddp.ranks_from_environment({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(SegkitError, match="rank 2 of a world of 2 processes"):
        ddp.ranks_from_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_the_learning_rate_rule_and_the_header():
    assert ddp.scaled_lr(1e-3, "none", 4) == 1e-3
    assert ddp.scaled_lr(1e-3, "linear", 4) == pytest.approx(4e-3)
    assert ddp.scaled_lr(1e-3, "sqrt", 4) == pytest.approx(2e-3)
    assert ddp.lr_text(1e-3, "linear", 4) == ("learning rate 0.004 = train.lr 0.001 x 4 (train.lr_scaling=linear "
                                              "for the global batch 4 times train.batch)")
    assert ddp.header(ddp.Ranks(rank=0, world=4, launcher="srun"), "cuda:0", 8) == \
        "4 processes (srun, nccl, one GPU each) x batch 8 per process = global batch 32"
    assert ddp.header(ddp.Ranks(), "cpu", 8) == "batch 8"


def test_recipe_keys_and_devices_of_several_processes(monkeypatch):
    from segkit.config import validate_recipe

    with pytest.raises(ConfigError, match="train.lr_scaling: 'cubic' is not one of none, linear, sqrt"):
        validate_recipe({"train": {"lr_scaling": "cubic"}})
    with pytest.raises(ConfigError, match="train.dist_timeout_min: must be positive"):
        validate_recipe({"train": {"dist_timeout_min": 0}})
    two = ddp.Ranks(rank=1, local_rank=1, world=2, launcher="torchrun")
    assert ddp.rank_device("cpu", two) == "cpu"
    with pytest.raises(ConfigError, match="train.device=cuda:1 names one GPU, but 2 processes train"):
        ddp.rank_device("cuda:1", two)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ddp.rank_device("auto", ddp.Ranks(rank=0, world=2)) == "cuda:0"
    with pytest.raises(ConfigError, match=r"which has 1 GPU: start at most 1 process per node"):
        ddp.rank_device("cuda", two)


def test_sync_batchnorm_on_the_cpu_is_refused_before_any_work(tmp_path, monkeypatch):
    from segkit.training.loop import train

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    recipe = _recipe(tmp_path, "run", sync_batchnorm=True)
    with pytest.raises(ConfigError, match="train.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only"):
        train(recipe, progress=False, echo=_quiet)
    assert not (tmp_path / "run").exists()


def test_a_signal_is_recorded_then_raised_through_the_previous_handler():
    """While several ranks train, SIGTERM only records; the shared decision raises it through the handler
    that was there before (the CLI's), so every rank stops as the command stops on SIGTERM."""
    raised: list[int] = []

    class Stop(Exception):
        pass

    def previous(signum, frame):
        raised.append(signum)
        raise Stop

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with ddp.StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert signals.received == signal.SIGTERM and raised == []  # recorded, not raised
            with pytest.raises(Stop):
                signals.raise_signal(signals.received)
        assert raised == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_peer_failures_are_told_apart_from_bugs():
    assert ddp.peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]"))
    assert ddp.peer_failure(torch.distributed.DistBackendError("NCCL watchdog"))
    assert not ddp.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_one_process_keeps_its_seeds_and_needs_no_process_group():
    with ddp.process_group(ddp.Ranks(), "cpu", timeout_min=1) as group:
        assert isinstance(group, ddp.LocalGroup) and group.main and group.world == 1
        value = torch.tensor(np.float32(2.5))
        assert group.mean(value) is value
    assert not torch.distributed.is_initialized()


def test_a_data_folder_is_refused_under_several_processes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from segkit.cli import main

    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["train", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path} is a data folder: with several processes train a recipe file" in result.output
    assert not list(tmp_path.iterdir())


def test_a_training_without_processes_refuses_a_launcher_that_started_several(tmp_path, monkeypatch):
    """segkit train-denoiser trains on one process: under torchrun it stops with one line instead of N copies
    writing the same run."""
    from segkit.training.runs import RunFiles, plan_epochs

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    train = {"iters_per_epoch": 2, "epochs": 1, "time_limit_min": None, "device": "cpu"}
    with pytest.raises(ConfigError, match="trains on one process, but torchrun started 2"):
        plan_epochs(RunFiles(tmp_path), None, train, "cpu", progress=False, echo=_quiet, log_fields=[], loss_label="",
                    curve_metrics=(), metric_label="")
