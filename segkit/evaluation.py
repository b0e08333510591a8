"""Evaluate a stored prediction stack against a label stack, slice by slice (streaming)."""

from __future__ import annotations

from typing import Any

import numpy as np

from segkit.errors import InputError
from segkit.io.tiff import TiffStack, open_stack
from segkit.metrics import SliceScores, mean_scores, membrane_from_labels, score_thresholds, to_probability

SWEEP_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def _check_labels(stack: TiffStack, source: str) -> None:
    if stack.dtype.kind == "f":
        raise InputError(
            f"{source} holds float values, which look like probabilities, not labels; "
            "pass the prediction first and the label stack second"
        )


def _paired_planes(pred: TiffStack, labels: TiffStack, slices: tuple[int, int] | None) -> list[tuple[int, int]]:
    start, stop = slices if slices is not None else (0, len(labels))
    if stop > len(labels):
        raise InputError(f"--slices {start}:{stop} exceeds the {len(labels)} slices of the label stack")
    count = stop - start
    if pred.shape[1:] != labels.shape[1:]:
        raise InputError(f"prediction planes {pred.shape[1:]} and label planes {labels.shape[1:]} differ in size")
    if len(pred) == len(labels):
        return [(z, z) for z in range(start, stop)]
    if len(pred) == count:
        return [(i, start + i) for i in range(count)]
    raise InputError(
        f"prediction has {len(pred)} planes but the labels have {len(labels)} (selected {count}); "
        "use --slices START:STOP to pick the labelled slices that were predicted"
    )


def evaluate_stacks(
    prediction: str, labels: str, /, *, threshold: float = 0.5, sweep: bool = False,
    slices: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Mean per-slice scores at `threshold` and, with `sweep`, at every threshold of a sweep."""
    if not 0.0 < threshold < 1.0:
        raise InputError(f"--threshold {threshold} must be between 0 and 1")
    thresholds = sorted(set(SWEEP_THRESHOLDS) | {threshold}) if sweep else [threshold]
    per_threshold: dict[float, list[SliceScores]] = {t: [] for t in thresholds}
    with open_stack(prediction) as pred_stack, open_stack(labels) as label_stack:
        _check_labels(label_stack, labels)
        for pred_index, label_index in _paired_planes(pred_stack, label_stack, slices):
            probability = to_probability(pred_stack.plane(pred_index))
            membrane = membrane_from_labels(label_stack.plane(label_index))
            if membrane.all() or not membrane.any():
                raise InputError(
                    f"{labels}: slice {label_index} is all membrane or all cell; labels need 0 = membrane "
                    "and > 0 = cell interior (ISBI 2012 convention)"
                )
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
