"""Validation for every label kind on whole images, through the same tiler as `segkit predict`, and
the choice of each kind's inference settings on the validation split.

- membrane (ISBI): probability of the membrane class -> pixel error, adapted Rand error and VI at
  several thresholds; the threshold with the best adapted Rand error is stored in the checkpoint;
- semantic: argmax classes -> per-class Dice/IoU and their mean (higher is better);
- instances: the object watershed over a small grid of settings -> matched F1/AP at IoU
  0.5-0.95 (per-image averages); the grid point with the best mean AP is stored in the checkpoint.

`EPOCH_VALIDATIONS` holds the validation the training loop runs after every epoch, per label kind;
`score_split` scores a finished checkpoint on one split of its recipe's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from segkit.checkpoint import load_model
from segkit.config import short, validate_recipe
from segkit.errors import ConfigError, OptionTypeError, OptionValueError
from segkit.inference.api import rescale_factor
from segkit.inference.engines import TorchEngine
from segkit.inference.tiler import plan_tiles, predict_arrays, predict_planes
from segkit.instances import ObjectParams, object_watershed
from segkit.io.resample import rescale
from segkit.metrics import (
    SliceScores,
    class_scores,
    instance_scores,
    mean_class_rows,
    mean_instance_rows,
    mean_scores,
    score_thresholds,
)
from segkit.training.datasets import load_examples
from segkit.training.patches import model_input
from segkit.training.targets import LabelRule

#: The splits of a recipe's data.
SPLITS = ("train", "val", "test")
#: Membrane thresholds tried on the validation slices after every epoch; the best is stored in the checkpoint.
VALIDATION_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Object watershed settings tried on the validation images: first the foreground threshold (how far
#: objects reach; the setting that matters most, for the outlines scored at high IoU), then, at the best
#: one, seed threshold x seed distance.
FOREGROUND_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
SEED_THRESHOLDS = (0.5, 0.7)
SEED_DISTANCES = (0.0, 1.0, 2.0)

#: What one epoch's validation returns: (log row, score (higher is better), the line to print,
#: inference settings for the checkpoint, validation scores for its training record).
EpochResult = tuple[dict[str, Any], float, str, dict[str, Any], dict[str, Any]]


def probabilities(model: Any, images: list[np.ndarray], *, tile: int, batch: int, device: str,
                  progress: Any = None) -> Iterator[np.ndarray]:
    """Class probabilities of whole images, tiled as `segkit predict` tiles.

    Parameters
    ----------
    model : torch.nn.Module
        A segkit model with a `geometry`.
    images : list of (C, H, W) ndarray of float32
        Normalised images (`model_input`).
    tile, batch : int
        Input tile size and tiles per forward pass.
    device : str
        Where the model runs ('cpu', 'cuda:N').
    progress : tqdm-like, optional
        Told the number of tiles (`reset(total)`), then each batch's (`update(n)`).

    Returns
    -------
    iterator of (K, H, W) ndarray of float32
        Each image's class probabilities, in order.
    """
    engine = TorchEngine(model, device=device, amp="none", channel="all")
    return predict_tiles(images, engine, model.geometry, tile=tile, batch=batch, progress=progress)


def predict_tiles(images: list[np.ndarray], engine: Any, geometry: Any, *, tile: int, batch: int,
                  progress: Any = None) -> Iterator[np.ndarray]:
    """`tiler.predict_arrays` with progress: `progress.reset(total)` with the images' tiles before the first,
    `progress.update(n)` after every batch (the validation bar of `runs.run_epochs`)."""
    import torch

    if progress is None:
        yield from predict_arrays(images, engine, geometry, tile=tile, batch=batch)
        return
    progress.reset(total=sum(plan_tiles(i.shape[-2:], geometry, tile=tile).n_tiles for i in images))

    def tensors() -> Iterator[Any]:
        for image in images:
            tensor = torch.as_tensor(image, dtype=torch.float32)
            yield (tensor[None] if tensor.ndim == 2 else tensor).to(engine.device)

    for values in predict_planes(tensors(), engine, geometry, tile=tile, batch=batch, on_tiles=progress.update):
        yield values.cpu().numpy()


def semantic_scores(predicted: list[np.ndarray], labels: list[np.ndarray], *, classes: int,
                    ignore: int | None) -> dict[str, float]:
    """Mean over images of per-class Dice/IoU of argmax classes against the labels.

    Parameters
    ----------
    predicted : list of (K, H, W) ndarray of float32
        Class probabilities.
    labels : list of (H, W) ndarray of int
        True classes.
    classes : int
        K.
    ignore : int or None
        A label value left out of the scores.

    Returns
    -------
    dict of str to float
        dice_k and iou_k per class k, and dice_mean, iou_mean.
    """
    rows = [class_scores(p.argmax(0).astype(np.uint8), t, classes, ignore=ignore) for p, t in zip(predicted, labels)]
    return mean_class_rows(rows)


def choose_objects(predicted: list[np.ndarray], labels: list[np.ndarray], *, progress: Any = None) -> dict[str, Any]:
    """The object watershed settings with the best mean AP on these (validation) images, by coordinate
    search: the foreground threshold at the default seeds, then the seeds at that threshold (11 settings
    instead of the 30 of the full grid).

    Parameters
    ----------
    predicted : list of (3, H, W) ndarray of float32
        Background/interior/boundary probabilities.
    labels : list of (H, W) ndarray of int
        True object ids (0: background).
    progress : tqdm-like, optional
        Told the settings to try (`reset(total)`, its unit set to "setting"), then each one tried (`update(1)`).

    Returns
    -------
    dict
        The best row: "params" (`ObjectParams.to_dict`) and "scores" (map, f1@0.5, ap@0.5, ...).
    """
    default = ObjectParams()
    seed_grid = [(t, d) for t in SEED_THRESHOLDS for d in SEED_DISTANCES
                 if (t, d) != (default.seed_threshold, default.seed_distance)]
    if progress is not None:
        progress.unit = "setting"
        progress.reset(total=len(FOREGROUND_THRESHOLDS) + len(seed_grid))
    first = instance_table(predicted, labels, [replace(default, foreground_threshold=f) for f in FOREGROUND_THRESHOLDS],
                           progress=progress)
    chosen = best_instances(first)
    foreground = chosen["params"]["foreground_threshold"]
    seeds = [ObjectParams(seed_threshold=t, seed_distance=d, foreground_threshold=foreground) for t, d in seed_grid]
    return best_instances([chosen, *instance_table(predicted, labels, seeds, progress=progress)])


def instance_table(predicted: list[np.ndarray], labels: list[np.ndarray], grid: list[Any], *,
                   progress: Any = None) -> list[dict[str, Any]]:
    """Matched-instance scores (per-image averages) of the object watershed for every setting of `grid`
    (`progress.update(1)` after each, when given)."""
    table = []
    for params in grid:
        rows = [instance_scores(t, object_watershed(p, params)) for p, t in zip(predicted, labels)]
        table.append({"params": params.to_dict(), "scores": mean_instance_rows(rows)})
        if progress is not None:
            progress.update(1)
    return table


def best_instances(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid row with the highest mean AP (ties: the higher F1 at IoU 0.5)."""
    return max(table, key=lambda row: (row["scores"]["map"], row["scores"]["f1@0.5"]))


def validate(model: Any, planes: list[np.ndarray], membranes: list[np.ndarray], *, tile: int, batch: int, device: str,
             thresholds: tuple[float, ...], progress: Any = None) -> dict[float, dict[str, float]]:
    """Membrane scores of whole validation slices at several thresholds, tiled exactly as `segkit predict`.

    Parameters
    ----------
    model : torch.nn.Module
        A segkit model with a `geometry`; its class 1 is the membrane.
    planes : list of (C, H, W) ndarray of float32
        The validation slices, normalised as the model sees them (`model_input`).
    membranes : list of (H, W) ndarray of bool
        The true membrane pixels of each slice.
    tile, batch : int
        Input tile size and tiles per forward pass.
    device : str
        Where the model runs ('cpu', 'cuda:N').
    thresholds : tuple of float
        Probabilities above which a pixel is membrane.
    progress : tqdm-like, optional
        The tiles predicted (`predict_tiles`).

    Returns
    -------
    dict of float to dict of str to float
        Per threshold, the mean over slices of pixel error, adapted Rand error, VI, Dice, ...
    """
    engine = TorchEngine(model, device=device, amp="none")
    scores: dict[float, list[SliceScores]] = {t: [] for t in thresholds}
    for probability, membrane in zip(predict_tiles(planes, engine, model.geometry, tile=tile, batch=batch,
                                                   progress=progress), membranes):
        for t, slice_scores in score_thresholds(probability[0], membrane, thresholds).items():
            scores[t].append(slice_scores)
    return {t: mean_scores(s) for t, s in scores.items()}


def membrane_epoch(model: Any, inputs: list[np.ndarray], labels: list[np.ndarray], *, rule: LabelRule, tile: int,
                   batch: int, device: str, val_threshold: float, progress: Any = None) -> EpochResult:
    """ISBI validation after an epoch: scores at each threshold; the best threshold by adapted Rand error.

    Parameters
    ----------
    model : torch.nn.Module
        The model to score (the weight average when the run keeps one).
    inputs : list of (C, H, W) ndarray of float32
        Validation images, normalised as the model sees them.
    labels : list of (H, W) ndarray of int
        Their labels (0 is membrane).
    rule : LabelRule
        The recipe's label kind (unused here; every kind's validation takes it).
    tile, batch : int
        Input tile size and tiles per forward pass.
    device : str
        Where the model runs.
    val_threshold : float
        The recipe's `train.val_threshold`: the threshold whose scores the log row holds.
    progress : tqdm-like, optional
        The validation's progress bar (`reset(total)`, `update(n)`): the tiles predicted.

    Returns
    -------
    EpochResult
        (log row, score (higher is better), the line to print, {"threshold": chosen}, validation scores).
    """
    thresholds = tuple(sorted({*VALIDATION_THRESHOLDS, val_threshold}))
    table = validate(model, inputs, [lab == 0 for lab in labels], tile=tile, batch=batch, device=device,
                     thresholds=thresholds, progress=progress)
    scores = table[val_threshold]
    chosen = min(thresholds, key=lambda t: (table[t]["adapted_rand_error"], abs(t - 0.5)))
    row = {"pixel_error": scores["pixel_error"], "adapted_rand_error": scores["adapted_rand_error"], "vi": scores["vi"],
           "dice": scores["dice"], "best_threshold": chosen,
           "best_adapted_rand_error": table[chosen]["adapted_rand_error"]}
    text = (f"val pixel error {row['pixel_error']:.4f}  adapted Rand error {row['adapted_rand_error']:.4f}  "
            f"VI {row['vi']:.3f}  (best threshold {chosen}: adapted Rand error {row['best_adapted_rand_error']:.4f})")
    return (row, -row["best_adapted_rand_error"], text, {"threshold": chosen},
            {"validation": table[chosen], "validation_at_val_threshold": scores})


def semantic_epoch(model: Any, inputs: list[np.ndarray], labels: list[np.ndarray], *, rule: LabelRule, tile: int,
                   batch: int, device: str, val_threshold: float, progress: Any = None) -> EpochResult:
    """Semantic validation after an epoch: argmax classes, per-class Dice/IoU and their means.

    Parameters and returns as `membrane_epoch` (labels are class indices; `val_threshold` is unused);
    the score is the mean Dice, and no inference setting is chosen.
    """
    predicted = list(probabilities(model, inputs, tile=tile, batch=batch, device=device, progress=progress))
    scores = semantic_scores(predicted, labels, classes=rule.classes, ignore=rule.ignore)
    per_class = "  ".join(f"{k} {scores[f'dice_{k}']:.3f}" for k in range(rule.classes))
    text = f"val mean Dice {scores['dice_mean']:.4f}  IoU {scores['iou_mean']:.4f}  (Dice per class: {per_class})"
    return scores, scores["dice_mean"], text, {}, {"validation": scores}


def instance_epoch(model: Any, inputs: list[np.ndarray], labels: list[np.ndarray], *, rule: LabelRule, tile: int,
                   batch: int, device: str, val_threshold: float, progress: Any = None) -> EpochResult:
    """Instance validation after an epoch: the object watershed over a grid of settings, matched F1/AP.

    Parameters and returns as `membrane_epoch` (labels are object ids; `val_threshold` is unused); the
    score is the mean AP at IoU 0.5-0.95, and the best setting is returned as {"watershed": params}
    for the checkpoint.
    """
    predicted = list(probabilities(model, inputs, tile=tile, batch=batch, device=device, progress=progress))
    chosen = choose_objects(predicted, labels, progress=progress)  # the bar goes on with the settings tried
    scores, params = chosen["scores"], chosen["params"]
    row = {key: scores[key] for key in ("map", "f1@0.5", "ap@0.5", "ap@0.75")}
    row.update(seed_threshold=params["seed_threshold"], seed_distance=params["seed_distance"],
               foreground_threshold=params["foreground_threshold"])
    text = (f"val mean AP {scores['map']:.4f}  F1@0.5 {scores['f1@0.5']:.4f}  AP@0.5 {scores['ap@0.5']:.4f}  "
            f"(watershed: foreground below background probability {params['foreground_threshold']}, seed threshold "
            f"{params['seed_threshold']}, seed distance {params['seed_distance']})")
    return row, scores["map"], text, {"watershed": params}, {"validation": scores}


#: The validation the training loop runs after every epoch, per label kind.
EPOCH_VALIDATIONS: dict[str, Callable[..., EpochResult]] = {
    "membrane": membrane_epoch, "semantic": semantic_epoch, "instances": instance_epoch}


def score_split(checkpoint: str, data: dict[str, Any], split: str = "test", *, device: str = "cpu",
                batch: int = 4, tile: int | None = None) -> dict[str, Any]:
    """Scores of a trained checkpoint on one split of its recipe's data (per-image means), with the
    settings stored in the checkpoint (threshold or watershed, chosen on validation), at each image's
    own resolution (images are resampled for the model by the pixel-size factor and the training scale,
    and its probabilities back, as `segkit predict` does: `segkit.inference.api.rescale_factor`): semantic
    Dice/IoU, or matched instances; membrane checkpoints get pixel error, adapted Rand error and VI.

    Parameters
    ----------
    checkpoint : str
        A segmenter checkpoint (.safetensors).
    data : dict
        The `data` section of its recipe.
    split : str
        'train', 'val' or 'test'.
    device : str
        Where the model runs.
    batch : int
        Tiles per forward pass.
    tile : int, optional
        Input tile size (default: the checkpoint's).

    Returns
    -------
    dict
        {"split": split, "images": count, "scores": {name: mean over images}}.

    Raises
    ------
    OptionTypeError, OptionValueError
        An argument of the wrong type or out of its range (a TypeError / ValueError naming it), before any work.
    SegkitError
        The checkpoint or the split's data cannot be read (CheckpointError, InputError, ...).
    """
    data = _check_score_call(checkpoint, data, split, device=device, batch=batch, tile=tile)
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


def _check_score_call(checkpoint: Any, data: Any, split: Any, *, device: Any, batch: Any, tile: Any) -> dict[str, Any]:
    """`score_split`'s arguments, before any work: one line naming the argument (OptionTypeError, a TypeError;
    OptionValueError, a ValueError). Returns `data` checked as a recipe's data section (defaults filled in)."""
    if not isinstance(checkpoint, (str, Path)):
        raise OptionTypeError(f"checkpoint must be a path to a .safetensors checkpoint, not {type(checkpoint).__name__}")
    if not isinstance(data, dict):
        raise OptionTypeError(f"data must be the data section of a recipe (recipe['data']), not {type(data).__name__}")
    if split not in SPLITS:
        raise OptionValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, not {short(split)}")
    if not isinstance(device, str):
        raise OptionTypeError(f"device must be a str ('cpu', 'cuda', 'cuda:1'), not {type(device).__name__}")
    for name, value, allowed in (("batch", batch, False), ("tile", tile, True)):
        if allowed and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionTypeError(f"{name} must be an int{' or None' if allowed else ''}, not {short(value)} "
                                  f"({type(value).__name__})")
        if value < 1:
            raise OptionValueError(f"{name} must be at least 1, got {value}")
    try:
        return validate_recipe({"data": data})["data"]
    except ConfigError as exc:
        raise OptionValueError(f"data: {exc}") from None
