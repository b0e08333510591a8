"""Train recipes on ISBI 2012, one after the other, and score each best checkpoint on the
held-out slices 25-29.

Usage:
  python tools/bench_train_isbi.py recipes/em_neurons.yaml
  python tools/bench_train_isbi.py recipes/em_neurons.yaml recipes/em_neurons_fcn32s.yaml \
      recipes/em_neurons_fcn16s.yaml recipes/em_neurons_fcn8s.yaml        # U-Net beside staged FCN
  python tools/bench_train_isbi.py recipes/em_neurons.yaml --set train.epochs=2 --set train.out=runs/x
  python tools/bench_train_isbi.py --checkpoint segkit/data/unet_isbi_demo.safetensors   # score only

Prints one JSON line: per run the recipe, device, training time, epochs, and the held-out pixel
error, adapted Rand error and VI (split/merge) at the threshold chosen on the validation slices,
computed exactly as `segkit predict` + `segkit evaluate` do (whole 512 x 512 slices, tiled).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile


def held_out_scores(checkpoint: Path, root: Path, test_slices: tuple[int, int], *, device: str,
                    batch: int = 8) -> dict:
    from segkit.checkpoint import read_info
    from segkit.evaluation import evaluate_stacks
    from segkit.inference.api import predict

    info = read_info(checkpoint)
    from segkit.inference.loading import trained_tile

    tile = trained_tile(info, info.geometry)  # the one place the default tile is decided
    threshold = float(info.inference.threshold if info.inference.threshold is not None else 0.5)
    start, stop = test_slices
    with tempfile.TemporaryDirectory() as tmp:
        raw = tifffile.imread(root / "train-volume.tif")[start:stop]
        tifffile.imwrite(Path(tmp) / "test.tif", raw, photometric="minisblack")
        started = time.perf_counter()
        predict(Path(tmp) / "test.tif", Path(tmp) / "pred.tif", model=checkpoint, device=device, amp="none",
                tile=tile, batch=batch, report=lambda _: None)
        seconds = time.perf_counter() - started
        report = evaluate_stacks(str(Path(tmp) / "pred.tif"), str(root / "train-labels.tif"), threshold=threshold,
                                 slices=(start, stop), sweep=True)
    return {"threshold": threshold, "tile": tile, "predict_seconds": round(seconds, 2),
            "scores": report["scores"], "best_threshold_on_test_for_reference": report["sweep"]["best"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=["recipes/em_neurons.yaml"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every recipe, e.g. --set train.time_limit_min=5")
    parser.add_argument("--checkpoint", type=Path, help="skip training; score this checkpoint")
    parser.add_argument("--root", type=Path, default=None, help="ISBI 2012 folder (default: the recipe's data.root)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from segkit.config import load_recipe
    from segkit.devices import resolve_device

    device = resolve_device(args.device)
    runs = []
    if args.checkpoint is not None:
        runs.append(score_checkpoint(args.checkpoint, args.root, device))
    else:
        from segkit.training.loop import train

        for recipe_path in args.recipes:
            recipe = load_recipe(recipe_path, args.overrides)
            started = time.perf_counter()
            files = train(recipe, progress=False, echo=lambda text: print(text, flush=True))
            run = {"recipe": recipe_path, "overrides": args.overrides,
                   "train_seconds": round(time.perf_counter() - started, 1),
                   "epochs": len(json.loads(files.log_json.read_text()))}
            run.update(score_checkpoint(files.best, args.root or Path(recipe["data"]["root"]), device))
            runs.append(run)
    print(json.dumps({"device": device, "runs": runs},
                     default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))


def score_checkpoint(checkpoint: Path, root: Path | None, device: str) -> dict:
    from segkit.checkpoint import read_info

    info = read_info(checkpoint)
    data = info.recipe.get("data", {})
    root = Path(root or data.get("root", "../shared/data/isbi2012"))
    if not (root / "train-volume.tif").exists():
        raise SystemExit(f"ISBI 2012 data not found in {root}; pass --root")
    test_slices = tuple(data.get("test_slices", (25, 30)))
    return {"checkpoint": str(checkpoint), "model": info.model, "trained_epochs": info.training.get("epoch"),
            "test_slices": list(test_slices),
            "held_out": held_out_scores(checkpoint, root, test_slices, device=device)}

if __name__ == "__main__":
    main()
