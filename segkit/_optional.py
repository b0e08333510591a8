"""One helper for optional imports, so every missing package gets the same actionable message."""

from __future__ import annotations

import importlib
from types import ModuleType

from segkit.errors import MissingDependencyError


def require(module: str, *, feature: str, package: str | None = None) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = package or module
        raise MissingDependencyError(
            f"{feature} needs the package '{name}' ({exc}); install it with: pip install {name}"
        ) from exc
