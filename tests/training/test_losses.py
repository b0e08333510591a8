"""The soft Dice term scores every foreground class, for every label kind, and honours ignored pixels."""

import pytest
import torch

from segkit.training.losses import segmentation_loss, soft_dice_loss


def _logits_for(target: torch.Tensor, classes: int, confident: float = 8.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, classes).permute(0, 3, 1, 2).float() * confident


@pytest.mark.parametrize("kind,classes", [("membrane", 2), ("semantic", 3), ("instances", 3)])
def test_dice_is_low_for_a_perfect_prediction_and_high_for_a_wrong_one(kind, classes):
    torch.manual_seed(0)
    target = torch.randint(0, classes, (2, 16, 16))
    perfect = soft_dice_loss(_logits_for(target, classes), target)
    wrong = soft_dice_loss(_logits_for((target + 1) % classes, classes), target)
    assert perfect < 0.01 and wrong > 0.95


@pytest.mark.parametrize("kind", ["semantic", "instances"])
def test_every_foreground_class_has_a_dice_term(kind):
    """3 classes (e.g. background / myelin / axon): getting class 2 wrong costs Dice, not only class 1."""
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    target[:, 4:6] = 2
    right = _logits_for(target, 3)
    class_2_missed = _logits_for(torch.where(target == 2, 0, target), 3)
    assert soft_dice_loss(class_2_missed, target) > soft_dice_loss(right, target) + 0.3  # (1 - 0) / 2 classes
    class_1_missed = _logits_for(torch.where(target == 1, 0, target), 3)
    assert soft_dice_loss(class_1_missed, target).item() == pytest.approx(soft_dice_loss(class_2_missed, target).item(), abs=0.05)


def test_two_class_dice_is_the_dice_of_class_one():
    """Membrane recipes: as before, the Dice of class 1 (the membrane)."""
    torch.manual_seed(1)
    logits, target = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
    probability = torch.softmax(logits, 1)[:, 1]
    truth = (target == 1).float()
    expected = 1 - (2 * (probability * truth).sum() + 1) / (probability.sum() + truth.sum() + 1)
    assert soft_dice_loss(logits, target) == pytest.approx(expected.item(), rel=1e-5)


def test_ignored_pixels_do_not_count():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    weight = torch.ones(1, 8, 8)
    logits = _logits_for(target, 2)
    logits[:, :, 6:] = _logits_for(torch.ones(1, 2, 8, dtype=torch.long), 2)  # wrong where ignored
    weight[:, 6:] = 0.0
    assert soft_dice_loss(logits, target, weight) < 0.01
    assert soft_dice_loss(logits, target) > 0.1  # the same mistakes count when not ignored
    assert segmentation_loss(logits, target, weight, dice_weight=1.0) < 0.05
