"""segkit: biomedical image segmentation with seamless overlap-tile inference.

Importing segkit pulls in no torch, onnxruntime or albumentations; heavy modules are imported
by the functions that need them.

segkit makes no network call: albumentations' update check (a request to pypi.org at every
import, in every DataLoader worker) is switched off through its documented environment switch,
set here, before any import of it, so worker processes inherit it. A value the user set is kept.
"""

import os

from segkit.version import __version__

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def __getattr__(name: str):  # noqa: ANN202 - lazy: `segkit.predict` imports torch only when called
    if name == "predict":
        from segkit.inference.api import predict

        return predict
    if name in ("Model", "predict_array"):  # arrays in, arrays out
        from segkit.inference import arrays

        return getattr(arrays, name)
    raise AttributeError(f"module 'segkit' has no attribute {name!r}")


__all__ = ["predict", "predict_array", "Model", "__version__"]
