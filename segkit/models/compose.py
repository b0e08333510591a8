"""A denoiser in front of a segmenter, as one model with one geometry.

The denoiser works in its own normalised units and the segmenter in its own, so between them
sits the affine map raw = d * std_d + mean_d, s = (raw - mean_s) / std_s. Geometries compose:
margins add, the step is the least common multiple, and an input tile is valid when it is valid
for the denoiser and its output is valid for the segmenter. Tiling the composition is therefore
exactly as seamless as tiling each model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from segkit.errors import TileSizeError
from segkit.models.geometry import Geometry


def compose_geometry(first: Geometry, second: Geometry) -> Geometry:
    """Geometry of `second(first(x))`."""
    if first.halo:
        raise TileSizeError("a pre-stage must be a valid-conv model (margin, no halo) so that margins add")
    step = math.lcm(first.step, second.step)
    margin = first.margin + second.margin
    start = max(first.min_input, second.min_input + 2 * first.margin)
    for size in range(start, start + step * second.step * first.step + 1):
        if first.is_valid_input(size) and second.is_valid_input(size - 2 * first.margin):
            return Geometry(margin=margin, step=step, min_output=size - 2 * margin, halo=second.halo)
    raise TileSizeError(f"no tile size suits both {first} and {second}")


class DenoisedSegmenter(nn.Module):
    """segmenter(affine(denoiser(x))); takes input normalised like the denoiser's training data.

    Args:
        denoiser: {"name", "kwargs", "normalization": {"mean", "std"}} of the pre-stage.
        segmenter: the same for the segmenter.
    The denoiser is frozen: training updates only the segmenter.
    """

    kind = "segmenter"

    def __init__(self, denoiser: dict[str, Any], segmenter: dict[str, Any]) -> None:
        super().__init__()
        from segkit.models import create_model

        self.denoiser = create_model(denoiser["name"], **denoiser["kwargs"])
        self.segmenter = create_model(segmenter["name"], **segmenter["kwargs"])
        for parameter in self.denoiser.parameters():
            parameter.requires_grad_(False)
        d, s = denoiser["normalization"], segmenter["normalization"]
        self.scale = float(d["std"]) / float(s["std"])
        self.shift = (float(d["mean"]) - float(s["mean"])) / float(s["std"])
        self.geometry = compose_geometry(self.denoiser.geometry, self.segmenter.geometry)
        self.out_channels = self.segmenter.out_channels

    def train(self, mode: bool = True) -> "DenoisedSegmenter":
        super().train(mode)
        self.denoiser.eval()  # frozen pre-stage: no dropout, BatchNorm statistics stay fixed
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(self.denoiser(x) * self.scale + self.shift)
