"""Validation of semantic and instance models on whole images, through the same tiler as
`segkit predict`, and the choice of their inference settings on the validation split.

Membrane (ISBI) validation lives in loop.py (adapted Rand error over thresholds). Here:
- semantic: argmax classes -> per-class Dice/IoU and their mean (higher is better);
- instances: the object watershed over a small grid of settings -> matched F1/AP at IoU
  0.5-0.95 (per-image averages); the grid point with the best mean AP is stored in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

#: Object watershed settings tried on the validation images: first the foreground threshold (how far
#: objects reach; the setting that matters most, for the outlines scored at high IoU), then, at the best
#: one, seed threshold x seed distance.
FOREGROUND_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
SEED_THRESHOLDS = (0.5, 0.7)
SEED_DISTANCES = (0.0, 1.0, 2.0)


def probabilities(model: Any, images: list[np.ndarray], *, tile: int, batch: int, device: str) -> Iterator[np.ndarray]:
    """(K, H, W) class probabilities of each normalised (C, H, W) image, tiled as `segkit predict` tiles."""
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_arrays

    engine = TorchEngine(model, device=device, amp="none", channel="all")
    return predict_arrays(images, engine, model.geometry, tile=tile, batch=batch)


def semantic_scores(predicted: list[np.ndarray], labels: list[np.ndarray], *, classes: int,
                    ignore: int | None) -> dict[str, float]:
    """Mean over images of per-class Dice/IoU of argmax classes against the labels."""
    from segkit.metrics import class_scores, mean_class_rows

    rows = [class_scores(p.argmax(0).astype(np.uint8), t, classes, ignore=ignore) for p, t in zip(predicted, labels)]
    return mean_class_rows(rows)


def choose_objects(predicted: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, Any]:
    """The object watershed settings with the best mean AP on these (validation) images, by coordinate
    search: the foreground threshold at the default seeds, then the seeds at that threshold (11 settings
    instead of the 30 of the full grid). Returns the best row (params and scores)."""
    from dataclasses import replace

    from segkit.instances import ObjectParams

    default = ObjectParams()
    first = instance_table(predicted, labels, [replace(default, foreground_threshold=f) for f in FOREGROUND_THRESHOLDS])
    chosen = best_instances(first)
    foreground = chosen["params"]["foreground_threshold"]
    seeds = [ObjectParams(seed_threshold=t, seed_distance=d, foreground_threshold=foreground)
             for t in SEED_THRESHOLDS for d in SEED_DISTANCES
             if (t, d) != (default.seed_threshold, default.seed_distance)]
    return best_instances([chosen, *instance_table(predicted, labels, seeds)])


def instance_table(predicted: list[np.ndarray], labels: list[np.ndarray], grid: list[Any]) -> list[dict[str, Any]]:
    """Matched-instance scores (per-image averages) of the object watershed for every setting of `grid`."""
    from segkit.instances import object_watershed
    from segkit.metrics import instance_scores, mean_instance_rows

    table = []
    for params in grid:
        rows = [instance_scores(t, object_watershed(p, params)) for p, t in zip(predicted, labels)]
        table.append({"params": params.to_dict(), "scores": mean_instance_rows(rows)})
    return table


def best_instances(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid row with the highest mean AP (ties: the higher F1 at IoU 0.5)."""
    return max(table, key=lambda row: (row["scores"]["map"], row["scores"]["f1@0.5"]))


def score_split(checkpoint: str, data: dict[str, Any], split: str = "test", *, device: str = "cpu",
                batch: int = 4, tile: int | None = None) -> dict[str, Any]:
    """Scores of a trained checkpoint on one split of its recipe's data (per-image means), with the
    settings stored in the checkpoint (threshold or watershed, chosen on validation), at each image's
    own resolution (images are resampled for the model by the pixel-size factor and the training scale,
    and its probabilities back, as `segkit predict` does: `segkit.inference.api.rescale_factor`): semantic
    Dice/IoU, or matched instances; membrane checkpoints get pixel error, adapted Rand error and VI."""
    from segkit.checkpoint import load_model
    from segkit.inference.api import rescale_factor
    from segkit.instances import ObjectParams, object_watershed
    from segkit.io.resample import rescale
    from segkit.metrics import instance_scores, mean_instance_rows, mean_scores, score_thresholds
    from segkit.training.datasets import load_examples
    from segkit.training.loop import model_input
    from segkit.training.targets import LabelRule

    model, info = load_model(checkpoint)
    rule = LabelRule.from_data(data)
    examples = load_examples({**data, "pixel_size": None, "scale": None}, split)  # scored at their own resolution
    factors = [rescale_factor(e, info) for e in examples]
    inputs = [model_input(rescale(e.image, f) if f is not None else e.image, info.normalization)
              for e, f in zip(examples, factors)]
    tile = tile or info.inference.tile
    predicted = (rescale(p, 1.0, shape=e.labels.shape) if p.shape[-2:] != e.labels.shape else p
                 for p, e in zip(probabilities(model, inputs, tile=tile, batch=batch, device=device), examples))
    labels = [e.labels for e in examples]
    if rule.kind == "semantic":
        scores = semantic_scores(list(predicted), labels, classes=rule.classes, ignore=rule.ignore)
    elif rule.kind == "instances":
        params = ObjectParams.from_dict(info.inference.watershed or {})
        scores = mean_instance_rows([instance_scores(t, object_watershed(p, params if f is None else
                                                                         params.resized(1.0 / f)))
                                     for p, t, f in zip(predicted, labels, factors)])
    else:
        threshold = info.inference.threshold or 0.5
        scores = mean_scores([score_thresholds(p[1], t == 0, (threshold,))[threshold]
                              for p, t in zip(predicted, labels)])
    return {"split": split, "images": len(examples), "scores": scores}
