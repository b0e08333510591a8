"""Train a recipe on ISBI 2012 and score the best checkpoint on the held-out slices 25-29.

Usage:
  python tools/bench_train_isbi.py recipes/em_neurons.yaml [section.key=value ...]
  python tools/bench_train_isbi.py --checkpoint segkit/data/unet_isbi_demo.safetensors   # score only

Prints one JSON line: recipe, device, training time, epochs, and the held-out pixel error,
adapted Rand error and VI (split/merge) at the validation threshold, computed exactly as
`segkit predict` + `segkit evaluate` do (whole 512 x 512 slices, overlap-tiled).
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
    from segkit.checkpoint import load_model
    from segkit.evaluation import evaluate_stacks
    from segkit.inference.engines import TorchEngine
    from segkit.inference.pipeline import predict_stack
    from segkit.io.tiff import open_stack

    model, info = load_model(checkpoint)
    engine = TorchEngine(model, device=device)
    tile = int(info.inference.get("tile", 572))
    threshold = float(info.inference.get("threshold", 0.5))
    start, stop = test_slices
    with tempfile.TemporaryDirectory() as tmp:
        raw = tifffile.imread(root / "train-volume.tif")[start:stop]
        tifffile.imwrite(Path(tmp) / "test.tif", raw, photometric="minisblack")
        started = time.perf_counter()
        with open_stack(Path(tmp) / "test.tif") as stack:
            predict_stack(stack, engine, info.geometry, Path(tmp) / "pred.tif", normalization=info.normalization,
                          tile=tile, batch=batch)
        seconds = time.perf_counter() - started
        report = evaluate_stacks(str(Path(tmp) / "pred.tif"), str(root / "train-labels.tif"), threshold=threshold,
                                 slices=(start, stop), sweep=True)
    return {"threshold": threshold, "tile": tile, "predict_seconds": round(seconds, 2),
            "scores": report["scores"], "best_threshold_on_test_for_reference": report["sweep"]["best"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="recipes/em_neurons.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--checkpoint", type=Path, help="skip training; score this checkpoint")
    parser.add_argument("--root", type=Path, default=None, help="ISBI 2012 folder (default: the recipe's data.root)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from segkit.config import load_recipe
    from segkit.inference.engines import resolve_device

    device = resolve_device(args.device)
    result: dict = {"device": device}
    if args.checkpoint is None:
        from segkit.training.loop import train

        recipe = load_recipe(args.recipe, args.overrides)
        started = time.perf_counter()
        files = train(recipe, progress=False, echo=lambda text: print(text, flush=True))
        result.update(recipe=args.recipe, overrides=args.overrides, train_seconds=round(time.perf_counter() - started, 1),
                      epochs=len(json.loads(files.log_json.read_text())))
        checkpoint, root = files.best, Path(args.root or recipe["data"]["root"])
        test_slices = tuple(recipe["data"]["test_slices"])
    else:
        from segkit.checkpoint import read_info

        info = read_info(args.checkpoint)
        checkpoint = args.checkpoint
        data = info.recipe.get("data", {})
        root = Path(args.root or data.get("root", "../shared/data/isbi2012"))
        test_slices = tuple(data.get("test_slices", (25, 30)))
        result.update(checkpoint=str(checkpoint), trained_epochs=info.training.get("epoch"))
    if not (root / "train-volume.tif").exists():
        raise SystemExit(f"ISBI 2012 data not found in {root}; pass --root")
    result["test_slices"] = list(test_slices)
    result["held_out"] = held_out_scores(checkpoint, root, test_slices, device=device)
    print(json.dumps(result, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))


if __name__ == "__main__":
    main()
