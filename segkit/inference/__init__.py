"""Prediction: options, output encodings, the tiler, engines, and the single-machine and Dask paths.

The public names below are imported on first use, so `import segkit.inference` loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name and the module that holds it.
_HOMES = {
    "predict": "segkit.inference.api",
    "PredictResult": "segkit.inference.api",
    "Model": "segkit.inference.arrays",
    "predict_array": "segkit.inference.arrays",
    "PredictOptions": "segkit.inference.options",
    "ProbabilityEncoding": "segkit.inference.encodings",
    "ClassMapEncoding": "segkit.inference.encodings",
    "IntensityEncoding": "segkit.inference.encodings",
    "InstanceEncoding": "segkit.inference.encodings",
    "ObjectEncoding": "segkit.inference.encodings",
    "plan_tiles": "segkit.inference.tiler",
    "predict_planes": "segkit.inference.tiler",
    "predict_plane": "segkit.inference.tiler",
    "predict_arrays": "segkit.inference.tiler",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'segkit.inference' has no attribute {name!r}")
