"""Neuron instances from a membrane probability map: seeded watershed, 2D per slice.

Connected components of a thresholded map merge two cells through a single-pixel gap in their
membrane. A watershed does not: seeds are placed only where the interior is at least
`seed_distance` px away from predicted membrane (scipy's Euclidean distance transform), and
regions grown from them over the probability (scikit-image's watershed) meet on the membrane
ridge, gap or not. Small seeds are dropped and small segments merged into their neighbours.

Each slice's labels are 1..n; a stack's are made unique across the stack by shifting each slice's
ids past those of the slices before it (`unique_ids`, `id_offsets`), as uint32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from segkit.errors import InputError, SegkitError


class _Settings:
    """to_dict / from_dict for the frozen settings dataclasses below (unknown keys are ignored)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class WatershedParams(_Settings):
    """threshold: probability below which a pixel is interior (seeds come from the interior);
    seed_distance: px a seed pixel keeps from predicted membrane; min_seed_size: px of the
    smallest seed; min_size: segments smaller than this (px) are merged into neighbours."""

    threshold: float = 0.5
    seed_distance: float = 2.0
    min_seed_size: int = 10
    min_size: int = 50

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise SegkitError(f"watershed threshold {self.threshold} must be between 0 and 1")
        if self.seed_distance < 0 or self.min_seed_size < 1 or self.min_size < 0:
            raise SegkitError(f"watershed parameters must be >= 0 (seed size >= 1): {self}")


def watershed_slice(probability: np.ndarray, params: WatershedParams = WatershedParams()) -> np.ndarray:
    """uint32 labels 1..n of a 2D membrane probability map; every pixel gets a segment."""
    from scipy import ndimage
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    if probability.ndim != 2:
        raise InputError(f"expected a 2D probability plane, got shape {probability.shape}")
    interior = probability < params.threshold
    distance = ndimage.distance_transform_edt(interior)
    seeds = label(distance > params.seed_distance, connectivity=1)
    too_small = np.bincount(seeds.ravel()) < params.min_seed_size
    too_small[0] = False
    seeds[too_small[seeds]] = 0
    if not seeds.any():  # no interior at all: one segment, so scores stay defined
        return np.ones(probability.shape, np.uint32)
    labels = watershed(probability, markers=seeds)
    if params.min_size > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < params.min_size
        small[0] = False
        if small.any() and not small[1:].all():
            labels[small[labels]] = 0
            labels = watershed(probability, markers=labels)  # the large segments flood the freed pixels
    return relabel_sequential(labels)[0].astype(np.uint32)


@dataclass(frozen=True)
class ObjectParams(_Settings):
    """Seeded watershed for objects on a background (nuclei) from background / interior / boundary
    probabilities. seed_threshold: interior probability a seed pixel needs; seed_distance: px a seed
    pixel keeps from pixels below it; foreground_threshold: background probability below which a pixel
    belongs to an object; min_seed_size / min_size: px of the smallest seed / object (smaller objects
    are dropped, or merged into a touching neighbour)."""

    seed_threshold: float = 0.5
    seed_distance: float = 1.0
    foreground_threshold: float = 0.5
    min_seed_size: int = 4
    min_size: int = 10

    def __post_init__(self) -> None:
        for name in ("seed_threshold", "foreground_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise SegkitError(f"watershed {name} {getattr(self, name)} must be between 0 and 1")
        if self.seed_distance < 0 or self.min_seed_size < 1 or self.min_size < 0:
            raise SegkitError(f"watershed parameters must be >= 0 (seed size >= 1): {self}")

    def resized(self, factor: float) -> "ObjectParams":
        """The same settings for images `factor` times the size they were chosen at (a model trained on
        resized images, its probabilities resized back): distances scale by `factor`, sizes by its square."""
        if abs(factor - 1.0) < 1e-3:
            return self
        area = factor * factor
        return dataclasses.replace(self, seed_distance=self.seed_distance * factor,
                                   min_seed_size=max(1, round(self.min_seed_size * area)),
                                   min_size=round(self.min_size * area))


def object_watershed(probabilities: np.ndarray, params: ObjectParams = ObjectParams()) -> np.ndarray:
    """uint32 object labels (0 = background) of a (3, H, W) background / interior / boundary probability
    map: seeds are the cores of confident interior, grown by a watershed over the interior
    probability (downhill from each core) within the foreground, so touching objects part along the
    predicted boundary between them."""
    from scipy import ndimage
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    if probabilities.ndim != 3 or probabilities.shape[0] != 3:
        raise InputError(f"expected (3, H, W) background/interior/boundary probabilities, got {probabilities.shape}")
    interior = probabilities[1]
    foreground = probabilities[0] < params.foreground_threshold
    core = interior >= params.seed_threshold
    if params.seed_distance > 0:
        core = ndimage.distance_transform_edt(core) > params.seed_distance
    seeds = label(core & foreground, connectivity=1)
    too_small = np.bincount(seeds.ravel()) < params.min_seed_size
    too_small[0] = False
    seeds[too_small[seeds]] = 0
    if not seeds.any():
        return np.zeros(interior.shape, np.uint32)
    labels = watershed(-interior, markers=seeds, mask=foreground)
    if params.min_size > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < params.min_size
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.uint32)


#: The largest id a uint32 label stack holds.
MAX_ID = int(np.iinfo(np.uint32).max)


def _check_ids(total: int, where: str) -> None:
    if total > MAX_ID:
        raise SegkitError(f"{where}: the stack holds more than {MAX_ID} objects, too many for uint32 ids unique "
                          "across the stack; predict it in parts (fewer slices per stack)")


def shift_ids(labels: np.ndarray, offset: int) -> np.ndarray:
    """uint32 `labels` with every id > 0 raised by `offset` (0, the background, stays 0)."""
    out = np.asarray(labels).astype(np.uint32, copy=True)
    if offset:
        _check_ids(offset + (int(out.max()) if out.size else 0), "shifting ids")
        out[out > 0] += np.uint32(offset)
    return out


def id_offsets(counts: Iterable[int]) -> list[int]:
    """The offset of each slice's ids, given how many ids (its largest) each slice uses: the cumulative
    sum of the counts of the slices before it, so ids are unique across the stack. Refused when the
    total does not fit uint32."""
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += int(count)
    _check_ids(total, "labels")
    return offsets


def unique_ids(planes: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The label planes of a stack (ids 1..n per plane, 0 = background), streaming, with ids unique
    across the stack: each plane's ids shifted past the largest id of the planes before it (uint32)."""
    offset = 0
    for plane in planes:
        count = int(plane.max()) if plane.size else 0
        _check_ids(offset + count, "labels")
        yield shift_ids(plane, offset)
        offset += count
