"""Segmentation metrics: membrane maps (pixel error, adapted Rand error, VI, membrane Dice and IoU),
semantic class maps (Dice and IoU per class) and instance label images (matched objects: precision,
recall, F1 and average precision per IoU threshold).

Membrane convention: a membrane probability map is thresholded; the connected components of the
non-membrane pixels are the predicted cells. Ground truth cells are the components of the
label's interior. As in ISBI 2012 / SNEMI3D, ground-truth membrane pixels are ignored by the
Rand and VI scores (foreground-restricted) and predicted membrane pixels count as singletons.
The Rand and VI scores themselves come from skimage.metrics; class and instance scores are counted
here, as the 2018 Data Science Bowl and StarDist count them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from segkit.errors import InputError


@dataclass(frozen=True)
class SliceScores:
    """Scores of one 2D slice of a membrane map (lower error is better; dice/iou of the membrane class).

    Attributes
    ----------
    pixel_error : float
        Share of pixels whose thresholded membrane label differs from the ground truth.
    adapted_rand_error : float
        1 - the foreground-restricted Rand F-score (ISBI 2012 / SNEMI3D).
    rand_precision, rand_recall : float
        The Rand precision and recall behind that error.
    vi_split, vi_merge : float
        Variation of information: false splits and false merges, in nats.
    dice, iou : float
        Dice and IoU of the membrane class.
    """

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
        """Variation of information: split + merge."""
        return self.vi_split + self.vi_merge

    def to_dict(self) -> dict[str, float]:
        """The scores as a dictionary, `vi` included.

        Returns
        -------
        dict of str to float
            One entry per attribute, plus `vi`.
        """
        return {**asdict(self), "vi": self.vi}


def label_cells(interior: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a boolean interior mask (0 = membrane/background).

    Parameters
    ----------
    interior : (H, W) ndarray of bool
        True inside cells.

    Returns
    -------
    (H, W) ndarray of int64
        0 on membrane/background, 1..n for the n components.
    """
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
    """Adapted Rand error and variation of information of two 2D label images.

    Label 0 of the truth is ignored (foreground-restricted); label 0 of the prediction counts as
    singletons, so a predicted membrane neither merges nor splits cells.

    Parameters
    ----------
    true_cells : (H, W) ndarray of int
        Ground-truth cells, 0 = membrane.
    pred_cells : (H, W) ndarray of int
        Predicted cells, 0 = membrane.

    Returns
    -------
    tuple of float
        (adapted Rand error, Rand precision, Rand recall, VI split, VI merge). A truth without cells
        scores (0, 1, 1, 0, 0); a prediction that is all membrane gets the error 1.

    Raises
    ------
    InputError
        When the two images differ in shape.
    """
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
    """Score one slice of a membrane probability map at one threshold.

    Parameters
    ----------
    membrane_probability : (H, W) ndarray of float
        Membrane probability in [0, 1].
    true_membrane : (H, W) ndarray of bool
        Ground-truth membrane mask.
    threshold : float
        Pixels with probability >= threshold are membrane.

    Returns
    -------
    SliceScores

    Raises
    ------
    InputError
        When the two images differ in shape.
    """
    return score_thresholds(membrane_probability, true_membrane, (threshold,))[threshold]


def score_thresholds(
    membrane_probability: np.ndarray, true_membrane: np.ndarray, thresholds: tuple[float, ...] | list[float]
) -> dict[float, SliceScores]:
    """Scores of one slice at each threshold; the ground-truth cells are labelled once.

    Parameters
    ----------
    membrane_probability : (H, W) ndarray of float
        Membrane probability in [0, 1].
    true_membrane : (H, W) ndarray of bool
        Ground-truth membrane mask.
    thresholds : sequence of float
        Thresholds to score at (pixels with probability >= threshold are membrane).

    Returns
    -------
    dict of float to SliceScores
        The scores at each threshold.

    Raises
    ------
    InputError
        When the two images differ in shape.
    """
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
    """Per-slice scores averaged over slices (ISBI 2012 scores 2D sections).

    Parameters
    ----------
    scores : list of SliceScores

    Returns
    -------
    dict of str to float
        The mean of every score, `vi` included.

    Raises
    ------
    InputError
        When `scores` is empty.
    """
    return mean_rows([s.to_dict() for s in scores])


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-slice score dictionaries averaged key by key.

    Parameters
    ----------
    rows : list of dict of str to float
        One dictionary per slice, all with the keys of the first.

    Returns
    -------
    dict of str to float

    Raises
    ------
    InputError
        When `rows` is empty.
    """
    if not rows:
        raise InputError("no slices to score")
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def membrane_from_labels(labels: np.ndarray) -> np.ndarray:
    """Boolean membrane mask from an ISBI-style label image (0 = membrane, > 0 = interior).

    Parameters
    ----------
    labels : (H, W) ndarray of int
        ISBI 2012 labels (0 = membrane, > 0 = cell; cell ids or a 0/255 mask).

    Returns
    -------
    (H, W) ndarray of bool
        True on membrane.
    """
    return labels == 0


def to_probability(plane: np.ndarray) -> np.ndarray:
    """A stored prediction plane as float probability.

    Parameters
    ----------
    plane : (H, W) ndarray of uint8, uint16 or float
        uint8 0-255 (or a 0/255 mask), uint16 0-65535, or float in [0, 1].

    Returns
    -------
    (H, W) ndarray of float32
        Probability in [0, 1].

    Raises
    ------
    InputError
        When float values leave [0, 1] or the dtype is not a probability map's.
    """
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


# -- semantic classes -----------------------------------------------------------------------------


def _value_list(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}, ... ({len(values)} values)]" if len(values) > limit else f"[{shown}]"


def class_scores(pred: np.ndarray, truth: np.ndarray, classes: int, *, ignore: int | None = None) -> dict[str, float]:
    """Per-class Dice and IoU of two 2D class maps (values 0..classes-1), from one confusion matrix.

    Pixels where truth == `ignore` are left out. A class absent from both truth and prediction is NaN (it
    is neither right nor wrong here) and left out of the means, so images can be averaged with
    `mean_class_rows`.

    Parameters
    ----------
    pred : (H, W) ndarray of int
        Predicted class map.
    truth : (H, W) ndarray of int
        Class labels.
    classes : int
        Number of classes K (values 0..K-1).
    ignore : int, optional
        Truth value of unlabelled pixels, left out.

    Returns
    -------
    dict of str to float
        `dice_<k>`, `iou_<k>` per class and `dice_mean`, `iou_mean` over the classes present in truth or
        prediction.

    Raises
    ------
    InputError
        When the maps differ in shape, are not integer, `classes` < 1, or a value lies outside the classes.
    """
    if pred.shape != truth.shape:
        raise InputError(f"class maps differ in shape: prediction {pred.shape} vs truth {truth.shape}")
    if classes < 1:
        raise InputError(f"classes={classes!r} must be at least 1")
    for name, values in (("prediction", pred), ("truth", truth)):
        if values.dtype.kind not in "iub":
            raise InputError(f"{name} holds {values.dtype} values, not integer class indices; pass class maps")
    keep = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    truth_kept, pred_kept = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    bad = np.unique(truth_kept[(truth_kept < 0) | (truth_kept >= classes)])
    if bad.size:
        raise InputError(f"truth holds values {_value_list(bad)} outside the classes 0..{classes - 1}; raise "
                         f"classes to cover them, or pass ignore=VALUE for unlabelled pixels")
    bad = np.unique(pred_kept[(pred_kept < 0) | (pred_kept >= classes)])
    if bad.size:
        raise InputError(f"prediction holds values {_value_list(bad)} outside the classes 0..{classes - 1}; "
                         f"it is not a class map of {classes} classes")
    confusion = np.bincount(truth_kept * classes + pred_kept, minlength=classes * classes).reshape(classes, classes)
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(present, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(present, tp / (tp + fp + fn), np.nan)
    scores = {f"dice_{k}": float(dice[k]) for k in range(classes)}
    scores |= {f"iou_{k}": float(iou[k]) for k in range(classes)}
    scores["dice_mean"] = float(dice[present].mean()) if present.any() else float("nan")
    scores["iou_mean"] = float(iou[present].mean()) if present.any() else float("nan")
    return scores


def mean_class_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-image class scores averaged key by key, skipping NaN (a class absent from an image).

    Parameters
    ----------
    rows : list of dict of str to float
        One `class_scores` dictionary per image.

    Returns
    -------
    dict of str to float
        The means; a key that is NaN in every image stays NaN.

    Raises
    ------
    InputError
        When `rows` is empty.
    """
    if not rows:
        raise InputError("no slices to score")
    table = np.array([[row[key] for key in rows[0]] for row in rows], dtype=np.float64)
    seen = ~np.isnan(table)
    counts = seen.sum(axis=0)
    sums = np.where(seen, table, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    return {key: float(value) for key, value in zip(rows[0], means)}


# -- matched instances (nuclei) --------------------------------------------------------------------

#: IoU thresholds of the 2018 Data Science Bowl and StarDist's evaluation: 0.5, 0.55, ..., 0.95.
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _check_instance_image(values: np.ndarray, name: str) -> None:
    if values.dtype.kind not in "iub":
        raise InputError(f"{name} holds {values.dtype} values, not instance labels (0 = background, one "
                         "integer id per object)")
    if values.dtype.kind == "i" and values.size and values.min() < 0:
        raise InputError(f"{name} holds negative values; instance labels are 0 (background) or a positive id")


def instance_scores(truth: np.ndarray, pred: np.ndarray,
                    thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> dict[str, float]:
    """Object matching scores of two 2D instance label images (0 = background, any other value one object).

    As in the 2018 Data Science Bowl and StarDist: a true and a predicted object match when their IoU is
    >= the threshold (`>=`, as StarDist), one to one. Per threshold t: `precision@t` = tp/(tp+fp),
    `recall@t` = tp/(tp+fn), `f1@t` = 2tp/(2tp+fp+fn), `ap@t` = tp/(tp+fp+fn) (the DSB's "average
    precision"); `map` and `f1_mean` average them over the thresholds; `n_true`, `n_pred` count objects.
    An image without objects in truth and prediction scores 1.0 everywhere (nothing to find, nothing
    wrong); a precision or recall whose denominator is 0 while the other image has objects is 0.0.

    Parameters
    ----------
    truth : (H, W) ndarray of int
        True objects, 0 = background.
    pred : (H, W) ndarray of int
        Predicted objects, 0 = background.
    thresholds : tuple of float
        IoU thresholds in [0.5, 1]; default 0.5, 0.55, ..., 0.95.

    Returns
    -------
    dict of str to float
        `precision@t`, `recall@t`, `f1@t`, `ap@t` per threshold (t written as `0.5`, `0.55`, ...), `map`,
        `f1_mean`, `n_true`, `n_pred`.

    Raises
    ------
    InputError
        When the images differ in shape, are not integer labels, hold negative ids, or a threshold lies
        outside [0.5, 1].
    """
    if truth.shape != pred.shape:
        raise InputError(f"label images differ in shape: truth {truth.shape} vs prediction {pred.shape}")
    _check_instance_image(truth, "truth")
    _check_instance_image(pred, "prediction")
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or not all(0.5 <= t <= 1.0 for t in thresholds):
        raise InputError(f"IoU thresholds {thresholds} must lie in [0.5, 1]: below 0.5 one object can "
                         "match several and the counts would need an assignment solver")
    # Pixels that are background in both change no object's area or overlap: leave them out (on sparse
    # objects this makes the tables below many times faster). Then the contingency table from the paired
    # ids (compact indices, so any id range fits in int64).
    keep = (truth != 0) | (pred != 0)
    truth, pred = truth[keep], pred[keep]
    true_ids, true_index = np.unique(truth.ravel(), return_inverse=True)
    pred_ids, pred_index = np.unique(pred.ravel(), return_inverse=True)
    true_area, pred_area = np.bincount(true_index), np.bincount(pred_index)
    both = (truth.ravel() != 0) & (pred.ravel() != 0)
    pairs, intersection = np.unique(true_index[both].astype(np.int64) * len(pred_ids) + pred_index[both],
                                    return_counts=True)
    true_of_pair, pred_of_pair = np.divmod(pairs, len(pred_ids))
    iou = intersection / (true_area[true_of_pair] + pred_area[pred_of_pair] - intersection)
    n_true, n_pred = int(np.count_nonzero(true_ids)), int(np.count_nonzero(pred_ids))
    scores: dict[str, float] = {}
    for t in thresholds:
        hit = iou >= t
        # For t >= 0.5 the pairs with IoU >= t form a forest (an object matches at most one other, or
        # two that each cover exactly half of it at IoU 0.5), so the largest one-to-one matching has
        # (objects in it) - (pairs) members: one per tree.
        tp = len(np.unique(true_of_pair[hit])) + len(np.unique(pred_of_pair[hit])) - int(hit.sum())
        fp, fn = n_pred - tp, n_true - tp
        if n_true == n_pred == 0:
            precision = recall = f1 = ap = 1.0
        else:
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_true if n_true else 0.0
            f1 = 2 * tp / (2 * tp + fp + fn)
            ap = tp / (tp + fp + fn)
        key = f"{t:g}"
        scores |= {f"precision@{key}": precision, f"recall@{key}": recall, f"f1@{key}": f1, f"ap@{key}": ap}
    scores["map"] = float(np.mean([scores[f"ap@{t:g}"] for t in thresholds]))
    scores["f1_mean"] = float(np.mean([scores[f"f1@{t:g}"] for t in thresholds]))
    scores["n_true"], scores["n_pred"] = float(n_true), float(n_pred)
    return scores


def mean_instance_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-image instance scores averaged over images key by key (the DSB / StarDist per-image mean).

    Parameters
    ----------
    rows : list of dict of str to float
        One `instance_scores` dictionary per image.

    Returns
    -------
    dict of str to float
        The means; `n_true`, `n_pred` become mean object counts per image.

    Raises
    ------
    InputError
        When `rows` is empty.
    """
    return mean_rows(rows)
