"""Augmentation of a whole batch on the tensors' device: the recipe's `augment` section, as
`segkit.training.patches.build_augmentation` (albumentations 2.0.x) applies it to one sample.

Why: one CPU DataLoader worker makes far fewer augmented 572-px patches per second than a GPU
trains on (tools/bench_augment.py measures both). Here the batch never leaves the device: flips
and rot90 are one exact gather, the elastic field is built as albumentations builds it (Gaussian
noise scaled to [-1, 1], blurred by OpenCV's kernel, times alpha, in pixels) and applied by
`grid_sample`; brightness/contrast and noise act on the image only, with albumentations'
formulas. Every random draw comes from the caller's generator, so a batch is reproducible.

Differences from the albumentations pipeline, by design: float masks (loss weights) are
interpolated bilinearly instead of by nearest neighbour; OpenCV's remap rounds coordinates to
1/32 pixel, grid_sample does not.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segkit.errors import ConfigError


def gaussian_kernel_size(sigma: float) -> int:
    """OpenCV's automatic kernel size for float images (`cv2.GaussianBlur(..., (0, 0), sigma)`,
    which albumentations' ElasticTransform uses): cvRound(8 sigma + 1) | 1."""
    return int(round(sigma * 8.0 + 1.0)) | 1


def gaussian_kernel(sigma: float, *, device: torch.device | str | None = None) -> Tensor:
    """The normalised 1D Gaussian taps of `cv2.getGaussianKernel(gaussian_kernel_size(sigma), sigma)`
    (computed in float64, stored as float32 like OpenCV's kernel for float images)."""
    size = gaussian_kernel_size(sigma)
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    taps = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (taps / taps.sum()).to(device=device, dtype=torch.float32)


def _blur_replicate(field: Tensor, sigma: float, *, use_conv: bool | None = None) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with replicated borders (cv2.BORDER_REPLICATE).

    On CUDA one conv2d per axis (cuDNN); elsewhere the same taps as shifted multiply-adds, which
    the CPU runs about 3x faster than a single-channel conv2d (identical sums either way).
    """
    taps = gaussian_kernel(sigma)  # built on the host from sigma alone: nothing leaves the device
    radius = taps.numel() // 2
    padded = F.pad(field, (radius, radius, radius, radius), mode="replicate")
    if use_conv if use_conv is not None else field.device.type == "cuda":
        taps = taps.to(field.device)
        rows = F.conv2d(padded, taps.view(1, 1, 1, -1))
        return F.conv2d(rows, taps.view(1, 1, -1, 1))
    h, w = field.shape[-2:]
    weights = taps.tolist()
    rows = padded[..., :, 0:w] * weights[0]
    for i in range(1, len(weights)):
        rows.add_(padded[..., :, i:i + w], alpha=weights[i])
    out = rows[..., 0:h, :] * weights[0]
    for i in range(1, len(weights)):
        out.add_(rows[..., i:i + h, :], alpha=weights[i])
    return out


def elastic_displacement(noise: Tensor, alpha: float, sigma: float) -> Tensor:
    """Displacement in pixels (N, 2 = dx, dy, H, W) from standard normal `noise` (N, 2, H, W),
    exactly as albumentations 2.0.x builds it (`generate_displacement_fields`, Gaussian noise):
    each sample's two fields are divided by their joint max |value| (so they lie in [-1, 1]),
    stacked as one (2H, W) image (dx above dy) and blurred with sigma and replicated borders,
    then multiplied by alpha. The output pixel (x, y) samples the input at (x + dx, y + dy)."""
    n, two, h, w = noise.shape
    if two != 2:
        raise ValueError(f"noise must be (N, 2, H, W), got {tuple(noise.shape)}")
    noise = noise.float()
    max_abs = noise.abs().amax(dim=(1, 2, 3), keepdim=True)
    fields = torch.where(max_abs > 1e-6, noise / max_abs.clamp_min(1e-6), noise)
    smoothed = _blur_replicate(fields.reshape(n, 1, 2 * h, w), sigma)
    return smoothed.reshape(n, 2, h, w) * alpha


def _reflect101(coordinate: Tensor, size: int) -> Tensor:
    """Fold a continuous pixel coordinate into [0, size - 1] by mirroring about the edge pixel
    centres (cv2.BORDER_REFLECT_101; grid_sample's reflection with align_corners=True)."""
    if size == 1:
        return torch.zeros_like(coordinate)
    period = 2.0 * (size - 1)
    folded = torch.remainder(coordinate, period)
    return torch.where(folded > size - 1, period - folded, folded)


def _d4_index(n: int, h: int, w: int, settings: dict[str, Any], generator: torch.Generator,
              device: torch.device) -> Tensor | None:
    """Per sample, the flat source index (N, H*W) of HorizontalFlip(0.5), VerticalFlip(0.5) and
    RandomRotate90 (k in 0..3, numpy's rot90 direction) in albumentations' order; None if off."""
    flips, rot90 = bool(settings.get("flips", False)), bool(settings.get("rot90", False))
    if not (flips or rot90):
        return None
    if rot90 and h != w:
        raise ValueError(f"augment.rot90 on a batch needs square patches, got {h} x {w}")
    horizontal = vertical = torch.zeros(n, dtype=torch.long, device=device)
    if flips:
        horizontal = (torch.rand(n, generator=generator, device=device) < 0.5).long()
        vertical = (torch.rand(n, generator=generator, device=device) < 0.5).long()
    turns = torch.zeros(n, dtype=torch.long, device=device)
    if rot90:
        turns = torch.randint(0, 4, (n,), generator=generator, device=device)
    base = torch.arange(h * w, device=device, dtype=torch.int32).view(h, w)
    table = []  # the 16 (hflip, vflip, k) index maps, made by the same array ops as albumentations
    for flip_x in (False, True):
        for flip_y in (False, True):
            plane = base.flip(1) if flip_x else base
            plane = plane.flip(0) if flip_y else plane
            table += [torch.rot90(plane, k, (0, 1)).reshape(-1) for k in range(4)]
    return torch.stack(table)[horizontal * 8 + vertical * 4 + turns].long()


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values (N, ..., H, W) rearranged by a flat per-sample source index (N, H*W)."""
    flat = values.reshape(values.shape[0], -1, index.shape[1])
    picked = flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1))
    return picked.reshape(values.shape)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """n draws of U(low, high) as float32 on `device`."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def augment_batch(
    image: Tensor, masks: list[Tensor], settings: dict[str, Any], generator: torch.Generator
) -> tuple[Tensor, list[Tensor]]:
    """Augment a batch on its own device, each sample independently, as build_augmentation would.

    image: (N, C, H, W) floating point, intensities in [0, 1]; returned in its dtype (the
    arithmetic is float32). masks: (N, H, W) tensors that follow the geometric transforms only:
    integer/bool masks (targets) by nearest neighbour (only input values appear, dtype kept),
    floating masks (loss weights) bilinearly. settings: the recipe's `augment` section (missing
    keys are off). generator: a torch.Generator on the tensors' device; the same generator state
    gives the same batch. Steps and probabilities as build_augmentation: HorizontalFlip 0.5,
    VerticalFlip 0.5, RandomRotate90 (k uniform in 0..3), ElasticTransform 0.8 (bicubic image,
    reflected border), RandomBrightnessContrast 0.8, GaussNoise 0.5.
    """
    if image.dim() != 4 or not image.is_floating_point():
        raise ValueError(f"image must be a floating (N, C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    n, _, h, w = image.shape
    device = image.device
    for mask in masks:
        if tuple(mask.shape) != (n, h, w) or mask.device != device:
            raise ValueError(f"each mask must be (N, H, W) = {(n, h, w)} on {device}, got {tuple(mask.shape)} "
                             f"on {mask.device}")
    if generator.device.type != device.type or (
        generator.device.index is not None and device.index is not None and generator.device.index != device.index
    ):
        raise ValueError(f"the generator is on {generator.device}, the batch on {device}; "
                         f"pass torch.Generator(device={str(device)!r})")
    dtype = image.dtype
    work = image.float()
    masks = list(masks)

    index = _d4_index(n, h, w, settings, generator, device)
    if index is not None:
        work = _gather(work, index)
        masks = [_gather(mask, index) for mask in masks]

    if settings.get("elastic", False):
        work, masks = _elastic(work, masks, settings, generator)

    limit = float(settings.get("brightness_contrast", 0.0))
    if limit > 0:
        apply = torch.rand(n, generator=generator, device=device) < 0.8
        contrast = 1.0 + _uniform(n, -limit, limit, generator, device)  # albumentations' alpha
        brightness = _uniform(n, -limit, limit, generator, device)  # beta, times max value 1.0
        adjusted = (work * contrast[:, None, None, None] + brightness[:, None, None, None]).clamp_(0.0, 1.0)
        work = torch.where(apply[:, None, None, None], adjusted, work)

    std = float(settings.get("noise_std", 0.0))
    if std > 0:
        apply = torch.rand(n, generator=generator, device=device) < 0.5
        sigma = _uniform(n, 0.0, std, generator, device)
        noise = torch.randn(work.shape, generator=generator, device=device)
        noisy = (work + noise * sigma[:, None, None, None]).clamp_(0.0, 1.0)
        work = torch.where(apply[:, None, None, None], noisy, work)

    return work.to(dtype), masks


def _elastic(work: Tensor, masks: list[Tensor], settings: dict[str, Any],
             generator: torch.Generator) -> tuple[Tensor, list[Tensor]]:
    """ElasticTransform(p=0.8): draw each sample's field, then warp the image and the masks."""
    alpha, sigma = float(settings["elastic_alpha"]), float(settings["elastic_sigma"])
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ConfigError(f"augment.elastic_alpha must be a finite number >= 0, got {alpha}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"augment.elastic_sigma must be a finite number > 0, got {sigma}")
    n, _, h, w = work.shape
    apply = torch.rand(n, generator=generator, device=work.device) < 0.8
    noise = torch.randn((n, 2, h, w), generator=generator, device=work.device)
    return warp_batch(work, masks, elastic_displacement(noise, alpha, sigma), apply)


def warp_batch(image: Tensor, masks: list[Tensor], displacement: Tensor,
               apply: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Resample a batch where output pixel (x, y) reads the input at (x + dx, y + dy), as cv2.remap
    with BORDER_REFLECT_101 does: image bicubic (OpenCV's INTER_CUBIC kernel, a = -0.75), floating
    masks bilinear, integer masks nearest (an index gather: exact for any dtype). `displacement` is
    (N, 2 = dx, dy, H, W) in pixels; samples where `apply` (N,) is False are returned unchanged."""
    n, _, h, w = image.shape
    if h < 2 or w < 2:
        raise ValueError(f"elastic deformation needs patches of at least 2 x 2 pixels, got {h} x {w}")
    device = image.device
    if apply is None:
        apply = torch.ones(n, dtype=torch.bool, device=device)
    displacement = displacement.float() * apply[:, None, None, None]
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    ys = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    source_x, source_y = xs + displacement[:, 0], ys + displacement[:, 1]
    # align_corners=True: -1 and 1 are the centres of the edge pixels, so grid_sample's reflection
    # mirrors about them, as BORDER_REFLECT_101 does (it also reflects each bicubic tap)
    grid = torch.stack((source_x * (2.0 / (w - 1)) - 1.0, source_y * (2.0 / (h - 1)) - 1.0), dim=-1)
    keep = apply[:, None, None, None]
    work = image.float()
    warped = F.grid_sample(work, grid, mode="bicubic", padding_mode="reflection", align_corners=True)
    out_image = torch.where(keep, warped, work).to(image.dtype)

    masks = list(masks)
    floating = [i for i, mask in enumerate(masks) if mask.is_floating_point()]
    if floating:
        stacked = torch.stack([masks[i].float() for i in floating], dim=1)
        smooth = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        smooth = torch.where(keep, smooth, stacked)
        for channel, i in enumerate(floating):
            masks[i] = smooth[:, channel].to(masks[i].dtype)
    if len(floating) < len(masks):
        # zero displacement rounds to the pixel itself, so unapplied samples are exact copies
        nearest_x = _reflect101(source_x, w).round_().clamp_(0, w - 1).long()
        nearest_y = _reflect101(source_y, h).round_().clamp_(0, h - 1).long()
        index = (nearest_y * w + nearest_x).reshape(n, h * w)
        masks = [mask if mask.is_floating_point() else _gather(mask, index) for mask in masks]
    return out_image, masks
