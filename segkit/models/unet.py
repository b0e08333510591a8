"""The original U-Net (Ronneberger, Fischer, Brox 2015): unpadded 3x3 convs, 2x2 max pooling,
2x2 up-convolutions and crop-and-concat skip connections. A 572 tile gives a 388 output."""

from __future__ import annotations

import torch
from torch import nn

from segkit.models.blocks import contract, crop_and_concat, double_conv, he_init, valid_encoder
from segkit.models.geometry import Geometry, valid_unet_geometry


class UNet(nn.Module):
    """Valid-convolution U-Net; returns class logits of shape (N, classes, H - 2m, W - 2m).

    Args:
        in_channels: input channels (1 for EM).
        classes: output classes (2 in the paper: interior, membrane).
        base: channels of the first level, doubled at each level (64 in the paper).
        depth: number of poolings (4 in the paper).
        batch_norm: BatchNorm after each conv (not in the paper; running stats keep tiled
            inference exact, unlike InstanceNorm).
        dropout: dropout probability at the end of the contracting path (the paper uses it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 2,
        base: int = 64,
        depth: int = 4,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1 or base < 1 or in_channels < 1 or classes < 1:
            raise ValueError("in_channels, classes, base and depth must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        self.geometry: Geometry = valid_unet_geometry(depth)
        self.out_channels = classes
        widths = [base * 2**level for level in range(depth + 1)]
        self.encoder, self.bottom = valid_encoder(in_channels, widths, batch_norm)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.upconvs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upconvs.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.decoder.append(double_conv(width * 2, width, batch_norm))
        self.head = nn.Conv2d(widths[0], classes, 1)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = contract(self.encoder, self.pool, x)
        x = self.dropout(self.bottom(x))
        for upconv, block, skip in zip(self.upconvs, self.decoder, reversed(skips)):
            x = upconv(x)
            x = block(crop_and_concat(skip, x))
        return self.head(x)
