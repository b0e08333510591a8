"""segkit: biomedical image segmentation with seamless overlap-tile inference.

Importing segkit pulls in no torch, onnxruntime or albumentations; heavy modules are imported
by the functions that need them.
"""

__version__ = "0.1.0"
