"""What every training run shares: its files, optimizer state as safetensors, logs and curves."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segkit.checkpoint import match_umask, read_info
from segkit.config import SCHEMA, Leaf, short, validate_recipe
from segkit.errors import (
    CheckpointError,
    ConfigError,
    OptionTypeError,
    OptionValueError,
    SegkitError,
    TileSizeError,
)
from segkit.io.outputs import atomic_path, remove_stale_partials
from segkit.memory import (
    TRAINING_PARAMETER_COPIES,
    device_memory,
    format_bytes,
    largest_batch,
    meta_model,
    tile_activation_bound,
    tile_activation_bytes,
    tile_problem,
    training_activation_bound,
    training_activation_bytes,
    training_model_problem,
)
from segkit.version import DISTRIBUTION
from segkit.words import counted


@dataclass
class RunFiles:
    """Paths of one training run."""

    root: Path

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.root / "last.optimizer.safetensors"

    @property
    def log_csv(self) -> Path:
        return self.root / "log.csv"

    @property
    def log_json(self) -> Path:
        return self.root / "log.json"

    @property
    def curve(self) -> Path:
        return self.root / "curve.png"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    def summary(self) -> str:
        """What the run holds, for the end of `segkit train`: the checkpoints and the curve that exist."""
        lines = [f"best checkpoint: {self.best}" if self.best.exists()
                 else "no best checkpoint yet: no epoch finished (continue with resume=True)"]
        lines += [f"{label}: {path}" for label, path in (("last checkpoint", self.last), ("curve", self.curve))
                  if path.exists()]
        return "\n".join(lines)

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file the run writes."""
        return (self.best, self.last, self.optimizer, self.log_csv, self.log_json, self.curve, self.recipe)

    def remove_partials(self, report: Callable[[str], object]) -> None:
        """Delete the temporary files of this run's own files that were cut short: those of killed runs
        (`io.outputs.remove_stale_partials`, which says so through `report`; a write this process
        interrupted removes its own), and the fixed names older segkit versions wrote
        (.best.safetensors.partial, .curve.partial.png, ...). Other programs' temporary files in the
        folder (an export or a prediction writing beside the checkpoints) are left alone.

        Parameters
        ----------
        report : callable taking a str
            Where the line naming removed (or possibly live) temporary files goes.
        """
        remove_stale_partials(self.outputs, report)
        for path in self.outputs:
            path.with_name(f".{path.name}.partial").unlink(missing_ok=True)
        self.curve.with_name(f".{self.curve.stem}.partial.png").unlink(missing_ok=True)


def open_run(out: str | Path, *, resume: bool) -> RunFiles:
    """The run folder, created if needed; never overwrites a run unless resuming it."""
    files = RunFiles(Path(out))
    if files.last.exists() and not resume:
        raise SegkitError(f"{files.root} already holds a run; pass resume=True to continue it or set train.out=<new folder>")
    if resume and not files.last.exists():
        raise SegkitError(f"resume=True: no last checkpoint in {files.root}; start without resume=True")
    files.root.mkdir(parents=True, exist_ok=True)
    return files


def resume_run(files: RunFiles, model: Any, optimizer: Any, *, name: str, kwargs: dict[str, Any], lr: float,
               average: "WeightAverage | None" = None) -> dict[str, Any]:
    """Load the last weights and optimizer state of `files` into `model` and `optimizer`.

    Refuses a run of another model. The recipe's learning rate applies from here on (the schedule then
    sets it per step). With a weight average, the last checkpoint holds the average and the optimizer
    file the trained weights (a run without an average left only the checkpoint: both start from it).
    Returns the extra state saved with the optimizer (epoch, history, best score).
    """
    from safetensors.torch import load_file

    previous = read_info(files.last)
    if previous.model != name or previous.model_kwargs != kwargs:
        raise CheckpointError(f"resume=True: {files.last} holds model {previous.model} "
                              f"{short(previous.model_kwargs, 120)}, not this recipe's {name} {short(kwargs, 120)}")
    last = load_file(str(files.last))
    model.load_state_dict(last)
    meta = load_optimizer(files.optimizer, optimizer, weights=model)
    if average is not None:
        average.model.load_state_dict(last)
        average.restore(meta.get("averaged_updates", 1))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return meta


def optimizer_step(loss: Any, optimizer: Any, scaler: Any, *, epoch: int,
                   mean: Callable[[Any], Any] = lambda value: value) -> float:
    """One optimiser step through the AMP grad scaler (a no-op scaler without AMP); a loss that is
    not finite stops training with advice instead of corrupting the weights. Returns the loss.

    With several processes, `mean` (`ProcessGroup.mean`) averages the loss over the ranks before the
    backward pass: the value returned (and logged) is the global batch's loss, and a loss that is not
    finite on any rank stops every rank at the same step."""
    import torch

    value = mean(loss.detach())
    if not torch.isfinite(value):
        raise SegkitError(f"loss became {value.item()} at epoch {epoch}; lower train.lr or disable train.amp")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(value.item())


def check_model_fits(name: str, kwargs: dict[str, Any], device: str) -> None:
    """Refuse (ConfigError, with the numbers) a recipe model too big to train on `device`, before
    it is built (model.params base 100000 would otherwise try to allocate hundreds of GB)."""
    problem = training_model_problem(name, kwargs, device)
    if problem is not None:
        raise ConfigError(f"model.params: {problem}")


def check_train_call(recipe: Any, *, resume: Any, progress: Any, echo: Any,
                     schema: dict[str, dict[str, Leaf]] = SCHEMA) -> dict[str, Any]:
    """The arguments of a Python training call (`loop.train`, `denoise_loop.train_denoiser`) checked before any
    work, each named in one line: OptionTypeError (a TypeError) for a wrong type, OptionValueError (a
    ValueError) for a recipe that does not pass `schema`'s checks (a value edited after `load_recipe`, a
    missing section). Returns the recipe validated again (sections it leaves out take their defaults)."""
    if isinstance(recipe, (str, Path)):
        raise OptionTypeError(f"recipe is a path ({short(str(recipe))}); load it first: "
                              "recipe = segkit.config.load_recipe(path, overrides)")
    if not isinstance(recipe, dict):
        raise OptionTypeError(f"recipe must be a recipe mapping (segkit.config.load_recipe(path)), not "
                              f"{type(recipe).__name__}")
    for name, value in (("resume", resume), ("progress", progress)):
        if not isinstance(value, bool):
            raise OptionTypeError(f"{name} must be True or False, not {short(value)} ({type(value).__name__})")
    if not callable(echo):
        raise OptionTypeError(f"echo must be a function taking one line (e.g. print), not {short(echo)}")
    try:
        return validate_recipe(recipe, schema)
    except ConfigError as exc:
        raise OptionValueError(f"recipe: {exc}") from None


def check_batch_memory(name: str, kwargs: dict[str, Any], *, tile: int, val_tile: int, batch: int, val_batch: int,
                       device: str, amp: bool, average: bool = False) -> None:
    """Refuse (ConfigError) a `train.batch` whose patches, or a `train.val_batch` whose validation tiles, do not
    fit in the memory of `device` (RAM on the CPU, the GPU's on CUDA) beside the training state, before anything
    is allocated: one line with the memory needed and available and the largest batch the estimate allows.

    The model `name(**kwargs)` is built on the meta device. A training patch costs what autograd keeps of it
    (`memory.training_activation_bytes`: half with AMP on a GPU) plus the patch, its target and weights, twice
    (sampled, then batched); a validation tile its forward pass (`memory.tile_activation_bytes`). Both are
    lower estimates, so a refused batch cannot fit. The training state stays during validation: the trained
    parameters `TRAINING_PARAMETER_COPIES` times (weights, gradients, optimiser state), frozen ones (a
    denoiser pre-stage) once, and the weight average (`average`) once more.

    Parameters
    ----------
    name, kwargs : str, dict
        The model's registry name and parameters (a composed model's included).
    tile, val_tile : int
        The training patch (data.tile) and validation tile (train.val_tile or data.tile), valid input sizes.
    batch, val_batch : int
        train.batch and train.val_batch.
    device : str
        The resolved device.
    amp : bool
        Whether training autocasts (to 16-bit on a GPU).
    average : bool
        Whether the run keeps a weight average (train.ema_decay > 0).
    """
    try:
        model = meta_model(name, kwargs)
        channels, out = int(kwargs.get("in_channels", 1)), model.geometry.output_size(tile)
    except Exception:  # an invalid model or tile is reported where it is built, with its own message
        return
    available, where = device_memory(device)
    if available is None:
        return
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = sum(t.numel() for t in model.state_dict().values()) - trained
    fixed = 4 * (TRAINING_PARAMETER_COPIES * trained + kept + (trained + kept) * average)
    patch = 2 * (channels * tile * tile * 4 + out * out * (8 + 4))
    element = 2 if amp and device.startswith("cuda") else 4
    checks = (
        ("train.batch", batch, f"patch of {tile} px", "data.tile",
         lambda: _plus(patch, training_activation_bound(model, tile, channels=channels)),
         lambda: _plus(patch, training_activation_bytes(model, tile, channels=channels, element_bytes=element))),
        ("train.val_batch", val_batch, f"validation tile of {val_tile} px", "train.val_tile",
         lambda: tile_activation_bound(model, val_tile, channels=channels),
         lambda: tile_activation_bytes(model, val_tile, channels=channels)),
    )
    for setting, count, what, tile_key, bound, estimate in checks:
        upper = bound()
        if upper is not None and fixed + count * upper <= available:
            continue  # fits even at the upper bound: no trace on the meta device (2 s of imports) is needed
        each = estimate()
        if each is None or fixed + count * each <= available:
            continue
        fits = largest_batch(available, fixed, each)
        advice = (f"set {setting} to at most {fits}" if fits else
                  f"not even {setting}=1 fits: use a smaller {tile_key} or model.params")
        raise ConfigError(f"{setting}: {count} needs at least {format_bytes(fixed + count * each)} "
                          f"({format_bytes(each)} per {what} and {format_bytes(fixed)} for the weights, gradients and "
                          f"optimiser state), but {format_bytes(available)} of memory is available on {where}; {advice}")


def _plus(extra: int, value: int | None) -> int | None:
    return None if value is None else extra + value


def check_training_tile(geometry: Any, tile: int, *, model: str | None = None, model_kwargs: dict | None = None,
                        device: str = "cpu") -> None:
    """geometry.check_tile for data.tile, and (given the model) that one tile's forward fits in the
    device's memory, before any patch is sampled or allocated; messages name the recipe key."""
    from types import SimpleNamespace

    try:
        geometry.check_tile(tile)
        problem = None if model is None else tile_problem(SimpleNamespace(model=model, model_kwargs=model_kwargs or {}),
                                                          geometry, tile, device)
        if problem is not None:
            raise TileSizeError(problem)
    except TileSizeError as exc:
        text = str(exc).replace("use tile ", "use data.tile ")
        raise TileSizeError("data." + text if text.startswith("tile ") else f"data.tile: {text}") from None


def cpu_cores() -> int:
    """CPU cores this process may run on (the number torch's DataLoader compares its workers with)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def loader_workers(requested: int, echo: Any) -> int:
    """train.workers capped at the CPU cores (more processes than cores only slow sampling down)."""
    cores = cpu_cores()
    if requested > cores:
        echo(f"note: train.workers={requested} is more than the {counted(cores, 'CPU core')} here; using {counted(cores, 'worker')}")
        return cores
    return requested


def _no_op(grad: Any) -> None:
    return None


def make_interruptible(model: Any, device: str) -> list[Any]:
    """On the CPU a whole backward pass is one C++ call that Ctrl-C or SIGTERM cannot interrupt (tens of
    seconds for the paper's U-Net); a no-op hook per parameter returns to Python after each layer's
    gradient, where a pending KeyboardInterrupt is raised. Returns the hook handles."""
    if device != "cpu":
        return []
    return [p.register_hook(_no_op) for p in model.parameters() if p.requires_grad]


def duration(seconds: float) -> str:
    """A rough human duration: 0.4 s, 40 s, 12 min, 3 h 05 min, 2.5 days."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 86400:.1f} days"


class Clock:
    """Elapsed time of a training run against train.time_limit_min, the first iterations' timing, and what an
    epoch and its validation take, so the limit counts validation too."""

    def __init__(self, limit_min: float | None, *, timed_iterations: int):
        self.started = time.monotonic()
        self.limit_min = limit_min
        self.timed = max(timed_iterations, 1)
        self.done = 0  # iterations finished in this run
        self._mark: float | None = None
        # several processes: the elapsed time the ranks agreed on at the last step (ddp.ProcessGroup.sync),
        # so the schedule and the time limit decide the same on every rank; None: this process's own clock
        self.agreed_elapsed: float | None = None
        # seconds the last validation took (checkpoints and logs included) or, before the first, its estimate;
        # and the last whole epoch with its validation. Both from agreed times: every rank decides alike.
        self.validation_s: float | None = None
        self.epoch_s: float | None = None

    def elapsed(self) -> float:
        """Seconds since the run started (as the ranks agreed, with several processes)."""
        return time.monotonic() - self.started if self.agreed_elapsed is None else self.agreed_elapsed

    def left(self) -> float | None:
        """Seconds train.time_limit_min leaves (negative once past it); None without a limit."""
        return None if self.limit_min is None else self.limit_min * 60 - self.elapsed()

    def time_up(self, reserve: float = 0.0) -> bool:
        """Whether the limit is reached, or would be by `reserve` more seconds (the validation still to come)."""
        left = self.left()
        return left is not None and left < reserve

    def iteration_seconds(self, done: int) -> float | None:
        """Seconds per iteration, once `done` (the iterations finished in this run) reaches the number
        timed; the first iteration (worker start-up, allocation) is left out when there are more."""
        now = time.monotonic()
        if done == 1:
            self._mark = now
            first = now - self.started
            return first if self.timed == 1 else None
        if done == self.timed and self._mark is not None:
            return (now - self._mark) / (done - 1)
        return None

    def epochs_that_fit(self, epoch_s: float, epochs: int) -> int:
        """How many of `epochs` more epochs of `epoch_s` seconds (validation included) end within the limit."""
        left = self.left()
        if left is None:
            return epochs
        return min(epochs, max(0, int(left // max(epoch_s, 1e-9))))

    def stop_message(self, *, epoch: int, epochs: int, iterations: int, iters: int, root: Path) -> str | None:
        """Why the run stops after this (validated and saved) epoch, or None to go on: the time limit cut the
        epoch short (resume goes on with the next one), or another epoch with its validation (as long as the
        last, `epoch_s`) would end after it."""
        if iterations < iters:
            return (f"stopping in epoch {epoch} after {iterations} of {counted(iters, 'iteration')}: "
                    f"train.time_limit_min={self.limit_min:g} reached; the short epoch was validated and saved in "
                    f"{root} (continue with resume=True, from epoch {epoch + 1})")
        if epoch < epochs and self.time_up():
            return f"stopping after epoch {epoch}: train.time_limit_min={self.limit_min:g} reached"
        if epoch < epochs and self.epoch_s is not None and self.time_up(self.epoch_s):
            return (f"stopping after epoch {epoch}: another epoch with its validation (about "
                    f"{duration(self.epoch_s)}) would end after train.time_limit_min={self.limit_min:g} "
                    f"({duration(self.elapsed())} spent; continue with resume=True)")
        return None


def slice_text(slices: dict[str, Any]) -> str:
    """{'training': [0, 20], 'validation': [20, 25]} -> 'training slices 0-19, validation slices 20-24'."""
    return ", ".join(f"{key} slices {start}-{stop - 1}" if stop - start > 1 else f"{key} slice {start}"
                     for key, (start, stop) in slices.items())


def announce(echo: Any, *, model: Any, name: str, device: str, requested_device: str, amp: bool,
             data: str, iters: int, batch: int, tile: int, epochs: int, processes: str | None = None,
             world: int = 1, lr: str | None = None) -> None:
    """The start of a run: what trains where, on what (`data`, in words), and the CPU notes (GPU recipe, amp).
    With several processes, `processes` says how many and the global batch (`ddp.header`), `world` counts
    them and `lr` gives the learning rate with its scaling rule (`ddp.lr_text`)."""
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    count = f"{params / 1e6:.2f} M parameters" + (f", {trained / 1e6:.2f} M trained" if trained != params else "")
    ranges = data
    per_step = processes or f"batch {batch}"
    echo(f"training {name} ({count}) on {device}: {ranges}; {counted(iters, 'iteration')} x {per_step} = "
         f"{counted(iters * batch * world, 'patch')} of {tile} px per epoch, {counted(epochs, 'epoch')}")
    if lr is not None and world > 1:
        echo(lr)
    if device == "cpu" and requested_device != "cpu":
        echo(f"warning: no GPU here (train.device={requested_device}), so this recipe trains on the CPU, "
             "many times slower; the time per epoch follows after the first iterations")
    if device == "cpu" and amp:
        echo("note: train.amp is ignored on the CPU (training runs in float32)")


def train_iterations(step: Callable[[], float], *, epoch: int, epochs: int, iters: int, clock: Clock,
                     progress: bool, echo: Any, gpu_recipe_on_cpu: bool,
                     sync: Callable[[Clock], None] = lambda clock: None,
                     estimate_validation: Callable[[], float] | None = None) -> list[float]:
    """One epoch's iterations: `step()` (one optimiser step; returns its loss) up to `iters` times under a
    progress bar, with the timing report once the first iterations are timed. train.time_limit_min is
    checked after every iteration and cuts the epoch short when it would be reached by the epoch's
    validation (`clock.validation_s`: the last one's time, before the first the estimate
    `estimate_validation()` gives once the first iterations are timed). With several processes, `sync`
    (`ProcessGroup.sync`) makes the ranks agree on the time and on a stop signal after every step.
    Returns the losses."""
    from tqdm import tqdm

    losses: list[float] = []
    bar = tqdm(range(iters), desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
    for _ in bar:
        losses.append(step())
        sync(clock)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        clock.done += 1
        if clock.done == clock.timed and clock.validation_s is None and estimate_validation is not None:
            clock.validation_s = estimate_validation()
        report_timing(echo, bar, clock, iters=iters, epochs_left=epochs - epoch + 1,
                      gpu_recipe_on_cpu=gpu_recipe_on_cpu)
        if len(losses) < iters and clock.time_up(clock.validation_s or 0.0):
            break
    bar.close()
    return losses


def timing_text(clock: Clock, *, per_iteration: float, iters: int, epochs_left: int) -> str:
    """The time an epoch (with the validation `clock.validation_s`, when known) and the rest of the run take,
    said against train.time_limit_min: after how many epochs it stops the run, or that it cuts this one (the
    first of the run, `clock.done` iterations into it) short."""
    epoch_s = per_iteration * iters
    validation = clock.validation_s
    per_epoch = epoch_s + (validation or 0.0)
    total = per_epoch * epochs_left
    text = (f"one epoch ({counted(iters, 'iteration')} at {per_iteration:.2f} s) takes about {duration(epoch_s)} plus "
            + (f"about {duration(validation)} of validation" if validation is not None else "validation"))
    rest = f"the {counted(epochs_left, 'epoch')} to go take{'s' if epochs_left == 1 else ''} about {duration(total)}"
    left = clock.left()
    if left is None:
        return f"{text}; {rest}"
    limit = f"train.time_limit_min={clock.limit_min:g} ({duration(clock.limit_min * 60)})"
    this_epoch = max(iters - clock.done, 0) * per_iteration + (validation or 0.0)
    if this_epoch > left:
        if validation is not None and validation > left:
            return (f"{text}; validation alone outlasts what {limit} leaves ({duration(max(left, 0.0))}): this epoch "
                    f"stops now and the run ends about {duration(validation - left)} after the limit; raise "
                    "train.time_limit_min, or validate on fewer images or larger train.val_tile")
        return f"{text}; {limit} cuts this epoch short (it is validated and saved; resume=True goes on)"
    fit = min(epochs_left, 1 + int((left - this_epoch) // max(per_epoch, 1e-9)))
    if fit < epochs_left:
        return (f"{text}; {limit} stops the run after about {fit} of the {counted(epochs_left, 'epoch')} to go (all would "
                f"take about {duration(total)})")
    return f"{text}; {rest}"


def report_timing(echo: Any, bar: Any, clock: Clock, *, iters: int, epochs_left: int,
                  gpu_recipe_on_cpu: bool) -> None:
    """Once the first iterations are timed: the time per epoch and for the run (`timing_text`; a warning for
    a GPU recipe on the CPU), printed between progress-bar updates."""
    per_iteration = clock.iteration_seconds(clock.done)
    if per_iteration is None:
        return
    text = timing_text(clock, per_iteration=per_iteration, iters=iters, epochs_left=epochs_left)
    if gpu_recipe_on_cpu:
        text = (f"warning: this recipe is sized for a GPU: on this CPU {text}; a smaller model (model.params) "
                "or data.tile trains faster")
    else:
        text = f"timing: {text}"
    bar.clear()
    echo(text)
    bar.refresh()


@dataclass
class EpochPlan:
    """What the shared epoch runner needs of a training run besides its step and its validation."""

    files: RunFiles
    model: Any
    epochs: int
    iters: int
    clock: Clock
    progress: bool
    echo: Callable[[str], None]
    gpu_recipe_on_cpu: bool
    log_fields: list[str]
    loss_label: str
    curve_metrics: tuple[str, ...]
    metric_label: str
    group: Any = None  # ddp.LocalGroup (one process) or ddp.ProcessGroup (several)
    averaged: Any = None  # the weight average, when there is one (checked the same on every rank, as the model)
    # seconds an epoch's validation will take, estimated before the first (`validation_timer`; rank 0's counts)
    estimate_validation: Callable[[], float] | None = None


def plan_epochs(files: RunFiles, model: Any, train: dict[str, Any], device: str, *, progress: bool,
                echo: Callable[[str], None], log_fields: list[str], loss_label: str, curve_metrics: tuple[str, ...],
                metric_label: str, group: Any = None) -> EpochPlan:
    """The epoch plan of a run from its recipe's `train` section, the same for segmenters and denoisers.

    Parameters
    ----------
    files : RunFiles
        Where the run writes.
    model : torch.nn.Module
        The model trained.
    train : dict
        The resolved `train` section: `epochs`, `iters_per_epoch`, `time_limit_min` and the requested
        `device` are read.
    device : str
        The device the run resolved to (a GPU recipe running on the CPU is told so).
    progress, echo, log_fields, loss_label, curve_metrics, metric_label
        As the fields of `EpochPlan`.
    group : ddp.LocalGroup or ddp.ProcessGroup, optional
        The processes training together (`ddp.process_group`); None: a single process, refused when a
        launcher (torchrun, srun) started several, since the caller cannot share the work.

    Returns
    -------
    EpochPlan
        Its clock times the first three iterations (fewer when an epoch has fewer).

    Raises
    ------
    ConfigError
        No `group` was given, but torchrun or srun started several processes.
    """
    from segkit.training.ddp import LocalGroup, ranks_from_environment

    if group is None:
        ranks = ranks_from_environment()
        if ranks.distributed:
            raise ConfigError(f"this training trains on one process, but {ranks.launcher} started {ranks.world}: "
                              "start it without torchrun (or with srun --ntasks 1)")
        group = LocalGroup()
    iters = train["iters_per_epoch"]
    return EpochPlan(files=files, model=model, epochs=train["epochs"], iters=iters,
                     clock=Clock(train["time_limit_min"], timed_iterations=min(3, iters)), progress=progress,
                     echo=echo, gpu_recipe_on_cpu=device == "cpu" and train["device"] != "cpu",
                     log_fields=log_fields, loss_label=loss_label, curve_metrics=curve_metrics,
                     metric_label=metric_label, group=group)


def count_tiles(shapes: list[tuple[int, int]], geometry: Any, tile: int) -> int:
    """How many `tile` tiles the tiler cuts planes of these (H, W) shapes into."""
    from segkit.inference.tiler import plan_tiles

    return sum(plan_tiles(tuple(shape), geometry, tile=tile).n_tiles for shape in shapes)


def validation_timer(model: Any, *, tiles: int, tile: int, channels: int, device: str) -> Callable[[], float]:
    """A function estimating the seconds of an epoch's validation before the first one runs: the `tiles` of
    the validation images times one forward pass of a `tile` tile of `model` (in eval mode, without gradients;
    the second of two, as the first allocates and tunes). Post-processing is left out, so the estimate is
    low rather than high: the time limit it reserves never cuts a run's first epoch much shorter than its
    validation needs (an epoch cut short ends the run). It costs two forward passes, once per run."""

    def estimate() -> float:
        import torch

        was_training = model.training
        model.eval()
        try:
            x = torch.zeros((1, channels, tile, tile), device=device)
            seconds = 0.0
            with torch.no_grad():
                for _ in range(2):  # the second pass is timed
                    started = time.perf_counter()
                    model(x)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - started
            return seconds * tiles
        finally:
            model.train(was_training)

    return estimate


def run_epochs(plan: EpochPlan, *, start_epoch: int, history: list[dict[str, Any]],
               step: Callable[[int], float],
               finish: Callable[[int, list[float], float, Any], tuple[dict[str, Any], bool, str]],
               save_best: Callable[[], None], save_last: Callable[[int], None]) -> None:
    """The epochs of a training run, shared by segmenters and denoisers: the epoch's iterations
    (`step(epoch)` each), then `finish(epoch, losses, started, bar)` validates under the progress bar `bar`
    (tqdm on stderr, hidden when quiet: `reset(total)` with the tiles to predict, `update(n)`) and returns the
    log row, whether it is the best so far and the line to print; the best and last checkpoints, logs and
    curve are written after every epoch. An interrupt (Ctrl-C, SIGTERM) keeps the last checkpoint and removes
    this run's temporary files before it propagates.

    train.time_limit_min counts validation: an epoch is cut short when its validation (as long as the last
    one, or as estimated before the first: `plan.estimate_validation`) would end after the limit, and the
    run stops before an epoch that, as long as the last with its validation, would end after it. The epoch
    cut short is validated and saved like any other, so a run whose epochs outlast the limit still
    progresses on resume.

    With several processes (`plan.group`), every rank trains; rank 0 alone validates and writes the
    checkpoints, logs and curve while the others wait for it at the epoch's `sync`, and an interrupt
    (shared by `sync`, so all ranks stop at the same step) is saved by rank 0 while the others wait. Every
    time the decisions use is agreed between the ranks (`ProcessGroup.sync`, `ProcessGroup.largest`)."""
    group, clock = plan.group, plan.clock
    completed = start_epoch - 1

    def save_completed(epoch: int) -> None:
        nonlocal completed
        completed = epoch
        save_last(epoch)

    def estimate() -> float:  # rank 0 validates, so its estimate counts on every rank
        return group.largest(plan.estimate_validation() if group.main else 0.0)

    try:
        with group.deferred_signals():
            group.sync(clock)  # the ranks agree on the time before the first epoch: epochs are timed from it
            for epoch in range(start_epoch, plan.epochs + 1):
                plan.model.train()
                started, begun = time.monotonic(), clock.elapsed()
                losses = train_iterations(lambda epoch=epoch: step(epoch), epoch=epoch, epochs=plan.epochs,
                                          iters=plan.iters, clock=clock, progress=plan.progress, echo=plan.echo,
                                          gpu_recipe_on_cpu=plan.gpu_recipe_on_cpu, sync=group.sync,
                                          estimate_validation=estimate if plan.estimate_validation else None)
                trained = clock.elapsed()
                plan.model.eval()
                for model in (plan.model, plan.averaged):
                    if model is not None:
                        group.check_same(model)
                line, seconds = None, 0.0
                if group.main:
                    line, seconds = _finish_epoch(plan, epoch, losses, started, history, first=epoch == start_epoch,
                                         finish=finish, save_best=save_best, save_last=save_completed)
                completed = epoch
                group.sync(clock)  # the other ranks wait for rank 0's validation and files here
                clock.validation_s = clock.elapsed() - trained
                if len(losses) == plan.iters:
                    clock.epoch_s = clock.elapsed() - begun
                stop = clock.stop_message(epoch=epoch, epochs=plan.epochs, iterations=len(losses),
                                          iters=plan.iters, root=plan.files.root)
                if line is not None:  # the time left: the epochs to go that end within the time limit
                    fit = clock.epochs_that_fit(clock.epoch_s, plan.epochs - epoch) if clock.epoch_s and not stop else 0
                    left = f"; about {duration(fit * clock.epoch_s)} left" if fit else ""
                    plan.echo(f"{line}  [{duration(seconds)}{left}]")
                if stop:
                    plan.echo(stop)
                    break
    except KeyboardInterrupt:
        if group.main:
            save_last(completed)  # weights of the unfinished epoch; resume=True reruns that epoch
            plan.files.remove_partials(plan.echo)  # of a best checkpoint or curve the interrupt cut short
            plan.echo(f"interrupted; last checkpoint kept in {plan.files.root} (continue with resume=True)")
        group.barrier()  # every rank stops once the checkpoint is written
        raise


def _finish_epoch(plan: EpochPlan, epoch: int, losses: list[float], started: float, history: list[dict[str, Any]],
                  *, first: bool, finish: Callable[[int, list[float], float, Any], tuple[dict[str, Any], bool, str]],
                  save_best: Callable[[], None], save_last: Callable[[int], None]) -> tuple[str, float]:
    """The end of an epoch (rank 0 alone, with several processes): validation under its progress bar,
    checkpoints, logs, curve; returns its line ("epoch 3: loss ...") and seconds, which `run_epochs` prints
    with the time left once the ranks agree on the time."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=f"validation {epoch}/{plan.epochs}", unit="tile", disable=not plan.progress,
               leave=False, delay=0.5)
    try:
        row, improved, text = finish(epoch, losses, started, bar)
    finally:
        bar.close()
    history.append(row)
    if improved:
        save_best()
    save_last(epoch)
    write_logs(plan.files, history, plan.log_fields)
    drawn = plot_curve(history, plan.files.curve, loss_label=plan.loss_label, metrics=plan.curve_metrics,
                       metric_label=plan.metric_label)
    if not drawn and first:  # said once per run
        plan.echo(f"note: matplotlib is not installed, so {plan.files.curve.name} is skipped "
                  f"(pip install matplotlib, or the {DISTRIBUTION}[plot] extra, draws it)")
    return f"epoch {epoch}: {text}", row["seconds"]


#: train.weight_decay when the recipe leaves it out: decoupled decay for AdamW (torch's default), none
#: for Adam and SGD (an L2 term there, which the paper recipes never used).
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "adam": 0.0, "sgd": 0.0}


def build_optimizer(params: Any, settings: dict[str, Any]) -> Any:
    """AdamW, Adam or SGD with momentum, from a recipe's `train` section."""
    import torch

    name = settings["optimizer"]
    decay = settings.get("weight_decay")
    decay = DEFAULT_WEIGHT_DECAY[name] if decay is None else decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=settings["lr"], weight_decay=decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=settings["lr"], weight_decay=decay)
    return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"], weight_decay=decay)


def scheduled_lr(base: float, progress: float, *, warmup: float, schedule: str = "cosine") -> float:
    """The learning rate at `progress` (0 at the start of the run, 1 at its planned end): linear warm-up
    from base / 10 over the first `warmup` of the run, then cosine decay from `base` to 0 (SGDR without
    restarts, as every modern recipe trains); `base` throughout for the constant schedule."""
    if schedule == "constant":
        return base
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return base * (0.1 + 0.9 * progress / warmup)
    decay = (progress - warmup) / (1.0 - warmup) if warmup < 1 else 1.0
    return base * 0.5 * (1.0 + math.cos(math.pi * decay))


@dataclass
class Schedule:
    """A run's learning rate over its course: `progress` is the larger of the iterations done over those
    planned (epochs x iters_per_epoch) and the time spent over train.time_limit_min, so the decay ends
    when the run does, whichever of the two ends it."""

    base: float
    planned: int
    warmup: float
    kind: str
    limit_min: float | None = None

    @classmethod
    def from_recipe(cls, settings: dict[str, Any]) -> "Schedule":
        return cls(base=settings["lr"], planned=settings["epochs"] * settings["iters_per_epoch"],
                   warmup=settings.get("warmup", 0.0), kind=settings.get("schedule", "constant"),
                   limit_min=settings.get("time_limit_min"))

    def progress(self, done: int, elapsed: float) -> float:
        by_iterations = done / max(self.planned, 1)
        by_time = elapsed / (self.limit_min * 60) if self.limit_min else 0.0
        return max(by_iterations, by_time)

    def lr(self, done: int, elapsed: float) -> float:
        return scheduled_lr(self.base, self.progress(done, elapsed), warmup=self.warmup, schedule=self.kind)

    def apply(self, optimizer: Any, done: int, elapsed: float) -> float:
        """Set the optimizer's learning rate for the next step (after `done` steps); returns it."""
        lr = self.lr(done, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics too), the
    model validation scores and the checkpoints hold. The decay ramps up as min(decay, (1 + n) / (10 + n))
    after n updates, so the average is not dominated by the random initial weights in a short run.
    Built on torch.optim.swa_utils.AveragedModel."""

    def __init__(self, model: Any, decay: float):
        from torch.optim.swa_utils import AveragedModel

        self.decay = decay

        def average(averaged: list[Any], current: list[Any], count: Any) -> None:
            import torch

            n = float(count)
            kept = min(self.decay, (1.0 + n) / (10.0 + n))
            if averaged[0].is_floating_point():
                torch._foreach_lerp_(averaged, current, 1.0 - kept)
            else:  # integer buffers (BatchNorm's batch counter) follow the model
                torch._foreach_copy_(averaged, current)

        self.averaged = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
        self.averaged.module.eval()
        for parameter in self.averaged.module.parameters():
            parameter.requires_grad_(False)

    @property
    def model(self) -> Any:
        """The averaged model (same class and geometry as the trained one), always in eval mode."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: Any) -> None:
        self.averaged.update_parameters(model)

    def restore(self, updates: int) -> None:
        """After resume: the average holds the last checkpoint; `updates` steps were averaged into it."""
        self.averaged.n_averaged.fill_(max(updates, 1))


#: Prefix of the trained (not averaged) weights in the optimizer file of a run with a weight average.
WEIGHTS_PREFIX = "weights."


def save_optimizer(path: Path, optimizer: Any, state: dict[str, Any], *, weights: Any = None) -> None:
    """Optimizer tensors as safetensors, its scalars and `state` (epoch, history...) as JSON; no pickle.

    Written atomically (`io.outputs.atomic_path`): an interrupted save leaves the previous file.

    Parameters
    ----------
    path : Path
        The optimizer file (`RunFiles.optimizer`).
    optimizer : torch.optim.Optimizer
        The run's optimizer.
    state : dict
        JSON-serialisable extra state (epoch, history, best score...), returned by `load_optimizer`.
    weights : torch.nn.Module, optional
        The trained model, stored beside them when the checkpoints hold its weight average.

    Raises
    ------
    OutputError
        The disk is full or the folder cannot be written.
    """
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    if weights is not None:
        tensors.update({WEIGHTS_PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.state_dict().items()})
    meta = {"param_groups": optimizer.state_dict()["param_groups"], "scalars": scalars, **state}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"segkit-optimizer": json.dumps(meta)})
        match_umask(tmp)


def load_optimizer(path: Path, optimizer: Any, *, weights: Any = None) -> dict[str, Any]:
    """Restore what save_optimizer wrote (and the trained weights into `weights`, when stored); returns
    the extra state."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["segkit-optimizer"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the optimizer state for resume=True: {exc}") from exc
    trained = {k[len(WEIGHTS_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(WEIGHTS_PREFIX)}
    if trained and weights is not None:
        weights.load_state_dict(trained)
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.pop("scalars").items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


def write_logs(files: RunFiles, history: list[dict[str, float]], fields: list[str]) -> None:
    """The per-epoch history as CSV (the given columns) and JSON (everything), each written atomically.

    Parameters
    ----------
    files : RunFiles
        The run; writes `files.log_csv` and `files.log_json`.
    history : list of dict of str to float
        One row per epoch.
    fields : list of str
        The CSV's columns (a row without one leaves it empty).

    Raises
    ------
    OutputError
        The disk is full or the folder cannot be written (nothing half-written is left).
    """
    with atomic_path(files.log_csv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in history:
                writer.writerow({k: row.get(k, "") for k in fields})
    with atomic_path(files.log_json) as tmp:
        tmp.write_text(json.dumps(history, indent=1))


def write_recipe(files: RunFiles, recipe: dict[str, Any]) -> None:
    """The resolved recipe the run trains, as YAML beside its checkpoints (written atomically).

    Parameters
    ----------
    files : RunFiles
        The run; writes `files.recipe`.
    recipe : dict
        The validated recipe.

    Raises
    ------
    OutputError
        The disk is full or the folder cannot be written.
    """
    with atomic_path(files.recipe) as tmp:
        tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))


def plot_curve(history: list[dict[str, float]], path: Path, *, loss_label: str, metrics: tuple[str, ...],
               metric_label: str) -> bool:
    """Training loss and validation metrics per epoch, as a PNG (written atomically), when matplotlib
    (optional: the `plot` extra) is installed.

    Parameters
    ----------
    history : list of dict of str to float
        One row per epoch, with "epoch", "train_loss" and the `metrics`.
    path : Path
        The PNG (`RunFiles.curve`).
    loss_label : str
        The loss, in words, for the left plot's axis.
    metrics : tuple of str
        The validation columns drawn in the right plot.
    metric_label : str
        Their axis label.

    Returns
    -------
    bool
        Whether the curve was drawn (False: matplotlib is not installed; nothing is written).

    Raises
    ------
    OutputError
        The disk is full or the folder cannot be written.
    """
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel=loss_label, title="training loss")
    for key in metrics:
        right.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", label=key)
    right.set(xlabel="epoch", ylabel=metric_label, title="validation (slices held out from training)")
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return True
