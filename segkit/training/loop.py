"""The training loop of segmenters: patches -> model -> weighted loss; after every epoch the
validation of the label kind (validation.py, with the real tiler); best/last checkpoints, resume,
CSV/JSON logs and a training-curve PNG (runs.py).

One loop for every label kind (membrane, semantic classes, instances; see targets.py) and any
number of input channels. Everything a run writes lives in `train.out`; an interrupted run keeps
its last checkpoint.

Like torch itself, the torch-backed modules (models.compose, losses, augment_device) are imported
inside the functions that run the model, so importing this module loads no torch.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from segkit.checkpoint import initialize_from, load_model, save_checkpoint
from segkit.devices import resolve_device, training_precision
from segkit.errors import ConfigError, InputError, SegkitError
from segkit.models import COMPOSED, create_model
from segkit.normalization import (
    Normalization,
    intensity_scale,
    mean_std_normalization,
    typical_percentile_normalization,
)
from segkit.record import CheckpointInfo, InferenceDefaults
from segkit.training.datasets import Example, load_examples, split_sources
from segkit.training.patches import data_source, model_input, pad_examples, patch_stream
from segkit.training.runs import (
    RunFiles,
    Schedule,
    WeightAverage,
    announce,
    build_optimizer,
    check_batch_memory,
    check_model_fits,
    check_train_call,
    check_training_tile,
    count_tiles,
    loader_workers,
    make_interruptible,
    open_run,
    optimizer_step,
    plan_epochs,
    resume_run,
    run_epochs,
    save_optimizer,
    slice_text,
    validation_timer,
    write_recipe,
)
from segkit.training.targets import LabelRule, check_classes_present, check_labels, class_weights, weight_map
from segkit.training.validation import EPOCH_VALIDATIONS
from segkit.words import counted

LOG_FIELDS = ["epoch", "train_loss", "pixel_error", "adapted_rand_error", "vi", "dice", "best_threshold",
              "best_adapted_rand_error", "seconds", "lr"]
SEMANTIC_FIELDS = ["epoch", "train_loss", "dice_mean", "iou_mean", "seconds", "lr"]
INSTANCE_FIELDS = ["epoch", "train_loss", "map", "f1@0.5", "ap@0.5", "ap@0.75", "foreground_threshold",
                   "seed_threshold", "seed_distance", "seconds", "lr"]


def split_description(data: dict[str, Any], examples: dict[str, list[Example]]) -> str:
    """Which images train and validate, in words (slice ranges, or image counts and split files)."""
    if all(data[f"{split}_files"] is None for split in ("train", "val")):
        return slice_text({"training": data["train_slices"], "validation": data["val_slices"]})
    parts = []
    for split, key in (("train", "training"), ("val", "validation")):
        spec = data[f"{split}_files"]
        named = f" ({spec})" if isinstance(spec, str) else ""
        parts.append(f"{counted(len(examples[split]), key + ' image')}{named}")
    return ", ".join(parts)


def split_labels_text(data: dict[str, Any], split: str, count: int) -> str:
    """The labels of one split in words, for messages."""
    if data[f"{split}_files"] is None:
        start, stop = data[f"{split}_slices"]
        return f"slices {start}-{stop - 1} (data.{split}_slices) of {data_source(data, 'labels')}"
    spec = data[f"{split}_files"]
    return f"the {counted(count, 'label image')} of data.{split}_files" + (f" ({spec})" if isinstance(spec, str) else "")


def check_disjoint(data: dict[str, Any], examples: dict[str, list[Example]]) -> None:
    """Refuse an image that is in the training and the validation (or test) split: held-out images must
    not be trained on (slice ranges are checked with the recipe; named images here)."""
    if data["test_files"] is not None:
        test = {source for source, _, plane in split_sources(data, "test") if plane is None}
    else:
        test = set()
    train = {e.source for e in examples["train"]}
    for split, held_out in (("val", {e.source for e in examples["val"]}), ("test", test)):
        shared = sorted(train & held_out)
        if shared:
            more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            raise InputError(f"data.train_files and data.{split}_files both name {shared[0]}{more}; held-out images "
                             f"must not be trained on: give each image to one split")


def dataset_normalization(examples: list[Example], data: dict[str, Any]) -> Normalization:
    """The recipe's normalisation of the training images: global per-channel mean/std, or the percentile
    rule (typical training values kept for display)."""
    channels = examples[0].image.shape[0]
    images = [e.image if channels > 1 else e.image[0] for e in examples]
    if data["normalization"] == "percentile":
        return typical_percentile_normalization(images, tuple(data["percentiles"]),
                                                channels=channels if channels > 1 else None)
    dtypes = {e.image.dtype for e in examples}
    if len(dtypes) > 1:
        raise InputError(f"the training images mix dtypes ({', '.join(sorted(map(str, dtypes)))}), so one global "
                         "mean/std does not fit them all; convert them to one dtype, or set "
                         "data.normalization=percentile (each image scaled by its own percentiles)")
    return mean_std_normalization(images, channels=channels if channels > 1 else None)


def build_model(settings: dict[str, Any], segmenter_normalization: Normalization, echo: Callable[[str], None], *,
                in_channels: int = 1, classes: int = 2) -> tuple[Any, str, dict[str, Any], Normalization]:
    """The model a recipe trains: (model, registry name, kwargs, normalisation of its input).

    With `model.denoiser`, the frozen denoiser runs in front of the segmenter on every batch:
    the model is their composition, its input normalised like the denoiser's training data.
    """
    kwargs = {"in_channels": in_channels, "classes": classes, **settings["params"]}
    if not settings["denoiser"]:
        model = create_model(settings["name"], **kwargs)
        _initialize(model, settings, echo)
        return model, settings["name"], kwargs, segmenter_normalization
    from segkit.models.compose import put_in_front

    denoiser, denoiser_info = load_model(settings["denoiser"], expect_kind="denoiser")
    model, composed_kwargs = put_in_front(denoiser, denoiser_info, settings["name"], kwargs, segmenter_normalization)
    _initialize(model.segmenter, settings, echo)
    echo(f"denoiser {settings['denoiser']} runs frozen in front of {settings['name']} "
         f"(margins {denoiser_info.geometry.margin} + {model.segmenter.geometry.margin})")
    return model, COMPOSED, composed_kwargs, denoiser_info.normalization


def _initialize(model: Any, settings: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Apply the recipe's `model.pretrained` (ImageNet backbone) and `model.init_from` (earlier stage)."""
    if settings["pretrained"]:
        if not hasattr(model, "load_pretrained"):
            raise ConfigError(f"model.pretrained: {settings['name']} has no pretrained backbone; use model.init_from")
        count = model.load_pretrained(settings["pretrained"])
        echo(f"loaded {count} pretrained tensors from {settings['pretrained']}")
    if settings["init_from"]:
        count = initialize_from(model, settings["init_from"])
        echo(f"initialised {count} tensors from {settings['init_from']}")


def train(recipe: dict[str, Any], *, resume: bool = False, progress: bool = True,
          echo: Callable[[str], None] = print) -> RunFiles:
    """Train the recipe's model, validating and saving after every epoch.

    Parameters
    ----------
    recipe : dict
        A validated recipe (`segkit.config.load_recipe`); `train.out` is the run folder.
    resume : bool
        Continue the run in `train.out` from its last checkpoint (otherwise a run there is refused).
    progress : bool
        Show a progress bar per epoch.
    echo : callable taking a str
        Where the run's messages go.

    Returns
    -------
    RunFiles
        The run's files (best/last checkpoints, optimizer state, logs, curve, recipe).

    Raises
    ------
    OptionTypeError, OptionValueError
        An argument of the wrong type, or a recipe that does not pass `config.validate_recipe` (a value
        edited after `load_recipe`): a TypeError / ValueError naming it, before any work.
    SegkitError
        The recipe, its data or its device cannot train (ConfigError, InputError, TileSizeError, ...: a
        `train.batch` or `train.val_batch` too large for the device's memory is refused before the run folder
        is made), or another training process failed (with several processes).

    Notes
    -----
    Started by torchrun or SLURM's srun (`ddp.ranks_from_environment`), every process trains its share
    of the global batch with DistributedDataParallel; rank 0 alone prints, validates and writes
    `train.out` (see `ddp`).
    """
    from segkit.training import ddp

    recipe = check_train_call(recipe, resume=resume, progress=progress, echo=echo)
    cfg_train = recipe["train"]
    ranks = ddp.ranks_from_environment()
    if not ranks.distributed:
        device = resolve_device(cfg_train["device"], option="train.device", recipe=True)
    else:
        device = ddp.rank_device(cfg_train["device"], ranks)
        if cfg_train["sync_batchnorm"] and device == "cpu":
            raise ConfigError("train.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; set "
                              "train.sync_batchnorm=false to train on the CPU (each process then normalises its own batch)")
        echo = echo if ranks.main else _silent
        progress = progress and ranks.main
    with ddp.process_group(ranks, device, timeout_min=cfg_train["dist_timeout_min"]) as group, group.answers():
        return _train(recipe, group, device, resume=resume, progress=progress, echo=echo)


def _silent(_: str) -> None:
    """The messages of ranks other than 0 (rank 0 says everything once)."""


def _train(recipe: dict[str, Any], group: Any, device: str, *, resume: bool, progress: bool,
           echo: Callable[[str], None]) -> RunFiles:
    """`train` in one process of `group` (`ddp.LocalGroup` when it trains alone) on `device`."""
    import torch

    from segkit.training import ddp

    cfg_data, cfg_train, cfg_loss, cfg_model = recipe["data"], recipe["train"], recipe["loss"], recipe["model"]
    ranks = group.ranks
    # the learning rate for the global batch (train.lr_scaling); the recipe written beside the run keeps train.lr
    settings = {**cfg_train, "lr": ddp.scaled_lr(cfg_train["lr"], cfg_train["lr_scaling"], ranks.world)}
    rule = LabelRule.from_data(cfg_data)
    data_source(cfg_data, "raw"), data_source(cfg_data, "labels")  # missing data fails before the run folder exists
    echo(f"loading data from {cfg_data['root']}")
    examples = {split: load_examples(cfg_data, split) for split in ("train", "val")}
    check_disjoint(cfg_data, examples)
    for example in examples["train"] + examples["val"]:
        check_labels(example.labels, rule, example.source)
    targets = {split: [rule.target(e.labels) for e in items] for split, items in examples.items()}
    what = split_description(cfg_data, examples)
    for split in ("train", "val"):
        check_classes_present(targets[split], rule, split, split_labels_text(cfg_data, split, len(examples[split])))
    channels = examples["train"][0].image.shape[0]
    if cfg_model["denoiser"] and (channels != 1 or cfg_data["normalization"] != "meanstd"):
        raise ConfigError("model.denoiser: a denoiser pre-stage takes single-channel images normalised by mean/std; "
                          "leave model.denoiser out for multi-channel or percentile-normalised data")
    check_model_fits(cfg_model["name"], {"in_channels": channels, "classes": rule.classes, **cfg_model["params"]},
                     device)
    torch.manual_seed(cfg_train["seed"])
    model, model_name, model_kwargs, normalization = build_model(
        cfg_model, dataset_normalization(examples["train"], cfg_data), echo, in_channels=channels,
        classes=rule.classes)
    geometry = model.geometry
    tile = cfg_data["tile"]
    check_training_tile(geometry, tile, model=model_name, model_kwargs=model_kwargs, device=device)
    out_tile = geometry.output_size(tile)
    val_tile = cfg_train["val_tile"] or tile
    if val_tile != tile:
        try:
            check_training_tile(geometry, val_tile, model=model_name, model_kwargs=model_kwargs, device=device)
        except SegkitError as exc:
            raise ConfigError(str(exc).replace("data.tile", "train.val_tile")) from None
    check_batch_memory(model_name, model_kwargs, tile=tile, val_tile=val_tile, batch=cfg_train["batch"],
                       val_batch=cfg_train["val_batch"], device=device, amp=cfg_train["amp"] is not False,
                       average=cfg_train["ema_decay"] > 0)
    files = open_run(cfg_train["out"], resume=resume)  # after every check: a refused recipe leaves no run folder

    slices, scale, unit_normalization, balance = training_slices(
        examples["train"], targets["train"], rule, normalization, cfg_loss, geometry=geometry,
        out_tile=out_tile)
    val_inputs = [model_input(e.image, normalization) for e in examples["val"]]
    val_labels = [e.labels for e in examples["val"]]

    model = model.to(device)
    if cfg_train["sync_batchnorm"] and ranks.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = group.wrap(model)  # DistributedDataParallel with several processes (rank 0's weights on all)
    if ranks.distributed:  # the same initial weights on every rank (above), then each its own dropout masks
        torch.manual_seed(int(np.random.default_rng([cfg_train["seed"], ranks.rank]).integers(2**62)))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    amp_dtype, scaler = training_precision(cfg_train["amp"], device)
    average = WeightAverage(model, cfg_train["ema_decay"]) if cfg_train["ema_decay"] > 0 else None
    scored = average.model if average is not None else model  # validated and saved: never the DDP wrapper

    history: list[dict[str, float]] = []
    start_epoch, best = 1, -math.inf  # higher is better: -adapted Rand error, mean Dice, mean AP
    if resume:
        meta = resume_run(files, model, optimizer, name=model_name, kwargs=model_kwargs, lr=settings["lr"],
                          average=average)
        start_epoch, history = meta["epoch"] + 1, meta["history"]
        best = meta["best_score"] if "best_score" in meta else -meta["best_error"]
        echo(f"resuming {files.root} after epoch {meta['epoch']}")
        processes, now = meta.get("processes", 1), ranks.world * cfg_train["batch"]
        before = meta.get("global_batch", processes * cfg_train["batch"])
        if (processes, before) != (ranks.world, now):
            echo(f"note: the run trained on {processes} process(es) with a global batch of {before} so far, now on "
                 f"{ranks.world} with a global batch of {now}")
    schedule = Schedule.from_recipe(settings)
    done_before = (start_epoch - 1) * cfg_train["iters_per_epoch"]  # iterations of earlier runs, for the schedule

    if group.main:
        write_recipe(files, recipe)
    info = CheckpointInfo(
        kind="segmenter", model=model_name, model_kwargs=model_kwargs, geometry=geometry, normalization=normalization,
        classes=rule.class_names(cfg_data["class_names"]),
        inference=InferenceDefaults(threshold=cfg_train["val_threshold"] if rule.kind == "membrane" else None,
                                    tile=val_tile, input_dtype=str(examples["train"][0].image.dtype),
                                    labels_kind=rule.kind, pixel_size=cfg_data["pixel_size"],
                                    scale=cfg_data["scale"]),
        recipe=recipe,
    )

    def save_last(completed: int) -> None:
        save_checkpoint(files.last, scored, info)
        state = {"epoch": completed, "best_score": best, "history": history, "processes": ranks.world,
                 "global_batch": ranks.world * cfg_train["batch"]}
        if average is not None:
            state["averaged_updates"] = average.updates
        save_optimizer(files.optimizer, optimizer, state, weights=model if average is not None else None)

    seed = ddp.stream_seed(cfg_train["seed"], start_epoch, ranks)
    loader = patch_loader(slices, recipe, tile=tile, out_tile=out_tile, normalization=unit_normalization, seed=seed,
                          device=device, echo=echo)
    augment_on_device = (device_augmentation(recipe["augment"], unit_normalization, scale, out_tile=out_tile,
                                            device=device, seed=seed)
                         if recipe["augment"]["on_device"] else None)

    def step(epoch: int) -> float:
        schedule.apply(optimizer, done_before + plan.clock.done, plan.clock.elapsed())
        value = training_step(trained, next(loader), optimizer, scaler, augment=augment_on_device, amp_dtype=amp_dtype,
                              device=device, dice_weight=cfg_loss["dice_weight"], epoch=epoch, mean=group.mean)
        if average is not None:
            average.update(model)
        return value

    evaluate = EPOCH_VALIDATIONS[rule.kind]

    def finish(epoch: int, losses: list[float], started: float, bar: Any) -> tuple[dict[str, Any], bool, str]:
        nonlocal best
        trained_s = time.monotonic() - started
        row, score, text, inference, validation = evaluate(
            scored, val_inputs, val_labels, rule=rule, tile=val_tile, batch=cfg_train["val_batch"], device=device,
            val_threshold=cfg_train["val_threshold"], progress=bar)
        # patches_per_s: the training throughput of all processes, validation left out (log.json only)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), **row,
               "seconds": time.monotonic() - started, "lr": optimizer.param_groups[0]["lr"],
               "patches_per_s": len(losses) * cfg_train["batch"] * ranks.world / max(trained_s, 1e-9)}
        # settings (threshold, watershed) are chosen on the validation images only, never on the test split
        info.inference = info.inference.replace(**inference)
        info.training = {"epoch": epoch, **validation, "class_weights": list(balance)}
        improved = score > best
        best = max(best, score)
        return row, improved, f"loss {row['train_loss']:.4f}  {text}"

    if not ranks.distributed:  # several processes take signals between steps (ddp.StopSignals), never inside one
        make_interruptible(model, device)  # after the average copied the model: its copy needs no hooks
    iters, epochs = cfg_train["iters_per_epoch"], cfg_train["epochs"]
    announce(echo, model=model, name=model_name, device=device, requested_device=cfg_train["device"],
             amp=cfg_train["amp"], data=what, iters=iters, batch=cfg_train["batch"], tile=tile, epochs=epochs,
             processes=ddp.header(ranks, device, cfg_train["batch"]), world=ranks.world,
             lr=ddp.lr_text(cfg_train["lr"], cfg_train["lr_scaling"], ranks.world))
    fields, metrics, label = {
        "membrane": (LOG_FIELDS, ("pixel_error", "adapted_rand_error"), "error"),
        "semantic": (SEMANTIC_FIELDS, ("dice_mean", "iou_mean"), "score (higher is better)"),
        "instances": (INSTANCE_FIELDS, ("map", "f1@0.5"), "score (higher is better)")}[rule.kind]
    plan = plan_epochs(files, model, cfg_train, device, progress=progress, echo=echo, log_fields=fields,
                       loss_label="weighted cross-entropy" + (" + Dice" if cfg_loss["dice_weight"] else ""),
                       curve_metrics=metrics, metric_label=label, group=group)
    plan.averaged = average.model if average is not None else None
    plan.estimate_validation = validation_timer(
        scored, tiles=count_tiles([i.shape[-2:] for i in val_inputs], geometry, val_tile), tile=val_tile,
        channels=channels, device=device)
    run_epochs(plan, start_epoch=start_epoch, history=history, step=step, finish=finish,
               save_best=lambda: save_checkpoint(files.best, scored, info), save_last=save_last)
    return files


def training_slices(examples: list[Example], targets: list[np.ndarray], rule: LabelRule, normalization: Normalization,
                    loss: dict[str, Any], *, geometry: Any,
                    out_tile: int) -> tuple[Any, float, Normalization, list[float]]:
    """The training images as patches are cut from them: in unit space (about [0, 1], where augmentation
    works), with their loss weights (class balance, border weight), mirror-padded by the model's margin
    and halo.

    Parameters
    ----------
    examples : list of Example
        The training split (`datasets.load_examples`).
    targets : list of ndarray
        Their class targets (`LabelRule.target`).
    rule : LabelRule
        How labels become targets and weights.
    normalization : Normalization
        The model's input normalisation (`build_model`).
    loss : dict
        The recipe's `loss` section (class balance, border weight).
    geometry : ModelGeometry
        The model's geometry (margin, halo).
    out_tile : int
        The model's output size for the training tile (images smaller than it are padded up to it).

    Returns
    -------
    slices : patches.SliceSet
        What `patch_stream` samples from.
    scale : float
        Raw units per unit-space unit (255 for uint8; 1 with percentile normalisation).
    unit_normalization : Normalization
        The map from unit space to the model's input.
    balance : list of float
        The class weights of the loss (`loss.class_balance`; all 1 without it).
    """
    if normalization.percentiles is not None:
        units = [model_input(e.image, normalization) for e in examples]
        scale, unit_normalization = 1.0, Normalization(0.0, 1.0)
    else:
        scale = intensity_scale(examples[0].image.dtype)
        units = [e.image.astype(np.float32) / np.float32(scale) for e in examples]
        unit_normalization = normalization
    valid = [rule.valid(e.labels) for e in examples]
    balance = (class_weights(targets, rule.classes, valid) if loss["class_balance"] else [1.0] * rule.classes)
    weights = [weight_map(e.labels, t, rule, balance, w0=loss["border_w0"], sigma=loss["border_sigma"])
               for e, t in zip(examples, targets)]
    # Same-padding models sample tiles from planes mirror-padded by their halo too: more positions.
    slices = pad_examples(units, targets, weights, margin=geometry.margin + geometry.halo, min_size=out_tile,
                          scale=scale)
    return slices, scale, unit_normalization, balance


def patch_loader(slices: Any, recipe: dict[str, Any], *, tile: int, out_tile: int, normalization: Normalization,
                 seed: tuple[int, ...], device: str, echo: Callable[[str], None]) -> Any:
    """The endless iterator of training batches (image, target, weight) the loop draws from: the recipe's
    patch stream (augmented by albumentations on the workers, or left for `augment.on_device`) in a
    DataLoader of `train.batch` with `train.workers` processes (capped at the CPU cores)."""
    import torch

    stream = patch_stream(slices, tile=tile, out_tile=out_tile, augment_settings=recipe["augment"],
                          normalization=normalization, seed=seed, augment_later=recipe["augment"]["on_device"],
                          foreground_fraction=recipe["data"]["foreground_fraction"])
    workers = loader_workers(recipe["train"]["workers"], echo)
    return iter(torch.utils.data.DataLoader(stream, batch_size=recipe["train"]["batch"], num_workers=workers,
                                            pin_memory=device.startswith("cuda"), persistent_workers=workers > 0))


def training_step(model: Any, batch: Any, optimizer: Any, scaler: Any, *, augment: Callable[..., Any] | None,
                  amp_dtype: Any, device: str, dice_weight: float, epoch: int,
                  mean: Callable[[Any], Any] = lambda value: value) -> float:
    """One optimiser step on one batch of the loader: to the device, on-device augmentation (if any),
    forward under autocast, the weighted loss, backward and step (`optimizer_step`). Returns the loss."""
    import torch

    from segkit.training.losses import segmentation_loss

    image, target, weight = (t.to(device, non_blocking=True) for t in batch)
    if augment is not None:
        image, target, weight = augment(image, target, weight)
    with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(image)
    loss = segmentation_loss(logits, target, weight, dice_weight=dice_weight)
    return optimizer_step(loss, optimizer, scaler, epoch=epoch, mean=mean)


def device_augmentation(settings: dict[str, Any], normalization: Normalization, scale: float, *, out_tile: int,
                        device: str, seed: tuple[int, ...]) -> Callable[[Any, Any, Any], tuple[Any, Any, Any]]:
    """`augment.on_device`: batches of unit-space patches augmented where they are (elastic deformation by
    grid_sample, flips, intensity), then cropped to the output tile and normalised."""
    import torch

    from segkit.training.augment_device import augment_batch

    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.default_rng(list(seed)).integers(2**62)))

    def augment(image: Any, target: Any, weight: Any) -> tuple[Any, Any, Any]:
        image, (target, weight) = augment_batch(image, [target, weight], settings, generator)
        m = (image.shape[-1] - out_tile) // 2
        inner = (..., slice(m, m + out_tile), slice(m, m + out_tile))
        return normalization.apply(image * scale), target[inner].long(), weight[inner].float()

    return augment
