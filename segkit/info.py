"""What segkit will run on: versions, torch's devices and ONNX Runtime's providers, for
`segkit info` and for bug reports. Reads package versions from their metadata (no imports),
and imports torch and onnxruntime only to ask them about devices."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

from segkit.inference.engines import cuda_provider_fix, resolve_device
from segkit.version import DISTRIBUTION, __version__

#: Distributions whose versions matter for a bug report (name on PyPI).
PACKAGES = (DISTRIBUTION, "torch", "torchvision", "onnxruntime-gpu", "onnxruntime", "segmentation-models-pytorch",
            "timm", "albumentations", "opencv-python-headless", "opencv-python", "tifffile", "imagecodecs", "numpy",
            "scipy", "scikit-image", "click", "matplotlib", "dask", "zarr", "bioimageio.spec", "bioimageio.core")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each distribution that is installed (others are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def torch_devices() -> dict[str, Any]:
    """torch's build and the devices it sees; the device `device='auto'` resolves to."""
    try:
        import torch
    except ImportError:
        return {"installed": False}

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {"installed": True, "version": torch.__version__, "built_for_cuda": torch.version.cuda,
            "cuda_available": cuda, "gpus": gpus, "auto_device": resolve_device("auto"),
            "bf16_on_gpu": bool(cuda and torch.cuda.is_bf16_supported()), "cpu_threads": torch.get_num_threads()}


def onnxruntime_providers() -> dict[str, Any]:
    """ONNX Runtime's version and the providers this build offers (CUDA needs onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return {"installed": False}
    providers = onnxruntime.get_available_providers()
    return {"installed": True, "version": onnxruntime.__version__, "providers": providers,
            "gpu": "CUDAExecutionProvider" in providers}


def describe() -> dict[str, Any]:
    """Everything `segkit info` prints, as plain data."""
    return {"segkit": __version__, "distribution": DISTRIBUTION, "python": sys.version.split()[0],
            "platform": platform.platform(), "packages": package_versions(), "torch": torch_devices(), "onnxruntime": onnxruntime_providers()}


def format_info(info: dict[str, Any]) -> str:
    """`describe()` as lines for a terminal."""
    torch_info, ort = info["torch"], info["onnxruntime"]
    lines = [f"segkit {info['segkit']} on Python {info['python']} ({info['platform']}); "
             f"pip name {info['distribution']}"]
    if torch_info["installed"]:
        gpus = ", ".join(torch_info["gpus"]) or "none"
        lines.append(f"torch {torch_info['version']} (CUDA build {torch_info['built_for_cuda'] or 'none'}): "
                     f"GPUs {gpus}; device auto -> {torch_info['auto_device']}, {torch_info['cpu_threads']} CPU threads")
    else:
        lines.append("torch: not installed")
    if ort["installed"]:
        lines.append(f"onnxruntime {ort['version']}: providers {', '.join(ort['providers'])}"
                     + ("" if ort["gpu"] else f" (no CUDA provider: --engine onnx runs on the CPU; for a GPU: {cuda_provider_fix()})"))
    else:
        lines.append("onnxruntime: not installed (--engine onnx needs it)")
    lines.append("packages: " + ", ".join(f"{name} {version}" for name, version in info["packages"].items()))
    return "\n".join(lines)
