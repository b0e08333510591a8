"""Evaluate a stored prediction stack against a label stack, slice by slice (streaming)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from segkit.config import short
from segkit.errors import InputError, OptionTypeError, OptionValueError
from segkit.inference.segment import check_probability_stack
from segkit.instances import WatershedParams, watershed_slice
from segkit.io.tiff import TiffStack, open_stack
from segkit.metrics import (
    SliceScores,
    class_scores,
    instance_scores,
    label_cells,
    mean_class_rows,
    mean_instance_rows,
    mean_rows,
    mean_scores,
    membrane_from_labels,
    score_thresholds,
    segmentation_scores,
    to_probability,
)
from segkit.words import counted

SWEEP_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def _check_call(prediction: Any, labels: Any, slices: Any, *, flags: Mapping[str, Any] | None = None,
                counts: Mapping[str, tuple[Any, int]] | None = None) -> None:
    """The arguments of a scoring call, before any file is read: one line naming the argument
    (OptionTypeError, a TypeError; OptionValueError, a ValueError). `flags` must be True or False; `counts`
    maps a name to (value, lowest) for whole numbers of at least `lowest`."""
    for name, value in (("prediction", prediction), ("labels", labels)):
        if not isinstance(value, (str, os.PathLike)):
            raise OptionTypeError(f"{name} must be a path (str or Path), not {short(value)} ({type(value).__name__})")
    if slices is not None:
        pair = isinstance(slices, (tuple, list)) and len(slices) == 2 and all(_is_int(v) for v in slices)
        if not pair or not 0 <= slices[0] < slices[1]:
            error = OptionValueError if pair else OptionTypeError
            raise error(f"slices must be None or (start, stop) with 0 <= start < stop, not {short(slices)}")
    for name, value in (flags or {}).items():
        if not isinstance(value, bool):
            raise OptionTypeError(f"{name} must be True or False, not {short(value)} ({type(value).__name__})")
    for name, (value, lowest) in (counts or {}).items():
        if not _is_int(value):
            raise OptionTypeError(f"{name} must be an int, not {short(value)} ({type(value).__name__})")
        if value < lowest:
            raise OptionValueError(f"{name} must be at least {lowest}, not {value}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_threshold(threshold: Any, text: Any = None) -> float:
    """A membrane threshold: a real number strictly between 0 and 1 (not a bool); `text` is what was
    given, when it was parsed from a string (the CLI passes its text)."""
    given = threshold if text is None else text
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise OptionTypeError(f"threshold={given!r} must be a number between 0 and 1, not "
                              f"{type(threshold).__name__}")
    if not 0.0 < threshold < 1.0:
        raise OptionValueError(f"threshold={given!r} must be between 0 and 1 (a membrane probability; "
                               "0 and 1 make every pixel cell or membrane)")
    return float(threshold)


def _check_labels(stack: TiffStack, source: str) -> None:
    if stack.dtype.kind == "f":
        raise InputError(
            f"{source} holds float values, which look like probabilities, not labels; "
            "pass the prediction first and the label stack second"
        )


@contextmanager
def _open_pair(prediction: str, labels: str) -> Iterator[tuple[TiffStack, TiffStack]]:
    """The prediction and the label stack, open; labels holding float values are refused."""
    with open_stack(prediction, labels=True) as pred_stack, open_stack(labels, labels=True) as label_stack:
        _check_labels(label_stack, labels)
        yield pred_stack, label_stack


#: Said when the prediction has more planes than the labels: a prediction holds all label slices or a part.
SWAPPED_HINT = "; were the prediction and the labels swapped? pass the prediction first, the labels second"


def _maybe_swapped(pred: TiffStack, labels: TiffStack) -> bool:
    """Whether the two stacks may be each other: the prediction has more planes than the labels (it holds all
    label slices or some), or the labels' first plane does not look like labels."""
    return len(pred) > len(labels) or (len(labels) > 0 and label_constancy(labels.plane(0)) < LABEL_MIN_EQUAL_NEIGHBOURS)


def _paired_planes(pred: TiffStack, labels: TiffStack, slices: tuple[int, int] | None) -> list[tuple[int, int]]:
    start, stop = slices if slices is not None else (0, len(labels))
    swapped = SWAPPED_HINT if _maybe_swapped(pred, labels) else ""
    if stop > len(labels):
        raise InputError(f"slices=({start}, {stop}) exceeds the {counted(len(labels), 'slice')} of the label stack "
                         f"{labels.source}{swapped}")
    count = stop - start
    if pred.shape[1:] != labels.shape[1:]:
        raise InputError(f"prediction planes {pred.shape[1:]} and label planes {labels.shape[1:]} differ in size")
    if len(pred) == len(labels):
        return [(z, z) for z in range(start, stop)]
    if len(pred) == count:
        return [(i, start + i) for i in range(count)]
    raise InputError(
        f"prediction has {counted(len(pred), 'plane')} but the labels have {len(labels)} (selected {count}); "
        + ("use slices=(START, STOP) to pick the labelled slices that were predicted" if not swapped else swapped[2:])
    )


def membrane_threshold(threshold: float | str | None = None, model: str | Path | None = None) -> tuple[float, str]:
    """The membrane threshold to score at, and where it comes from in words (`segkit evaluate` prints both).

    Parameters
    ----------
    threshold : float, 'auto' or None
        A number in (0, 1) wins; 'auto' or None take the threshold stored in `model` (chosen on
        validation slices by `segkit evaluate --sweep --write-defaults`); None without a model is 0.5.
    model : path or str, optional
        A checkpoint, ONNX file, bioimage.io package or 'demo' (the bundled U-Net) whose stored
        threshold to use; only its record is read.

    Returns
    -------
    (float, str)
        The threshold and its origin: 'threshold=...', 'stored in MODEL', or the default.

    Raises
    ------
    OptionTypeError, OptionValueError
        A threshold that is not a number in (0, 1) or 'auto', or a model that is not a path (a TypeError /
        ValueError naming it), before the model is read.
    SegkitError
        'auto' without a model, or a model file that cannot be read.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise OptionTypeError(f"model must be None or a path (str or Path), not {short(model)} ({type(model).__name__})")
    if isinstance(threshold, str) and threshold != "auto":  # the CLI passes its text
        try:
            number = float(threshold)
        except ValueError:
            raise OptionTypeError(f"threshold={threshold!r} must be a number between 0 and 1, or 'auto' (the "
                                  "model's stored threshold)") from None
        return _check_threshold(number, threshold), "given"
    if threshold is not None and threshold != "auto":
        return _check_threshold(threshold), "given"
    if model is None:
        if threshold == "auto":
            raise InputError("threshold='auto' takes the threshold stored in a model: pass model=MODEL (a "
                             "checkpoint, package or 'demo', the bundled U-Net)")
        return 0.5, "the default; model=MODEL scores at a model's stored threshold"
    from segkit.inference.loading import BUNDLED_MODEL, model_info, names_bundled_model

    name = f"{BUNDLED_MODEL}, the bundled U-Net" if names_bundled_model(model) else str(model)
    stored = model_info(model).inference.threshold
    if stored is None:
        return 0.5, f"the default: {name} stores none"
    return float(stored), f"stored in {name}"


def evaluate_stacks(
    prediction: str, labels: str, /, *, threshold: float = 0.5, sweep: bool = False,
    slices: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Score a membrane probability stack against ISBI-style labels (0 = membrane, > 0 = cell).

    Per slice, then averaged: pixel error, adapted Rand error, VI and membrane Dice/IoU of the
    4-connected components of the thresholded prediction (see `segkit.metrics.score_thresholds`).

    Parameters
    ----------
    prediction : str
        Path of the prediction: a TIFF stack (Z, H, W), a 2D TIFF, a folder or a glob of TIFFs.
    labels : str
        Path of the label stack, in the same forms.
    threshold : float
        Membrane threshold in (0, 1).
    sweep : bool
        Also score every threshold 0.05, 0.10, ..., 0.95 and report the best by adapted Rand error.
    slices : tuple of (int, int), optional
        The label slices [start, stop) to score; the prediction holds either all label slices or just
        these. Default: every slice.

    Returns
    -------
    dict
        `prediction`, `labels`, `threshold`, `slices` (how many), `scores` (the means), `per_slice`; with
        `sweep` also `sweep` (`thresholds`, `adapted_rand_error`, `pixel_error` per threshold, and `best`:
        its `threshold` and `scores`).

    Raises
    ------
    OptionTypeError, OptionValueError
        An argument of the wrong type or out of its range (a TypeError / ValueError naming it), before
        any file is read.
    InputError
        When a file cannot be read, the planes differ in size or count, or the labels look like
        probabilities (or the two were swapped); the message names the fix.
    """
    _check_call(prediction, labels, slices, flags={"sweep": sweep})
    threshold = _check_threshold(threshold)
    thresholds = sorted(set(SWEEP_THRESHOLDS) | {threshold}) if sweep else [threshold]
    per_threshold: dict[float, list[SliceScores]] = {t: [] for t in thresholds}
    with _open_pair(prediction, labels) as (pred_stack, label_stack):
        check_probability_stack(pred_stack.dtype, prediction)
        for pred_index, label_index in _paired_planes(pred_stack, label_stack, slices):
            probability = to_probability(pred_stack.plane(pred_index))
            membrane = _true_membrane(label_stack, label_index, labels)
            for t, scores in score_thresholds(probability, membrane, thresholds).items():
                per_threshold[t].append(scores)
    report: dict[str, Any] = {
        "prediction": prediction, "labels": labels, "threshold": threshold,
        "slices": len(per_threshold[threshold]), "scores": mean_scores(per_threshold[threshold]),
        "per_slice": [s.to_dict() for s in per_threshold[threshold]],
    }
    if sweep:
        table = {t: mean_scores(per_threshold[t]) for t in thresholds}
        best = min(thresholds, key=lambda t: (table[t]["adapted_rand_error"], abs(t - 0.5)))
        report["sweep"] = {
            "thresholds": thresholds,
            "adapted_rand_error": [table[t]["adapted_rand_error"] for t in thresholds],
            "pixel_error": [table[t]["pixel_error"] for t in thresholds],
            "best": {"threshold": best, "scores": table[best]},
        }
    return report


INSTANCE_KEYS = ("adapted_rand_error", "rand_precision", "rand_recall", "vi_split", "vi_merge", "vi")
#: Watershed settings the sweep tries (min_seed_size and min_size stay as given).
WATERSHED_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WATERSHED_SEED_DISTANCES = (0.0, 1.0, 2.0, 4.0, 6.0)


def _instance_scores(true_cells: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    are, precision, recall, split, merge = segmentation_scores(true_cells, pred_labels)
    return {"adapted_rand_error": are, "rand_precision": precision, "rand_recall": recall, "vi_split": split,
            "vi_merge": merge, "vi": split + merge}


#: Labels are constant inside each cell: of the neighbouring pixel pairs with both pixels in cells (> 0),
#: ISBI labels and cell-ID labels have 98-100 % equal, raw EM 2 % and a membrane probability map 31 %.
LABEL_MIN_EQUAL_NEIGHBOURS = 0.8


def label_constancy(plane: np.ndarray) -> float:
    """The share of neighbouring pixel pairs (4-connected, both > 0) that hold the same value.

    Near 1 for labels (a 0/255 mask or cell IDs), far below for an image or a probability map; the
    checks that refuse swapped arguments compare it with `LABEL_MIN_EQUAL_NEIGHBOURS`.

    Parameters
    ----------
    plane : (H, W) ndarray
        A label image, an image or a probability map.

    Returns
    -------
    float
        In [0, 1]; 1 when no pair has both pixels > 0.

    Raises
    ------
    OptionTypeError, OptionValueError
        `plane` is not a 2D array (a TypeError / ValueError).
    """
    if not isinstance(plane, np.ndarray):
        raise OptionTypeError(f"plane must be a 2D numpy array, not {type(plane).__name__}")
    if plane.ndim != 2:
        raise OptionValueError(f"plane must be a 2D array (H, W), not of shape {plane.shape}")
    same = total = 0
    for a, b in ((plane[:, 1:], plane[:, :-1]), (plane[1:], plane[:-1])):
        both = (a != 0) & (b != 0)
        total += int(both.sum())
        same += int((both & (a == b)).sum())
    return same / total if total else 1.0


def _true_membrane(label_stack: TiffStack, index: int, source: str) -> np.ndarray:
    """The ground-truth membrane of one label slice, refused when it is all membrane or all cell, or
    when it does not look like labels at all (the prediction and the labels swapped)."""
    plane = label_stack.plane(index)
    if label_constancy(plane) < LABEL_MIN_EQUAL_NEIGHBOURS:
        raise InputError(f"{source} does not look like labels (0 = membrane, > 0 = cell, e.g. a 0/255 mask): slice "
                         f"{index} changes from pixel to pixel inside cells, like a probability map or a raw image; "
                         "were the prediction and the labels swapped? pass the prediction first, the labels second")
    membrane = membrane_from_labels(plane)
    if membrane.all() or not membrane.any():
        raise InputError(f"{source}: slice {index} is all membrane or all cell; labels need 0 = membrane "
                         "and > 0 = cell interior (ISBI 2012 convention)")
    return membrane


def _true_cells(label_stack: TiffStack, index: int, source: str) -> np.ndarray:
    return label_cells(~_true_membrane(label_stack, index, source))


def _slice_ids(plane: np.ndarray) -> np.ndarray:
    """A label plane's ids renumbered 1..n in their order (0 stays 0), as int64: ids unique across a stack
    (each slice's shifted past the slices before it) score exactly as that slice's own 1..n."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(plane.astype(np.int64))[0]


def evaluate_instances(prediction: str, labels: str, /, *, slices: tuple[int, int] | None = None) -> dict[str, Any]:
    """Adapted Rand error and VI of an instance label stack (`segkit segment`, `predict --instances`)
    against ISBI-style labels (0 = membrane, > 0 = cell).

    Parameters
    ----------
    prediction, labels, slices
        As for `evaluate_stacks`; the prediction holds integer labels of at least 16 bits (segkit
        writes uint32).

    Returns
    -------
    dict
        `prediction`, `labels`, `slices` (how many), `scores` (the means of `adapted_rand_error`,
        `rand_precision`, `rand_recall`, `vi_split`, `vi_merge`, `vi`) and `per_slice`.

    Raises
    ------
    OptionTypeError, OptionValueError, InputError
        As for `evaluate_stacks`.
    """
    _check_call(prediction, labels, slices)
    rows = []
    with _open_pair(prediction, labels) as (pred_stack, label_stack):
        if pred_stack.dtype.kind not in "iu" or pred_stack.dtype.itemsize < 2:
            raise InputError(f"{prediction} holds {pred_stack.dtype} values, which look like membrane probabilities, "
                             "not instance labels (segkit writes uint32 labels); score them with `segkit evaluate PREDICTION LABELS`, "
                             "or run "
                             "`segkit segment` on it first (labels of your own: save them as uint16/uint32)")
        for pred_index, label_index in _paired_planes(pred_stack, label_stack, slices):
            rows.append(_instance_scores(_true_cells(label_stack, label_index, labels),
                                         _slice_ids(pred_stack.plane(pred_index))))
    return {"prediction": prediction, "labels": labels, "slices": len(rows), "scores": mean_rows(rows), "per_slice": rows}


def evaluate_watershed(prediction: str, labels: str, /, *, slices: tuple[int, int] | None = None,
                       params: Any = None) -> dict[str, Any]:
    """Scores of the seeded-watershed instances of a membrane probability stack, at one setting.

    Parameters
    ----------
    prediction, labels, slices
        As for `evaluate_stacks`.
    params : segkit.instances.WatershedParams, optional
        The watershed settings; default `WatershedParams()`.

    Returns
    -------
    dict
        `prediction`, `labels`, `slices` (how many), `params` (the settings as a dict) and `scores` (the
        means of the adapted Rand error, Rand precision and recall, and VI).

    Raises
    ------
    OptionTypeError, OptionValueError, InputError
        As for `evaluate_stacks`.
    """
    _check_call(prediction, labels, slices)
    if params is not None and not isinstance(params, WatershedParams):
        raise OptionTypeError(f"params must be None or a segkit.instances.WatershedParams, not {short(params)} "
                              f"({type(params).__name__})")
    params = params or WatershedParams()
    report = _watershed_table(prediction, labels, slices, [params])
    return {"prediction": prediction, "labels": labels, "slices": report[1], "params": params.to_dict(),
            "scores": report[0][0]["scores"]}


def sweep_watershed(prediction: str, labels: str, /, *, slices: tuple[int, int] | None = None,
                    min_seed_size: int = 10, min_size: int = 50) -> dict[str, Any]:
    """Scores of the seeded-watershed instances of a membrane probability stack for every (threshold,
    seed distance) of the grid `WATERSHED_THRESHOLDS` x `WATERSHED_SEED_DISTANCES`; the best by adapted
    Rand error.

    Parameters
    ----------
    prediction, labels, slices
        As for `evaluate_stacks`.
    min_seed_size : int
        px of the smallest seed, the same for every setting.
    min_size : int
        Segments smaller than this (px) are merged into their neighbours, the same for every setting.

    Returns
    -------
    dict
        `prediction`, `labels`, `slices` (how many), `table` (one row per setting: `params`, `scores`) and
        `best` (the row with the lowest adapted Rand error; ties go to the threshold nearest 0.5).

    Raises
    ------
    OptionTypeError, OptionValueError, InputError
        As for `evaluate_stacks`.
    """
    _check_call(prediction, labels, slices, counts={"min_seed_size": (min_seed_size, 1), "min_size": (min_size, 0)})
    grid = [WatershedParams(t, d, min_seed_size, min_size) for t in WATERSHED_THRESHOLDS
            for d in WATERSHED_SEED_DISTANCES]
    table, count = _watershed_table(prediction, labels, slices, grid)
    best = min(table, key=lambda row: (row["scores"]["adapted_rand_error"], abs(row["params"]["threshold"] - 0.5)))
    return {"prediction": prediction, "labels": labels, "slices": count, "table": table, "best": best}


def _watershed_table(prediction: str, labels: str, slices: tuple[int, int] | None,
                     grid: list[Any]) -> tuple[list[dict[str, Any]], int]:
    rows: dict[Any, list[dict[str, float]]] = {params: [] for params in grid}
    with _open_pair(prediction, labels) as (pred_stack, label_stack):
        check_probability_stack(pred_stack.dtype, prediction)
        for pred_index, label_index in _paired_planes(pred_stack, label_stack, slices):
            probability = to_probability(pred_stack.plane(pred_index))
            true_cells = _true_cells(label_stack, label_index, labels)
            for params in grid:
                rows[params].append(_instance_scores(true_cells, watershed_slice(probability, params)))
    return [{"params": params.to_dict(), "scores": mean_rows(rows[params])} for params in grid], len(rows[grid[0]])


def evaluate_semantic(prediction: str, labels: str, /, *, classes: int, ignore: int | None = None,
                      slices: tuple[int, int] | None = None) -> dict[str, Any]:
    """Per-class Dice and IoU of a stack of class maps (integer class per pixel, e.g. an argmax output)
    against a stack of class labels, averaged over slices (NaN-aware: a class absent from a slice is
    skipped).

    Parameters
    ----------
    prediction, labels, slices
        As for `evaluate_stacks`.
    classes : int
        Number of classes K >= 2 (values 0..K-1).
    ignore : int, optional
        Label value of unlabelled pixels, left out of the scores.

    Returns
    -------
    dict
        `prediction`, `labels`, `slices` (how many), `scores` (`dice_<k>`, `iou_<k>`, `dice_mean`,
        `iou_mean`, see `segkit.metrics.class_scores`) and `per_slice`.

    Raises
    ------
    OptionTypeError, OptionValueError, InputError
        As for `evaluate_stacks`.
    """
    _check_call(prediction, labels, slices, counts={"classes": (classes, 2)})
    if ignore is not None and not _is_int(ignore):
        raise OptionTypeError(f"ignore must be None or an int (a label value), not {short(ignore)} "
                              f"({type(ignore).__name__})")
    rows = []
    with _open_pair(prediction, labels) as (pred_stack, label_stack):
        if pred_stack.dtype.kind not in "iu":
            raise InputError(f"{prediction} holds {pred_stack.dtype} values, which look like probabilities, not a "
                             f"class map; pass integer class maps (values 0..{classes - 1}, uint8/uint16)")
        for pred_index, label_index in _paired_planes(pred_stack, label_stack, slices):
            pred = pred_stack.plane(pred_index)
            if pred.size and int(pred.max()) >= classes:
                raise InputError(f"{prediction}: slice {pred_index} holds the value {int(pred.max())}, so it is not a "
                                 f"class map of {classes} classes (values 0..{classes - 1}); pass the class map "
                                 "(argmax) output, or the right number of classes")
            try:
                rows.append(class_scores(pred, label_stack.plane(label_index), classes, ignore=ignore))
            except InputError as error:
                raise InputError(f"{labels}: slice {label_index}: {error}") from error
    return {"prediction": prediction, "labels": labels, "slices": len(rows), "scores": mean_class_rows(rows),
            "per_slice": rows}


def evaluate_matched_instances(prediction: str, labels: str, /, *,
                               slices: tuple[int, int] | None = None) -> dict[str, Any]:
    """DSB 2018 / StarDist object matching scores of an instance label stack against instance labels.

    Both hold 0 = background and one id per object (not the ISBI membrane convention). Scores are
    per-slice means of `segkit.metrics.instance_scores`: precision, recall, F1 and AP at IoU 0.5..0.95,
    and their means.

    Parameters
    ----------
    prediction, labels, slices
        As for `evaluate_stacks`.

    Returns
    -------
    dict
        `prediction`, `labels`, `slices` (how many), `scores` (the means) and `per_slice`.

    Raises
    ------
    OptionTypeError, OptionValueError, InputError
        As for `evaluate_stacks`.
    """
    _check_call(prediction, labels, slices)
    rows = []
    with _open_pair(prediction, labels) as (pred_stack, label_stack):
        if pred_stack.dtype.kind not in "iu":
            raise InputError(f"{prediction} holds {pred_stack.dtype} values, which look like probabilities, "
                             "not instance labels (0 = background, one id per object); run `segkit segment` on it "
                             "first (labels of your own: save them as uint16/uint32)")
        for pred_index, label_index in _paired_planes(pred_stack, label_stack, slices):
            pred, truth = pred_stack.plane(pred_index), label_stack.plane(label_index)
            # Labels are constant inside each object; an 8/16-bit probability map changes from pixel to pixel.
            if label_constancy(pred) < LABEL_MIN_EQUAL_NEIGHBOURS:
                raise InputError(f"{prediction} holds {pred_stack.dtype} values that change from pixel to pixel "
                                 f"inside objects (slice {pred_index}), which look like probabilities, not instance "
                                 "labels (0 = background, one id per object); run `segkit segment` on it first "
                                 "(labels of your own: save them as uint16/uint32)")
            if label_constancy(truth) < LABEL_MIN_EQUAL_NEIGHBOURS:
                raise InputError(f"{labels} does not look like instance labels: slice {label_index} changes from "
                                 "pixel to pixel inside objects; were the prediction and the labels swapped? pass "
                                 "the prediction first, the labels second")
            try:
                rows.append(instance_scores(truth, pred))
            except InputError as error:
                raise InputError(f"slice {label_index} of {labels} vs slice {pred_index} of {prediction}: {error}") from error
    return {"prediction": prediction, "labels": labels, "slices": len(rows), "scores": mean_instance_rows(rows),
            "per_slice": rows}
