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
from segkit.errors import CheckpointError
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
            if data.get("format") != FORMAT:
                raise CheckpointError(
                    f"{source}: unsupported checkpoint format {data.get('format')!r}, "
                    f"expected {FORMAT!r}"
                )
            return cls(
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
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed segkit record in checkpoint: {exc}") from exc


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
    """Read only the JSON record of a checkpoint (fast; no weights, no torch)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .safetensors file")
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or header_len > 100_000_000 or header_len > path.stat().st_size:
                raise ValueError("bad header length")
            header = json.loads(handle.read(header_len))
        record = header["__metadata__"]["segkit"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a segkit checkpoint (safetensors with a segkit record): {exc}"
        ) from exc
    return CheckpointInfo.from_json(record, str(path))


def load_model(path: str | Path, *, expect_kind: str = "segmenter") -> tuple[Any, CheckpointInfo]:
    """Rebuild the model from a checkpoint and load its weights (strict)."""
    from safetensors.torch import load_file

    from segkit.models import create_model

    info = read_info(path)
    if info.kind != expect_kind:
        use = {"denoiser": "use it with `segkit denoise`, or in front of a segmenter with `segkit predict --denoise`",
               "segmenter": "use it with `segkit predict`"}.get(info.kind, "")
        raise CheckpointError(f"{path} is a {info.kind} checkpoint, but a {expect_kind} checkpoint is needed here; {use}")
    model = create_model(info.model, **info.model_kwargs)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match model '{info.model}': {first}") from exc
    if model.geometry != info.geometry:
        raise CheckpointError(
            f"{path}: recorded geometry {info.geometry} differs from the model's {model.geometry}"
        )
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
