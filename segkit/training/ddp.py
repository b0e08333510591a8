"""Training on several processes at once (`torchrun --nproc-per-node N -m segkit train ...`, or SLURM's
`srun`): which rank this process is, its device and process group, the decisions every rank takes
together, and the learning-rate rule for the larger global batch.

Each rank trains the same model (DistributedDataParallel averages the gradients) on its own seeded
patch stream, so the global batch is the recipe's `train.batch` times the number of processes. Rank 0
alone validates and writes the run's files; the others wait for it. Every decision that stops the run
(SIGTERM or Ctrl-C on any rank, `train.time_limit_min`, a loss that is not finite) is shared by an
all-reduce after every step, so all ranks stop at the same step and none is left waiting in a
collective. A single process (no launcher variables, or a world of one) gets `LocalGroup`: the same
interface, doing nothing, so the training loop has no special cases.

torch is imported inside the functions that need it: importing this module loads none.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from segkit.errors import ConfigError, SegkitError
from segkit.words import counted

#: How the learning rate follows the global batch (`train.lr_scaling`): factor of train.lr for a global
#: batch `world` times the recipe's `train.batch`.
LR_SCALING = {
    "none": lambda world: 1.0,
    "linear": lambda world: float(world),
    "sqrt": lambda world: math.sqrt(world),
}


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes that train together.

    Attributes
    ----------
    rank : int
        Global rank, 0 .. world - 1; rank 0 validates and writes the run's files.
    local_rank : int
        Rank on this node: the GPU index it trains on (cuda:local_rank).
    world : int
        Number of processes; 1 trains as a single process without any process group.
    launcher : str
        "torchrun", "srun" or "single".
    address : str or None
        The rendezvous (tcp://MASTER_ADDR:MASTER_PORT) under srun; None under torchrun (its own store).
    """

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    launcher: str = "single"
    address: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _integer(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        number = int(value)
    except ValueError:
        raise SegkitError(f"environment variable {name}={value!r} is not a whole number; it is set by torchrun or "
                          "SLURM's srun, so start segkit train through one of them without changing it") from None
    if number < 0:
        raise SegkitError(f"environment variable {name}={number} is negative; start segkit train with torchrun "
                          "or srun, which set it")
    return number


def ranks_from_environment(env: Mapping[str, str] | None = None) -> Ranks:
    """This process's rank from the launcher's variables.

    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/MASTER_PORT, which its own
    rendezvous uses). Without them, SLURM's srun gives SLURM_PROCID, SLURM_LOCALID and
    SLURM_STEP_NUM_TASKS (or SLURM_NTASKS); the rendezvous is then MASTER_ADDR:MASTER_PORT as torch
    expects them, MASTER_ADDR defaulting to this machine on a one-node job and MASTER_PORT to
    20000 + SLURM_JOB_ID mod 20000 (so jobs sharing a node do not collide).

    Parameters
    ----------
    env : mapping of str to str, optional
        The environment (default: os.environ).

    Returns
    -------
    Ranks
        A world of one (no process group) when neither launcher started several processes.

    Raises
    ------
    SegkitError
        A variable is not a whole number, the rank lies outside the world, or a multi-node srun job
        gives no MASTER_ADDR.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _integer(env, "RANK"), _integer(env, "WORLD_SIZE")
        local = _integer(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher, address = "torchrun", None
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        rank = _integer(env, "SLURM_PROCID")
        world = _integer(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        local = _integer(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher, address = "srun", None
        if world > 1:
            host = env.get("MASTER_ADDR")
            if not host:
                if env.get("SLURM_NNODES", "1") != "1":
                    raise SegkitError(
                        "MASTER_ADDR is not set for this multi-node SLURM job; in the sbatch script, before srun: "
                        "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)")
                host = "127.0.0.1"
            port = env.get("MASTER_PORT") or str(20000 + _integer(env, "SLURM_JOB_ID") % 20000
                                                  if "SLURM_JOB_ID" in env else 29500)
            address = f"tcp://{host}:{port}"
    else:
        return Ranks()
    if world < 1 or rank >= world:
        raise SegkitError(f"rank {rank} of a world of {counted(world, 'process')}: the launcher's variables disagree "
                          "(RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    return Ranks(rank=rank, local_rank=local, world=world, launcher=launcher, address=address)


def rank_device(requested: str, ranks: Ranks) -> str:
    """The device of this rank: cuda:LOCAL_RANK when the recipe trains on GPUs, else the CPU.

    Parameters
    ----------
    requested : str
        The recipe's `train.device` (auto, cpu, cuda or cuda:N).
    ranks : Ranks
        This process's place (a world of more than one).

    Returns
    -------
    str
        'cpu' or 'cuda:LOCAL_RANK'.

    Raises
    ------
    ConfigError
        One GPU is named (cuda:N) while several processes train, CUDA was asked for but is missing, or
        this node has fewer GPUs than processes.
    """
    import torch

    if requested.startswith("cuda:"):
        raise ConfigError(f"train.device={requested} names one GPU, but {ranks.world} processes train: each uses "
                          "cuda:LOCAL_RANK; set train.device=cuda (or auto), or choose the GPUs with "
                          "CUDA_VISIBLE_DEVICES")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={requested} was asked for but CUDA is not available here; "
                          "set train.device=cpu (or auto)")
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise ConfigError(f"rank {ranks.rank} is process {ranks.local_rank} on its node, which has {counted(count, 'GPU')}: "
                          f"start at most {counted(count, 'process')} per node (torchrun --nproc-per-node {count}, or srun "
                          "--ntasks-per-node / --gpus-per-node)")
    return f"cuda:{ranks.local_rank}"


def scaled_lr(lr: float, rule: str, world: int) -> float:
    """`train.lr` for a global batch `world` times the recipe's batch: unchanged (none), times the world
    (linear: Goyal et al.'s rule for SGD) or times its square root (sqrt: the usual rule for Adam)."""
    return lr * LR_SCALING[rule](world)


def lr_text(lr: float, rule: str, world: int) -> str:
    """The learning rate in the run's header, with the rule that gave it."""
    scaled = scaled_lr(lr, rule, world)
    if world == 1 or rule == "none":
        return f"learning rate {scaled:g} (train.lr_scaling={rule}: not scaled)"
    return (f"learning rate {scaled:g} = train.lr {lr:g} x {LR_SCALING[rule](world):g} "
            f"(train.lr_scaling={rule} for the global batch {world} times train.batch)")


def stream_seed(seed: int, start_epoch: int, ranks: Ranks) -> tuple[int, ...]:
    """The seed of a rank's patch stream (and of its on-device augmentation): (train.seed, first epoch of
    this run) for a single process, as before, with the rank appended when several train, so every rank
    draws its own patches and a resumed run never replays the first run's."""
    return (seed, start_epoch) if not ranks.distributed else (seed, start_epoch, ranks.rank)


class StopSignals:
    """SIGTERM and SIGINT recorded instead of raised while several ranks train (a signal raised in the middle
    of a collective would leave the other ranks waiting in it). `ProcessGroup.sync` shares what was
    received; every rank then raises it at the same step through the handler that was there before (the
    CLI's, which stops the command as on Ctrl-C). Only in the main thread, where Python runs handlers."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received = max(self.received, signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(number)
                if previous is not signal.SIG_IGN:
                    self._previous[number] = previous
                    signal.signal(number, self._record)
        return self

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def raise_signal(self, signum: int) -> None:
        """Stop as `signum` stops this process: its previous handler (which raises), else KeyboardInterrupt."""
        previous = self._previous.get(signum)
        self.restore()
        if callable(previous):
            previous(signum, None)
        raise KeyboardInterrupt


class LocalGroup:
    """A single process: nothing to share (signals raise where they land, as in any command)."""

    ranks = Ranks()
    main = True
    world = 1

    def sync(self, clock: Any) -> None:
        """Nothing to agree on; the clock keeps its own time."""

    def largest(self, value: float) -> float:
        return value

    def mean(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        """No one to wait for."""

    def wrap(self, model: Any) -> Any:
        return model

    def check_same(self, model: Any) -> None:
        """One copy of the weights."""

    @contextmanager
    def deferred_signals(self) -> Iterator[None]:
        yield

    @contextmanager
    def answers(self) -> Iterator[None]:
        yield


class ProcessGroup:
    """The torch process group of a training run on several processes, and what the ranks decide together.

    Parameters
    ----------
    ranks : Ranks
        This process's place (world > 1).
    device : str
        This rank's device ('cpu' or 'cuda:LOCAL_RANK').
    timeout_min : float
        How long a collective waits for the other ranks (`train.dist_timeout_min`) before this rank stops
        with an error: a rank that died or hangs never leaves the others waiting for ever.
    """

    def __init__(self, ranks: Ranks, device: str, timeout_min: float):
        self.ranks, self.device, self.timeout_min = ranks, device, timeout_min
        self.main, self.world = ranks.main, ranks.world
        self.signals = StopSignals()

    def _reduce(self, values: list[float], op: str) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self.answers():
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.tolist()

    def sync(self, clock: Any) -> None:
        """After every step (and after rank 0's validation, which makes it a barrier): the ranks agree on
        the time elapsed (the largest, so the learning-rate schedule and the time limit are the same on
        all) and on any SIGTERM/SIGINT one of them received, which all then raise here."""
        import time

        elapsed, signum = self._reduce([time.monotonic() - clock.started, float(self.signals.received)], "MAX")
        clock.agreed_elapsed = elapsed
        if signum:
            self.signals.raise_signal(int(signum))

    def largest(self, value: float) -> float:
        """The largest of the ranks' `value`s, the same on every rank (rank 0's estimate, the others giving 0)."""
        return self._reduce([float(value)], "MAX")[0]

    def mean(self, value: Any) -> Any:
        """The mean of a scalar tensor over the ranks (the loss of the global batch), the same on every rank,
        so a loss that is not finite on one rank stops all of them."""
        import torch.distributed as dist

        total = value.detach().clone()
        with self.answers():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world

    def barrier(self) -> None:
        import torch.distributed as dist

        with self.answers():
            dist.barrier(device_ids=[int(self.device.split(":")[1])] if self.device.startswith("cuda") else None)

    def wrap(self, model: Any) -> Any:
        """The model as DistributedDataParallel trains it (rank 0's weights and buffers broadcast to all)."""
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.startswith("cuda")
        with self.answers():
            return DistributedDataParallel(model, device_ids=[int(self.device.split(":")[1])] if cuda else None)

    def check_same(self, model: Any) -> None:
        """Refuse to go on when the ranks' copies of `model`'s parameters differ (they never should: DDP
        averages the gradients and every rank steps the same optimizer): two float64 sums per tensor,
        compared across ranks to a relative 1e-6 (once per epoch)."""
        import torch

        with torch.no_grad():
            sums = [float(s) for p in model.parameters() for s in (p.double().sum(), p.double().abs().sum())]
        low = self._reduce([-s for s in sums], "MAX")
        high = self._reduce(sums, "MAX")
        if any(h + minus > 1e-6 * max(abs(h), 1.0) for h, minus in zip(high, low)):
            raise SegkitError(f"the weights of the {self.world} processes have diverged (rank {self.ranks.rank}); "
                              "this is a bug in segkit's distributed training, please report it")

    @contextmanager
    def deferred_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT are recorded and shared at the next `sync` instead of raised where they land."""
        with self.signals:
            yield

    @contextmanager
    def answers(self) -> Iterator[None]:
        """A collective that fails because another rank died or did not answer in time stops this rank
        with one line instead of a traceback (the failed rank printed its own error)."""
        try:
            yield
        except RuntimeError as exc:  # torch's DistError (a dead or silent peer) is a RuntimeError
            if not peer_failure(exc):
                raise
            raise SegkitError(
                f"rank {self.ranks.rank}: the other training processes stopped answering (one of them failed or "
                f"was stopped: see its message; collectives wait at most train.dist_timeout_min="
                f"{self.timeout_min:g})") from exc


def peer_failure(exc: BaseException) -> bool:
    """Whether a torch error means another rank died or timed out (gloo: the connection closed; nccl and
    the store: a timeout), rather than a bug here."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):  # torch >= 2.2's family of distributed errors
        return True
    text = str(exc)
    return any(words in text for words in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                           "NCCL communicator was aborted"))


@contextmanager
def process_group(ranks: Ranks, device: str, *, timeout_min: float) -> Iterator[LocalGroup | ProcessGroup]:
    """The group this training process belongs to, for the duration of the run.

    A world of one is a `LocalGroup` (no torch.distributed at all). Otherwise the torch process group is
    created (nccl on GPUs, gloo on the CPU; torchrun's rendezvous, or MASTER_ADDR:MASTER_PORT under srun)
    unless the caller already made one, and destroyed at the end if it was made here.

    Parameters
    ----------
    ranks : Ranks
        This process's place (`ranks_from_environment`).
    device : str
        This rank's device (`rank_device`).
    timeout_min : float
        `train.dist_timeout_min`: how long any collective (the rendezvous included) waits.

    Yields
    ------
    LocalGroup or ProcessGroup

    Raises
    ------
    SegkitError
        The other ranks did not join within the timeout (one line naming the rendezvous).
    """
    if not ranks.distributed:
        yield LocalGroup()
        return
    import datetime

    import torch
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        options: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_min)}
        if ranks.address is not None:
            options.update(init_method=ranks.address, rank=ranks.rank, world_size=ranks.world)
        try:
            dist.init_process_group(**options)
        except (RuntimeError, ValueError) as exc:  # torch's DistError is a RuntimeError
            where = ranks.address or "torchrun's rendezvous"
            raise SegkitError(f"rank {ranks.rank} of {ranks.world}: the training processes could not meet at {where} "
                              f"within train.dist_timeout_min={timeout_min:g} ({str(exc).splitlines()[0][:160]}); "
                              "start one process per GPU with torchrun or srun") from exc
    elif dist.get_world_size() != ranks.world:
        raise SegkitError(f"a torch process group of {counted(dist.get_world_size(), 'process')} exists, but the launcher's "
                          f"variables say {ranks.world}")
    try:
        yield ProcessGroup(ranks, device, timeout_min)
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()


def header(ranks: Ranks, device: str, batch: int) -> str:
    """The processes and the batch, for the run's header: '2 processes (torchrun, gloo on the CPU) x batch 2
    per process = global batch 4'."""
    if not ranks.distributed:
        return f"batch {batch}"
    where = "nccl, one GPU each" if device.startswith("cuda") else "gloo on the CPU"
    return f"{ranks.world} processes ({ranks.launcher}, {where}) x batch {batch} per process = global batch " \
           f"{ranks.world * batch}"


__all__ = ["LR_SCALING", "LocalGroup", "ProcessGroup", "Ranks", "StopSignals", "header", "lr_text", "peer_failure",
           "process_group", "rank_device", "ranks_from_environment", "scaled_lr", "stream_seed"]
