"""Convolutional denoising autoencoder (Vincent et al. 2008), valid convolutions throughout.

Encoder: unpadded 3x3 convs + 2x2 max pooling per level; bottleneck; decoder: 2x upsampling
followed by unpadded 3x3 convs, optional crop-and-concat skips. Upsampling is either
resize-convolution (nearest neighbour, then convolution: no checkerboard artefacts, Odena et al.
2016) or a 2x2 transposed convolution. Valid convolutions give it a margin like the U-Net's, so
in front of a segmenter the margins simply add and tiling stays exact.
"""

from __future__ import annotations

import torch
from torch import nn

from segkit.models.blocks import contract, crop_and_concat, double_conv, he_init, valid_encoder
from segkit.models.geometry import Geometry, valid_unet_geometry

UPSAMPLING = ("resize", "transpose")


class DenoisingAutoencoder(nn.Module):
    """Maps a noisy image (N, C, H, W) to a clean estimate (N, C, H - 2m, W - 2m), in the same units.

    Args:
        in_channels: image channels (1 for EM).
        base: channels of the first level, doubled per level.
        depth: number of poolings (the bottleneck is 2**depth times smaller).
        skip: crop-and-concat skip connections (a U-Net-shaped autoencoder) or a plain bottleneck.
        upsampling: "resize" (nearest + conv) or "transpose" (2x2 transposed conv).
        batch_norm: BatchNorm after each conv.
    """

    kind = "denoiser"

    def __init__(self, in_channels: int = 1, base: int = 16, depth: int = 2, skip: bool = True,
                 upsampling: str = "resize", batch_norm: bool = False) -> None:
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {', '.join(UPSAMPLING)}, not {upsampling!r}")
        if depth < 1 or base < 1 or in_channels < 1:
            raise ValueError("in_channels, base and depth must be positive")
        self.geometry: Geometry = valid_unet_geometry(depth)
        self.out_channels = in_channels
        self.skip = skip
        widths = [base * 2**level for level in range(depth + 1)]
        self.encoder, self.bottom = valid_encoder(in_channels, widths, batch_norm)
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            if upsampling == "resize":
                self.upsamplers.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                     nn.Conv2d(width * 2, width, 1)))
            else:
                self.upsamplers.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.decoder.append(double_conv(width * 2 if skip else width, width, batch_norm))
        self.head = nn.Conv2d(widths[0], in_channels, 1)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = contract(self.encoder, self.pool, x)
        x = self.bottom(x)
        for up, block, skip in zip(self.upsamplers, self.decoder, reversed(skips)):
            x = up(x)
            if self.skip:
                x = crop_and_concat(skip, x)
            x = block(x)
        return self.head(x)
