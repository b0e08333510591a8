"""segkit.normalization: the one implementation of intensity normalisation (global mean/std, per
channel, percentile rules) that training, prediction, export and packages share."""

import numpy as np
import pytest

from segkit.normalization import (
    Normalization,
    intensity_scale,
    mean_std_normalization,
    stack_normalization,
    typical_percentile_normalization,
)


class _Stack:
    def __init__(self, planes):
        self.planes = planes

    def __len__(self):
        return len(self.planes)

    def plane(self, index):
        return self.planes[index]


def test_mean_std_pools_every_plane_and_keeps_one_pair_per_channel():
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 255, (2, 8, 8), dtype=np.uint8) for _ in range(3)]
    norm = mean_std_normalization(planes, channels=2)
    for c in range(2):
        values = np.concatenate([p[c].ravel() for p in planes]).astype(np.float64)
        assert norm.mean[c] == pytest.approx(values.mean()) and norm.std[c] == pytest.approx(values.std())
    gray = mean_std_normalization([p[0] for p in planes])
    assert isinstance(gray.mean, float) and gray.channels is None
    assert mean_std_normalization([np.full((4, 4), 7, np.uint8)]).std == 1e-6  # constant: no division by 0


def test_stack_normalization_equals_mean_std_of_the_same_planes():
    rng = np.random.default_rng(1)
    planes = [rng.normal(100, 10, (16, 16)).astype(np.float32) for _ in range(4)]
    assert stack_normalization(_Stack(planes)) == mean_std_normalization(planes)
    colour = [rng.normal(100, 10, (3, 16, 16)).astype(np.float32) for _ in range(4)]
    assert stack_normalization(_Stack(colour)) == mean_std_normalization(colour, channels=3)


def test_typical_percentile_rule_holds_median_percentiles_and_normalises_each_image_by_its_own():
    images = [np.linspace(0, top, 1000, dtype=np.float32).reshape(10, 100) for top in (10.0, 20.0, 30.0)]
    rule = typical_percentile_normalization(images, (0.0, 100.0))
    assert rule.percentiles == (0.0, 100.0) and rule.clip
    assert rule.mean == pytest.approx(0.0) and rule.std == pytest.approx(20.0)
    own = rule.for_image(images[2]).apply(images[2])
    assert own.min() == pytest.approx(0.0) and own.max() == pytest.approx(1.0)


def test_apply_and_invert_round_trip_and_intensity_scale():
    norm = Normalization(mean=(10.0, 20.0), std=(2.0, 4.0))
    raw = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    assert np.allclose(norm.invert(norm.apply(raw)), raw)
    assert Normalization.from_dict(norm.to_dict()) == norm
    assert (intensity_scale(np.uint8), intensity_scale("uint16"), intensity_scale(np.float32)) == (255.0, 65535.0, 1.0)
