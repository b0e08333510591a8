"""Segmentation metrics for EM membrane maps: pixel error, adapted Rand error, VI, Dice, IoU.

Convention: a membrane probability map is thresholded; the connected components of the
non-membrane pixels are the predicted cells. Ground truth cells are the components of the
label's interior. As in ISBI 2012 / SNEMI3D, ground-truth membrane pixels are ignored by the
Rand and VI scores (foreground-restricted) and predicted membrane pixels count as singletons.
The scores themselves come from skimage.metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from segkit.errors import InputError


@dataclass(frozen=True)
class SliceScores:
    """Scores of one 2D slice (lower error is better; dice/iou of the membrane class)."""

    pixel_error: float
    adapted_rand_error: float
    rand_precision: float
    rand_recall: float
    vi_split: float
    vi_merge: float
    dice: float
    iou: float

    @property
    def vi(self) -> float:
        return self.vi_split + self.vi_merge

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "vi": self.vi}


def label_cells(interior: np.ndarray) -> np.ndarray:
    """Label 4-connected components of a boolean interior mask (0 = membrane/background)."""
    from skimage.measure import label

    return label(interior, connectivity=1).astype(np.int64)


def _singleton_background(segmentation: np.ndarray) -> np.ndarray:
    # SNEMI3D/ISBI convention: unassigned (membrane) pixels of the prediction are singletons,
    # so a predicted membrane neither merges nor splits cells.
    out = segmentation.astype(np.int64, copy=True)
    background = out == 0
    out[background] = out.max() + 1 + np.arange(int(background.sum()))
    return out


def segmentation_scores(true_cells: np.ndarray, pred_cells: np.ndarray) -> tuple[float, float, float, float, float]:
    """(adapted Rand error, precision, recall, VI split, VI merge) of two 2D label images."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    if true_cells.shape != pred_cells.shape:
        raise InputError(f"label images differ in shape: {true_cells.shape} vs {pred_cells.shape}")
    pred = _singleton_background(pred_cells)
    if not (true_cells > 0).any():
        return 0.0, 1.0, 1.0, 0.0, 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        error, precision, recall = adapted_rand_error(true_cells, pred, ignore_labels=(0,))
    if not np.isfinite(error):
        # The prediction has no pixel pairs in one segment (all membrane): the worst score, not NaN.
        error, precision, recall = 1.0, np.nan_to_num(precision), np.nan_to_num(recall)
    # skimage returns (H(prediction|truth), H(truth|prediction)): false splits, false merges.
    split, merge = variation_of_information(true_cells, pred, ignore_labels=(0,))
    return float(error), float(precision), float(recall), max(0.0, float(split)), max(0.0, float(merge))


def score_slice(membrane_probability: np.ndarray, true_membrane: np.ndarray, *, threshold: float = 0.5) -> SliceScores:
    """Score one slice: probability in [0, 1] vs boolean ground-truth membrane mask."""
    return score_thresholds(membrane_probability, true_membrane, (threshold,))[threshold]


def score_thresholds(
    membrane_probability: np.ndarray, true_membrane: np.ndarray, thresholds: tuple[float, ...] | list[float]
) -> dict[float, SliceScores]:
    """Scores of one slice at each threshold; the ground-truth cells are labelled once."""
    if membrane_probability.shape != true_membrane.shape:
        raise InputError(
            f"prediction shape {membrane_probability.shape} differs from label shape {true_membrane.shape}"
        )
    true_membrane = true_membrane.astype(bool)
    true_cells = label_cells(~true_membrane)
    scores = {}
    for threshold in thresholds:
        pred_membrane = membrane_probability >= threshold
        pixel_error = float(np.mean(pred_membrane != true_membrane))
        inter = float(np.logical_and(pred_membrane, true_membrane).sum())
        total = float(pred_membrane.sum() + true_membrane.sum())
        union = float(np.logical_or(pred_membrane, true_membrane).sum())
        dice = 2 * inter / total if total else 1.0
        iou = inter / union if union else 1.0
        are, precision, recall, split, merge = segmentation_scores(true_cells, label_cells(~pred_membrane))
        scores[threshold] = SliceScores(pixel_error, are, precision, recall, split, merge, dice, iou)
    return scores


def mean_scores(scores: list[SliceScores]) -> dict[str, float]:
    """Per-slice scores averaged over slices (ISBI 2012 scores 2D sections)."""
    return mean_rows([s.to_dict() for s in scores])


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-slice score dictionaries averaged key by key."""
    if not rows:
        raise InputError("no slices to score")
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def membrane_from_labels(labels: np.ndarray) -> np.ndarray:
    """Boolean membrane mask from an ISBI-style label image (0 = membrane, >0 = interior)."""
    return labels == 0


def to_probability(plane: np.ndarray) -> np.ndarray:
    """Stored prediction plane (uint8 0-255, float in [0, 1], or 0/255 mask) as float probability."""
    if plane.dtype == np.uint8:
        return plane.astype(np.float32) / 255.0
    if plane.dtype.kind == "f":
        values = plane.astype(np.float32)
        if values.size and (values.min() < -1e-3 or values.max() > 1.0 + 1e-3):
            raise InputError(
                f"float prediction values span [{values.min():.3g}, {values.max():.3g}], not [0, 1]; "
                "pass a probability map"
            )
        return values
    if plane.dtype == np.uint16:
        return plane.astype(np.float32) / 65535.0
    raise InputError(f"prediction dtype {plane.dtype} is not a probability map; use uint8, uint16 or float")
