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


@dataclass(frozen=True)
class ModelEntry:
    """Where a model's class lives and what it is, as plain data."""

    module: str
    attribute: str
    summary: str


_REGISTRY: dict[str, ModelEntry] = {
    "unet": ModelEntry(
        "segkit.models.unet", "UNet", "original valid-conv U-Net (Ronneberger et al. 2015)"
    ),
}


def list_models() -> list[str]:
    """Names of all registered architectures."""
    return sorted(_REGISTRY)


def model_summary(name: str) -> str:
    return _entry(name).summary


def _entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint} valid: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_class(name: str) -> Any:
    entry = _entry(name)
    return getattr(importlib.import_module(entry.module), entry.attribute)


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ConfigError for a parameter the model does not take, naming the closest one."""
    params = [p for p in inspect.signature(model_class(name)).parameters if p != "self"]
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
    try:
        return model_class(name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model '{name}' rejected its parameters {kwargs}: {exc}") from exc
