"""A plain segmentation-models-pytorch baseline: what a user would write instead of segkit.

Usage:
  python tools/baseline_smp.py --dataset bbbc039 --minutes 10 --threads 2
  python tools/baseline_smp.py --dataset axondeepseg_sem --minutes 10 --seed 1 --data-root ../shared/data

smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=3), trained from scratch on the train
split for M minutes of wall time (random 256 x 256 crops, flips and rot90, batch 8, Adam 1e-3,
cross-entropy + soft Dice), then run once on whole val and test images (padded to a multiple of 32).
bbbc039: 3 classes background / interior / 1-px inner boundary; instances are the 4-connected components
of the interior, or those grown back into the foreground by a watershed on the boundary probability,
whichever has the higher mAP on val; both are reported on test. axondeepseg_sem: argmax of
background / myelin / axon (pixel sizes are ignored, as a plain user would). Scores come from
segkit.metrics (per-image means). Progress goes to stderr; the last stdout line is one JSON object.
`run_baseline(...)` returns the same dictionary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("bbbc039", "axondeepseg_sem")
CROP, BATCH, LR, CLASSES = 256, 8, 1e-3, 3
INSTANCE_KEYS = ("f1@0.5", "ap@0.5", "map", "f1@0.75")
CLASS_KEYS = ("dice_mean", "iou_mean", "dice_1", "dice_2")


def default_data_root() -> Path:
    """$SEGKIT_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("SEGKIT_DATA") or ROOT.parent / "shared" / "data")


def log(message: str) -> None:
    print(f"[baseline_smp] {message}", file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------------------


def normalize(image: np.ndarray) -> np.ndarray:
    """Per-image zero mean, unit standard deviation, float32."""
    image = image.astype(np.float32)
    return (image - image.mean()) / max(float(image.std()), 1e-6)


def three_classes(instances: np.ndarray) -> np.ndarray:
    """Instance labels -> uint8 classes 0 background, 1 interior, 2 inner boundary (1 px, within objects)."""
    from skimage.segmentation import find_boundaries

    target = (instances > 0).astype(np.uint8)
    target[find_boundaries(instances, mode="inner") & (instances > 0)] = 2
    return target


def load_split(folder: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, normalised image, raw label image) of every name in `split`.txt."""
    names = (folder / f"{split}.txt").read_text().split()
    return [(name, normalize(tifffile.imread(folder / "images" / f"{name}.tif")),
             tifffile.imread(folder / "labels" / f"{name}.tif")) for name in names]


def random_patch(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random CROP x CROP crop (reflection-padded if the image is smaller), random flips and rot90."""
    pad = [(0, max(0, CROP - s)) for s in image.shape]
    if any(after for _, after in pad):
        image, target = np.pad(image, pad, mode="reflect"), np.pad(target, pad, mode="reflect")
    y = rng.integers(0, image.shape[0] - CROP + 1)
    x = rng.integers(0, image.shape[1] - CROP + 1)
    image, target = image[y:y + CROP, x:x + CROP], target[y:y + CROP, x:x + CROP]
    if rng.random() < 0.5:
        image, target = image[::-1], target[::-1]
    if rng.random() < 0.5:
        image, target = image[:, ::-1], target[:, ::-1]
    k = int(rng.integers(4))
    return np.ascontiguousarray(np.rot90(image, k)), np.ascontiguousarray(np.rot90(target, k))


# -- model, training, prediction -------------------------------------------------------------------


def make_model() -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=CLASSES)


def train(model: torch.nn.Module, data: list[tuple[np.ndarray, np.ndarray]], *, minutes: float, device: str,
          rng: np.random.Generator) -> tuple[int, float]:
    """Train until `minutes` of wall time have passed (checked after every iteration); (iterations, seconds)."""
    import segmentation_models_pytorch as smp

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    cross_entropy, dice = torch.nn.CrossEntropyLoss(), smp.losses.DiceLoss(mode="multiclass", from_logits=True)
    model.train()
    iterations, started, last_log = 0, time.perf_counter(), 0.0
    while True:
        patches = [random_patch(*data[rng.integers(len(data))], rng) for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([p[0] for p in patches])[:, None]).to(device)
        y = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64)).to(device)
        logits = model(x)
        loss = cross_entropy(logits, y) + dice(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iterations += 1
        elapsed = time.perf_counter() - started
        if elapsed - last_log >= 30 or iterations == 1:
            log(f"iteration {iterations}: loss {loss.item():.4f}, {elapsed:.1f} s, "
                f"{elapsed / iterations:.2f} s/iteration")
            last_log = elapsed
        if elapsed >= minutes * 60:
            return iterations, elapsed


@torch.inference_mode()
def predict(model: torch.nn.Module, image: np.ndarray, device: str) -> np.ndarray:
    """Class probabilities (CLASSES, H, W) of a whole normalised image, reflection-padded to a multiple of 32."""
    h, w = image.shape
    padded = np.pad(image, ((0, -h % 32), (0, -w % 32)), mode="reflect")
    logits = model(torch.from_numpy(padded)[None, None].to(device))
    return torch.softmax(logits, 1)[0, :, :h, :w].float().cpu().numpy()


# -- post-processing and scores --------------------------------------------------------------------


def instances_from(probs: np.ndarray) -> dict[str, np.ndarray]:
    """The two instance variants: interior components, and those grown into the foreground by watershed."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    classes = probs.argmax(0)
    seeds = label(classes == 1, connectivity=1)
    return {"components": seeds, "watershed": watershed(probs[2], markers=seeds, mask=classes != 0)}


def score_images(model: torch.nn.Module, split: list[tuple[str, np.ndarray, np.ndarray]], dataset: str,
                 device: str) -> dict[str, dict[str, float]]:
    """Per-image mean scores of each variant on one split: {variant: {metric: value}}."""
    from segkit.metrics import class_scores, instance_scores, mean_class_rows, mean_instance_rows

    rows: dict[str, list[dict[str, float]]] = {}
    for _, image, labels in split:
        probs = predict(model, image, device)
        if dataset == "bbbc039":
            for variant, pred in instances_from(probs).items():
                rows.setdefault(variant, []).append(instance_scores(labels, pred))
        else:
            rows.setdefault("argmax", []).append(class_scores(probs.argmax(0).astype(np.uint8), labels, CLASSES))
    mean: Callable = mean_instance_rows if dataset == "bbbc039" else mean_class_rows
    keys = INSTANCE_KEYS if dataset == "bbbc039" else CLASS_KEYS
    return {variant: {key: round(mean(r)[key], 4) for key in keys} for variant, r in rows.items()}


# -- entry points ----------------------------------------------------------------------------------


def run_baseline(dataset: str, minutes: float, *, threads: int | None = None, seed: int = 0,
                 data_root: str | Path | None = None, device: str = "cpu") -> dict:
    """Train, choose the post-processing on val, score test; the report dictionary (see the module doc)."""
    import segmentation_models_pytorch as smp

    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {DATASETS}")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    folder = Path(data_root or default_data_root()) / dataset
    convert = three_classes if dataset == "bbbc039" else (lambda labels: labels.astype(np.uint8))
    train_data = [(image, convert(labels)) for _, image, labels in load_split(folder, "train")]
    log(f"{dataset}: {len(train_data)} training images from {folder}; training {minutes:g} min on {device}, "
        f"{torch.get_num_threads()} threads")
    model = make_model().to(device)
    iterations, seconds = train(model, train_data, minutes=minutes, device=device, rng=rng)
    log(f"trained {iterations} iterations in {seconds:.1f} s; scoring val and test")
    model.eval()
    started = time.perf_counter()
    val = score_images(model, load_split(folder, "val"), dataset, device)
    chosen = max(val, key=lambda v: val[v].get("map", 0.0))  # ties: the first (components / argmax)
    test = score_images(model, load_split(folder, "test"), dataset, device)
    return {"tool": "baseline_smp", "dataset": dataset, "minutes": minutes, "threads": torch.get_num_threads(),
            "seed": seed, "device": device, "iterations": iterations, "patches": iterations * BATCH,
            "seconds_training": round(seconds, 2), "seconds_scoring": round(time.perf_counter() - started, 2),
            "val": val, "test": test, "chosen": chosen, "torch": torch.__version__, "smp": smp.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--minutes", type=float, required=True, help="wall time of training")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding bbbc039/ and axondeepseg_sem/ (default: $SEGKIT_DATA or ../shared/data)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    report = run_baseline(args.dataset, args.minutes, threads=args.threads, seed=args.seed,
                          data_root=args.data_root, device=args.device)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # `python tools/baseline_smp.py` finds segkit without an install
        sys.path.insert(0, str(ROOT))
    main()
