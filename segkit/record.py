"""The checkpoint record: everything about a model but its weights, as plain data.

`CheckpointInfo` names the model (registry name and parameters), its geometry, normalisation,
classes, the resolved recipe and the segkit version; `InferenceDefaults` holds what prediction
uses where the caller does not say. `check_record` refuses, with one line, a record that would
run wrongly or not at all. The same record travels in checkpoints (`segkit.checkpoint`), ONNX
files (`segkit.export`) and bioimage.io packages (`segkit.bioimageio`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segkit.errors import CheckpointError, ConfigError
from segkit.models import COMPOSED, model_kind
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization
from segkit.version import __version__

#: The record's format name, checked when a record is read.
FORMAT = "segkit-checkpoint/1"
#: What a model is (`CheckpointInfo.kind`).
MODEL_KINDS = ("segmenter", "denoiser")
#: What a model's labels are (`InferenceDefaults.labels_kind`).
LABELS_KINDS = ("membrane", "semantic", "instances")


@dataclass(frozen=True)
class InferenceDefaults:
    """A checkpoint's inference defaults (the `inference` entry of its record): what prediction uses
    where the caller does not say. Frozen: change it with `replace`, which returns a new record.

    Fields (None = not recorded; the reader then uses its own default):
        tile: the tile the model was trained with (checked against the model's geometry on load).
        threshold: membrane probability threshold in [0, 1], chosen on the validation slices.
        input_dtype: the training data's stored dtype ("uint8", "uint16", ...); 'auto'
            normalisation uses a stack's own statistics when its dtype differs.
        watershed: seeded-watershed settings (`segkit.instances.WatershedParams.to_dict()`), as
            `segkit evaluate --write-defaults` stores them.
        intensity_scale: a denoiser's raw-to-[0, 1] scale (255 for uint8 training data).
        labels_kind: what the training labels were: "membrane" (boundary maps, the default),
            "semantic" (one class per pixel) or "instances" (object ids); it chooses what prediction
            writes by default (probabilities, classes or objects) and how validation scores.
        pixel_size: micrometres per pixel of the training data; input of another known pixel size
            is resampled to it for the model, and the output back to the input's size.
        scale: the factor the training images were resized by (`data.scale`, after any pixel-size
            rescaling; 0.5: half size); input planes are resized by it for the model, and the
            output back to the input's size.
        output_channel: a model output channel, kept for readers of the record; segkit's prediction
            does not read it (it writes channel 1 of membrane models and every class of the others).

    Values are kept as stored; `check_record` validates them (one line per problem) when a
    checkpoint loads and before `update_inference_defaults` writes.
    """

    tile: int | None = None
    threshold: float | None = None
    input_dtype: str | None = None
    watershed: dict[str, Any] | None = None
    intensity_scale: float | None = None
    labels_kind: str = "membrane"
    pixel_size: float | None = None
    output_channel: int | None = None
    scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record's `inference` entry: every field that is set (None values are left out, so a
        reader of older records finds the entries it knows, and nothing more it must understand)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.watershed, Mapping):
            data["watershed"] = dict(self.watershed)
        return {name: value for name, value in data.items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "InferenceDefaults":
        """From a record's `inference` entry, as any segkit version wrote it (older records hold a
        subset of the fields). Unknown keys are ignored, None means not recorded; values are kept
        as stored (`check_record` validates them). A non-mapping raises TypeError."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise TypeError(f"its inference entry is a {type(data).__name__}, not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: value for name, value in data.items() if name in names and value is not None}
        if isinstance(values.get("watershed"), Mapping):
            values["watershed"] = dict(values["watershed"])
        return cls(**values)

    def replace(self, **changes: Any) -> "InferenceDefaults":
        """A copy with `changes` applied (dataclasses.replace; an unknown field name is a TypeError)."""
        return dataclasses.replace(self, **changes)


@dataclass
class CheckpointInfo:
    """Everything but the weights: enough to rebuild and run the model.

    `inference` is an InferenceDefaults; a plain dict (a record's `inference` entry) is accepted
    and converted with `InferenceDefaults.from_dict`."""

    kind: str  # one of MODEL_KINDS
    model: str
    model_kwargs: dict[str, Any]
    geometry: Geometry
    normalization: Normalization
    classes: list[str] = field(default_factory=lambda: ["interior", "membrane"])
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    recipe: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    segkit_version: str = __version__

    @property
    def input_channels(self) -> int:
        """Channels the model takes: its record's in_channels (a denoiser pre-stage's, for composed models)."""
        kwargs = self.model_kwargs.get("denoiser", {}).get("kwargs", self.model_kwargs)
        return int(kwargs.get("in_channels") or 1)

    @property
    def output_classes(self) -> int:
        """Classes a segmenter outputs: its record's classes (the segmenter's, for composed models), else
        its class names, else 2 (membrane models)."""
        kwargs = self.model_kwargs.get("segmenter", {}).get("kwargs", self.model_kwargs)
        return int(kwargs.get("classes") or len(self.classes) or 2)

    def __post_init__(self) -> None:
        if not isinstance(self.inference, InferenceDefaults):
            self.inference = InferenceDefaults.from_dict(self.inference)

    def to_json(self) -> str:
        """The record as JSON (`FORMAT`), as checkpoints, ONNX files and packages store it."""
        return json.dumps(
            {
                "format": FORMAT,
                "kind": self.kind,
                "model": self.model,
                "model_kwargs": self.model_kwargs,
                "geometry": self.geometry.to_dict(),
                "normalization": self.normalization.to_dict(),
                "classes": self.classes,
                "inference": self.inference.to_dict(),
                "recipe": self.recipe,
                "training": self.training,
                "segkit_version": self.segkit_version,
            }
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> "CheckpointInfo":
        """Read a record as any segkit version wrote it, and check it (`check_record`).

        Parameters
        ----------
        text : str
            The record's JSON (a checkpoint's `segkit` metadata, an ONNX file's `segkit` property).
        source : str
            The file it came from, named in errors.

        Returns
        -------
        CheckpointInfo
            The record.

        Raises
        ------
        CheckpointError
            The JSON is malformed, of another format, misses an entry, or `check_record` refuses it.
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise CheckpointError(f"{source}: its segkit record is a JSON {type(data).__name__}, not an object; "
                                      "the checkpoint is damaged: use another one or train again")
            if data.get("format") != FORMAT:
                raise CheckpointError(
                    f"{source}: unsupported checkpoint format {data.get('format')!r}, "
                    f"expected {FORMAT!r}"
                )
            info = cls(
                kind=data["kind"],
                model=data["model"],
                model_kwargs=dict(data["model_kwargs"]),
                geometry=Geometry.from_dict(data["geometry"]),
                normalization=Normalization.from_dict(data["normalization"]),
                classes=list(data.get("classes", [])),
                inference=InferenceDefaults.from_dict(data.get("inference")),
                recipe=dict(data.get("recipe", {})),
                training=dict(data.get("training", {})),
                segkit_version=str(data.get("segkit_version", "unknown")),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:200]
            raise CheckpointError(f"{source}: malformed segkit record in checkpoint: {detail}; the checkpoint is "
                                  "damaged: use another one or train again") from exc
        except CheckpointError as exc:
            if str(exc).startswith(source):
                raise
            raise CheckpointError(f"{source}: {exc}; the checkpoint is damaged: use another one or train again") from exc
        check_record(info, source)
        return info


def check_record(info: CheckpointInfo, source: str) -> None:
    """Refuse a record that would run wrongly or not at all.

    Checked: the kind (`MODEL_KINDS`), the model (known to the registry, parameters in range), the
    normalisation (finite, std above 0: std 0 would write all-zero outputs) and the inference
    defaults (a tile the model accepts, a threshold in [0, 1], a known labels kind, ...).
    No torch: the model is only looked up in the registry.

    Parameters
    ----------
    info : CheckpointInfo
        The record.
    source : str
        The file it came from, named in errors.

    Raises
    ------
    CheckpointError
        One line naming the first problem and the fix.
    """
    fix = "the checkpoint is damaged or was edited: use another one or train again"
    if info.kind not in MODEL_KINDS:
        raise CheckpointError(f"{source}: unknown kind {info.kind!r} in its record (segmenter or denoiser); {fix}")
    _check_model(info.model, info.model_kwargs, source, fix)  # the kind is checked where it matters (load_model)
    check_normalization_record(info.normalization.mean, info.normalization.std, source, fix)
    check_inference_defaults(info.inference, info.geometry, source, fix)


def check_inference_defaults(inference: InferenceDefaults, geometry: Geometry, source: str, fix: str) -> None:
    """Refuse inference defaults of wrong types or out of range (tile, threshold, watershed, ...) with one
    CheckpointError naming the field, `source` and the `fix`; checkpoints and packages share it."""
    def refuse(name: str, value: Any, problem: str) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        return CheckpointError(f"{source}: its record's inference {name} {shown} {problem}; {fix}")

    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float))

    tile = inference.tile
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or not geometry.is_valid_input(tile)):
        below, above = geometry.nearest_valid(tile) if isinstance(tile, int) and tile > 0 else (None, None)
        near = f" (nearest valid: {below} or {above})" if above is not None else ""
        raise refuse("tile", tile, f"is not a valid tile of this model{near}")
    threshold = inference.threshold
    if threshold is not None and (not number(threshold) or not 0.0 <= threshold <= 1.0):
        raise refuse("threshold", threshold, "is not a number between 0 and 1")
    if inference.input_dtype is not None and not isinstance(inference.input_dtype, str):
        raise refuse("input_dtype", inference.input_dtype, "is not a dtype name (such as 'uint8')")
    if inference.watershed is not None and not isinstance(inference.watershed, Mapping):
        raise refuse("watershed", inference.watershed, "is not a table of watershed settings")
    scale = inference.intensity_scale
    if scale is not None and (not number(scale) or not math.isfinite(scale) or scale <= 0):
        raise refuse("intensity_scale", scale, "is not a finite number above 0")
    if inference.labels_kind not in LABELS_KINDS:
        raise refuse("labels_kind", inference.labels_kind, f"is not one of {', '.join(LABELS_KINDS)}")
    size = inference.pixel_size
    if size is not None and (not number(size) or not math.isfinite(size) or size <= 0):
        raise refuse("pixel_size", size, "is not a finite number of micrometres per pixel above 0")
    factor = inference.scale
    if factor is not None and (not number(factor) or not math.isfinite(factor) or factor <= 0):
        raise refuse("scale", factor, "is not a finite resize factor above 0")
    channel = inference.output_channel
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise refuse("output_channel", channel, "is not a channel index (a whole number, 0 or more)")


#: Integer model parameters and their allowed ranges (the registry's models; others are checked when built).
_INT_RANGES = {"base": (1, None), "width": (1, None), "fc": (1, None), "classes": (1, 1000), "in_channels": (1, 64),
               "depth": (1, 8), "halo": (0, 4096)}


def _check_model(name: Any, kwargs: dict[str, Any], source: str, fix: str, *, kind: str | None = None) -> None:
    try:
        actual = "segmenter" if name == COMPOSED else model_kind(str(name))
    except ConfigError as exc:
        raise CheckpointError(f"{source}: its record names the unknown model {str(name)[:100]!r} (`segkit models` "
                              f"lists the known ones); {fix}") from exc
    if kind is not None and actual != kind:
        raise CheckpointError(f"{source}: its record says {kind} but names the {actual} model {name!r}; {fix}")
    if name == COMPOSED:
        for part in ("denoiser", "segmenter"):
            entry = kwargs.get(part)
            if not isinstance(entry, dict) or not isinstance(entry.get("kwargs"), dict) \
                    or not isinstance(entry.get("normalization"), dict):
                raise CheckpointError(f"{source}: its record's {part} entry is malformed; {fix}")
            _check_model(entry.get("name"), entry["kwargs"], source, fix, kind=part)
            norm = entry["normalization"]
            check_normalization_record(norm.get("mean"), norm.get("std"), source, fix)
        return
    for key, value in kwargs.items():
        if key not in _INT_RANGES:
            continue
        low, high = _INT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            allowed = f"{low} to {high}" if high is not None else f"{low} or more"
            raise CheckpointError(f"{source}: its record's model parameter {key}={value!r} is out of range ({allowed} "
                                  f"for {name}); {fix}")
    dropout = kwargs.get("dropout")
    if dropout is not None and (not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0):
        raise CheckpointError(f"{source}: its record's model parameter dropout={dropout!r} is out of range (0 to "
                              f"below 1); {fix}")


def check_normalization_record(mean: Any, std: Any, source: str, fix: str) -> None:
    """Refuse a normalisation mean/std (numbers, or one pair per channel) that is not finite, or a std
    that is not positive, with one CheckpointError naming `source` and the `fix`."""
    if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) and mean:
        for m, s in zip(mean, std):  # one pair per channel
            check_normalization_record(m, s, source, fix)
        return
    try:
        mean, std = float(mean), float(std)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: its record's normalisation (mean {mean!r}, std {std!r}) is not a pair of "
                              f"numbers (or of equal lists, one per channel); {fix}") from None
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise CheckpointError(f"{source}: its record's normalisation has mean {mean} and std {std}; segkit needs a "
                              f"finite mean and a finite std above 0 (std 0 or NaN would give all-zero output); {fix}")
