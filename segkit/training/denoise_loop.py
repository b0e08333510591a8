"""Self-supervised training of a denoiser on raw stacks (no labels).

supervised mode: the raw data (scaled to [0, 1]) is the clean target and a synthetic corruption
of it the input, as in a denoising autoencoder. blind_spot mode (Noise2Void): the input is the
(corrupted or real) noisy data with a few pixels replaced by neighbours, and the loss is taken
only at those pixels against their noisy values, so no clean data is needed.
Validation: PSNR and SSIM of whole validation slices, corrupted once with a fixed seed and
denoised through the same tiler as `segkit denoise`, against the clean slices.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from segkit.checkpoint import save_checkpoint
from segkit.config import DENOISE_SCHEMA
from segkit.devices import resolve_device, training_precision
from segkit.errors import ConfigError
from segkit.inference.engines import TorchEngine
from segkit.io.tiff import open_stack
from segkit.models import create_model, model_kind
from segkit.normalization import Normalization, intensity_scale, mean_std_normalization
from segkit.record import CheckpointInfo, InferenceDefaults
from segkit.training.corruption import blind_spot, corrupt, psnr, ssim
from segkit.training.patches import data_source, mirror_array, split_planes
from segkit.training.runs import (
    RunFiles,
    announce,
    build_optimizer,
    check_batch_memory,
    check_model_fits,
    check_train_call,
    check_training_tile,
    count_tiles,
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
from segkit.training.validation import predict_tiles

LOG_FIELDS = ["epoch", "train_loss", "psnr", "ssim", "noisy_psnr", "seconds", "lr"]
VALIDATION_SEED = 20120  # the same corrupted validation slices in every epoch and every run


def load_raw(data: dict[str, Any], split: str) -> list[np.ndarray]:
    """Raw planes of one split, as stored."""
    with open_stack(data_source(data, "raw")) as stack:
        return split_planes(stack, data, split)


def sample_denoise_batch(planes: list[np.ndarray], rng: np.random.Generator, *, tile: int, margin: int,
                         batch: int, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (N, 1, tile, tile), targets (N, 1, out, out), loss weights (N, 1, out, out)) in [0, 1] units.

    `planes` are mirror-padded by `margin` and scaled to [0, 1].
    """
    corruption, train, augment = settings["corruption"], settings["train"], settings["augment"]
    out = tile - 2 * margin
    inner = (slice(margin, margin + out), slice(margin, margin + out))
    inputs, targets, weights = [], [], []
    for _ in range(batch):
        plane = planes[int(rng.integers(len(planes)))]
        y = int(rng.integers(plane.shape[0] - tile + 1))
        x = int(rng.integers(plane.shape[1] - tile + 1))
        clean = plane[y : y + tile, x : x + tile]
        if augment["rot90"]:
            clean = np.rot90(clean, int(rng.integers(4)))
        if augment["flips"] and rng.random() < 0.5:
            clean = clean[:, ::-1]
        noisy = corrupt(np.ascontiguousarray(clean), rng, corruption)
        if train["mode"] == "blind_spot":
            masked, mask = blind_spot(noisy, rng, fraction=train["blind_spot_fraction"],
                                      radius=train["blind_spot_radius"], region=inner)
            inputs.append(masked)
            targets.append(noisy[inner])
            weights.append(mask[inner].astype(np.float32))
        else:
            inputs.append(noisy)
            targets.append(clean[inner])
            weights.append(np.ones((out, out), np.float32))
    stack = lambda items: np.stack(items)[:, None].astype(np.float32)  # noqa: E731
    return stack(inputs), stack(targets), stack(weights)


def denoise_planes(model: Any, planes: list[np.ndarray], *, normalization: Normalization, scale: float, tile: int,
                   batch: int, device: str, progress: Any = None) -> list[np.ndarray]:
    """Denoise planes given in [0, 1] units through the tiler; returns [0, 1] units. `progress` (tqdm-like)
    is told the tiles (`validation.predict_tiles`)."""
    engine = TorchEngine(model, device=device, amp="none", channel=None)
    normalized = [normalization.apply(p * scale) for p in planes]
    outputs = predict_tiles(normalized, engine, model.geometry, tile=tile, batch=batch, progress=progress)
    return [normalization.invert(o[0]) / scale for o in outputs]


def train_denoiser(recipe: dict[str, Any], *, resume: bool = False, progress: bool = True,
                   echo: Callable[[str], None] = print) -> RunFiles:
    """Train the recipe's denoiser; returns the run's files (best/last checkpoints, logs, curve).

    The arguments are those of `loop.train`, checked the same way before any work (`runs.check_train_call`:
    OptionTypeError, OptionValueError), the recipe against the denoiser schema (`config.DENOISE_SCHEMA`).
    """
    import torch

    recipe = check_train_call(recipe, resume=resume, progress=progress, echo=echo, schema=DENOISE_SCHEMA)
    cfg_data, cfg_train = recipe["data"], recipe["train"]
    if model_kind(recipe["model"]["name"]) != "denoiser":
        raise ConfigError(f"model.name: {recipe['model']['name']} is a segmenter; `segkit train-denoiser` trains "
                          "denoisers (model.name: denoiser) and `segkit train` trains segmenters")
    if cfg_train["mode"] == "supervised" and recipe["corruption"]["noise"] == "none":
        raise ConfigError("corruption.noise: 'none' leaves nothing to learn in supervised mode; choose a noise or "
                          "train.mode: blind_spot")
    device = resolve_device(cfg_train["device"], option="train.device", recipe=True)
    data_source(cfg_data, "raw")  # missing data fails before the run folder exists

    torch.manual_seed(cfg_train["seed"])
    model_kwargs = {"in_channels": 1, **recipe["model"]["params"]}
    check_model_fits(recipe["model"]["name"], model_kwargs, device)
    model = create_model(recipe["model"]["name"], **model_kwargs)
    geometry, tile = model.geometry, cfg_data["tile"]
    check_training_tile(geometry, tile, model=recipe["model"]["name"], model_kwargs=model_kwargs, device=device)
    check_batch_memory(recipe["model"]["name"], model_kwargs, tile=tile, val_tile=tile, batch=cfg_train["batch"],
                       val_batch=cfg_train["val_batch"], device=device, amp=cfg_train["amp"] is not False)
    files = open_run(cfg_train["out"], resume=resume)  # after every check: a refused recipe leaves no run folder
    out_tile = geometry.output_size(tile)

    echo(f"loading raw data from {cfg_data['root']}")
    train_raw, val_raw = load_raw(cfg_data, "train"), load_raw(cfg_data, "val")
    scale = intensity_scale(train_raw[0].dtype)
    normalization = mean_std_normalization(train_raw)
    unit = lambda plane: plane.astype(np.float32) / scale  # noqa: E731
    padded = [mirror_array(unit(p), [(geometry.margin, geometry.margin + max(0, out_tile - n)) for n in p.shape])
              for p in train_raw]
    val_clean = [unit(p) for p in val_raw]
    val_rng = np.random.default_rng(VALIDATION_SEED)
    val_noisy = [corrupt(p, val_rng, recipe["corruption"]) for p in val_clean]
    # Without synthetic noise the "clean" slices are the raw ones, and the noisy input equals them.
    synthetic = recipe["corruption"]["noise"] != "none"
    noisy_psnr = float(np.mean([psnr(n, c) for n, c in zip(val_noisy, val_clean)])) if synthetic else None

    model = model.to(device)
    optimizer = build_optimizer(model.parameters(), cfg_train)
    use_cuda = device.startswith("cuda")
    amp_dtype, scaler = training_precision(cfg_train["amp"], device)
    history: list[dict[str, float]] = []
    start_epoch, best_psnr = 1, -math.inf
    if resume:
        meta = resume_run(files, model, optimizer, name=recipe["model"]["name"], kwargs=model_kwargs,
                          lr=cfg_train["lr"])
        start_epoch, best_psnr, history = meta["epoch"] + 1, meta["best_psnr"], meta["history"]
        echo(f"resuming {files.root} after epoch {meta['epoch']}")

    write_recipe(files, recipe)
    info = CheckpointInfo(
        kind="denoiser", model=recipe["model"]["name"], model_kwargs=model_kwargs, geometry=geometry,
        normalization=normalization, classes=[],
        inference=InferenceDefaults(tile=tile, input_dtype=str(train_raw[0].dtype), intensity_scale=scale), recipe=recipe,
    )
    rng = np.random.default_rng([cfg_train["seed"], start_epoch])

    def save_last(completed: int) -> None:
        save_checkpoint(files.last, model, info)
        save_optimizer(files.optimizer, optimizer, {"epoch": completed, "best_psnr": best_psnr, "history": history})

    def to_model_units(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalization.apply(x * scale)).to(device)

    def step(epoch: int) -> float:
        noisy, target, weight = sample_denoise_batch(padded, rng, tile=tile, margin=geometry.margin,
                                                     batch=cfg_train["batch"], settings=recipe)
        with torch.autocast("cuda" if use_cuda else "cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            estimate = model(to_model_units(noisy)).float()
        error = estimate - to_model_units(target)
        per_pixel = error.square() if cfg_train["loss"] == "mse" else error.abs()
        weight_t = torch.from_numpy(weight).to(device)
        loss = (per_pixel * weight_t).sum() / weight_t.sum().clamp(min=1.0)
        return optimizer_step(loss, optimizer, scaler, epoch=epoch)

    def finish(epoch: int, losses: list[float], started: float, bar: Any) -> tuple[dict[str, Any], bool, str]:
        nonlocal best_psnr
        denoised = denoise_planes(model, val_noisy, normalization=normalization, scale=scale, tile=tile,
                                  batch=cfg_train["val_batch"], device=device, progress=bar)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)),
               "psnr": float(np.mean([psnr(d, c) for d, c in zip(denoised, val_clean)])),
               "ssim": float(np.mean([ssim(d, c) for d, c in zip(denoised, val_clean)])),
               "noisy_psnr": noisy_psnr, "seconds": time.monotonic() - started,
               "lr": optimizer.param_groups[0]["lr"]}
        info.training = {"epoch": epoch, "validation": {k: row[k] for k in ("psnr", "ssim", "noisy_psnr")},
                         "corruption": recipe["corruption"], "mode": cfg_train["mode"]}
        improved = row["psnr"] > best_psnr
        best_psnr = max(best_psnr, row["psnr"])
        baseline = f" (noisy input {noisy_psnr:.2f} dB)" if synthetic else " (vs the raw data)"
        return row, improved, f"loss {row['train_loss']:.4f}  val PSNR {row['psnr']:.2f} dB{baseline}  SSIM {row['ssim']:.3f}"

    make_interruptible(model, device)
    iters, epochs = cfg_train["iters_per_epoch"], cfg_train["epochs"]
    announce(echo, model=model, name=recipe["model"]["name"], device=device, requested_device=cfg_train["device"],
             amp=cfg_train["amp"], data=slice_text({"training": cfg_data["train_slices"],
                                                    "validation": cfg_data["val_slices"]}),
             iters=iters, batch=cfg_train["batch"], tile=tile, epochs=epochs)
    plan = plan_epochs(files, model, cfg_train, device, progress=progress, echo=echo, log_fields=LOG_FIELDS,
                       loss_label=f"{cfg_train['loss']} ({cfg_train['mode']})",
                       curve_metrics=("psnr", "noisy_psnr") if synthetic else ("psnr",), metric_label="PSNR (dB)")
    plan.estimate_validation = validation_timer(model, tiles=count_tiles([p.shape for p in val_noisy], geometry, tile),
                                                tile=tile, channels=1, device=device)
    run_epochs(plan, start_epoch=start_epoch, history=history, step=step, finish=finish,
               save_best=lambda: save_checkpoint(files.best, model, info), save_last=save_last)
    return files
