"""Building blocks shared by the valid-convolution models (the U-Net and the denoising autoencoder).

Every block here uses unpadded ("valid") 3x3 convolutions, so a model built from them loses a fixed
number of pixels per border (its margin, see `segkit.models.geometry`) and tiled inference stays
exact. The blocks return plain `nn.Sequential`/`nn.ModuleList` containers, so the parameter names of a
model that holds them (and so its checkpoints' state-dict keys) depend only on the attribute names the
model gives them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["center_crop", "contract", "crop_and_concat", "double_conv", "he_init", "valid_encoder"]


def double_conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """Two unpadded 3x3 convolutions, each followed by ReLU (and BatchNorm before it if `batch_norm`).

    Shrinks the input by 2 pixels per side: (N, in_channels, H, W) -> (N, out_channels, H - 4, W - 4).
    The convolutions have no bias when BatchNorm follows them. Layer indices inside the Sequential are
    [conv, relu, conv, relu] or [conv, bn, relu, conv, bn, relu] (part of the state-dict key names)."""
    layers: list[nn.Module] = []
    for channels in (in_channels, out_channels):
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=0, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def valid_encoder(in_channels: int, widths: list[int], batch_norm: bool) -> tuple[nn.ModuleList, nn.Sequential]:
    """Contracting path of unpadded double convs (one per level, pooled between) and the bottom block.

    `widths` lists the channels of each level, the last one being the bottom block's
    (`[base * 2**level for level in range(depth + 1)]` for a U-Net of `depth` poolings). Returns the
    encoder levels (`len(widths) - 1` double convs, without the pooling, which the model applies) and
    the bottom double conv."""
    encoder = nn.ModuleList()
    channels = in_channels
    for width in widths[:-1]:
        encoder.append(double_conv(channels, width, batch_norm))
        channels = width
    return encoder, double_conv(channels, widths[-1], batch_norm)


def he_init(model: nn.Module) -> None:
    """He et al. 2015 init, std sqrt(2/N), as the U-Net paper prescribes for ReLU networks.

    Applies to every Conv2d and ConvTranspose2d of `model` (in place; biases set to zero); other
    layers keep their default initialisation. Skipped on torch's meta device (a shapes-only model has
    no values to draw; torch's reference normal_ there would import torch._dynamo: 1.5 s of start-up)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and not module.weight.is_meta:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def center_crop(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central `height` x `width` window of `skip` (..., H, W), as a view (no copy).

    Used for the crop-and-concat skip connections of valid-convolution models, where the encoder's
    feature map is larger than the decoder's. When H - height is odd the extra pixel is cut at the
    bottom (and likewise at the right)."""
    top = (skip.shape[-2] - height) // 2
    left = (skip.shape[-1] - width) // 2
    return skip[..., top : top + height, left : left + width]


def contract(encoder: nn.ModuleList, pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the contracting path: each level of `encoder`, then `pool`, keeping every level's output.

    Parameters
    ----------
    encoder : nn.ModuleList
        The levels, as `valid_encoder` returns them (without the pooling).
    pool : nn.Module
        The pooling applied after each level.
    x : torch.Tensor
        The input (N, C, H, W).

    Returns
    -------
    x : torch.Tensor
        The last level's pooled output, the bottom block's input.
    skips : list of torch.Tensor
        Each level's output before pooling, first level first (the skip connections).
    """
    skips = []
    for block in encoder:
        x = block(x)
        skips.append(x)
        x = pool(x)
    return x, skips


def crop_and_concat(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The centre of `skip` cropped to the size of `x` and joined before it on the channel axis.

    Parameters
    ----------
    skip : torch.Tensor
        An encoder level's output (N, C1, H1, W1), at least as large as `x`.
    x : torch.Tensor
        The decoder's upsampled features (N, C2, H, W).

    Returns
    -------
    torch.Tensor
        (N, C1 + C2, H, W).
    """
    return torch.cat([center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1)
