"""Checkpoints as plain data: safetensors weights plus a JSON record in the file's header.

The JSON holds the model name and kwargs, geometry, normalisation, the resolved recipe and the
segkit version, so `segkit predict` needs only the checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segkit.errors import CheckpointError, SegkitError
from segkit.models.geometry import Geometry
from segkit.version import __version__

FORMAT = "segkit-checkpoint/1"


@dataclass(frozen=True)
class Normalization:
    """Global intensity normalisation: (x - mean) / std per channel, never computed per tile.

    `mean` and `std` are numbers (one channel) or one per channel. With `percentiles` (low, high)
    the normalisation is a rule instead (CSBDeep/StarDist style, for fluorescence): each image or
    stack gets mean = its low percentile and std = high - low percentile (`for_image`), so its
    intensities map to about [0, 1]; `mean`/`std` then hold typical training values, for display.
    `clip` clamps normalised values to [0, 1] (percentile rules clip: the augmentation clips training
    patches to [0, 1], so prediction input must be clipped alike).
    """

    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    percentiles: tuple[float, float] | None = None
    clip: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # one channel: a plain number, so planes keep their (H, W) shape
            value = getattr(self, name)
            if isinstance(value, (list, tuple, np.ndarray)):
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value[0] if len(value) == 1 else value)
        if self.percentiles is not None:
            object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))

    @property
    def channels(self) -> int | None:
        """Channels this normalisation is for (None: any, one number for all)."""
        return len(self.mean) if isinstance(self.mean, tuple) else None

    def apply(self, raw: Any) -> Any:
        """(raw - mean) / std as float32, for a numpy array or a torch tensor of any stored dtype
        (uint8, uint16, float32), (H, W) or (C, H, W), on whatever device the tensor is. The one place
        segkit normalises."""
        if not _is_tensor(raw):
            mean, scale = self._per_channel()
            normalized = (np.asarray(raw, np.float32) - mean) * scale
            return np.clip(normalized, 0.0, 1.0, out=normalized) if self.clip else normalized
        if self.channels is None:
            # the same float32 arithmetic as for numpy, so every dtype and device gives the same values
            normalized = _as_float32(raw).sub_(self.mean).mul_(1.0 / self.std)
        else:
            import torch

            mean, scale = (torch.as_tensor(v, device=raw.device) for v in self._per_channel())
            normalized = _as_float32(raw).sub_(mean).mul_(scale)
        return normalized.clamp_(0.0, 1.0) if self.clip else normalized

    def _per_channel(self) -> tuple[Any, Any]:
        """(mean, 1 / std) as float32 scalars or (C, 1, 1) arrays that broadcast over (C, H, W)."""
        if self.channels is None:
            return np.float32(self.mean), np.float32(1.0 / self.std)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        return mean, (1.0 / np.asarray(self.std, np.float64)).astype(np.float32).reshape(-1, 1, 1)

    def invert(self, normalized: Any) -> Any:
        """raw = normalized * std + mean (a denoiser's output back in raw units); numpy or torch."""
        if self.channels is None:
            return normalized * self.std + self.mean
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        if _is_tensor(normalized):
            import torch

            std, mean = torch.as_tensor(std, device=normalized.device), torch.as_tensor(mean, device=normalized.device)
        return normalized * std + mean

    def for_image(self, image: np.ndarray, *, max_pixels: int = 4_000_000) -> "Normalization":
        """The normalisation of one image or stack sample ((H, W), (C, H, W) or (Z, C, H, W) with `channels`
        given by the leading axis of (C, H, W)): itself, or, for a percentile rule, that image's percentiles."""
        if self.percentiles is None:
            return self
        return percentile_normalization(image, self.percentiles, channels=self.channels, max_pixels=max_pixels,
                                        clip=self.clip)

    def to_dict(self) -> dict[str, Any]:
        as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        data: dict[str, Any] = {"mean": as_json(self.mean), "std": as_json(self.std)}
        if self.percentiles is not None:
            data["percentiles"] = list(self.percentiles)
        if self.clip:
            data["clip"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalization":
        value = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
        percentiles = data.get("percentiles")
        return cls(mean=value(data["mean"]), std=value(data["std"]),
                   percentiles=tuple(float(v) for v in percentiles) if percentiles is not None else None,
                   clip=bool(data.get("clip", False)))


def percentile_normalization(image: np.ndarray, percentiles: tuple[float, float], *, channels: int | None = None,
                             max_pixels: int = 4_000_000, clip: bool = False) -> Normalization:
    """mean = low percentile, std = high - low percentile, per channel, of `image` ((H, W) or (C, H, W)
    when `channels` is set; (N, C, H, W) samples too), from at most about `max_pixels` values per channel."""
    values = np.asarray(image)
    if channels is None:
        flat = values.reshape(1, -1)
    else:
        flat = np.moveaxis(values.reshape(-1, channels, *values.shape[-2:]), 1, 0).reshape(channels, -1)
    stride = max(1, flat.shape[1] // max_pixels)
    low, high = np.percentile(flat[:, ::stride].astype(np.float64), percentiles, axis=1)
    spread = np.maximum(high - low, 1e-6)
    return Normalization(mean=tuple(low.tolist()), std=tuple(spread.tolist()), clip=clip)


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _as_float32(raw: Any) -> Any:
    """A float32 copy of a tensor; uint16 goes through int32, which every device can convert."""
    import torch

    if raw.dtype == torch.uint16:
        return raw.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).float()
    return raw.float() if raw.dtype != torch.float32 else raw.clone()


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
        output_channel: the model output channel segkit writes (recorded; nothing uses it yet).

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

    kind: str  # "segmenter" (later also "denoiser")
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
    """Refuse a record that would run wrongly or not at all (CheckpointError, one line): an unknown
    model or kind, parameters out of range, a normalisation that is not finite or has std <= 0
    (which would write all-zero outputs), or inference defaults the model cannot use (a tile it does
    not accept, a threshold outside [0, 1], an unknown labels kind, ...).
    No torch: the model is only looked up in the registry."""
    fix = "the checkpoint is damaged or was edited: use another one or train again"
    if info.kind not in ("segmenter", "denoiser"):
        raise CheckpointError(f"{source}: unknown kind {info.kind!r} in its record (segmenter or denoiser); {fix}")
    _check_model(info.model, info.model_kwargs, source, fix)  # the kind is checked where it matters (load_model)
    _check_normalization(info.normalization.mean, info.normalization.std, source, fix)
    _check_inference(info.inference, info.geometry, source, fix)


def _check_inference(inference: InferenceDefaults, geometry: Geometry, source: str, fix: str) -> None:
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
    from segkit.errors import ConfigError
    from segkit.models import COMPOSED, model_kind

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
            _check_normalization(norm.get("mean"), norm.get("std"), source, fix)
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


def _check_normalization(mean: Any, std: Any, source: str, fix: str) -> None:
    if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) and mean:
        for m, s in zip(mean, std):  # one pair per channel
            _check_normalization(m, s, source, fix)
        return
    try:
        mean, std = float(mean), float(std)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: its record's normalisation (mean {mean!r}, std {std!r}) is not a pair of "
                              f"numbers (or of equal lists, one per channel); {fix}") from None
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise CheckpointError(f"{source}: its record's normalisation has mean {mean} and std {std}; segkit needs a "
                              f"finite mean and a finite std above 0 (std 0 or NaN would give all-zero output); {fix}")


def save_checkpoint(path: str | Path, model: Any, info: CheckpointInfo) -> None:
    """Write weights and info atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"segkit": info.to_json()})
    match_umask(tmp)
    os.replace(tmp, path)


def match_umask(path: Path) -> None:
    # safetensors creates files owner-only; checkpoints are shared like any other output file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_info(path: str | Path) -> CheckpointInfo:
    """Read only the JSON record of a checkpoint (fast; no weights, no torch), after checking that
    the file holds every byte its tensor table points to; the record is validated (`check_record`)."""
    header = _read_header(Path(path))
    try:
        record = header["__metadata__"]["segkit"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a segkit checkpoint (safetensors with a segkit record): "
                              f"it has no segkit record; pass a checkpoint from `segkit train`") from exc
    return CheckpointInfo.from_json(record, str(path))


#: safetensors dtype names and their sizes in bytes.
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file: every tensor's byte range
    lies inside the data, matches its shape and dtype, and the data is exactly covered (a truncated
    or damaged file fails here, with one line, before any weight is read)."""
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; check the path (segkit reads .safetensors "
                              "checkpoints from `segkit train` and .onnx files from `segkit export`)")
    not_ours = f"{path} is not a segkit checkpoint (safetensors with a segkit record)"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len <= 0 or header_len > 100_000_000 or 8 + header_len > size:
                raise ValueError(f"its header length {header_len} does not fit a file of {size} bytes")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{not_ours}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_ours}: its header is a JSON {type(header).__name__}, not a table of tensors")
    data_size = size - 8 - header_len
    damaged = f"{path} is truncated or damaged"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            count = int(np.prod([int(n) for n in entry["shape"]], dtype=np.int64)) * _DTYPE_SIZES[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{damaged}: the entry of tensor {name!r} is malformed; copy the checkpoint again "
                                  "or use another one") from exc
        if not 0 <= begin <= stop or stop - begin != count:
            raise CheckpointError(f"{damaged}: tensor {name!r} has byte range {begin}-{stop}, but its shape and dtype "
                                  f"need {count} bytes; copy the checkpoint again or use another one")
        if stop > data_size:
            raise CheckpointError(f"{damaged}: tensor {name!r} ends at byte {stop} of the weights, but the file holds "
                                  f"{data_size} bytes of weights; copy the checkpoint again or use another one")
        end = max(end, stop)
    if end != data_size:
        raise CheckpointError(f"{damaged}: its tensors cover {end} of its {data_size} bytes of weights; copy the "
                              "checkpoint again or use another one")
    return header


def check_weights_fit(path: str | Path, info: CheckpointInfo) -> Any:
    """Before anything is allocated: build the record's model on torch's meta device (shapes only),
    and refuse (CheckpointError, with the numbers) a model that does not match the file's tensors
    or whose parameters do not fit in the memory available. Returns the meta model."""
    from segkit.memory import available_memory, format_bytes, meta_model, parameter_bytes

    fix = "the checkpoint is damaged or was edited: use another one or train again"
    try:
        meta = meta_model(info.model, info.model_kwargs)
    except SegkitError as exc:
        raise CheckpointError(f"{path}: {exc}; {fix}") from exc
    header = _read_header(Path(path))
    stored = sum(int(np.prod([int(n) for n in entry["shape"]], dtype=np.int64))
                 for name, entry in header.items() if name != "__metadata__")
    wanted = sum(t.numel() for t in meta.state_dict().values())
    params = parameter_bytes(meta)
    available = available_memory()
    if available is not None and params > available:
        why = (f" (and the file holds only {stored:,} values: its weights do not match its record); {fix}"
               if stored != wanted else "; use a machine with more memory")
        raise CheckpointError(f"{path}: its record describes a {info.model} model ({_kwargs_text(info.model_kwargs)}) of "
                              f"{format_bytes(params)} of parameters, but {format_bytes(available)} of memory is "
                              f"available{why}")
    if stored != wanted:
        raise CheckpointError(f"{path}: its weights do not match its record: the record describes a {info.model} model "
                              f"({_kwargs_text(info.model_kwargs)}) of {wanted:,} values, but the file holds {stored:,}; "
                              f"{fix}")
    return meta


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if not isinstance(v, dict)) or "defaults"
    return text if len(text) <= 120 else text[:117] + "..."


def load_model(path: str | Path, *, expect_kind: str = "segmenter") -> tuple[Any, CheckpointInfo]:
    """Rebuild the model from a checkpoint and load its weights (strict), after checking that the
    record's model matches the file and fits in memory (`check_weights_fit`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from segkit.models import create_model

    info = read_info(path)
    if info.kind != expect_kind:
        use = {"denoiser": "use it with `segkit denoise`, or in front of a segmenter with `segkit predict --denoise`",
               "segmenter": "use it with `segkit predict`"}.get(info.kind, "")
        raise CheckpointError(f"{path} is a {info.kind} checkpoint, but a {expect_kind} checkpoint is needed here; {use}")
    meta = check_weights_fit(path, info)
    if meta.geometry != info.geometry:
        raise CheckpointError(f"{path}: recorded geometry {info.geometry} differs from the model's {meta.geometry}; "
                              "the checkpoint is damaged or was edited: use another one or train again")
    try:
        model = create_model(info.model, **info.model_kwargs)
    except SegkitError as exc:
        raise CheckpointError(f"{path}: {exc}; the checkpoint is damaged or was edited: use another one or "
                              "train again") from exc
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match model '{info.model}': {first}") from exc
    model.eval()
    return model, info


def initialize_from(model: Any, path: str | Path) -> int:
    """Copy every tensor of a segkit checkpoint whose name and shape match into `model`.

    This is how FCN-16s starts from a trained FCN-32s (and 8s from 16s): the shared layers carry
    over, the new skip layers keep their initialisation. Returns the number of tensors copied.
    """
    from safetensors.torch import load_file

    read_info(path)  # a clear error for a missing or foreign file
    source = load_file(str(path))
    ours = model.state_dict()
    matching = {k: v for k, v in source.items() if k in ours and ours[k].shape == v.shape}
    if not matching:
        raise CheckpointError(f"model.init_from: no tensor of {path} matches the model's layers")
    model.load_state_dict(matching, strict=False)
    return len(matching)


def put_in_front(denoiser: Any, denoiser_info: CheckpointInfo, segmenter: str, segmenter_kwargs: dict[str, Any],
                 segmenter_normalization: Normalization) -> tuple[Any, dict[str, Any]]:
    """A `denoised` model: the loaded `denoiser` (weights copied) in front of a new `segmenter`
    built from its registry name and kwargs; returns the model and its registry kwargs."""
    from segkit.models import COMPOSED, create_model

    kwargs = {
        "denoiser": {"name": denoiser_info.model, "kwargs": denoiser_info.model_kwargs,
                     "normalization": denoiser_info.normalization.to_dict()},
        "segmenter": {"name": segmenter, "kwargs": segmenter_kwargs, "normalization": segmenter_normalization.to_dict()},
    }
    model = create_model(COMPOSED, **kwargs)
    model.denoiser.load_state_dict(denoiser.state_dict())
    return model, kwargs


def compose_with_denoiser(denoiser_path: str | Path, segmenter_path: str | Path) -> tuple[Any, CheckpointInfo]:
    """Load a denoiser and a segmenter checkpoint as one model (denoiser first); its info carries
    the denoiser's input normalisation and the composed geometry."""
    from segkit.models import COMPOSED

    denoiser, denoiser_info = load_model(denoiser_path, expect_kind="denoiser")
    segmenter, segmenter_info = load_model(segmenter_path, expect_kind="segmenter")
    model, kwargs = put_in_front(denoiser, denoiser_info, segmenter_info.model, segmenter_info.model_kwargs,
                                 segmenter_info.normalization)
    model.segmenter.load_state_dict(segmenter.state_dict())
    model.eval()
    tile = segmenter_info.inference.tile
    if tile is not None:
        tile = model.geometry.nearest_valid(int(tile) + 2 * denoiser_info.geometry.margin)[1]
    info = CheckpointInfo(
        kind="segmenter", model=COMPOSED, model_kwargs=kwargs, geometry=model.geometry,
        normalization=denoiser_info.normalization, classes=segmenter_info.classes,
        inference=segmenter_info.inference.replace(tile=tile, input_dtype=denoiser_info.inference.input_dtype),
        recipe=segmenter_info.recipe, training=segmenter_info.training,
    )
    return model, info


def update_inference_defaults(path: str | Path, updates: dict[str, Any], *, chosen_on: tuple[int, int]) -> CheckpointInfo:
    """Write `updates` (field name -> value, see InferenceDefaults) into a checkpoint's inference
    defaults (atomically), after checking that the slices they were chosen on are the recipe's
    validation slices (never the test slices) and that the updated defaults are valid (`check_record`)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    info = read_info(path)
    val = info.recipe.get("data", {}).get("val_slices")
    if val is not None and not (val[0] <= chosen_on[0] and chosen_on[1] <= val[1]):
        raise CheckpointError(f"{path.name}: inference defaults must be chosen on the validation slices {val[0]}:{val[1]} "
                              f"of its recipe, not {chosen_on[0]}:{chosen_on[1]}; choose them on slices=({val[0]}, {val[1]})")
    known = [f.name for f in dataclasses.fields(InferenceDefaults)]
    unknown = sorted(set(updates) - set(known))
    if unknown:
        raise CheckpointError(f"{path.name}: unknown inference default {unknown[0]!r}; choose from {', '.join(known)}")
    info.inference = info.inference.replace(**updates)
    check_record(info, path.name)
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"segkit": info.to_json()})
    match_umask(tmp)
    os.replace(tmp, path)
    return info
