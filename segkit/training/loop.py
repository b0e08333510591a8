"""The training loop: patches -> model -> weighted loss; validation with the real tiler;
best/last checkpoints, resume, CSV/JSON logs and a training-curve PNG.

Everything a run writes lives in `train.out`; an interrupted run keeps its last checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import yaml

from segkit.checkpoint import CheckpointInfo, Normalization, save_checkpoint
from segkit.errors import ConfigError, InputError
from segkit.io.tiff import open_stack
from segkit.metrics import SliceScores, mean_scores, membrane_from_labels, score_thresholds
from segkit.training.data import (
    class_balance_weights,
    data_normalization,
    data_source,
    patch_stream,
    prepare_slices,
    split_planes,
)
from segkit.training.runs import (
    Clock,
    RunFiles,
    amp_setup,
    announce,
    build_optimizer,
    check_model_fits,
    check_training_tile,
    duration,
    loader_workers,
    make_interruptible,
    open_run,
    optimizer_step,
    plot_curve,
    resume_run,
    save_optimizer,
    train_iterations,
    training_device,
    write_logs,
)

LOG_FIELDS = ["epoch", "train_loss", "pixel_error", "adapted_rand_error", "vi", "dice", "best_threshold",
              "best_adapted_rand_error", "seconds", "lr"]
#: Thresholds tried on the validation slices after every epoch; the best is stored in the checkpoint.
VALIDATION_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def load_split(data: dict[str, Any], split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Raw planes and boolean membrane masks of one split ('train', 'val' or 'test').

    Labels follow the ISBI 2012 convention: 0 = membrane, > 0 = cell interior.
    """
    raw_stack = open_stack(data_source(data, "raw"))
    label_stack = open_stack(data_source(data, "labels"))
    with raw_stack, label_stack:
        if raw_stack.shape != label_stack.shape:
            raise InputError(f"raw {raw_stack.shape} and labels {label_stack.shape} differ in shape; pair them correctly")
        raws = split_planes(raw_stack, data, split)
        membranes = [membrane_from_labels(labels) for labels in split_planes(label_stack, data, split)]
    return raws, membranes


def check_label_classes(membranes: list[np.ndarray], data: dict[str, Any], split: str) -> None:
    """Refuse label slices that are all membrane or all cell: training on them learns nothing, and
    validation on them scores a perfect adapted Rand error of 0."""
    membrane = sum(int(m.sum()) for m in membranes)
    if 0 < membrane < sum(m.size for m in membranes):
        return
    start, stop = data[f"{split}_slices"]
    what = "no membrane (no pixel is 0)" if membrane == 0 else "only membrane (every pixel is 0)"
    raise InputError(f"data.labels: slices {start}-{stop - 1} (data.{split}_slices) of {data_source(data, 'labels')} "
                     f"hold {what}, so there is nothing to learn or score; labels mark membrane 0 and cells > 0 "
                     f"(ISBI 2012): check data.labels and data.{split}_slices")


def validate(model: Any, raws: list[np.ndarray], membranes: list[np.ndarray], *, normalization: Normalization,
             tile: int, batch: int, device: str, thresholds: tuple[float, ...]) -> dict[float, dict[str, float]]:
    """Tiled prediction of whole validation slices (exactly as `segkit predict`); scores per threshold."""
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_arrays

    engine = TorchEngine(model, device=device, amp="none")
    planes = [normalization.apply(raw) for raw in raws]
    scores: dict[float, list[SliceScores]] = {t: [] for t in thresholds}
    for probability, membrane in zip(predict_arrays(planes, engine, model.geometry, tile=tile, batch=batch), membranes):
        for t, slice_scores in score_thresholds(probability[0], membrane, thresholds).items():
            scores[t].append(slice_scores)
    return {t: mean_scores(s) for t, s in scores.items()}


def build_model(settings: dict[str, Any], segmenter_normalization: Normalization,
                echo: Callable[[str], None]) -> tuple[Any, str, dict[str, Any], Normalization]:
    """The model a recipe trains: (model, registry name, kwargs, normalisation of its input).

    With `model.denoiser`, the frozen denoiser runs in front of the segmenter on every batch:
    the model is their composition, its input normalised like the denoiser's training data.
    """
    from segkit.models import COMPOSED, create_model

    kwargs = {"in_channels": 1, "classes": 2, **settings["params"]}
    if not settings["denoiser"]:
        model = create_model(settings["name"], **kwargs)
        _initialize(model, settings, echo)
        return model, settings["name"], kwargs, segmenter_normalization
    from segkit.checkpoint import load_model, put_in_front

    denoiser, denoiser_info = load_model(settings["denoiser"], expect_kind="denoiser")
    model, composed_kwargs = put_in_front(denoiser, denoiser_info, settings["name"], kwargs, segmenter_normalization)
    _initialize(model.segmenter, settings, echo)
    echo(f"denoiser {settings['denoiser']} runs frozen in front of {settings['name']} "
         f"(margins {denoiser_info.geometry.margin} + {model.segmenter.geometry.margin})")
    return model, COMPOSED, composed_kwargs, denoiser_info.normalization


def _initialize(model: Any, settings: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Apply the recipe's `model.pretrained` (ImageNet backbone) and `model.init_from` (earlier stage)."""
    from segkit.checkpoint import initialize_from

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
    """Train the recipe's model; returns the run's files (best/last checkpoints, logs, curve)."""
    import torch

    from segkit.training.losses import segmentation_loss

    cfg_data, cfg_train, cfg_loss = recipe["data"], recipe["train"], recipe["loss"]
    device = training_device(cfg_train["device"])
    data_source(cfg_data, "raw"), data_source(cfg_data, "labels")  # missing data fails before the run folder exists
    files = open_run(cfg_train["out"], resume=resume)
    torch.manual_seed(cfg_train["seed"])
    echo(f"loading data from {cfg_data['root']}")
    train_raw, train_mem = load_split(cfg_data, "train")
    val_raw, val_mem = load_split(cfg_data, "val")
    check_label_classes(train_mem, cfg_data, "train")
    check_label_classes(val_mem, cfg_data, "val")
    check_model_fits(recipe["model"]["name"], {"in_channels": 1, "classes": 2, **recipe["model"]["params"]}, device)
    model, model_name, model_kwargs, normalization = build_model(recipe["model"], data_normalization(train_raw), echo)
    geometry = model.geometry
    tile = cfg_data["tile"]
    check_training_tile(geometry, tile, model=model_name, model_kwargs=model_kwargs, device=device)
    out_tile = geometry.output_size(tile)
    class_weights = class_balance_weights(np.stack(train_mem)) if cfg_loss["class_balance"] else (1.0, 1.0)
    # Same-padding models sample tiles from planes mirror-padded by their halo too: more positions.
    slices = prepare_slices(train_raw, train_mem, margin=geometry.margin + geometry.halo, min_size=out_tile,
                            class_weights=class_weights, w0=cfg_loss["border_w0"], sigma=cfg_loss["border_sigma"])

    model = model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg_train)
    use_cuda = device.startswith("cuda")
    amp_dtype, scaler = amp_setup(cfg_train["amp"], device)

    history: list[dict[str, float]] = []
    start_epoch, best_error = 1, math.inf
    if resume:
        meta = resume_run(files, model, optimizer, name=model_name, kwargs=model_kwargs, lr=cfg_train["lr"])
        start_epoch, best_error, history = meta["epoch"] + 1, meta["best_error"], meta["history"]
        echo(f"resuming {files.root} after epoch {meta['epoch']}")

    files.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    info = CheckpointInfo(
        kind="segmenter", model=model_name,
        model_kwargs=model_kwargs,
        geometry=geometry, normalization=normalization,
        inference={"threshold": cfg_train["val_threshold"], "tile": tile, "input_dtype": str(train_raw[0].dtype)},
        recipe=recipe,
    )
    thresholds = tuple(sorted({*VALIDATION_THRESHOLDS, cfg_train["val_threshold"]}))
    epoch = completed = start_epoch - 1
    limit = cfg_train["time_limit_min"]

    def save_last() -> None:
        save_checkpoint(files.last, model, info)
        save_optimizer(files.optimizer, optimizer, {"epoch": completed, "best_error": best_error,
                                                    "history": history})

    stream = patch_stream(slices, tile=tile, out_tile=out_tile, augment_settings=recipe["augment"],
                          normalization=normalization, seed=(cfg_train["seed"], start_epoch))
    workers = loader_workers(cfg_train["workers"], echo)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=cfg_train["batch"], num_workers=workers,
                                              pin_memory=use_cuda, persistent_workers=workers > 0))
    make_interruptible(model, device)
    iters, epochs = cfg_train["iters_per_epoch"], cfg_train["epochs"]
    announce(echo, model=model, name=model_name, device=device, requested_device=cfg_train["device"],
             amp=cfg_train["amp"], slices={"training": cfg_data["train_slices"], "validation": cfg_data["val_slices"]},
             iters=iters, batch=cfg_train["batch"], tile=tile, epochs=epochs)
    clock = Clock(limit, timed_iterations=min(3, iters))
    epoch_seconds: list[float] = []
    try:
        for epoch in range(start_epoch, epochs + 1):
            model.train()
            epoch_start = time.monotonic()

            def step(epoch: int = epoch) -> float:  # this epoch, bound now
                image, target, weight = (t.to(device, non_blocking=True) for t in next(loader))
                with torch.autocast("cuda" if use_cuda else "cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(image)
                loss = segmentation_loss(logits, target, weight, dice_weight=cfg_loss["dice_weight"])
                return optimizer_step(loss, optimizer, scaler, epoch=epoch)

            # an epoch the time limit cuts short is validated and saved like any other, so a run whose
            # epochs outlast the limit still progresses on resume
            losses = train_iterations(step, epoch=epoch, epochs=epochs, iters=iters, clock=clock, progress=progress,
                                      echo=echo, gpu_recipe_on_cpu=device == "cpu" and cfg_train["device"] != "cpu")
            model.eval()
            table = validate(model, val_raw, val_mem, normalization=normalization, tile=tile,
                             batch=cfg_train["val_batch"], device=device, thresholds=thresholds)
            scores = table[cfg_train["val_threshold"]]
            best_threshold = min(thresholds, key=lambda t: (table[t]["adapted_rand_error"], abs(t - 0.5)))
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "pixel_error": scores["pixel_error"],
                   "adapted_rand_error": scores["adapted_rand_error"], "vi": scores["vi"], "dice": scores["dice"],
                   "best_threshold": best_threshold,
                   "best_adapted_rand_error": table[best_threshold]["adapted_rand_error"],
                   "seconds": time.monotonic() - epoch_start, "lr": optimizer.param_groups[0]["lr"]}
            history.append(row)
            # The threshold is chosen on the validation slices only, never on the test split.
            info.inference["threshold"] = best_threshold
            info.training = {"epoch": epoch, "validation": table[best_threshold],
                             "validation_at_val_threshold": scores, "class_weights": list(class_weights)}
            if row["best_adapted_rand_error"] < best_error:
                best_error = row["best_adapted_rand_error"]
                save_checkpoint(files.best, model, info)
            completed = epoch
            save_last()
            write_logs(files, history, LOG_FIELDS)
            plot_curve(history, files.curve, loss_label="weighted cross-entropy",
                       metrics=("pixel_error", "adapted_rand_error"), metric_label="error")
            epoch_seconds.append(row["seconds"])
            left = f"; about {duration((epochs - epoch) * np.mean(epoch_seconds))} left" if epoch < epochs else ""
            echo(f"epoch {epoch}: loss {row['train_loss']:.4f}  val pixel error {row['pixel_error']:.4f}  "
                 f"adapted Rand error {row['adapted_rand_error']:.4f}  VI {row['vi']:.3f}  "
                 f"(best threshold {best_threshold}: adapted Rand error {row['best_adapted_rand_error']:.4f})  "
                 f"[{duration(row['seconds'])}{left}]")
            stop = clock.stop_message(epoch=epoch, epochs=epochs, iterations=len(losses), iters=iters, root=files.root)
            if stop:
                echo(stop)
                break
    except KeyboardInterrupt:
        save_last()  # weights of the unfinished epoch; resume=True reruns that epoch
        files.remove_partials()  # of a best checkpoint or curve the interrupt cut short
        echo(f"interrupted; last checkpoint kept in {files.root} (continue with resume=True)")
        raise
    return files

