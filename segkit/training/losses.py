"""Losses: the U-Net paper's pixel-weighted cross-entropy, optionally plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of w(x) * CE(x) over pixels; logits (N, K, H, W), target (N, H, W) int, weight (N, H, W)."""
    per_pixel = F.cross_entropy(logits.float(), target, reduction="none")
    return (per_pixel * weight).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, channel: int = 1, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of class `channel` over the batch."""
    probability = torch.softmax(logits.float(), dim=1)[:, channel]
    truth = (target == channel).float()
    intersection = (probability * truth).sum()
    return 1.0 - (2.0 * intersection + eps) / (probability.sum() + truth.sum() + eps)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, dice_weight: float = 0.0
) -> torch.Tensor:
    loss = weighted_cross_entropy(logits, target, weight)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits, target)
    return loss
