"""Model registry: every architecture is built by name, with its parameters checked.

`create_model("unet", base=8)` returns a torch module that has a `.geometry` attribute.
Model modules are imported lazily so that `import segkit` stays free of torch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from segkit.errors import ConfigError

__all__ = ["COMPOSED", "SMP_PREFIX", "ModelEntry", "check_model_kwargs", "create_model", "list_models", "model_class",
           "model_kind", "model_summary"]


@dataclass(frozen=True)
class ModelEntry:
    """Where a model's class lives and what it is, as plain data."""

    module: str
    attribute: str
    summary: str
    kind: str = "segmenter"  # or "denoiser"


_REGISTRY: dict[str, ModelEntry] = {
    "unet": ModelEntry("segkit.models.unet", "UNet", "original valid-conv U-Net (Ronneberger et al. 2015)"),
    "fcn32s": ModelEntry("segkit.models.fcn", "FCN32s", "FCN-VGG16, stride 32 (Long et al. 2015)"),
    "fcn16s": ModelEntry("segkit.models.fcn", "FCN16s", "FCN-VGG16 with pool4 skip, stride 16"),
    "fcn8s": ModelEntry("segkit.models.fcn", "FCN8s", "FCN-VGG16 with pool4 + pool3 skips, stride 8"),
    "denoiser": ModelEntry("segkit.models.denoiser", "DenoisingAutoencoder",
                           "valid-conv denoising autoencoder (pre-stage in front of a segmenter)", kind="denoiser"),
}
SMP_PREFIX = "smp:"
_SMP_ENTRY = ModelEntry("segkit.models.smp", "SmpModel", "segmentation-models-pytorch")
#: Built from two checkpoints' records (a denoiser in front of a segmenter), so not listed.
COMPOSED = "denoised"
_COMPOSED_ENTRY = ModelEntry("segkit.models.compose", "DenoisedSegmenter", "denoiser pre-stage + segmenter")


def list_models(kind: str | None = None) -> list[str]:
    """Names of registered architectures ("segmenter" or "denoiser" ones, or all); smp ones with
    their default encoder (any smp encoder works)."""
    from segkit.models.smp import ARCHITECTURES, DEFAULT_ENCODER

    smp = [f"{SMP_PREFIX}{arch}:{DEFAULT_ENCODER}" for arch in ARCHITECTURES] if kind in (None, "segmenter") else []
    return sorted(name for name, entry in _REGISTRY.items() if kind in (None, entry.kind)) + smp


def model_kind(name: str) -> str:
    """'segmenter' or 'denoiser'."""
    return _entry(name).kind


def model_summary(name: str) -> str:
    if name.startswith(SMP_PREFIX):
        return f"segmentation-models-pytorch {name[len(SMP_PREFIX):].replace(':', ' with encoder ')}"
    return _entry(name).summary


def _entry(name: str) -> ModelEntry:
    if name.startswith(SMP_PREFIX):
        return _SMP_ENTRY
    if name == COMPOSED:
        return _COMPOSED_ENTRY
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY) + ["smp:Unet:resnet34"], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint} valid: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_class(name: str) -> Any:
    entry = _entry(name)
    return getattr(importlib.import_module(entry.module), entry.attribute)


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ConfigError for a parameter the model does not take, naming the closest one, and for a
    value of a switch (a parameter whose default is True or False) that is not a boolean: the string
    'false' would otherwise switch it on."""
    signature = inspect.signature(model_class(name)).parameters
    params = [p for p in signature if p not in ("self", "kwargs", "arch_kwargs")]
    for key, value in kwargs.items():
        if key in signature and isinstance(signature[key].default, bool) and not isinstance(value, bool):
            raise ConfigError(f"model.params.{key}: expected true or false, got {value!r} ({type(value).__name__}); "
                              f"write {key}: true or {key}: false without quotes")
    if name.startswith(SMP_PREFIX):
        from segkit.models.smp import architecture_parameters, parse_name

        arch, _ = parse_name(name)
        params = [p for p in params if p not in ("arch", "encoder")] + architecture_parameters(arch)
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"model.params.{key}: unknown parameter of '{name}'{hint} valid: {', '.join(params)}"
            )


def create_model(name: str, **kwargs: Any) -> Any:
    """Build a registered model by name; unknown names and parameters raise ConfigError."""
    check_model_kwargs(name, kwargs)
    if name.startswith(SMP_PREFIX):
        from segkit.models.smp import parse_name

        arch, encoder = parse_name(name)
        kwargs = {"arch": arch, "encoder": encoder, **kwargs}
    try:
        return model_class(name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model '{name}' rejected its parameters {kwargs}: {exc}") from exc
