"""Patch sampling that does not starve sparse foreground: a share of patches centred on objects and
rare classes (data.foreground_fraction)."""

import numpy as np
import pytest

from segkit.training.patches import pad_examples, sample_patch


def _sparse_set(margin=10, size=200):
    """One image with a single 6 x 6 object of class 1 (0.09 % of it) and a 4 x 4 one of class 2."""
    target = np.zeros((size, size), np.uint8)
    target[150:156, 30:36] = 1
    target[20:24, 170:174] = 2
    unit = np.random.default_rng(0).random((size, size)).astype(np.float32)
    return pad_examples([unit], [target], [np.ones_like(target, np.float32)], margin=margin, min_size=20)


def _centre_classes(slices, fraction, n=2000, tile=40, out_tile=20):
    rng = np.random.default_rng(1)
    centres = []
    for _ in range(n):
        _, target, _ = sample_patch(slices, rng, tile=tile, out_tile=out_tile, augment=None,
                                    foreground_fraction=fraction)
        centres.append(int(target[out_tile // 2, out_tile // 2]))
    return np.bincount(centres, minlength=3) / n


def test_a_share_of_patches_is_centred_on_foreground():
    slices = _sparse_set()
    share = _centre_classes(slices, 0.5)
    assert share[1] + share[2] == pytest.approx(0.5, abs=0.04)
    # the rare classes are drawn uniformly among those present: both get about half of the share
    assert share[1] == pytest.approx(0.25, abs=0.04) and share[2] == pytest.approx(0.25, abs=0.04)
    assert _centre_classes(slices, 1.0)[0] == 0.0


def test_without_the_fraction_patches_are_uniform_and_miss_sparse_objects():
    share = _centre_classes(_sparse_set(), 0.0)
    assert share[1] + share[2] < 0.02  # the old behaviour: about 0.1 % of centres on foreground


def test_foreground_centres_stay_inside_the_padded_image_and_skip_ignored_pixels():
    target = np.zeros((30, 30), np.uint8)
    target[0:2, 0:2] = 1  # an object in the corner: the patch is clipped to the padded image
    target[20:30, 20:30] = 2
    weight = np.ones_like(target, np.float32)
    weight[20:30, 20:30] = 0  # ignored: never a centre
    slices = pad_examples([np.zeros((30, 30), np.float32)], [target], [weight], margin=5, min_size=10)
    rng = np.random.default_rng(0)
    for _ in range(200):
        image, patch_target, _ = sample_patch(slices, rng, tile=24, out_tile=14, augment=None, foreground_fraction=1.0)
        assert image.shape == (1, 24, 24)
        assert (patch_target == 1).any()
    assert set(slices.foreground[0]) == {1}


def test_images_without_foreground_fall_back_to_uniform_patches():
    empty = pad_examples([np.zeros((30, 30), np.float32)], [np.zeros((30, 30), np.uint8)],
                         [np.ones((30, 30), np.float32)], margin=5, min_size=10)
    image, target, _ = sample_patch(empty, np.random.default_rng(0), tile=24, out_tile=14, augment=None,
                                    foreground_fraction=1.0)
    assert image.shape == (1, 24, 24) and not target.any()
