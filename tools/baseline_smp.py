"""A plain segmentation-models-pytorch baseline: what a careful user writes instead of segkit.

Usage:
  python tools/baseline_smp.py --data my_data --kind instances --minutes 20 --threads 2
  python tools/baseline_smp.py --images stack.tif --labels stack_labels.tif --slices 0:20,20:25,25:30 \
      --kind membrane --minutes 20
  python tools/baseline_smp.py --dataset bbbc039 --minutes 10           # shorthand for a shared data set
  python tools/baseline_smp.py --dataset isbi2012 --minutes 10 --data-root ../shared/data

Data: a folder in segkit's layout (images/NAME.tif, labels/NAME.tif, split files train.txt, val.txt,
test.txt naming the images), or one image stack and one label stack split by plane ranges (train,
val, test). Images are (H, W), (C, H, W) or (H, W, C) with C <= 4; each image is z-scored per channel.
`--dataset` names a shared set under --data-root: bbbc039 (instances), axondeepseg_sem (semantic) or
isbi2012 (membrane: train-volume.tif / train-labels.tif, planes 0-19 train, 20-24 val, 25-29 test).

Model and training, the same for every kind: smp.Unet("resnet34", encoder_weights=None) from random
weights, in_channels from the data; random 256 x 256 crops (reflection-padded when the image is smaller)
with flips and rot90, batch 8; cross-entropy + smp's multi-class soft Dice; Adam, lr 1e-3 with a cosine
decay over the time budget (lr = 0.5 lr0 (1 + cos(pi elapsed / budget)), set every iteration from the
wall time); training stops once --minutes of wall time have passed. Val and test images are predicted
whole (reflection-padded to a multiple of 32), one at a time.

Per label kind (labels: instances 0 = background, 1..N one id per object; semantic 0..K-1 classes;
membrane 0 = membrane, anything else = cell):
- instances: 3 classes background / interior / boundary (an object's pixels within 2 px of the
  background or another object). Objects: seeds = connected components of P(interior) > t_seed,
  flooded by a watershed on -P(interior) inside P(interior) + P(boundary) > t_mask, then objects
  under min_size px removed; (t_seed, t_mask, min_size) is the grid point with the best mean AP on
  val. Scores: matched F1 / AP at IoU 0.5 to 0.95 (per-image means).
- semantic: K = the largest training label + 1 classes; argmax. Scores: per-class Dice / IoU, segkit's
  dice_mean (over every class present, background included) and dice_foreground (mean over 1..K-1).
- membrane: 2 classes cell / membrane; P(membrane) thresholded at the t in 0.3..0.9 with the lowest
  adapted Rand error on val. Scores: adapted Rand error, VI, pixel error (per-slice means).
Scores come from segkit.metrics. Progress goes to stderr; the last stdout line is one JSON object.
`run_baseline(...)` returns the same dictionary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("instances", "semantic", "membrane")
#: The shared data sets `--dataset` names: kind, and for a stack its files and train,val,test planes.
SHARED: dict[str, tuple[str, tuple[str, str, str] | None]] = {
    "bbbc039": ("instances", None),
    "axondeepseg_sem": ("semantic", None),
    "isbi2012": ("membrane", ("train-volume.tif", "train-labels.tif", "0:20,20:25,25:30")),
}
DATASETS = tuple(SHARED)
SPLITS = ("train", "val", "test")
CROP, BATCH, LR = 256, 8, 1e-3
BOUNDARY_WIDTH = 2
#: Object post-processing grid, tried on val: seed threshold x mask threshold x smallest object (px).
SEED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
MASK_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_SIZES = (0, 10, 30)
#: Membrane thresholds tried on val.
MEMBRANE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
INSTANCE_KEYS = ("f1@0.5", "ap@0.5", "map", "f1@0.75", "ap@0.75", "f1_mean")
MEMBRANE_KEYS = ("adapted_rand_error", "vi", "vi_split", "vi_merge", "pixel_error", "rand_precision", "rand_recall")


def default_data_root() -> Path:
    """$SEGKIT_DATA, else ../shared/data beside the repository: segkit's one rule (segkit.data_check.data_root)."""
    from segkit.data_check import data_root

    return data_root()


def log(message: str) -> None:
    print(f"[baseline_smp] {message}", file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------------------


def parse_slices(text: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """'0:20,20:25,25:30' -> ((0, 20), (20, 25), (25, 30)): the train, val and test plane ranges [start, stop)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"slices {text!r}: give three plane ranges train,val,test such as 0:20,20:25,25:30")
    ranges = []
    for part in parts:
        try:
            start, stop = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"slices {text!r}: {part!r} is not a range START:STOP") from None
        if not 0 <= start < stop:
            raise ValueError(f"slices {text!r}: {part!r} is empty or negative")
        ranges.append((start, stop))
    return ranges[0], ranges[1], ranges[2]


def to_chw(image: np.ndarray) -> np.ndarray:
    """An image as (C, H, W): (H, W) gains a channel axis, (H, W, C) with C <= 4 is moved channel-first."""
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3 and image.shape[0] <= 4:
        return image
    if image.ndim == 3 and image.shape[-1] <= 4:
        return np.moveaxis(image, -1, 0)
    raise ValueError(f"image of shape {image.shape} is not (H, W), (C, H, W) or (H, W, C) with at most 4 channels")


def normalize(image: np.ndarray) -> np.ndarray:
    """Per-image, per-channel zero mean and unit standard deviation of a (C, H, W) image, float32."""
    image = image.astype(np.float32)
    mean = image.mean(axis=(1, 2), keepdims=True)
    std = image.std(axis=(1, 2), keepdims=True)
    return (image - mean) / np.maximum(std, 1e-6)


def _tif(folder: Path, name: str) -> Path:
    for path in (folder / name, folder / f"{name}.tif", folder / f"{name}.tiff"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no image {name}(.tif) in {folder}")


@dataclass
class Data:
    """Where the images are: a folder in segkit's layout, or an image stack + label stack split by planes."""

    kind: str
    name: str
    folder: Path | None = None
    images: Path | None = None
    labels: Path | None = None
    slices: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        ranges = ",".join(f"{a}:{b}" for a, b in self.slices)
        return f"{self.images} + {self.labels} planes {ranges}"

    def load(self, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, normalised (C, H, W) image, label image (H, W)) of every image of `split`."""
        if self.folder is not None:
            names = [line.strip() for line in (self.folder / f"{split}.txt").read_text().splitlines() if line.strip()]
            return [(name, normalize(to_chw(tifffile.imread(_tif(self.folder / "images", name)))),
                     np.squeeze(tifffile.imread(_tif(self.folder / "labels", name)))) for name in names]
        start, stop = self.slices[SPLITS.index(split)]
        images, labels = tifffile.imread(self.images), tifffile.imread(self.labels)
        if stop > len(images) or len(labels) != len(images):
            raise ValueError(f"planes {start}:{stop} of {self.images} ({len(images)} planes) and {self.labels} "
                             f"({len(labels)} planes): out of range or not paired")
        return [(f"{self.images.name}[{z}]", normalize(to_chw(images[z])), labels[z]) for z in range(start, stop)]


def resolve_data(dataset: str | None = None, *, data_root: str | Path | None = None, data: str | Path | None = None,
                 kind: str | None = None, images: str | Path | None = None, labels: str | Path | None = None,
                 slices: str | None = None) -> Data:
    """The data from exactly one of: a shared `dataset` name (under `data_root`), a `data` folder, or an
    `images` stack with its `labels` stack and `slices` (train,val,test)."""
    if sum(v is not None for v in (dataset, data, images)) != 1:
        raise ValueError("give exactly one of dataset, data (a folder) or images (a stack, with labels and slices)")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if dataset is not None:
        if dataset not in SHARED:
            raise ValueError(f"dataset {dataset!r} is not one of {DATASETS}; pass another folder as data=DIR")
        shared_kind, stack = SHARED[dataset]
        if kind not in (None, shared_kind):
            raise ValueError(f"dataset {dataset} is {shared_kind}, not {kind}")
        folder = Path(data_root or default_data_root()) / dataset
        if stack is None:
            return Data(shared_kind, dataset, folder=folder)
        return Data(shared_kind, dataset, images=folder / stack[0], labels=folder / stack[1],
                    slices=parse_slices(stack[2]))
    if kind is None:
        raise ValueError(f"say which labels these are: kind is one of {KINDS}")
    if data is not None:
        return Data(kind, Path(data).name, folder=Path(data))
    if labels is None or slices is None:
        raise ValueError("an image stack needs its label stack (labels) and the train,val,test planes (slices)")
    return Data(kind, Path(images).stem, images=Path(images), labels=Path(labels), slices=parse_slices(slices))


# -- targets ---------------------------------------------------------------------------------------


def boundary_classes(instances: np.ndarray, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """Instance labels -> uint8 classes 0 background, 1 interior, 2 boundary: an object's pixels within
    `width` px (Euclidean) of a pixel of the background or of another object (the image edge is not one)."""
    from scipy.ndimage import maximum_filter, minimum_filter
    from skimage.morphology import disk

    footprint = disk(width).astype(bool)
    instances = instances.astype(np.int64)
    near_other = ((maximum_filter(instances, footprint=footprint, mode="nearest") != instances)
                  | (minimum_filter(instances, footprint=footprint, mode="nearest") != instances))
    target = (instances > 0).astype(np.uint8)
    target[near_other & (instances > 0)] = 2
    return target


def targets(kind: str, labels: np.ndarray) -> np.ndarray:
    """The training classes of a label image: instances -> background/interior/boundary, semantic -> the labels,
    membrane -> 0 cell, 1 membrane (label 0)."""
    if kind == "instances":
        return boundary_classes(labels)
    if kind == "membrane":
        return (labels == 0).astype(np.uint8)
    return labels.astype(np.uint8)


def random_patch(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random CROP x CROP crop of a (C, H, W) image and its (H, W) target (reflection-padded when the
    image is smaller), random flips and rot90, the same for both."""
    pad = [(0, max(0, CROP - s)) for s in target.shape]
    if any(after for _, after in pad):
        image, target = np.pad(image, [(0, 0), *pad], mode="reflect"), np.pad(target, pad, mode="reflect")
    y = rng.integers(0, target.shape[0] - CROP + 1)
    x = rng.integers(0, target.shape[1] - CROP + 1)
    image, target = image[:, y:y + CROP, x:x + CROP], target[y:y + CROP, x:x + CROP]
    if rng.random() < 0.5:
        image, target = image[:, ::-1], target[::-1]
    if rng.random() < 0.5:
        image, target = image[:, :, ::-1], target[:, ::-1]
    k = int(rng.integers(4))
    return np.ascontiguousarray(np.rot90(image, k, axes=(1, 2))), np.ascontiguousarray(np.rot90(target, k))


# -- model, training, prediction -------------------------------------------------------------------


def make_model(in_channels: int, classes: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=in_channels, classes=classes)


def cosine_lr(elapsed: float, budget: float, lr0: float = LR) -> float:
    """The learning rate after `elapsed` of `budget` seconds: 0.5 lr0 (1 + cos(pi elapsed / budget)), 0 past the end."""
    progress = min(1.0, elapsed / budget) if budget > 0 else 1.0
    return 0.5 * lr0 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Trained:
    iterations: int
    seconds: float
    lrs: list[float]  # the learning rate of each iteration


def train(model: torch.nn.Module, data: list[tuple[np.ndarray, np.ndarray]], *, minutes: float, device: str,
          rng: np.random.Generator, clock: Callable[[], float] = time.perf_counter) -> Trained:
    """Train until `minutes` of wall time have passed (checked after every iteration), the learning rate
    following `cosine_lr` of the time elapsed before each iteration."""
    import segmentation_models_pytorch as smp

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    cross_entropy, dice = torch.nn.CrossEntropyLoss(), smp.losses.DiceLoss(mode="multiclass", from_logits=True)
    model.train()
    budget, lrs, last_log = minutes * 60, [], -math.inf
    started = clock()
    while True:
        lr = cosine_lr(clock() - started, budget)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        patches = [random_patch(*data[rng.integers(len(data))], rng) for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([p[0] for p in patches])).to(device)
        y = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64)).to(device)
        logits = model(x)
        loss = cross_entropy(logits, y) + dice(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = clock() - started
        if elapsed - last_log >= 30:
            log(f"iteration {len(lrs)}: loss {loss.item():.4f}, lr {lr:.2e}, {elapsed:.1f} s, "
                f"{elapsed / len(lrs):.2f} s/iteration")
            last_log = elapsed
        if elapsed >= budget:
            return Trained(len(lrs), elapsed, lrs)


@torch.inference_mode()
def predict(model: torch.nn.Module, image: np.ndarray, device: str) -> np.ndarray:
    """Class probabilities (K, H, W) of a whole normalised (C, H, W) image, reflection-padded to a multiple of 32."""
    _, h, w = image.shape
    padded = np.pad(image, ((0, 0), (0, -h % 32), (0, -w % 32)), mode="reflect")
    logits = model(torch.from_numpy(padded)[None].to(device))
    return torch.softmax(logits.float(), 1)[0, :, :h, :w].cpu().numpy()


def outputs(model: torch.nn.Module, split: list[tuple[str, np.ndarray, np.ndarray]], kind: str,
            device: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(what the kind's post-processing needs, labels) per image, predicted one at a time: instances
    (2, H, W) P(interior), P(interior) + P(boundary); membrane P(membrane); semantic the argmax classes."""
    for _, image, labels in split:
        probs = predict(model, image, device)
        if kind == "instances":
            yield np.stack([probs[1], probs[1] + probs[2]]), labels
        elif kind == "membrane":
            yield probs[1], labels
        else:
            yield probs.argmax(0).astype(np.uint8), labels


# -- post-processing and scores --------------------------------------------------------------------


def remove_small(objects: np.ndarray, min_size: int) -> np.ndarray:
    """The label image without objects of fewer than `min_size` pixels."""
    if min_size <= 0:
        return objects
    small = np.bincount(objects.ravel()) < min_size
    small[0] = False
    return np.where(small[objects], 0, objects)


def _flood(interior: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from skimage.segmentation import watershed

    return watershed(-interior, markers=seeds, mask=mask)


def _seeds(interior: np.ndarray, t_seed: float) -> np.ndarray:
    from skimage.measure import label

    return label(interior > t_seed, connectivity=1)


def objects_from(maps: np.ndarray, t_seed: float, t_mask: float, min_size: int) -> np.ndarray:
    """Instances of one image from (P(interior), P(interior) + P(boundary)): seeds = components of
    P(interior) > t_seed, flooded on -P(interior) within P(interior) + P(boundary) > t_mask, small ones removed."""
    interior, foreground = maps
    return remove_small(_flood(interior, _seeds(interior, t_seed), foreground > t_mask), min_size)


def choose_objects(predicted: list[np.ndarray], labels: list[np.ndarray], *, seed_thresholds=SEED_THRESHOLDS,
                   mask_thresholds=MASK_THRESHOLDS, min_sizes=MIN_SIZES) -> dict:
    """The grid point (t_seed, t_mask, min_size) with the best mean AP (ties: F1@0.5, then the first in
    grid order) over these images: {"params": {...}, "scores": {...}}. Seeds are labelled once per t_seed,
    flooded once per (t_seed, t_mask); min_size only filters."""
    from segkit.metrics import instance_scores, mean_instance_rows

    rows: dict[tuple, list[dict[str, float]]] = {}
    for maps, truth in zip(predicted, labels):
        interior, foreground = maps
        for t_seed in seed_thresholds:
            seeds = _seeds(interior, t_seed)
            for t_mask in mask_thresholds:
                flooded = _flood(interior, seeds, foreground > t_mask)
                for min_size in min_sizes:
                    rows.setdefault((t_seed, t_mask, min_size), []).append(
                        instance_scores(truth, remove_small(flooded, min_size)))
    table = [{"params": {"t_seed": t, "t_mask": m, "min_size": s}, "scores": mean_instance_rows(r)}
             for (t, m, s), r in rows.items()]
    return max(table, key=lambda row: (row["scores"]["map"], row["scores"]["f1@0.5"]))


def choose_threshold(probabilities: list[np.ndarray], labels: list[np.ndarray],
                     thresholds=MEMBRANE_THRESHOLDS) -> tuple[float, dict[str, float]]:
    """The membrane threshold with the lowest mean adapted Rand error over these slices (ties: the
    lowest threshold), and its mean scores. Labels: 0 = membrane."""
    from segkit.metrics import mean_scores, score_thresholds

    per_slice = [score_thresholds(p, t == 0, thresholds) for p, t in zip(probabilities, labels)]
    means = {t: mean_scores([s[t] for s in per_slice]) for t in thresholds}
    best = min(thresholds, key=lambda t: means[t]["adapted_rand_error"])
    return best, means[best]


def foreground_dice(scores: dict[str, float], classes: int | None = None) -> float:
    """Mean of the per-class Dice dice_1 .. dice_{K-1} (classes absent everywhere, NaN, left out)."""
    keys = [k for k in scores if k.startswith("dice_") and k[5:].isdigit() and int(k[5:]) > 0
            and (classes is None or int(k[5:]) < classes)]
    values = [scores[k] for k in keys if not math.isnan(scores[k])]
    return float(np.mean(values)) if values else float("nan")


def semantic_scores(predicted: list[np.ndarray], labels: list[np.ndarray], classes: int) -> dict[str, float]:
    """Per-image mean class scores (segkit's dice_mean counts class 0) plus dice_foreground."""
    from segkit.metrics import class_scores, mean_class_rows

    scores = mean_class_rows([class_scores(p, t, classes) for p, t in zip(predicted, labels)])
    return {**scores, "dice_foreground": foreground_dice(scores, classes)}


def instance_test_scores(predicted: Iterator[tuple[np.ndarray, np.ndarray]], params: dict) -> dict[str, float]:
    from segkit.metrics import instance_scores, mean_instance_rows

    return mean_instance_rows([instance_scores(t, objects_from(p, **params)) for p, t in predicted])


def membrane_test_scores(predicted: Iterator[tuple[np.ndarray, np.ndarray]], threshold: float) -> dict[str, float]:
    from segkit.metrics import mean_scores, score_thresholds

    return mean_scores([score_thresholds(p, t == 0, (threshold,))[threshold] for p, t in predicted])


def rounded(scores: dict[str, float], keys: tuple[str, ...] | None = None) -> dict[str, float | None]:
    """Scores rounded to 4 digits (NaN as None, so the line is strict JSON)."""
    return {k: (None if math.isnan(v) else round(float(v), 4)) for k, v in scores.items() if keys is None or k in keys}


def score(model: torch.nn.Module, data: Data, kind: str, classes: int, device: str) -> tuple[dict, dict, dict]:
    """Choose the post-processing on val, score test with it: (chosen, val scores, test scores)."""
    val = list(outputs(model, data.load("val"), kind, device))
    predicted, labels = [p for p, _ in val], [t for _, t in val]
    del val
    if kind == "instances":
        best = choose_objects(predicted, labels)
        del predicted
        chosen, val_scores = best["params"], best["scores"]
        test_scores = instance_test_scores(outputs(model, data.load("test"), kind, device), chosen)
        return chosen, rounded(val_scores, INSTANCE_KEYS), rounded(test_scores, INSTANCE_KEYS)
    if kind == "membrane":
        threshold, val_scores = choose_threshold(predicted, labels)
        del predicted
        test_scores = membrane_test_scores(outputs(model, data.load("test"), kind, device), threshold)
        return {"threshold": threshold}, rounded(val_scores, MEMBRANE_KEYS), rounded(test_scores, MEMBRANE_KEYS)
    val_scores = semantic_scores(predicted, labels, classes)
    test = list(outputs(model, data.load("test"), kind, device))
    test_scores = semantic_scores([p for p, _ in test], [t for _, t in test], classes)
    return {"argmax": True}, rounded(val_scores), rounded(test_scores)


# -- entry points ----------------------------------------------------------------------------------


def run_baseline(dataset: str | None, minutes: float, *, threads: int | None = None, seed: int = 0,
                 data_root: str | Path | None = None, device: str = "cpu", data: str | Path | None = None,
                 kind: str | None = None, images: str | Path | None = None, labels: str | Path | None = None,
                 slices: str | None = None) -> dict:
    """Train, choose the post-processing on val, score test; the report dictionary (see the module doc).
    The data: a shared `dataset` name (under `data_root`), or `data` (a folder) with `kind`, or `images`
    and `labels` stacks with `slices` ('0:20,20:25,25:30') and `kind`."""
    source = resolve_data(dataset, data_root=data_root, data=data, kind=kind, images=images, labels=labels,
                          slices=slices)
    return run(source, minutes, threads=threads, seed=seed, device=device)


def run(source: Data, minutes: float, *, threads: int | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """`run_baseline` on resolved data."""
    import segmentation_models_pytorch as smp

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_split = source.load("train")
    in_channels = train_split[0][1].shape[0]
    if any(image.shape[0] != in_channels for _, image, _ in train_split):
        raise ValueError(f"{source.describe()}: training images differ in their number of channels")
    classes = {"instances": 3, "membrane": 2}.get(source.kind) or int(max(t.max() for _, _, t in train_split)) + 1
    train_data = [(image, targets(source.kind, labels)) for _, image, labels in train_split]
    del train_split
    log(f"{source.name} ({source.kind}): {len(train_data)} training images from {source.describe()}, "
        f"{in_channels} channel(s), {classes} classes; training {minutes:g} min on {device}, "
        f"{torch.get_num_threads()} threads")
    model = make_model(in_channels, classes).to(device)
    trained = train(model, train_data, minutes=minutes, device=device, rng=rng)
    del train_data
    log(f"trained {trained.iterations} iterations in {trained.seconds:.1f} s; scoring val and test")
    model.eval()
    started = time.perf_counter()
    chosen, val, test = score(model, source, source.kind, classes, device)
    seconds_scoring = time.perf_counter() - started
    log(f"chosen on val: {chosen}; scored in {seconds_scoring:.1f} s")
    return {"tool": "baseline_smp", "kind": source.kind, "data": source.describe(), "dataset": source.name,
            "minutes": minutes, "threads": torch.get_num_threads(), "seed": seed, "device": device,
            "in_channels": in_channels, "classes": classes, "iterations": trained.iterations,
            "patches": trained.iterations * BATCH, "final_lr": trained.lrs[-1],
            "seconds_training": round(trained.seconds, 2), "seconds_scoring": round(seconds_scoring, 2),
            "chosen": chosen, "val": val, "test": test, "torch": torch.__version__, "smp": smp.__version__}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=DATASETS, help="a shared data set under --data-root")
    source.add_argument("--data", type=Path, help="a folder: images/, labels/, train.txt, val.txt, test.txt")
    source.add_argument("--images", type=Path, help="one image stack (with --labels and --slices)")
    p.add_argument("--labels", type=Path, help="the label stack of --images")
    p.add_argument("--slices", help="train,val,test plane ranges of the stacks, e.g. 0:20,20:25,25:30")
    p.add_argument("--kind", choices=KINDS, help="the labels: instances, semantic or membrane (0 = membrane)")
    p.add_argument("--minutes", type=float, required=True, help="wall time of training")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding the shared data sets (default: $SEGKIT_DATA or ../shared/data)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        source = resolve_data(args.dataset, data_root=args.data_root, data=args.data, kind=args.kind,
                              images=args.images, labels=args.labels, slices=args.slices)
    except ValueError as exc:
        p.error(str(exc))
    report = run(source, args.minutes, threads=args.threads, seed=args.seed, device=args.device)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # `python tools/baseline_smp.py` finds segkit without an install
        sys.path.insert(0, str(ROOT))
    main()
