"""segkit: biomedical image segmentation with seamless overlap-tile inference.

Importing segkit pulls in no torch, onnxruntime or albumentations; heavy modules are imported
by the functions that need them.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: `segkit.predict` imports torch only when called
    if name == "predict":
        from segkit.inference.api import predict

        return predict
    raise AttributeError(f"module 'segkit' has no attribute {name!r}")


__all__ = ["predict", "__version__"]
