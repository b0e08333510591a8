"""Engines run a model on a batch of tiles: numpy (N, C, H, W) float32 in, probabilities out."""

from __future__ import annotations

from typing import Any

import numpy as np

from segkit.errors import SegkitError

AMP_DTYPES = ("none", "fp16", "bf16")


def resolve_device(requested: str) -> str:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error, not a fallback."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SegkitError(f"--device {requested} was asked for but CUDA is not available here; use --device cpu")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise SegkitError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    return requested


class TorchEngine:
    """Holds a model on a device and returns the softmax probability of one class per tile.

    Args:
        model: a segkit model (logits N x K x h x w).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        amp: 'none', 'fp16' or 'bf16' autocast (CUDA; bf16 also works on CPU).
        channel: the class whose probability is returned (1 = membrane for EM models); None returns
            the model's output as it is (denoisers).
    """

    def __init__(self, model: Any, *, device: str = "auto", amp: str = "none", channel: int | None = 1) -> None:
        import torch

        if amp not in AMP_DTYPES:
            raise SegkitError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_DTYPES)}")
        self.device = resolve_device(device)
        if amp == "fp16" and not self.device.startswith("cuda"):
            raise SegkitError("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
        self.amp = amp
        self.channel = channel
        self.model = model.to(self.device).eval()
        if self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        self.geometry = model.geometry

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device, non_blocking=True)
            if device_type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(x)
            if self.channel is None:
                return logits.float().cpu().numpy()
            probs = torch.softmax(logits.float(), dim=1)[:, self.channel : self.channel + 1]
            return probs.cpu().numpy()
