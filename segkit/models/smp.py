"""segmentation-models-pytorch architectures as segkit models: `smp:<Arch>:<encoder>`.

Encoder weights are never downloaded: they start random, or come from a local file through the
recipe's `model.pretrained`. The geometry is same-padding: inputs are multiples of the encoder's
total stride (2 ** encoder_depth) and tiles get a halo that the tiler blends away.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segkit._optional import require
from segkit.errors import CheckpointError, ConfigError
from segkit.models.geometry import Geometry

#: Architectures segkit serves, with the smallest output (in strides) each accepts.
ARCHITECTURES: dict[str, int] = {
    "Unet": 1, "UnetPlusPlus": 1, "FPN": 1, "Linknet": 1, "MAnet": 1, "PAN": 4,
    "PSPNet": 1, "DeepLabV3": 1, "DeepLabV3Plus": 1, "UPerNet": 1, "Segformer": 1,
}
DEFAULT_ENCODER = "resnet34"


def _smp() -> Any:
    return require("segmentation_models_pytorch", feature="smp models", package="segmentation-models-pytorch")


def parse_name(name: str) -> tuple[str, str]:
    """'smp:Unet:resnet34' -> ('Unet', 'resnet34'), with errors that list the choices."""
    import difflib

    parts = name.split(":")
    if len(parts) != 3 or parts[0] != "smp" or not parts[1] or not parts[2]:
        raise ConfigError(f"smp model name {name!r} must look like smp:<Arch>:<encoder>, e.g. smp:Unet:resnet34")
    arch, encoder = parts[1], parts[2]
    if arch not in ARCHITECTURES:
        close = difflib.get_close_matches(arch, list(ARCHITECTURES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown smp architecture '{arch}'{hint} valid: {', '.join(ARCHITECTURES)}")
    encoders = _smp().encoders.get_encoder_names()
    if encoder not in encoders:
        close = difflib.get_close_matches(encoder, encoders, n=3)
        raise ConfigError(f"unknown smp encoder '{encoder}'; closest: {', '.join(close) or 'none'} "
                          "(see segmentation_models_pytorch.encoders.get_encoder_names())")
    return arch, encoder


def architecture_parameters(arch: str) -> list[str]:
    """Keyword arguments the smp architecture itself takes (beyond segkit's own)."""
    cls = getattr(_smp(), arch)
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "kwargs", "encoder_name",
                                                                       "encoder_weights", "in_channels", "classes")]


class SmpModel(nn.Module):
    """An smp architecture with segkit geometry; logits (N, classes, H, W) for H, W multiples of the step.

    Args:
        arch: smp architecture name (Unet, FPN, ...).
        encoder: smp encoder name (resnet34, efficientnet-b0, ...).
        in_channels, classes: as in smp.
        halo: context in pixels added around each tile and blended away.
        **arch_kwargs: further arguments of the smp architecture (encoder_depth, decoder_channels, ...).
    """

    def __init__(self, arch: str, encoder: str = DEFAULT_ENCODER, in_channels: int = 1, classes: int = 2,
                 halo: int = 64, **arch_kwargs: Any) -> None:
        super().__init__()
        if halo < 0:
            raise ValueError("halo must be >= 0")
        smp = _smp()
        self.arch, self.encoder_name = arch, encoder
        self.net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                    classes=classes, **arch_kwargs)
        step = 2 ** (len(self.net.encoder.out_channels) - 1)
        self.geometry = Geometry(margin=0, step=step, min_output=step * ARCHITECTURES[arch], halo=halo)
        self.out_channels = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_pretrained(self, path: str | Path) -> int:
        """Load encoder weights from a local state dict file (keys as in smp's encoder or a timm/torchvision
        backbone); returns the number of tensors loaded."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {path} does not exist; give the local path of the encoder weights")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign files
            raise CheckpointError(f"model.pretrained: {path} is not a torch state dict: {exc}") from exc
        ours = self.net.encoder.state_dict()
        usable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
        first_conv = next((k for k in ours if k.endswith("weight") and ours[k].ndim == 4), None)
        if first_conv in state and first_conv not in usable and state[first_conv].shape[1] == 3 \
                and ours[first_conv].shape[1] == 1:
            usable[first_conv] = state[first_conv].sum(dim=1, keepdim=True)  # grayscale: sum the RGB filters
        if not usable:
            raise CheckpointError(f"model.pretrained: no tensor of {path} fits the {self.encoder_name} encoder")
        self.net.encoder.load_state_dict(usable, strict=False)
        return len(usable)
