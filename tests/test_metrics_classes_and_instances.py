"""Golden numbers for the class and matched-instance metrics, and their stack evaluation."""

import warnings

import numpy as np
import pytest
import tifffile

from segkit.errors import InputError, OptionValueError
from segkit.evaluation import evaluate_matched_instances, evaluate_semantic
from segkit.metrics import IOU_THRESHOLDS, class_scores, instance_scores, mean_class_rows, mean_instance_rows

NAN = float("nan")


def write(path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, photometric="minisblack")


def one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# -- semantic classes --------------------------------------------------------------------------------


def test_class_scores_golden():
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 2, 2],
                      [2, 2, 2, 2]], np.uint8)
    pred = truth.copy()
    pred[0, 2] = 0  # a class-1 pixel called 0
    pred[2, :2] = 1  # two class-2 pixels called 1
    s = class_scores(pred, truth, 3)
    # class 0: tp 4, fp 1, fn 0; class 1: tp 3, fp 2, fn 1; class 2: tp 6, fp 0, fn 2
    assert s["dice_0"] == pytest.approx(8 / 9) and s["iou_0"] == pytest.approx(4 / 5)
    assert s["dice_1"] == pytest.approx(6 / 9) and s["iou_1"] == pytest.approx(3 / 6)
    assert s["dice_2"] == pytest.approx(12 / 14) and s["iou_2"] == pytest.approx(6 / 8)
    assert s["dice_mean"] == pytest.approx((8 / 9 + 6 / 9 + 12 / 14) / 3)
    assert s["iou_mean"] == pytest.approx((4 / 5 + 1 / 2 + 3 / 4) / 3)
    assert set(s) == {"dice_0", "dice_1", "dice_2", "iou_0", "iou_1", "iou_2", "dice_mean", "iou_mean"}
    perfect = class_scores(truth, truth, 3)
    assert all(v == 1.0 for v in perfect.values())


def test_class_scores_ignore_and_missing_class():
    truth = np.array([[0, 0, 1, 255],
                      [0, 0, 1, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 2],
                     [0, 0, 1, 3]], np.uint8)  # wrong values only under ignored pixels, plus one error
    s = class_scores(pred, truth, 3, ignore=255)
    assert s["dice_0"] == pytest.approx(6 / 7) and s["iou_0"] == pytest.approx(3 / 4)
    assert s["dice_1"] == pytest.approx(4 / 5) and s["iou_1"] == pytest.approx(2 / 3)
    assert np.isnan(s["dice_2"]) and np.isnan(s["iou_2"])  # in neither image once 255 is left out
    assert s["dice_mean"] == pytest.approx((6 / 7 + 4 / 5) / 2)
    assert s["iou_mean"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    # a class only predicted counts as 0 and enters the mean
    s = class_scores(np.array([[2, 0]]), np.array([[0, 0]]), 3)
    assert s["dice_2"] == 0.0 and np.isnan(s["dice_1"]) and s["dice_mean"] == pytest.approx((2 / 3 + 0) / 2)
    # all pixels ignored: nothing to score
    s = class_scores(np.zeros((2, 2), int), np.full((2, 2), 9), 2, ignore=9)
    assert all(np.isnan(v) for v in s.values())


def test_class_scores_refuses_values_outside_the_classes():
    truth = np.array([[0, 1, 5, 7]], np.uint16)
    with pytest.raises(InputError) as error:
        class_scores(np.zeros_like(truth), truth, 3)
    one_line(error, "[5, 7]", "0..2", "ignore=")
    with pytest.raises(InputError) as error:
        class_scores(np.array([[0, 3, 0, 0]]), np.zeros((1, 4), np.uint8), 3)
    one_line(error, "[3]", "not a class map of 3 classes")
    with pytest.raises(InputError) as error:
        class_scores(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.uint8), 3)
    one_line(error, "float32")
    with pytest.raises(InputError):
        class_scores(np.zeros((2, 4), np.uint8), np.zeros((1, 4), np.uint8), 3)


def test_mean_class_rows_is_nan_aware():
    rows = [{"dice_0": 1.0, "dice_1": NAN, "dice_2": NAN}, {"dice_0": 0.5, "dice_1": 0.25, "dice_2": NAN}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = mean_class_rows(rows)
    assert mean["dice_0"] == 0.75 and mean["dice_1"] == 0.25 and np.isnan(mean["dice_2"])
    with pytest.raises(InputError):
        mean_class_rows([])


# -- matched instances -------------------------------------------------------------------------------


def keys_for(thresholds) -> set[str]:
    keys = {"map", "f1_mean", "n_true", "n_pred"}
    for t in thresholds:
        keys |= {f"precision@{t:g}", f"recall@{t:g}", f"f1@{t:g}", f"ap@{t:g}"}
    return keys


def test_iou_thresholds():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_shifted_squares():
    truth = np.zeros((40, 80), np.uint16)
    truth[0:10, 0:10] = 1  # 10x10, predicted 2 px to the right: IoU 80 / 120 = 2/3
    truth[15:35, 30:50] = 2  # 20x20, predicted 5 px to the right: IoU 300 / 500 = 0.6 exactly
    pred = np.zeros_like(truth)
    pred[0:10, 2:12] = 1
    pred[15:35, 35:55] = 2
    s = instance_scores(truth, pred)
    assert set(s) == keys_for(IOU_THRESHOLDS)
    assert s["n_true"] == 2 and s["n_pred"] == 2
    for t, tp in [(0.5, 2), (0.55, 2), (0.6, 2), (0.65, 1), (0.7, 0), (0.95, 0)]:  # IoU >= t matches
        assert s[f"precision@{t:g}"] == s[f"recall@{t:g}"] == s[f"f1@{t:g}"] == pytest.approx(tp / 2)
        assert s[f"ap@{t:g}"] == pytest.approx(tp / (tp + 2 * (2 - tp)))
    assert s["map"] == pytest.approx((3 * 1 + 1 / 3) / 10)
    assert s["f1_mean"] == pytest.approx((3 * 1 + 0.5) / 10)


def test_split_object():
    truth = np.zeros((10, 30), np.uint8)
    truth[:, 0:20] = 1
    even = np.zeros_like(truth)
    even[:, 0:10], even[:, 10:20] = 1, 2  # two halves, each IoU exactly 0.5: one of them matches at 0.5
    s = instance_scores(truth, even)
    assert (s["precision@0.5"], s["recall@0.5"]) == (0.5, 1.0)
    assert s["f1@0.5"] == pytest.approx(2 / 3) and s["ap@0.5"] == 0.5
    assert s["ap@0.55"] == s["f1@0.55"] == s["precision@0.55"] == s["recall@0.55"] == 0.0
    assert s["map"] == pytest.approx(0.05)
    uneven = np.zeros_like(truth)
    uneven[:, 0:14], uneven[:, 14:20] = 5, 9  # IoU 0.7 and 0.3
    s = instance_scores(truth, uneven)
    assert s["ap@0.7"] == 0.5 and s["ap@0.75"] == 0.0 and s["map"] == pytest.approx(5 * 0.5 / 10)


def test_merged_object_with_non_consecutive_ids():
    truth = np.zeros((10, 30), np.uint32)
    truth[:, 0:10], truth[:, 10:20] = 3, 4_000_000_000
    pred = np.zeros_like(truth)
    pred[:, 0:20] = 70_000
    s = instance_scores(truth, pred)  # each true half has IoU 0.5 with the merged object
    assert (s["n_true"], s["n_pred"]) == (2, 1)
    assert (s["precision@0.5"], s["recall@0.5"], s["ap@0.5"]) == (1.0, 0.5, 0.5)
    assert s["f1@0.5"] == pytest.approx(2 / 3) and s["f1@0.55"] == 0.0
    # the scores do not depend on the ids themselves
    relabelled = np.select([truth == 3, truth > 3], [1, 2], 0)
    assert instance_scores(relabelled, (pred > 0).astype(np.uint8)) == s


def test_missing_and_extra_objects():
    truth = np.zeros((20, 40), np.int32)
    truth[0:5, 0:5], truth[0:5, 10:15], truth[10:15, 0:5] = 1, 2, 3
    pred = np.zeros_like(truth)
    pred[0:5, 0:5], pred[0:5, 10:15] = 8, 2  # object 3 missed
    pred[10:20, 30:40] = 6  # an extra object
    s = instance_scores(truth, pred)
    for t in IOU_THRESHOLDS:
        assert s[f"precision@{t:g}"] == s[f"recall@{t:g}"] == s[f"f1@{t:g}"] == pytest.approx(2 / 3)
        assert s[f"ap@{t:g}"] == pytest.approx(0.5)
    assert s["map"] == pytest.approx(0.5) and s["f1_mean"] == pytest.approx(2 / 3)


def test_empty_images():
    empty = np.zeros((8, 8), np.uint16)
    one = empty.copy()
    one[2:4, 2:4] = 1
    both_empty = instance_scores(empty, empty)
    assert both_empty["n_true"] == both_empty["n_pred"] == 0
    assert all(v == 1.0 for k, v in both_empty.items() if not k.startswith("n_"))
    for truth, pred in [(empty, one), (one, empty)]:
        s = instance_scores(truth, pred)
        assert all(v == 0.0 for k, v in s.items() if not k.startswith("n_")), s


def test_instance_scores_refuses_bad_input():
    labels = np.zeros((4, 4), np.uint8)
    with pytest.raises(InputError) as error:
        instance_scores(labels, labels, thresholds=(0.3,))
    one_line(error, "[0.5, 1]")
    with pytest.raises(InputError) as error:
        instance_scores(labels, labels.astype(np.float32))
    one_line(error, "float32", "not instance labels")
    with pytest.raises(InputError):
        instance_scores(labels.astype(np.int32) - 1, labels)
    with pytest.raises(InputError):
        instance_scores(labels, labels[:2])


def brute_force(truth: np.ndarray, pred: np.ndarray, thresholds) -> dict[str, float]:
    """Reference: IoU of every pair of objects by masks, the largest one-to-one matching per threshold."""
    from scipy.optimize import linear_sum_assignment

    true_ids = [i for i in np.unique(truth) if i]
    pred_ids = [j for j in np.unique(pred) if j]
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            inter = np.sum((truth == i) & (pred == j))
            iou[a, b] = inter / np.sum((truth == i) | (pred == j))
    out = {}
    for t in thresholds:
        ok = iou >= t
        rows, cols = linear_sum_assignment(-ok.astype(float))
        tp = int(ok[rows, cols].sum())
        fp, fn = len(pred_ids) - tp, len(true_ids) - tp
        out[f"precision@{t:g}"] = tp / (tp + fp) if tp + fp else 0.0
        out[f"recall@{t:g}"] = tp / (tp + fn) if tp + fn else 0.0
        out[f"f1@{t:g}"] = 2 * tp / (2 * tp + fp + fn)
        out[f"ap@{t:g}"] = tp / (tp + fp + fn)
    out["map"] = np.mean([out[f"ap@{t:g}"] for t in thresholds])
    out["f1_mean"] = np.mean([out[f"f1@{t:g}"] for t in thresholds])
    out["n_true"], out["n_pred"] = len(true_ids), len(pred_ids)
    return out


def random_instances(rng: np.random.Generator, count: int, shape=(64, 64)) -> np.ndarray:
    labels = np.zeros(shape, np.uint32)
    for label in rng.choice(10_000, count, replace=False) + 1:
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(3, 14, 2)
        labels[y:y + h, x:x + w] = label
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_instance_scores_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = random_instances(rng, 12)
    pred = np.roll(truth, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))  # shifted objects
    pred[rng.integers(0, 64):, : rng.integers(0, 64)] = 0  # some lost or clipped
    pred = np.where(pred == 0, random_instances(rng, 3), pred)  # some extra
    split = pred == pred[pred > 0][0]
    pred[split & (np.arange(64)[None, :] % 2 == 0)] = 99_999  # one object split into stripes
    thresholds = IOU_THRESHOLDS + (0.5, 1.0)
    got, want = instance_scores(truth, pred, thresholds), brute_force(truth, pred, thresholds)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


@pytest.mark.parametrize("seed", range(3))
def test_instance_scores_ignore_pixels_that_are_background_in_both(seed):
    """Only object pixels count: scores of whole images equal those of their object pixels alone (the
    function leaves background-only pixels out, which makes validation's watershed search fast)."""
    rng = np.random.default_rng(seed)
    truth = random_instances(rng, 8)
    pred = np.roll(truth, 2, axis=1)
    keep = (truth > 0) | (pred > 0)
    assert instance_scores(truth, pred) == instance_scores(truth[keep], pred[keep])
    empty = np.zeros_like(truth)
    assert instance_scores(empty, empty) == instance_scores(empty[keep], empty[keep])


def test_mean_instance_rows():
    a = instance_scores(np.ones((4, 4), np.uint8), np.ones((4, 4), np.uint8))
    b = instance_scores(np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    mean = mean_instance_rows([a, b])
    assert mean["map"] == 0.5 and mean["f1@0.5"] == 0.5 and mean["n_true"] == 1 and mean["n_pred"] == 0.5


# -- stack evaluation --------------------------------------------------------------------------------


def class_stacks() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, (3, 16, 16)).astype(np.uint8)
    truth[:, :2] = 255  # unlabelled rows
    truth[1][truth[1] == 2] = 1  # class 2 absent from slice 1
    pred = truth.copy()
    pred[pred == 255] = 0
    pred[:, 5:8] = rng.integers(0, 3, (3, 3, 16))
    pred[1][pred[1] == 2] = 0
    return pred, truth


def test_evaluate_semantic(tmp_path):
    pred, truth = class_stacks()
    write(tmp_path / "pred.tif", pred)
    write(tmp_path / "pred16.tif", pred[1:].astype(np.uint16))
    write(tmp_path / "truth.tif", truth)
    report = evaluate_semantic(str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif"), classes=3, ignore=255)
    rows = [class_scores(p, t, 3, ignore=255) for p, t in zip(pred, truth)]
    assert report["slices"] == 3
    np.testing.assert_equal(report["per_slice"], rows)  # NaN equals NaN here
    np.testing.assert_equal(report["scores"], mean_class_rows(rows))
    assert np.isnan(rows[1]["dice_2"]) and not np.isnan(report["scores"]["dice_2"])
    assert set(report) == {"prediction", "labels", "slices", "scores", "per_slice"}
    # a prediction of the labelled slices 1..2 only
    report = evaluate_semantic(str(tmp_path / "pred16.tif"), str(tmp_path / "truth.tif"), classes=3, ignore=255,
                               slices=(1, 3))
    np.testing.assert_equal(report["per_slice"], rows[1:])


def test_evaluate_semantic_refuses(tmp_path):
    pred, truth = class_stacks()
    write(tmp_path / "pred.tif", pred)
    write(tmp_path / "truth.tif", truth)
    write(tmp_path / "prob.tif", np.random.default_rng(0).random(pred.shape, np.float32))
    prob_uint8 = np.random.default_rng(0).integers(0, 256, pred.shape).astype(np.uint8)
    write(tmp_path / "prob8.tif", prob_uint8)
    p, t = str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif")
    with pytest.raises(InputError) as error:
        evaluate_semantic(p, t, classes=3)  # 255 is not a class without ignore
    one_line(error, t, "[255]", "ignore=")
    with pytest.raises(InputError) as error:
        evaluate_semantic(p, t, classes=2, ignore=255)
    one_line(error, p, "not a class map of 2 classes")
    with pytest.raises(InputError) as error:
        evaluate_semantic(str(tmp_path / "prob8.tif"), t, classes=3, ignore=255)
    one_line(error, "not a class map of 3 classes")
    with pytest.raises(InputError) as error:
        evaluate_semantic(str(tmp_path / "prob.tif"), t, classes=3, ignore=255)
    one_line(error, "float32", "not a class map")
    with pytest.raises(InputError) as error:
        evaluate_semantic(t, str(tmp_path / "prob.tif"), classes=3)
    one_line(error, "pass the prediction first")
    with pytest.raises(OptionValueError, match="^classes must be at least 2"):  # before reading (test_evaluation_calls)
        evaluate_semantic(p, t, classes=1)


def instance_stacks(dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    truth = np.stack([random_instances(rng, 10, (32, 32)) for _ in range(3)])
    truth = (np.unique(truth, return_inverse=True)[1].reshape(truth.shape)).astype(dtype)  # ids fit uint8
    pred = np.roll(truth, 1, axis=2).astype(np.uint32) * 7
    pred[2] = 0  # nothing found in the last slice
    return pred, truth


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_evaluate_matched_instances(tmp_path, dtype):
    pred, truth = instance_stacks(dtype)
    write(tmp_path / "pred.tif", pred)
    write(tmp_path / "truth.tif", truth)
    report = evaluate_matched_instances(str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif"))
    rows = [instance_scores(t, p) for p, t in zip(pred, truth)]
    assert report["slices"] == 3 and report["per_slice"] == rows
    assert report["scores"] == mean_instance_rows(rows)
    assert report["per_slice"][2]["map"] == 0.0 and 0 < report["scores"]["map"] < 1
    assert set(report["scores"]) == keys_for(IOU_THRESHOLDS)
    # uint8 instance labels as the prediction are accepted too
    write(tmp_path / "truth8.tif", truth.astype(np.uint8))
    report = evaluate_matched_instances(str(tmp_path / "truth8.tif"), str(tmp_path / "truth.tif"), slices=(0, 2))
    assert report["slices"] == 2 and report["scores"]["map"] == 1.0


def test_evaluate_matched_instances_refuses(tmp_path):
    pred, truth = instance_stacks(np.uint16)
    rng = np.random.default_rng(0)
    write(tmp_path / "pred.tif", pred)
    write(tmp_path / "truth.tif", truth)
    write(tmp_path / "prob8.tif", rng.integers(1, 256, pred.shape).astype(np.uint8))
    write(tmp_path / "prob.tif", rng.random(pred.shape, np.float32))
    write(tmp_path / "negative.tif", -pred.astype(np.int32))
    p, t = str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif")
    for probabilities in ("prob8.tif", "prob.tif"):
        with pytest.raises(InputError) as error:
            evaluate_matched_instances(str(tmp_path / probabilities), t)
        one_line(error, "look like probabilities", "not instance labels", "segkit segment")
    with pytest.raises(InputError) as error:
        evaluate_matched_instances(p, str(tmp_path / "prob8.tif"))
    one_line(error, "swapped")
    with pytest.raises(InputError) as error:
        evaluate_matched_instances(p, str(tmp_path / "prob.tif"))
    one_line(error, "pass the prediction first")
    with pytest.raises(InputError) as error:
        evaluate_matched_instances(str(tmp_path / "negative.tif"), t)
    one_line(error, "negative", "slice 0")
