"""Patches: the training patches cut from an example set's images (mirror-padded, sampled, augmented by
albumentations on CPU workers) and the endless patch stream the loop draws from; also where the data
comes from (data.root) and its global normalisation. Which images form a split is datasets.py's;
targets and weight maps are targets.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segkit.errors import ConfigError, InputError
from segkit.normalization import Normalization, normalize_unit
from segkit.words import counted


def mirror_array(array: np.ndarray, padding: Any) -> np.ndarray:
    """Mirror-extrapolate a 2D training array (numpy's reflect, as the tiler's mirror; any width)."""
    return np.pad(array, padding, mode="reflect" if min(array.shape) > 1 else "symmetric")


def split_planes(stack: Any, data: dict[str, Any], split: str) -> list[np.ndarray]:
    """The planes of `stack` in the recipe's `data.<split>_slices` range ('train', 'val', 'test')."""
    start, stop = data[f"{split}_slices"]
    if stop > len(stack):
        raise ConfigError(f"data.{split}_slices: [{start}, {stop}) exceeds the {counted(len(stack), 'slice')} of {stack.source}")
    return [stack.plane(z) for z in range(start, stop)]


def data_source(data: dict[str, Any], key: str) -> str:
    """`data.root` joined with `data.<key>` (raw or labels). A missing root or file is an error that
    names the `data.root=` override fixing it, with the folder where the data was found, if anywhere."""
    import glob
    import os
    from pathlib import Path

    root, name = Path(data["root"]), data[key]
    source = root / name
    if root.is_dir() and (source.exists() or glob.has_magic(str(name))):
        return str(source)
    candidates = [Path(os.environ["SEGKIT_DATA"]) / root.name] if os.environ.get("SEGKIT_DATA") else []
    candidates += [Path(__file__).resolve().parents[3] / "shared" / "data" / root.name,
                   Path.cwd().parent / "shared" / "data" / root.name]
    found = next((c for c in candidates if (c / name).exists() and c.resolve() != root.resolve()), None)
    hint = "" if found else _data_check_hint(root.name)
    if not root.is_dir():
        fix = f"data.root={found}" if found else f"data.root=<the folder holding {name}>"
        raise InputError(f"data.root {root} does not exist; pass {fix} "
                         f"(a relative data.root in a recipe file is relative to the file's folder){hint}")
    fix = f"data.root={found}" if found else f"data.{key}=<a file in {root}> or data.root=<the folder holding {name}>"
    raise InputError(f"data.{key}: {source} does not exist; pass {fix}{hint}")


def _data_check_hint(folder: str) -> str:
    """For a folder named as a catalogued public data set (isbi2012, ...): the command that says where to get it."""
    from segkit.data_check import load_catalog

    if folder not in load_catalog():
        return ""
    return f"; `segkit data check {folder}` says which files it needs and where to get them"


def build_augmentation(settings: dict[str, Any], *, seed: int) -> Any:
    """albumentations pipeline from the recipe's `augment` section (image in [0, 1], masks follow)."""
    import albumentations as A
    import cv2

    steps: list[Any] = []
    if settings["flips"]:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if settings["rot90"]:
        steps.append(A.RandomRotate90(p=1.0))
    if settings["elastic"]:
        steps.append(
            A.ElasticTransform(
                alpha=float(settings["elastic_alpha"]), sigma=float(settings["elastic_sigma"]),
                interpolation=cv2.INTER_CUBIC, border_mode=cv2.BORDER_REFLECT_101, p=0.8,
            )
        )
    if settings["brightness_contrast"] > 0:
        limit = float(settings["brightness_contrast"])
        steps.append(A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=0.8))
    if settings["noise_std"] > 0:
        std = float(settings["noise_std"])
        steps.append(A.GaussNoise(std_range=(0.0, std), p=0.5))
    return A.Compose(steps, seed=seed)


#: Foreground pixels remembered per class and image for object-centred patches (a random subset beyond
#: this; enough to spread the centres over every object of the image).
FOREGROUND_POINTS = 20_000


@dataclass
class SliceSet:
    """Mirror-padded training images in unit space (about [0, 1]; (C, H, W)), their class targets and
    loss weights, how often each is drawn (in proportion to its area), and where their foreground
    classes lie (for patches centred on objects and rare classes)."""

    raw: list[np.ndarray]
    target: list[np.ndarray]
    weight: list[np.ndarray]
    margin: int
    scale: float = 1.0  # raw units per unit of `raw` (255 for uint8 data; 1 when `raw` is in model units)
    areas: list[int] | None = None  # pixels of each image before padding
    # per image: {class k >= 1: (n, 2) int32 (y, x) of its pixels in padded coordinates}
    foreground: list[dict[int, np.ndarray]] | None = None

    def draw(self, rng: np.random.Generator, among: list[int] | None = None) -> int:
        """An image index (of `among`, default all), drawn in proportion to the images' areas (uniform
        without areas)."""
        indices = list(range(len(self.raw))) if among is None else among
        if not self.areas:
            return indices[int(rng.integers(len(indices)))]
        cumulative = np.cumsum([self.areas[i] for i in indices])
        return indices[int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))]

    def draw_foreground(self, rng: np.random.Generator) -> tuple[int, int, int] | None:
        """(image, y, x) of a foreground pixel: an image that has any (by area), a class drawn uniformly
        among the foreground classes it holds, a pixel of it; None when no image has foreground."""
        among = [i for i, classes in enumerate(self.foreground or []) if classes]
        if not among:
            return None
        index = self.draw(rng, among)
        classes = self.foreground[index]  # type: ignore[index]
        points = classes[sorted(classes)[int(rng.integers(len(classes)))]]
        y, x = points[int(rng.integers(len(points)))]
        return index, int(y), int(x)


def foreground_points(target: np.ndarray, offset: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """{class k >= 1: (n, 2) int32 (y, x) + offset of up to FOREGROUND_POINTS of its pixels} of a target."""
    points: dict[int, np.ndarray] = {}
    for k in np.unique(target):
        if k == 0:
            continue
        where = np.argwhere(target == k).astype(np.int32)
        if len(where) > FOREGROUND_POINTS:
            where = where[rng.choice(len(where), FOREGROUND_POINTS, replace=False)]
        points[int(k)] = where + np.int32(offset)
    return points


def pad_examples(units: list[np.ndarray], targets: list[np.ndarray], weights: list[np.ndarray], *, margin: int,
                 min_size: int, scale: float = 1.0) -> SliceSet:
    """Pad every image ((C, H, W) or (H, W), in unit space) by the model margin (mirror), so any patch of
    the image has its context; images smaller than `min_size` output pixels are mirror-padded up to it.
    Foreground pixels of weight 0 (ignored labels) are never patch centres."""
    raws, padded_targets, padded_weights, areas, foreground = [], [], [], [], []
    rng = np.random.default_rng(0)
    for unit, target, weight in zip(units, targets, weights):
        unit = unit[None] if unit.ndim == 2 else unit
        grow = [(margin, margin + max(0, min_size - n)) for n in unit.shape[-2:]]
        raws.append(np.stack([mirror_array(channel.astype(np.float32), grow) for channel in unit]))
        padded_targets.append(mirror_array(target.astype(np.uint8), grow))
        padded_weights.append(mirror_array(weight.astype(np.float32), grow))
        areas.append(int(target.size))
        foreground.append(foreground_points(np.where(weight > 0, target, 0), margin, rng))
    return SliceSet(raws, padded_targets, padded_weights, margin, scale, areas, foreground)


def patch_corner(slices: SliceSet, rng: np.random.Generator, *, tile: int,
                 foreground_fraction: float = 0.0) -> tuple[int, int, int]:
    """(image, y, x) of a training patch's top-left corner in padded coordinates: with probability
    `foreground_fraction` the patch is centred on a foreground pixel (`SliceSet.draw_foreground`,
    clipped to the padded image), otherwise drawn uniformly."""
    if foreground_fraction > 0 and rng.random() < foreground_fraction:
        drawn = slices.draw_foreground(rng)
        if drawn is not None:
            index, cy, cx = drawn
            height, width = slices.raw[index].shape[-2:]
            y = min(max(cy - tile // 2, 0), height - tile)
            x = min(max(cx - tile // 2, 0), width - tile)
            return index, y, x
    index = slices.draw(rng)
    raw = slices.raw[index]
    return index, int(rng.integers(raw.shape[-2] - tile + 1)), int(rng.integers(raw.shape[-1] - tile + 1))


def sample_patch(
    slices: SliceSet, rng: np.random.Generator, *, tile: int, out_tile: int, augment: Any,
    foreground_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented (input tile (C, tile, tile), target, weight) triple; targets are the centre out_tile crop.
    A share `foreground_fraction` of patches is centred on foreground (see `patch_corner`)."""
    index, y, x = patch_corner(slices, rng, tile=tile, foreground_fraction=foreground_fraction)
    raw, target, weight = slices.raw[index], slices.target[index], slices.weight[index]
    window = (slice(y, y + tile), slice(x, x + tile))
    image, masks = raw[(slice(None), *window)], [target[window], weight[window]]
    if augment is not None:
        # albumentations takes (H, W) or channels-last (H, W, C) images
        hwc = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        result = augment(image=np.ascontiguousarray(hwc), masks=[np.ascontiguousarray(m) for m in masks])
        augmented = np.asarray(result["image"], np.float32)
        image = augmented[None] if augmented.ndim == 2 else np.moveaxis(augmented, -1, 0)
        masks = result["masks"]
    m = (tile - out_tile) // 2
    inner = (slice(m, m + out_tile), slice(m, m + out_tile))
    return (
        np.ascontiguousarray(image, np.float32),
        np.asarray(masks[0][inner], np.int64),
        np.asarray(masks[1][inner], np.float32),
    )


def model_input(image: np.ndarray, normalization: Normalization) -> np.ndarray:
    """A whole image as the model sees it: normalised globally, or by its own percentiles.

    Parameters
    ----------
    image : (C, H, W) ndarray of uint8, uint16 or float32
        The image in its stored dtype.
    normalization : Normalization
        The model's normalisation (`Normalization.for_image` gives an image its own percentiles).

    Returns
    -------
    (C, H, W) ndarray of float32
        The normalised image.
    """
    image = image if image.shape[0] > 1 else image[0]
    normalized = normalization.for_image(image).apply(image)
    return normalized if normalized.ndim == 3 else normalized[None]


def patch_stream(
    slices: SliceSet, *, tile: int, out_tile: int, augment_settings: dict[str, Any],
    normalization: Normalization, seed: tuple[int, ...], augment_later: bool = False,
    foreground_fraction: float = 0.0,
) -> Any:
    """An endless torch IterableDataset of (image (C, tile, tile), target, weight) training patches.

    Each DataLoader worker draws from its own random stream seeded by (seed..., worker id), so
    workers never repeat each other and a resumed run (seeded with its start epoch) never
    replays the patches of the first run. With `augment_later` the patches are left as they are, in
    unit space, with whole-tile targets and weights: augmentation, centre crop and normalisation
    then happen on the training device (`augment.on_device`). A share `foreground_fraction` of the
    patches is centred on foreground pixels (`data.foreground_fraction`).
    """
    import torch

    class _PatchStream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[override]
            worker = torch.utils.data.get_worker_info()
            worker_id = worker.id if worker is not None else 0
            rng = np.random.default_rng([*seed, worker_id])
            augment = None if augment_later else build_augmentation(augment_settings, seed=int(rng.integers(2**31)))
            scale = slices.scale
            while True:
                if augment_later:
                    image, target, weight = sample_patch(slices, rng, tile=tile, out_tile=tile, augment=None,
                                                         foreground_fraction=foreground_fraction)
                else:
                    image, target, weight = sample_patch(slices, rng, tile=tile, out_tile=out_tile, augment=augment,
                                                         foreground_fraction=foreground_fraction)
                    image = normalize_unit(image, normalization, scale).astype(np.float32)
                yield torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(weight)

    return _PatchStream()
