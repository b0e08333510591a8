"""The module a bioimage.io package holds: a segkit model with its output made what the package declares.

`PackagedModel` wraps a registry model: it mirrors its input by (before, after) px first and crops
what the model returns back to its input's size (so a valid-conv model returns a tile of its input's
size, whose border a consumer crops as the declared halo, which is what bioimageio.core's tiling
needs), and turns the logits into one class's probability, all K classes' probabilities, or leaves
a denoiser's intensities as they are. The two pads are chosen (`segkit.bioimageio.write.package_padding`)
so that every block of bioimageio.core's tiling puts the model's pooling grid where segkit's own
tiler puts it, so both give the same pixels.

This module imports only torch (and segkit's registry, in `packaged_model` alone): a package's
`arch.py` is this module's source together with the model classes', so bioimageio.core builds the
pytorch_state_dict weights' architecture without segkit (see `segkit.bioimageio.source`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segkit.models import create_model

#: What a packaged model returns (`PackagedModel(output=...)`).
PACKAGED_OUTPUTS = ("probability", "probabilities", "intensity")


class PackagedModel(nn.Module):
    """A segkit model as a bioimage.io package runs it: (N, C, H, W) float32 normalised input.

    Args:
        model: the registry model (its state dict keys get the prefix `model.`).
        output: "probability" (softmax over the classes, class `channel` only: (N, 1, H, W)),
            "probabilities" (all K classes: (N, K, H, W)) or "intensity" (the model's output as it is).
        pad: (before, after) pixels mirrored (numpy's 'reflect') onto the top and left, and the bottom and
            right, first; each at least the model's margin.
        margin: the pixels the model loses per side (valid convolutions); the output is cropped by
            pad - margin per side, so it has the input's size.
        channel: the class of "probability".
    """

    def __init__(self, model: nn.Module, output: str = "probability", pad: tuple[int, int] = (0, 0), margin: int = 0,
                 channel: int = 1) -> None:
        super().__init__()
        if output not in PACKAGED_OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(PACKAGED_OUTPUTS)}, not {output!r}")
        before, after = (int(p) for p in pad)
        if min(before, after) < margin or margin < 0:
            raise ValueError(f"pad {pad} must be at least the margin {margin} on each side")
        self.model = model
        self.output = output
        self.pad = (before, after)
        self.crop = (before - margin, after - margin)
        self.channel = int(channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.pad
        if before or after:
            x = F.pad(x, (before, after, before, after), mode="reflect")
        y = self.model(x)
        first, last = self.crop
        if first or last:
            y = y[..., first:y.shape[-2] - last, first:y.shape[-1] - last]
        if self.output == "probabilities":
            return torch.softmax(y, dim=1)
        if self.output == "probability":
            return torch.softmax(y, dim=1)[:, self.channel:self.channel + 1]
        return y


def packaged_model(model: str, model_kwargs: dict[str, Any] | None = None, output: str = "probability",
                   pad: tuple[int, int] | list[int] = (0, 0), margin: int = 0, channel: int = 1) -> nn.Module:
    """The architecture of a package's pytorch_state_dict weights, built by registry name.

    Parameters
    ----------
    model : str
        A segkit registry name.
    model_kwargs : dict, optional
        Its parameters.
    output : {"probability", "probabilities", "intensity"}
        What it returns (see `PackagedModel`).
    pad : (int, int)
        Pixels mirrored onto the input first, before and after (see `PackagedModel`).
    margin : int
        The pixels the model loses per side.
    channel : int
        The class of "probability".

    Returns
    -------
    PackagedModel
        In eval mode.
    """
    return PackagedModel(create_model(model, **(model_kwargs or {})), output=output, pad=(pad[0], pad[1]),
                         margin=margin, channel=channel).eval()
