"""Augmented training patches per second: one CPU DataLoader worker against augment_batch on a device.

Usage:
  python tools/bench_augment.py                    # 20 s per measurement
  python tools/bench_augment.py --seconds 5 --batch 8

(a) One worker, as training runs it: a single process with torch and OpenCV on 1 thread iterates
segkit.training.patches.patch_stream over a mirror-padded 1024 x 1024 float32 plane (margin 92): crop
a random 572 x 572 patch with its target and weight map, apply build_augmentation with the
recipe's (--recipe, default em_neurons.yaml) `augment` settings (elastic included) to the image and both masks, crop the 388 x 388
targets, normalise. (b) The same with elastic off. (c) segkit.training.augment_device.augment_batch
on batches of --batch 572 px patches (image, uint8 target, float32 weight), on the CPU (1 thread,
comparable with one worker per core) and on CUDA when available. Also: how many such workers a GPU
consuming --rate patches/s (240: base-64 U-Net, bf16, H100) needs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Any

import numpy as np

TILE, OUT_TILE, PLANE = 572, 388, 1024


def synthetic_slices(seed: int) -> Any:
    """One 1024 x 1024 EM-like plane in [0, 1] (smoothed noise), a membrane target and a weight map,
    mirror-padded by the U-Net margin as training pads them (pad_examples)."""
    from scipy import ndimage

    from segkit.training.patches import pad_examples

    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal((PLANE, PLANE)).astype(np.float32), 6)
    raw = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    membrane = np.abs(smooth) < 0.1 * np.abs(smooth).std()
    weight = np.where(membrane, 3.0, 0.6).astype(np.float32)
    return pad_examples([raw.astype(np.float32)], [membrane.astype(np.uint8)], [weight],
                        margin=(TILE - OUT_TILE) // 2, min_size=OUT_TILE)


def worker_rate(slices: Any, augment: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Patches/s of patch_stream iterated in this process (a DataLoader worker's loop)."""
    from segkit.normalization import Normalization
    from segkit.training.patches import patch_stream

    stream = iter(patch_stream(slices, tile=TILE, out_tile=OUT_TILE, augment_settings=augment,
                               normalization=Normalization(0.5, 0.2), seed=(0,)))
    for _ in range(3):
        next(stream)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(stream)
        count += 1
    elapsed = time.perf_counter() - started
    return {"patches": count, "seconds": round(elapsed, 2), "patches_per_s": round(count / elapsed, 2),
            "ms_per_patch": round(1000 * elapsed / count, 1)}


def batch_rate(augment: dict[str, Any], device: str, batch: int, seconds: float) -> dict[str, Any]:
    """Patches/s of augment_batch on `device` for (batch, 1, 572, 572) patches with two masks."""
    import torch

    from segkit.training.augment_device import augment_batch

    generator = torch.Generator(device=device).manual_seed(0)
    image = torch.rand((batch, 1, TILE, TILE), generator=generator, device=device)
    target = (torch.rand((batch, TILE, TILE), generator=generator, device=device) < 0.2).to(torch.uint8)
    weight = torch.rand((batch, TILE, TILE), generator=generator, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    for _ in range(2):
        augment_batch(image, [target, weight], augment, generator)
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        augment_batch(image, [target, weight], augment, generator)
        count += 1
        if count % 8 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - started
    row: dict[str, Any] = {"batch": batch, "batches": count, "seconds": round(elapsed, 2),
                           "patches_per_s": round(count * batch / elapsed, 1),
                           "ms_per_batch": round(1000 * elapsed / count, 2)}
    if device == "cpu":
        row["threads"] = torch.get_num_threads()
    else:
        row["device_name"] = torch.cuda.get_device_name(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each measurement")
    parser.add_argument("--batch", type=int, default=8, help="patches per augment_batch call")
    parser.add_argument("--rate", type=float, default=240.0, help="patches/s the GPU consumes")
    parser.add_argument("--recipe", default="recipes/em_neurons.yaml",
                        help="recipe whose `augment` section is measured (default: the paper U-Net's)")
    args = parser.parse_args()

    import albumentations
    import cv2
    import torch

    from segkit.config import load_recipe

    augment = {k: v for k, v in load_recipe(args.recipe)["augment"].items() if k != "on_device"}
    no_elastic = {**augment, "elastic": False}
    slices = synthetic_slices(0)

    cpu_threads = torch.get_num_threads()
    cv2_threads = cv2.getNumThreads()
    torch.set_num_threads(1)  # as in a DataLoader worker; OpenCV too, so one worker is one core
    cv2.setNumThreads(1)
    try:
        worker = {"elastic": worker_rate(slices, augment, args.seconds),
                  "no_elastic": worker_rate(slices, no_elastic, args.seconds)}
        # on one core too, to compare with one worker per core
        device_rows: dict[str, Any] = {"cpu": batch_rate(augment, "cpu", args.batch, args.seconds)}
    finally:
        torch.set_num_threads(cpu_threads)
        cv2.setNumThreads(cv2_threads)

    if torch.cuda.is_available():
        device_rows["cuda"] = batch_rate(augment, "cuda", args.batch, args.seconds)
    else:
        device_rows["cuda"] = None
        device_rows["cuda_note"] = "CUDA not available on this machine"

    print(json.dumps({
        "benchmark": "augment", "tile": TILE, "plane": PLANE, "seconds_per_measurement": args.seconds,
        "augment_settings": augment,
        "one_worker": {**worker, "torch_threads": 1, "cv2_threads": 1},
        "workers_for_rate": {"rate": args.rate,
                             **{name: math.ceil(args.rate / row["patches_per_s"]) for name, row in worker.items()}},
        "augment_batch": device_rows,
        "cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "versions": {"torch": torch.__version__, "albumentations": albumentations.__version__,
                     "opencv": cv2.__version__, "cpu": platform.processor() or platform.machine()},
    }))


if __name__ == "__main__":
    main()
