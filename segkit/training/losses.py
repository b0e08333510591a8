"""Losses: the U-Net paper's pixel-weighted cross-entropy, optionally plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of w(x) * CE(x) over pixels; logits (N, K, H, W), target (N, H, W) int, weight (N, H, W)."""
    per_pixel = F.cross_entropy(logits.float(), target, reduction="none")
    return (per_pixel * weight).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
                   eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice of the foreground classes 1..K-1 over the batch.

    Every foreground class counts the same (class 0 is the background, interior of membranes or
    the most common class by the label rules), so a rare class such as the axons of a 3-class
    recipe gets the same Dice term as a common one. Pixels of weight 0 (an ignored label value)
    count in neither the prediction nor the truth.
    """
    classes = logits.shape[1]
    probability = torch.softmax(logits.float(), dim=1)[:, 1:]
    truth = F.one_hot(target.long(), classes).permute(0, 3, 1, 2)[:, 1:].float()
    if weight is not None:
        valid = (weight > 0).unsqueeze(1).float()
        probability, truth = probability * valid, truth * valid
    dims = (0, 2, 3)
    intersection = (probability * truth).sum(dims)
    dice = (2.0 * intersection + eps) / (probability.sum(dims) + truth.sum(dims) + eps)
    return 1.0 - dice.mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, dice_weight: float = 0.0
) -> torch.Tensor:
    """Weighted cross-entropy, plus `dice_weight` times the foreground soft Dice loss."""
    loss = weighted_cross_entropy(logits, target, weight)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits, target, weight)
    return loss
