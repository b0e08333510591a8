"""Neuron instances on ISBI 2012 held-out slices 25-29: what TTA and the watershed each add.

Usage:
  python tools/bench_instances.py                                          # the bundled demo U-Net, CPU
  python tools/bench_instances.py -m runs/em_neurons/best.safetensors --device cuda

For (a) threshold + connected components, (b) + TTA (d4), (c) + seeded watershed, (d) both,
prints pixel error (of the thresholded membrane map), adapted Rand error and VI on slices 25-29.
Every setting (the threshold, the watershed's threshold and seed distance) is chosen on the
validation slices 20-24 only, exactly as `segkit evaluate --sweep [--watershed] --slices 20:25`
does; the test slices are scored once. Prints one JSON line per variant and a summary line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
VAL, TEST = (20, 25), (25, 30)


def predict_slices(checkpoint: Path, raw: np.ndarray, *, tta: str, device: str, batch: int) -> np.ndarray:
    from segkit.checkpoint import load_model
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_arrays
    from segkit.inference.tta import TTAForward

    model, info = load_model(checkpoint)
    engine = TorchEngine(model, device=device, amp="none")
    forward = engine if tta == "none" else TTAForward(engine, tta)
    planes = (info.normalization.apply(plane) for plane in raw)
    from segkit.inference.loading import trained_tile

    tile = trained_tile(info, model.geometry)  # the one place the default tile is decided
    return np.stack([p[0] for p in predict_arrays(planes, forward, model.geometry, tile=tile, batch=batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, default=ROOT / "segkit" / "data" / "unet_isbi_demo.safetensors")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "isbi2012")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tta", default="d4", choices=["flips", "d4"], help="the TTA of variants (b) and (d)")
    args = parser.parse_args()

    from segkit.evaluation import evaluate_stacks, evaluate_watershed, sweep_watershed
    from segkit.instances import WatershedParams

    raw = tifffile.imread(args.data / "train-volume.tif")
    labels = str(args.data / "train-labels.tif")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tta in ("none", args.tta):
            started = time.perf_counter()
            probability = predict_slices(args.model, raw[VAL[0] : TEST[1]], tta=tta, device=args.device,
                                         batch=args.batch)
            seconds = round(time.perf_counter() - started, 1)
            val, test = Path(tmp) / f"val_{tta}.tif", Path(tmp) / f"test_{tta}.tif"
            count = VAL[1] - VAL[0]
            tifffile.imwrite(val, np.rint(probability[:count] * 255).astype(np.uint8), photometric="minisblack")
            tifffile.imwrite(test, np.rint(probability[count:] * 255).astype(np.uint8), photometric="minisblack")
            # settings from the validation slices only
            threshold = evaluate_stacks(str(val), labels, sweep=True, slices=VAL)["sweep"]["best"]["threshold"]
            params = WatershedParams.from_dict(sweep_watershed(str(val), labels, slices=VAL)["best"]["params"])
            components = evaluate_stacks(str(test), labels, threshold=threshold, slices=TEST)["scores"]
            instances = evaluate_watershed(str(test), labels, slices=TEST, params=params)["scores"]
            for name, scores, setting in (("connected components", components, {"threshold": threshold}),
                                          ("watershed", instances, params.to_dict())):
                row = {"variant": f"{f'TTA {tta} + ' if tta != 'none' else ''}{name}", "tta": tta, "setting": setting,
                       "pixel_error": round(components["pixel_error"], 4),
                       "adapted_rand_error": round(scores["adapted_rand_error"], 4),
                       "vi": round(scores["vi"], 4), "vi_split": round(scores["vi_split"], 4),
                       "vi_merge": round(scores["vi_merge"], 4), "predict_seconds_10_slices": seconds}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(json.dumps({"benchmark": "instances_isbi_25_29", "model": str(args.model), "chosen_on": "slices 20-24",
                      "results": rows}))


if __name__ == "__main__":
    main()
