import numpy as np
import pytest

from segkit.errors import InputError
from segkit.metrics import label_cells, mean_scores, score_slice, segmentation_scores, to_probability


def two_cells() -> np.ndarray:
    membrane = np.zeros((10, 10), bool)
    membrane[:, 5] = True  # cells: columns 0-4 (50 px) and 6-9 (40 px)
    return membrane


def test_perfect_prediction():
    membrane = two_cells()
    s = score_slice(membrane.astype(float), membrane)
    assert s.pixel_error == 0 and s.adapted_rand_error == pytest.approx(0, abs=1e-12)
    assert s.vi == pytest.approx(0, abs=1e-12) and s.dice == 1 and s.iou == 1


def test_one_pixel_gap_merges_two_cells():
    membrane = two_cells()
    probability = membrane.astype(float)
    probability[4, 5] = 0.0  # a gap in the predicted membrane
    s = score_slice(probability, membrane)
    assert s.pixel_error == pytest.approx(1 / 100)
    # Rand F-score over pixel pairs (self-pairs excluded, n = 90 foreground pixels):
    # together in both: 50^2 + 40^2 - 90 = 4010; together in the merged prediction: 90^2 - 90 = 8010.
    f_score = 2 * (4010 / 8010) * 1.0 / (4010 / 8010 + 1.0)
    assert s.adapted_rand_error == pytest.approx(1 - f_score)
    # VI merge = H(truth | prediction) = H(5/9, 4/9) in bits; no split.
    h = -(5 / 9) * np.log2(5 / 9) - (4 / 9) * np.log2(4 / 9)
    assert s.vi_merge == pytest.approx(h) and s.vi_split == pytest.approx(0, abs=1e-12)
    # Dice of membrane: 9 shared of 9 + 10 pixels.
    assert s.dice == pytest.approx(18 / 19) and s.iou == pytest.approx(9 / 10)


def test_split_cell():
    truth = np.ones((4, 6), np.int64)  # one cell
    pred = np.ones((4, 6), np.int64)
    pred[:, 3:] = 2  # split into two halves of 12
    error, _, _, split, merge = segmentation_scores(truth, pred)
    # pairs: together in both 2 * 12^2 - 24 = 264, together in truth 24^2 - 24 = 552
    f_score = 2 * (264 / 552) / (264 / 552 + 1)
    assert error == pytest.approx(1 - f_score)
    assert split == pytest.approx(1.0) and merge == pytest.approx(0.0, abs=1e-12)


def test_predicted_membrane_pixels_are_singletons():
    # A thick predicted membrane over a ground-truth cell neither merges nor is one big segment.
    truth = np.ones((6, 6), np.int64)
    pred = label_cells(np.ones((6, 6), bool))
    pred[:, 2:4] = 0
    error, precision, recall, _, _ = segmentation_scores(truth, pred)
    assert error > 0 and min(precision, recall) < 1


def test_mean_and_conversions():
    membrane = two_cells()
    a = score_slice(membrane.astype(float), membrane)
    b = score_slice(np.zeros((10, 10)), membrane)
    assert mean_scores([a, b])["pixel_error"] == pytest.approx(b.pixel_error / 2)
    np.testing.assert_allclose(to_probability(np.array([0, 255], np.uint8)), [0, 1])
    with pytest.raises(InputError, match="not \\[0, 1\\]"):
        to_probability(np.array([0.0, 7.0], np.float32))


def test_all_membrane_prediction_scores_worst_not_nan():
    membrane = two_cells()
    s = score_slice(np.ones((10, 10)), membrane)
    assert s.adapted_rand_error == 1.0 and np.isfinite(s.vi)


def test_scores_at_several_thresholds_match_single_scores():
    from segkit.metrics import score_thresholds

    membrane = two_cells()
    probability = np.random.default_rng(0).random((10, 10)) * 0.4 + 0.6 * membrane
    table = score_thresholds(probability, membrane, (0.3, 0.5, 0.7))
    for t in (0.3, 0.5, 0.7):
        assert table[t] == score_slice(probability, membrane, threshold=t)
