"""Checkpoints as plain data: safetensors weights plus a JSON record in the file's header.

The JSON holds the model name and kwargs, geometry, normalisation, the resolved recipe and the
segkit version, so `segkit predict` needs only the checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segkit import __version__
from segkit.errors import CheckpointError, SegkitError
from segkit.models.geometry import Geometry

FORMAT = "segkit-checkpoint/1"


@dataclass(frozen=True)
class Normalization:
    """Global intensity normalisation: (x - mean) / std, never computed per tile."""

    mean: float
    std: float

    def apply(self, raw: Any) -> Any:
        """(raw - mean) / std as float32, for a numpy array or a torch tensor of any stored dtype
        (uint8, uint16, float32), on whatever device the tensor is. The one place segkit normalises."""
        if not _is_tensor(raw):
            return (np.asarray(raw, np.float32) - np.float32(self.mean)) * np.float32(1.0 / self.std)
        # the same float32 arithmetic as for numpy, so every dtype and device gives the same values
        return _as_float32(raw).sub_(self.mean).mul_(1.0 / self.std)

    def invert(self, normalized: Any) -> Any:
        """raw = normalized * std + mean (a denoiser's output back in raw units); numpy or torch."""
        return normalized * self.std + self.mean

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalization":
        return cls(mean=float(data["mean"]), std=float(data["std"]))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _as_float32(raw: Any) -> Any:
    """A float32 copy of a tensor; uint16 goes through int32, which every device can convert."""
    import torch

    if raw.dtype == torch.uint16:
        return raw.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).float()
    return raw.float() if raw.dtype != torch.float32 else raw.clone()


@dataclass
class CheckpointInfo:
    """Everything but the weights: enough to rebuild and run the model."""

    kind: str  # "segmenter" (later also "denoiser")
    model: str
    model_kwargs: dict[str, Any]
    geometry: Geometry
    normalization: Normalization
    classes: list[str] = field(default_factory=lambda: ["interior", "membrane"])
    inference: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    segkit_version: str = __version__

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
                "inference": self.inference,
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
                inference=dict(data.get("inference", {})),
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
    (which would write all-zero outputs), or an inference tile or threshold the model cannot use.
    No torch: the model is only looked up in the registry."""
    fix = "the checkpoint is damaged or was edited: use another one or train again"
    if info.kind not in ("segmenter", "denoiser"):
        raise CheckpointError(f"{source}: unknown kind {info.kind!r} in its record (segmenter or denoiser); {fix}")
    _check_model(info.model, info.model_kwargs, source, fix)  # the kind is checked where it matters (load_model)
    _check_normalization(info.normalization.mean, info.normalization.std, source, fix)
    tile = info.inference.get("tile")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or not info.geometry.is_valid_input(tile)):
        below, above = info.geometry.nearest_valid(tile) if isinstance(tile, int) and tile > 0 else (None, None)
        near = f" (nearest valid: {below} or {above})" if above is not None else ""
        raise CheckpointError(f"{source}: its record's inference tile {tile!r} is not a valid tile of this model{near}; "
                              f"{fix}")
    threshold = info.inference.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise CheckpointError(f"{source}: its record's inference threshold {threshold!r} is not a number between 0 "
                              f"and 1; {fix}")


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
    try:
        mean, std = float(mean), float(std)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: its record's normalisation (mean {mean!r}, std {std!r}) is not a pair of "
                              f"numbers; {fix}") from None
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
    tile = segmenter_info.inference.get("tile")
    if tile is not None:
        tile = model.geometry.nearest_valid(int(tile) + 2 * denoiser_info.geometry.margin)[1]
    info = CheckpointInfo(
        kind="segmenter", model=COMPOSED, model_kwargs=kwargs, geometry=model.geometry,
        normalization=denoiser_info.normalization, classes=segmenter_info.classes,
        inference={**segmenter_info.inference, "tile": tile, "input_dtype": denoiser_info.inference.get("input_dtype")},
        recipe=segmenter_info.recipe, training=segmenter_info.training,
    )
    return model, info


def update_inference_defaults(path: str | Path, updates: dict[str, Any], *, chosen_on: tuple[int, int]) -> CheckpointInfo:
    """Write `updates` into a checkpoint's inference defaults (atomically), after checking that the
    slices they were chosen on are the recipe's validation slices (never the test slices)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    info = read_info(path)
    val = info.recipe.get("data", {}).get("val_slices")
    if val is not None and not (val[0] <= chosen_on[0] and chosen_on[1] <= val[1]):
        raise CheckpointError(f"{path.name}: inference defaults must be chosen on the validation slices {val[0]}:{val[1]} "
                              f"of its recipe, not {chosen_on[0]}:{chosen_on[1]}; choose them on slices=({val[0]}, {val[1]})")
    info.inference = {**info.inference, **updates}
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"segkit": info.to_json()})
    match_umask(tmp)
    os.replace(tmp, path)
    return info
