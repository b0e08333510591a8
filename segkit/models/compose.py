"""A denoiser in front of a segmenter, as one model with one geometry.

The denoiser works in its own normalised units and the segmenter in its own, so between them
sits the affine map raw = d * std_d + mean_d, s = (raw - mean_s) / std_s. Geometries compose:
margins add, the step is the least common multiple, and an input tile is valid when it is valid
for the denoiser and its output is valid for the segmenter. Tiling the composition is therefore
exactly as seamless as tiling each model.

`compose_with_denoiser` loads two checkpoints as one such model; `put_in_front` builds one from a
loaded denoiser and a new segmenter (training a segmenter behind a denoiser).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segkit.checkpoint import load_model
from segkit.errors import TileSizeError
from segkit.models import COMPOSED, create_model
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo


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


def put_in_front(denoiser: Any, denoiser_info: CheckpointInfo, segmenter: str, segmenter_kwargs: dict[str, Any],
                 segmenter_normalization: Normalization) -> tuple[Any, dict[str, Any]]:
    """A composed model: a loaded denoiser (weights copied) in front of a new segmenter.

    Parameters
    ----------
    denoiser : torch.nn.Module
        The loaded denoiser.
    denoiser_info : CheckpointInfo
        Its record (model, parameters, normalisation).
    segmenter : str
        The segmenter's registry name.
    segmenter_kwargs : dict
        Its parameters.
    segmenter_normalization : Normalization
        The normalisation the segmenter's input is in (one channel).

    Returns
    -------
    model : DenoisedSegmenter
        The composed model (registry name `COMPOSED`).
    kwargs : dict
        Its registry parameters, as a record stores them.
    """
    kwargs = {
        "denoiser": {"name": denoiser_info.model, "kwargs": denoiser_info.model_kwargs,
                     "normalization": denoiser_info.normalization.to_dict()},
        "segmenter": {"name": segmenter, "kwargs": segmenter_kwargs, "normalization": segmenter_normalization.to_dict()},
    }
    model = create_model(COMPOSED, **kwargs)
    model.denoiser.load_state_dict(denoiser.state_dict())
    return model, kwargs


def compose_with_denoiser(denoiser_path: str | Path, segmenter_path: str | Path) -> tuple[Any, CheckpointInfo]:
    """Load a denoiser and a segmenter checkpoint as one model, denoiser first.

    Parameters
    ----------
    denoiser_path : str or Path
        A denoiser checkpoint.
    segmenter_path : str or Path
        A segmenter checkpoint.

    Returns
    -------
    model : DenoisedSegmenter
        The composed model, in eval mode.
    info : CheckpointInfo
        Its record: the denoiser's input normalisation and dtype, the composed geometry (its trained
        tile grown by the denoiser's margin), the segmenter's classes, defaults and recipe.

    Raises
    ------
    CheckpointError
        Either checkpoint is refused, or is not of the kind its place needs.
    """
    denoiser, denoiser_info = load_model(denoiser_path, expect_kind="denoiser")
    segmenter, segmenter_info = load_model(segmenter_path, expect_kind="segmenter")
    model, kwargs = put_in_front(denoiser, denoiser_info, segmenter_info.model, segmenter_info.model_kwargs,
                                 segmenter_info.normalization)
    model.segmenter.load_state_dict(segmenter.state_dict())
    model.eval()
    tile = segmenter_info.inference.tile
    if tile is not None:
        tile = model.geometry.nearest_valid(int(tile) + 2 * denoiser_info.geometry.margin)[1]
    info = CheckpointInfo(
        kind="segmenter", model=COMPOSED, model_kwargs=kwargs, geometry=model.geometry,
        normalization=denoiser_info.normalization, classes=segmenter_info.classes,
        inference=segmenter_info.inference.replace(tile=tile, input_dtype=denoiser_info.inference.input_dtype),
        recipe=segmenter_info.recipe, training=segmenter_info.training,
    )
    return model, info
