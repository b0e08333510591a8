"""Training throughput of a recipe, part by part: where does a training step spend its time?

Usage:
  python tools/bench_train.py                                   # recipes/em_neurons.yaml, 20 s per part
  python tools/bench_train.py recipes/nuclei_bbbc039.yaml train.batch=16 --seconds 30 --device cuda
  python tools/bench_train.py recipes/em_neurons.yaml augment.on_device=true --device cuda

The recipe and its dotted overrides are read as `segkit train` reads them; its data come from
$SEGKIT_DATA (default ../shared/data beside the repository) when that folder holds the recipe's data
folder (data.root's last name), unless data.root is overridden. Four parts are timed, each for
--seconds after --warmup untimed iterations (worker start-up, allocation, cuDNN autotuning), with the
functions the training loop itself runs (segkit.training.loop: build_model, training_slices,
patch_loader, device_augmentation, training_step; the weight average when train.ema_decay > 0):

- model_only: forward, weighted loss, backward and optimiser step on a synthetic batch already on the
  device (train.batch tiles of data.tile px, the recipe's model, loss, optimizer and AMP rule);
- loader: batches from the recipe's DataLoader alone (train.workers processes, capped at the CPU cores;
  albumentations on the workers, or raw unit-space patches with augment.on_device);
- augment_device: `augment.on_device` augmentation alone, on batches of whole patches on the device
  (timed whatever the recipe's augment.on_device);
- full_step: loader + on-device augmentation (when the recipe asks for it) + forward/backward/step, as
  a training epoch runs it, validation left out.

Prints one JSON line: device, torch version, recipe, batch, tile, the rates (tiles or patches per
second) and the ratios to model_only (full_step_over_model_only is the one the goal is stated in).
A recipe or device that cannot be used is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "em_neurons.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: [RECIPE] [section.key=value ...] and the options."""
    parser = argparse.ArgumentParser(description="training throughput of a recipe: model alone, loader alone, "
                                                 "on-device augmentation alone, full training step")
    parser.add_argument("args", nargs="*", metavar="[RECIPE] OVERRIDE",
                        help=f"a recipe (default {DEFAULT_RECIPE.relative_to(ROOT)}), then section.key=value overrides")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per part (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each part (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to train (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    first = args.args[0] if args.args else None
    if first is not None and "=" not in first:
        args.recipe, args.overrides = first, args.args[1:]
    else:
        args.recipe, args.overrides = str(DEFAULT_RECIPE), list(args.args)
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    return args


def load(recipe_path: str, overrides: list[str], device: str) -> dict[str, Any]:
    """The validated recipe with its overrides, train.device set to `device`, and data.root moved to
    $SEGKIT_DATA/<its folder name> when that exists (unless data.root is overridden)."""
    from segkit.config import load_recipe
    from segkit.data_check import data_root

    overrides = [*overrides, f"train.device={device}"]
    recipe = load_recipe(recipe_path, overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        shared = data_root() / Path(recipe["data"]["root"]).name
        if shared.is_dir():
            recipe = load_recipe(recipe_path, [*overrides, f"data.root={shared}"])
    return recipe


def timed(step: Callable[[], Any], *, seconds: float, warmup: int, sync: Callable[[], None],
          per_step: int) -> dict[str, float]:
    """Run `step` `warmup` times untimed, then for at least `seconds` (and at least once); the device is
    synchronised before the clock starts and before it stops, so queued GPU work is counted."""
    for _ in range(warmup):
        step()
    sync()
    count, started = 0, time.perf_counter()
    while True:
        step()
        count += 1
        if time.perf_counter() - started >= seconds:
            break
    sync()
    elapsed = time.perf_counter() - started
    return {"iterations": count, "seconds": round(elapsed, 3), "per_s": count * per_step / elapsed}


def bench(recipe: dict[str, Any], *, seconds: float, warmup: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Time the four parts for a validated recipe (train.device resolved); the result's rates and ratios."""
    import torch

    from segkit.devices import resolve_device, training_precision
    from segkit.training.datasets import load_examples
    from segkit.training.loop import (
        build_model,
        dataset_normalization,
        device_augmentation,
        patch_loader,
        training_slices,
        training_step,
    )
    from segkit.training.runs import (
        WeightAverage,
        build_optimizer,
        check_training_tile,
        loader_workers,
        make_interruptible,
    )
    from segkit.training.targets import LabelRule

    data, train, loss = recipe["data"], recipe["train"], recipe["loss"]
    device = resolve_device(train["device"], option="--device")
    rule = LabelRule.from_data(data)
    examples = load_examples(data, "train")
    targets = [rule.target(e.labels) for e in examples]
    channels = examples[0].image.shape[0]
    torch.manual_seed(train["seed"])
    model, name, kwargs, normalization = build_model(recipe["model"], dataset_normalization(examples, data), echo,
                                                     in_channels=channels, classes=rule.classes)
    tile, batch = data["tile"], train["batch"]
    check_training_tile(model.geometry, tile, model=name, model_kwargs=kwargs, device=device)
    out_tile = model.geometry.output_size(tile)
    slices, scale, unit_normalization, _ = training_slices(examples, targets, rule, normalization, loss,
                                                           geometry=model.geometry, out_tile=out_tile)
    del examples, targets
    model = model.to(device).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train)
    amp_dtype, scaler = training_precision(train["amp"], device)
    average = WeightAverage(model, train["ema_decay"]) if train["ema_decay"] > 0 else None
    make_interruptible(model, device)  # as the loop does on the CPU (a hook per parameter)
    seed = (train["seed"], 1)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def optimise(batch_tensors: Any, augment: Any) -> None:
        training_step(model, batch_tensors, optimizer, scaler, augment=augment, amp_dtype=amp_dtype, device=device,
                      dice_weight=loss["dice_weight"], epoch=1)
        if average is not None:
            average.update(model)

    run = {"seconds": seconds, "warmup": warmup, "sync": sync, "per_step": batch}

    def model_only() -> dict[str, float]:
        """The model alone: a synthetic normalised batch, already on the device."""
        generator = torch.Generator(device=device).manual_seed(0)
        synthetic = (torch.randn((batch, channels, tile, tile), generator=generator, device=device),
                     torch.randint(0, rule.classes, (batch, out_tile, out_tile), generator=generator, device=device),
                     torch.ones((batch, out_tile, out_tile), device=device))
        return timed(lambda: optimise(synthetic, None), **run)

    augment = device_augmentation(recipe["augment"], unit_normalization, scale, out_tile=out_tile, device=device,
                                  seed=seed)

    def augment_alone() -> dict[str, float]:
        """On-device augmentation alone, on whole unit-space patches (as augment.on_device receives them)."""
        raw = {**recipe, "augment": {**recipe["augment"], "on_device": True}, "train": {**train, "workers": 0}}
        whole = [t.to(device) for t in next(patch_loader(slices, raw, tile=tile, out_tile=out_tile,
                                                         normalization=unit_normalization, seed=seed, device=device,
                                                         echo=echo))]
        return timed(lambda: augment(*whole), **run)

    def with_loader(step: Callable[[Any], Any]) -> dict[str, float]:
        """`step(batch)` on batches of a fresh DataLoader of the recipe (its workers end with it)."""
        batches = patch_loader(slices, recipe, tile=tile, out_tile=out_tile, normalization=unit_normalization,
                               seed=seed, device=device, echo=lambda _: None)
        return timed(lambda: step(next(batches)), **run)

    workers = loader_workers(train["workers"], echo)
    on_device = augment if recipe["augment"]["on_device"] else None
    parts: dict[str, dict[str, float]] = {}
    for part, measure in (("model_only", model_only), ("augment_device", augment_alone),
                          ("loader", lambda: with_loader(lambda b: b)),
                          ("full_step", lambda: with_loader(lambda b: optimise(b, on_device)))):
        echo(f"timing {part}" + (f" ({workers} loader workers)" if part in ("loader", "full_step") else ""))
        parts[part] = measure()

    model_rate = parts["model_only"]["per_s"]
    result: dict[str, Any] = {
        "tool": "bench_train", "device": device, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": name, "params_m": round(sum(p.numel() for p in model.parameters())
                                                                              / 1e6, 3),
        "batch": batch, "tile": tile, "out_tile": out_tile, "channels": channels, "classes": rule.classes,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "none",
        "augment_on_device": recipe["augment"]["on_device"], "workers": workers,
        "ema": train["ema_decay"] > 0, "seconds_per_part": seconds, "warmup": warmup,
        "model_only_tiles_per_s": round(model_rate, 3),
        "loader_patches_per_s": round(parts["loader"]["per_s"], 3),
        "augment_device_tiles_per_s": round(parts["augment_device"]["per_s"], 3),
        "full_step_tiles_per_s": round(parts["full_step"]["per_s"], 3),
        "full_step_over_model_only": round(parts["full_step"]["per_s"] / model_rate, 3),
        "loader_over_model_only": round(parts["loader"]["per_s"] / model_rate, 3),
        "augment_device_over_model_only": round(parts["augment_device"]["per_s"] / model_rate, 3),
        "iterations": {part: int(values["iterations"]) for part, values in parts.items()},
        "timed_seconds": {part: values["seconds"] for part, values in parts.items()},
    }
    return result


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's (platform.processor, else the machine type) and its core count."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from segkit.errors import SegkitError

    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SegkitError("--device cuda: CUDA is not available here; use --device cpu")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        recipe = load(args.recipe, args.overrides, device)
        result = bench(recipe, seconds=args.seconds, warmup=args.warmup,
                       echo=lambda line: print(line, file=sys.stderr, flush=True))
    except SegkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"tool": result.pop("tool"), "recipe": args.recipe, "overrides": args.overrides, **result}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
