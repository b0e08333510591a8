"""FCN-VGG16 (Long, Shelhamer, Darrell 2015): FCN-32s, FCN-16s and FCN-8s.

VGG16's 13 convs and 5 poolings, fc6/fc7 as 7x7 and 1x1 convolutions, 1x1 score layers
(zero-initialised), skip fusion from pool4 (16s) and pool3 (8s) by summation, learned 2x
up-convolutions initialised bilinear, and a final fixed bilinear upsampling. Convolutions are
same-padded, so an input that is a multiple of 32 gives an output of the same size; every
transposed convolution (kernel 2f, stride f) is cropped by f/2, which aligns pixel centres.
The feature layers keep torchvision's VGG16 indices, so its ImageNet weights load by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segkit.errors import CheckpointError, ConfigError
from segkit.models.geometry import Geometry

# VGG16 configuration "D": channels per conv (as multiples of the base width), "M" = max pool.
_VGG16 = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")
_POOL3_END, _POOL4_END = 17, 24  # indices in `features` just after pool3 and pool4 (torchvision layout)


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """(channels, 1, size, size) bilinear interpolation kernel for a depthwise transposed conv.

    Computed on the CPU and moved to the default device: on the meta device (a shapes-only model) the
    arithmetic would run torch's reference implementations, whose first use imports torch._dynamo."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - torch.abs(torch.arange(size, dtype=torch.float32, device="cpu") - centre) / factor
    kernel = torch.outer(ramp, ramp).expand(channels, 1, size, size).clone()
    return kernel.to(torch.get_default_device())


def _vgg16_features(in_channels: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width * int(item), 3, padding=1), nn.ReLU(inplace=True)]
            channels = width * int(item)
    return nn.Sequential(*layers)


class FCN(nn.Module):
    """FCN-VGG16 with output stride 32 (`variant="32s"`), 16 or 8; logits (N, classes, H, W).

    Args:
        variant: "32s", "16s" or "8s".
        in_channels: 1 (grayscale; ImageNet conv1 weights are summed over RGB) or 3.
        classes: output classes.
        width: channels of the first VGG block (64 in VGG16; small values for tests).
        fc: channels of fc6/fc7 (4096 in VGG16).
        dropout: dropout after fc6 and fc7.
        halo: context in pixels the tiler adds around each tile and blends away.
    """

    def __init__(self, variant: str = "8s", in_channels: int = 1, classes: int = 2, width: int = 64,
                 fc: int = 4096, dropout: float = 0.5, halo: int = 96) -> None:
        super().__init__()
        if variant not in ("32s", "16s", "8s"):
            raise ValueError(f"variant must be 32s, 16s or 8s, not {variant!r}")
        if min(in_channels, classes, width, fc) < 1 or halo < 0:
            raise ValueError("in_channels, classes, width and fc must be positive, halo >= 0")
        self.variant, self.classes = variant, classes
        self.geometry = Geometry(margin=0, step=32, min_output=32, halo=halo)
        self.out_channels = classes
        self.features = _vgg16_features(in_channels, width)
        self.fc6 = nn.Conv2d(8 * width, fc, 7, padding=3)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout2d(dropout)
        self.score_fr = nn.Conv2d(fc, classes, 1)
        scores = [self.score_fr]
        if variant in ("16s", "8s"):
            self.score_pool4 = nn.Conv2d(8 * width, classes, 1)
            self.upscore2 = nn.ConvTranspose2d(classes, classes, 4, stride=2, bias=False)
            scores.append(self.score_pool4)
        if variant == "8s":
            self.score_pool3 = nn.Conv2d(4 * width, classes, 1)
            self.upscore_pool4 = nn.ConvTranspose2d(classes, classes, 4, stride=2, bias=False)
            scores.append(self.score_pool3)
        self.final_factor = {"32s": 32, "16s": 16, "8s": 8}[variant]
        self.register_buffer("final_kernel", bilinear_kernel(classes, 2 * self.final_factor), persistent=False)
        self._init(scores)

    def _init(self, scores: list[nn.Conv2d]) -> None:
        if self.final_kernel.is_meta:  # a shapes-only model has no values to draw (see models.blocks.he_init)
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for score in scores:  # the paper zero-initialises the class scoring layers
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        for up in (getattr(self, "upscore2", None), getattr(self, "upscore_pool4", None)):
            if up is not None:
                with torch.no_grad():
                    up.weight.zero_()
                    for c in range(self.classes):  # identity across classes, bilinear in space
                        up.weight[c, c] = bilinear_kernel(1, 4)[0, 0]

    @staticmethod
    def _crop(x: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
        return x[..., offset : offset + height, offset : offset + width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pool3 = self.features[:_POOL3_END](x)
        pool4 = self.features[_POOL3_END:_POOL4_END](pool3)
        pool5 = self.features[_POOL4_END:](pool4)
        h = self.drop(F.relu(self.fc6(pool5), inplace=True))
        h = self.drop(F.relu(self.fc7(h), inplace=True))
        score = self.score_fr(h)
        if self.variant in ("16s", "8s"):
            score = self._crop(self.upscore2(score), 1, pool4.shape[-2], pool4.shape[-1]) + self.score_pool4(pool4)
        if self.variant == "8s":
            score = self._crop(self.upscore_pool4(score), 1, pool3.shape[-2], pool3.shape[-1]) + self.score_pool3(pool3)
        f = self.final_factor
        up = F.conv_transpose2d(score, self.final_kernel.to(score.dtype), stride=f, groups=self.classes)
        return self._crop(up, f // 2, height, width)

    def load_pretrained(self, path: str | Path) -> int:
        """Load torchvision VGG16 ImageNet weights (a local .pth state dict); returns tensors loaded."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {path} does not exist; download torchvision's vgg16 weights "
                              "(vgg16-397923af.pth) once and give their local path")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign files
            raise CheckpointError(f"model.pretrained: {path} is not a torch state dict: {exc}") from exc
        ours = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            target = key
            for source, ours_prefix in (("classifier.0.", "fc6."), ("classifier.3.", "fc7.")):
                if key.startswith(source):
                    target = ours_prefix + key[len(source):]
            if not target.startswith(("features.", "fc6.", "fc7.")):
                continue  # the ImageNet classifier head (classifier.6) has no counterpart
            if target in ours and value.numel() == ours[target].numel():
                value = value.reshape(ours[target].shape)  # Linear (out, in*7*7) -> conv (out, in, 7, 7)
            mapped[target] = value
        first = "features.0.weight"
        if first in mapped and mapped[first].shape[1] == 3 and ours[first].shape[1] == 1:
            mapped[first] = mapped[first].sum(dim=1, keepdim=True)  # grayscale: sum the RGB filters
        missing = [k for k in ours if k.startswith(("features.", "fc6.", "fc7.")) and k not in mapped]
        wrong = [k for k, v in mapped.items() if k in ours and ours[k].shape != v.shape]
        if missing or wrong:
            raise CheckpointError(
                f"model.pretrained: {path} does not fit this FCN (needs torchvision VGG16 at width 64, fc 4096): "
                f"{len(missing)} missing, {len(wrong)} mis-shaped tensors, e.g. {(missing + wrong)[0]}"
            )
        self.load_state_dict(mapped, strict=False)
        return len(mapped)


class FCN32s(FCN):
    """FCN-32s: scores from fc7 only, upsampled 32x."""

    def __init__(self, in_channels: int = 1, classes: int = 2, width: int = 64, fc: int = 4096,
                 dropout: float = 0.5, halo: int = 96) -> None:
        super().__init__("32s", in_channels, classes, width, fc, dropout, halo)


class FCN16s(FCN):
    """FCN-16s: fc7 scores fused with pool4 scores, upsampled 16x."""

    def __init__(self, in_channels: int = 1, classes: int = 2, width: int = 64, fc: int = 4096,
                 dropout: float = 0.5, halo: int = 96) -> None:
        super().__init__("16s", in_channels, classes, width, fc, dropout, halo)


class FCN8s(FCN):
    """FCN-8s: fused with pool4 and pool3 scores, upsampled 8x."""

    def __init__(self, in_channels: int = 1, classes: int = 2, width: int = 64, fc: int = 4096,
                 dropout: float = 0.5, halo: int = 96) -> None:
        super().__init__("8s", in_channels, classes, width, fc, dropout, halo)
