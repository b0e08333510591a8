"""Label images to training targets and loss weights, one rule per label kind.

- membrane (ISBI 2012): 0 = membrane, > 0 = cell; classes interior / membrane, the U-Net border
  weight on membrane pixels between cells.
- semantic: classes 0..K-1 as given; an optional ignore value gets weight 0.
- instances (nuclei): object ids, 0 = background; classes background / interior / boundary, the
  boundary a rim of `boundary_width` px inside each object, so touching objects are separated by
  a predicted boundary; the U-Net border weight on background and boundary pixels between objects.
Class balance weights n / (K n_c) make every class weigh the same in total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segkit.errors import InputError

CLASS_NAMES = {"membrane": ["interior", "membrane"], "instances": ["background", "interior", "boundary"]}


@dataclass(frozen=True)
class LabelRule:
    """How a recipe's labels become targets: kind, class count, ignore value, boundary width."""

    kind: str = "membrane"
    classes: int = 2
    ignore: int | None = None
    boundary_width: int = 2

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "LabelRule":
        kind = data.get("labels_kind", "membrane")
        classes = {"membrane": 2, "instances": 3}.get(kind) or int(data["classes"])
        return cls(kind, classes, data.get("ignore_index"), int(data.get("boundary_width", 2)))

    def class_names(self, names: list[str] | None = None) -> list[str]:
        return list(names) if names else CLASS_NAMES.get(self.kind) or [f"class {k}" for k in range(self.classes)]

    def target(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class of every pixel (ignored pixels: class 0, weight 0)."""
        if self.kind == "membrane":
            return (labels == 0).astype(np.uint8)
        if self.kind == "semantic":
            target = labels.astype(np.int64)
            if self.ignore is not None:
                target = np.where(labels == self.ignore, 0, target)
            return target.astype(np.uint8)
        return instance_classes(labels, self.boundary_width)

    def valid(self, labels: np.ndarray) -> np.ndarray | None:
        """Pixels that count in the loss and the scores (None: all)."""
        if self.kind == "semantic" and self.ignore is not None:
            return labels != self.ignore
        return None


def check_labels(labels: np.ndarray, rule: LabelRule, source: str) -> None:
    """Refuse label values the rule cannot train on, naming them and the fix."""
    if labels.dtype.kind not in "iu":
        raise InputError(f"{source}: labels are {labels.dtype}; save them as integers (uint8/uint16/uint32)")
    if rule.kind == "semantic":
        values = np.unique(labels)
        bad = [int(v) for v in values if (v < 0 or v >= rule.classes) and v != rule.ignore]
        if bad:
            shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise InputError(f"{source}: label values {shown} are outside the classes 0-{rule.classes - 1} "
                             f"(data.classes={rule.classes}); fix the labels, raise data.classes, or set "
                             "data.ignore_index for an 'unlabelled' value")
    elif rule.kind == "instances" and labels.dtype.kind == "i" and labels.min() < 0:
        raise InputError(f"{source}: instance labels hold negative ids; use 0 for background and 1..N for objects")


def check_classes_present(targets: list[np.ndarray], rule: LabelRule, split: str, what: str) -> None:
    """Refuse a split whose targets hold one class only: nothing to learn or to score. `what` names the
    split's labels in words (e.g. "slices 0-2 (data.train_slices) of labels.tif")."""
    present = set()
    for target in targets:
        present.update(np.unique(target).tolist())
        if len(present) > 1:
            return
    only = rule.class_names()[present.pop()] if present else "nothing"
    hint = {"membrane": "labels mark membrane 0 and cells > 0 (ISBI 2012)",
            "semantic": "labels hold classes 0..K-1",
            "instances": "labels hold 0 for background and one id per object"}[rule.kind]
    raise InputError(f"data.labels: {what} hold only {only} pixels, so there is nothing to learn or score; {hint} "
                     f"(data.labels_kind={rule.kind}): check data.labels and data.{split}_files / data.{split}_slices")


def instance_classes(labels: np.ndarray, width: int) -> np.ndarray:
    """Background 0 / interior 1 / boundary 2 of an instance label image: an object's pixels within
    `width` px of another object or of the background are boundary."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    objects = labels > 0
    rim = find_boundaries(labels, connectivity=1, mode="inner") & objects
    if width > 1:
        rim = ndimage.binary_dilation(rim, iterations=width - 1) & objects
    target = objects.astype(np.uint8)
    target[rim] = 2
    return target


def class_weights(targets: list[np.ndarray], classes: int, valid: list[np.ndarray | None] | None = None) -> list[float]:
    """n / (K n_c) per class over all training targets (1 for classes that never occur)."""
    counts = np.zeros(classes, np.int64)
    for index, target in enumerate(targets):
        mask = valid[index] if valid else None
        values = target[mask] if mask is not None else target.ravel()
        counts += np.bincount(values, minlength=classes)[:classes]
    total = counts.sum()
    present = int((counts > 0).sum()) or 1
    return [float(total / (present * c)) if c else 1.0 for c in counts]


def border_term(cells: np.ndarray, where: np.ndarray, *, w0: float, sigma: float) -> np.ndarray:
    """The U-Net paper's w0 exp(-(d1 + d2)^2 / 2 sigma^2) on `where` pixels, 0 elsewhere; d1, d2 the
    distances to the nearest and second-nearest object of `cells` (ids > 0).

    Distances are computed per object inside its bounding box grown by the radius beyond which the
    term is negligible, so an image with hundreds of objects stays fast."""
    from scipy import ndimage

    if w0 <= 0 or not cells.any():
        return np.zeros(cells.shape, np.float32)
    reach = float(np.ceil(sigma * np.sqrt(2.0 * np.log(max(w0, 1.0) * 1e3))))
    d1 = np.full(cells.shape, reach, np.float32)
    d2 = np.full(cells.shape, reach, np.float32)
    pad = int(reach) + 1
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        ys = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, cells.shape[0]))
        xs = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, cells.shape[1]))
        distance = ndimage.distance_transform_edt(cells[ys, xs] != index).astype(np.float32)
        near1, near2 = d1[ys, xs], d2[ys, xs]
        d2[ys, xs] = np.minimum(near2, np.maximum(near1, distance))
        d1[ys, xs] = np.minimum(near1, distance)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    return np.where(where, border, 0.0).astype(np.float32)


def weight_map(labels: np.ndarray, target: np.ndarray, rule: LabelRule, weights: list[float], *, w0: float,
               sigma: float) -> np.ndarray:
    """The loss weight of every pixel: its class's balance weight plus the border term (membrane and
    instances), 0 on ignored pixels."""
    from scipy import ndimage

    weight = np.asarray(weights, np.float32)[target]
    if rule.kind == "membrane":
        cells = ndimage.label(target == 0)[0]
        weight += border_term(cells, target == 1, w0=w0, sigma=sigma)
    elif rule.kind == "instances":
        cells = _sequential(labels)
        weight += border_term(cells, target != 1, w0=w0, sigma=sigma)
    valid = rule.valid(labels)
    if valid is not None:
        weight[~valid] = 0.0
    return weight


def _sequential(labels: np.ndarray) -> np.ndarray:
    """Object ids renumbered 1..N (find_objects needs them dense)."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels.astype(np.int64))[0]
