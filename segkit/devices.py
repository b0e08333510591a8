"""Where a model runs and in what precision: the device and AMP rules that prediction and training
share, with their messages.

torch is imported inside the functions that need it, so that `import segkit` and `segkit --help`
stay free of it.
"""

from __future__ import annotations

from typing import Any

from segkit.errors import ConfigError, SegkitError

#: Autocast precisions a model can run in ("none": float32).
AMP_DTYPES = ("none", "fp16", "bf16")
#: What the amp option takes: a precision, or "auto" (the best the device has).
AMP_CHOICES = ("auto",) + AMP_DTYPES


def resolve_device(requested: str, *, option: str = "device", recipe: bool = False) -> str:
    """The device a model runs on, named as torch names the device of the tensors placed there.

    'auto' is cuda:N (the current GPU) when CUDA is available, else cpu; 'cuda' is cuda:N; 'cuda'
    without a GPU is an error, never a silent fallback to the CPU.

    Parameters
    ----------
    requested : str
        'auto', 'cpu', 'cuda' or 'cuda:N'.
    option : str
        The name errors give the setting ('device', 'train.device', ...).
    recipe : bool
        Word errors as a recipe setting (ConfigError: ``train.device=cuda was asked for ...; set
        train.device=cpu (or auto)``) instead of a keyword argument (SegkitError: ``device='cuda'
        was asked for ...; use device='cpu'``).

    Returns
    -------
    str
        'cpu' or 'cuda:N'.

    Raises
    ------
    SegkitError
        CUDA was asked for but is not available, or the device is unknown (ConfigError, a
        SegkitError, with `recipe`).
    """
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    if requested == "auto":
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        if recipe:
            raise ConfigError(f"{option}={requested} was asked for but CUDA is not available here; "
                              f"set {option}=cpu (or auto)")
        raise SegkitError(f"{option}={requested!r} was asked for but CUDA is not available here; use {option}='cpu'")
    if requested != "cpu" and not requested.startswith("cuda"):
        unknown = f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N"
        raise ConfigError(f"{option}: {unknown}") if recipe else SegkitError(unknown)
    return requested


def resolve_amp(amp: str, device: str) -> str:
    """The autocast precision on `device`: 'auto' is bf16 on GPUs that support it, else fp16, and
    none on the CPU (autocast there is slower).

    Parameters
    ----------
    amp : str
        One of `AMP_CHOICES`: 'auto', 'none', 'fp16' or 'bf16'.
    device : str
        A resolved device ('cpu', 'cuda:N'; see `resolve_device`).

    Returns
    -------
    str
        One of `AMP_DTYPES`.

    Raises
    ------
    SegkitError
        `amp` is not one of `AMP_CHOICES`.
    """
    if amp not in AMP_CHOICES:
        raise SegkitError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    if amp != "auto":
        return amp
    if not device.startswith("cuda"):
        return "none"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def training_precision(enabled: bool | None, device: str) -> tuple[Any, Any]:
    """Mixed precision for training (`train.amp`): the 'auto' rule of `resolve_amp` (bf16 where the
    GPU has it, else fp16; nothing on the CPU), with loss scaling for fp16.

    Parameters
    ----------
    enabled : bool or None
        The recipe's `train.amp`; None (not set) is the default, on (a no-op on the CPU).
    device : str
        A resolved device ('cpu', 'cuda:N').

    Returns
    -------
    dtype : torch.dtype or None
        The autocast dtype (None: float32).
    scaler : torch.amp.GradScaler
        Scales the loss for fp16; a no-op otherwise.
    """
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolve_amp("none" if enabled is False else "auto", device))
    if dtype is not None:
        torch.backends.cudnn.benchmark = True
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
