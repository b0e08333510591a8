"""Test-time augmentation, watershed instances, instance evaluation and sweeps that write defaults."""

import numpy as np
import pytest
import tifffile
import torch

from segkit.checkpoint import read_info
from segkit.evaluation import evaluate_instances, sweep_watershed
from segkit.inference.engines import TorchEngine
from segkit.inference.tiler import pad_plane, plan_tiles, predict_plane
from segkit.inference.tta import TTAForward, tta_transforms
from segkit.instances import WatershedParams, watershed_slice
from segkit.metrics import label_cells, to_probability
from tests.helpers import REPO, FakeEngine, as_plane, assert_user_error, run


@pytest.mark.parametrize("mode, count", [("none", 1), ("flips", 4), ("d4", 8)])
def test_tta_transforms_are_inverted_exactly(mode, count):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype(np.float32))
    transforms = tta_transforms(mode)
    assert len(transforms) == count
    seen = set()
    for transform, inverse in transforms:
        assert torch.equal(inverse(transform(x)), x)
        seen.add(transform(x).numpy().tobytes())
    assert len(seen) == count  # all different transforms
    # a pointwise model gives the identity under TTA
    engine = FakeEngine(lambda b: b * 2.0 + 1.0)
    tta = TTAForward(engine, mode)
    assert tta.device == engine.device and f"TTA {mode} ({count} passes)" in tta.label
    out = tta(x)
    assert isinstance(out, torch.Tensor) and engine.calls == [3] * count
    torch.testing.assert_close(out, x * 2.0 + 1.0, rtol=1e-6, atol=1e-6)


def test_tiled_tta_equals_whole_plane_tta(tiny_unet):
    engine = TorchEngine(tiny_unet, device="cpu")
    geometry = tiny_unet.geometry
    plane = as_plane(np.random.default_rng(1).standard_normal((150, 133)))
    tiled = predict_plane(plane, TTAForward(engine, "d4"), geometry, tile=220, batch=3)
    plan = plan_tiles((150, 133), geometry, tile=220)
    assert plan.n_tiles > 1
    padded = pad_plane(plane, plan)[None]
    whole = torch.stack([inverse(engine(transform(padded))) for transform, inverse in
                         tta_transforms("d4")]).mean(dim=0)[0][:, :150, :133]
    assert (tiled - whole).abs().max() < 1e-5
    plain = predict_plane(plane, engine, geometry, tile=220)
    assert (tiled - plain).abs().max() > 1e-3  # TTA changed something


def two_cells_with_a_gap():
    """Two square cells separated by a vertical membrane with a one-pixel gap."""
    probability = np.full((40, 60), 0.05, np.float32)
    probability[:, :2] = probability[:, -2:] = probability[:2] = probability[-2:] = 0.95
    probability[:, 29:31] = 0.95
    probability[20, 29:31] = 0.45  # the gap: below the 0.5 threshold
    truth = np.ones((40, 60), np.int64)
    truth[:, 30:] = 2
    truth[:, 29:31] = 0
    return probability, truth


def test_watershed_separates_cells_that_connected_components_merge():
    probability, truth = two_cells_with_a_gap()
    merged = label_cells(probability < 0.5)
    assert len(np.unique(merged[merged > 0])) == 1  # connected components merge through the gap
    labels = watershed_slice(probability, WatershedParams(threshold=0.5, seed_distance=2, min_size=10))
    assert labels.dtype == np.uint32 and labels.min() == 1
    assert len(np.unique(labels[5:35, 5:25])) == 1 and len(np.unique(labels[5:35, 35:55])) == 1
    assert labels[20, 10] != labels[20, 50]
    # an empty interior still gives one segment, so scores stay defined
    assert np.unique(watershed_slice(np.ones((10, 10), np.float32))).tolist() == [1]


def test_small_segments_merge_and_parameters_are_checked():
    probability, _ = two_cells_with_a_gap()
    probability[5:12, 5:12] = 0.95  # a membrane ring enclosing a 3 x 3 interior inside the left cell
    probability[7:10, 7:10] = 0.05
    params = WatershedParams(threshold=0.4, seed_distance=0, min_seed_size=1)
    assert len(np.unique(watershed_slice(probability, WatershedParams(**{**params.to_dict(), "min_size": 0})))) == 3
    labels = watershed_slice(probability, WatershedParams(**{**params.to_dict(), "min_size": 200}))
    assert len(np.unique(labels)) == 2 and labels[8, 8] == labels[20, 20]  # the small segment joined its neighbour
    big_seed_only = WatershedParams(threshold=0.4, seed_distance=0, min_seed_size=10, min_size=0)
    assert len(np.unique(watershed_slice(probability, big_seed_only))) == 2  # the 9-px seed was dropped
    with pytest.raises(Exception, match="between 0 and 1"):
        WatershedParams(threshold=1.5)


def _write_pair(tmp_path, slices=3):
    probability, truth = two_cells_with_a_gap()
    tifffile.imwrite(tmp_path / "prob.tif", np.stack([np.rint(probability * 255).astype(np.uint8)] * slices),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "truth.tif", np.stack([truth.astype(np.uint8)] * slices), photometric="minisblack")
    return tmp_path / "prob.tif", tmp_path / "truth.tif"


def test_sweep_picks_the_known_best_setting(tmp_path):
    prob, truth = _write_pair(tmp_path)
    report = sweep_watershed(str(prob), str(truth), min_size=10)
    table = {(row["params"]["threshold"], row["params"]["seed_distance"]): row["scores"]["adapted_rand_error"]
             for row in report["table"]}
    # at threshold 0.5 the gap (0.45) is interior: seeds touching the membrane run through it and
    # merge the cells; seeds kept 1 px away from membrane, or a threshold below 0.45, separate them
    assert table[0.5, 0.0] > 0.3 and table[0.5, 1.0] < 0.01 and table[0.4, 0.0] < 0.01
    best = report["best"]
    assert best["scores"]["adapted_rand_error"] == min(table.values()) < 0.01
    assert best["params"]["threshold"] == 0.5 and best["params"]["seed_distance"] >= 1.0  # ties: nearest 0.5


def test_cli_segment_evaluate_instances_and_write_defaults(tmp_path, tiny_checkpoint):
    import shutil

    prob, truth = _write_pair(tmp_path)
    result = run("segment", prob, "-o", tmp_path / "labels.tif", "--threshold", "0.4", "--min-size", 10, "-q")
    assert result.exit_code == 0, result.output
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.dtype == np.uint32 and labels.shape == (3, 40, 60)
    report = evaluate_instances(str(tmp_path / "labels.tif"), str(truth))
    assert report["scores"]["adapted_rand_error"] < 0.01
    result = run("evaluate", tmp_path / "labels.tif", truth, "--instances")
    assert result.exit_code == 0 and "adapted_rand_error" in result.output
    # labels where probabilities belong, and the other way round
    assert_user_error(run("evaluate", tmp_path / "labels.tif", truth), "looks like instance labels", "--instances")
    assert_user_error(run("segment", tmp_path / "labels.tif", "-o", tmp_path / "x.tif"), "looks like instance labels")
    assert_user_error(run("evaluate", prob, truth, "--instances"), "look like membrane probabilities")
    # --write-defaults: only from a sweep on the recipe's validation slices
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint, checkpoint)
    assert_user_error(run("evaluate", prob, truth, "--write-defaults", checkpoint), "--sweep and --slices")
    result = run("evaluate", prob, truth, "--sweep", "--watershed", "--slices", "0:3", "--write-defaults", checkpoint)
    assert result.exit_code == 0, result.output
    stored = read_info(checkpoint).inference.watershed
    assert stored == report_best(prob, truth)
    result = run("segment", prob, "-m", checkpoint, "-o", tmp_path / "auto.tif", "-q")
    assert result.exit_code == 0 and f"'threshold': {stored['threshold']}" in result.output
    result = run("evaluate", prob, truth, "--sweep", "--slices", "0:3", "--write-defaults", checkpoint)
    assert result.exit_code == 0 and read_info(checkpoint).inference.threshold == pytest.approx(
        float(result.output.split("best threshold ")[1].split()[0]))


def report_best(prob, truth):
    return sweep_watershed(str(prob), str(truth))["best"]["params"]


def test_write_defaults_refuses_test_slices(tmp_path, tiny_unet):
    from segkit.checkpoint import save_checkpoint
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    prob, truth = _write_pair(tmp_path, slices=30)
    checkpoint = tmp_path / "m.safetensors"
    save_checkpoint(checkpoint, tiny_unet, CheckpointInfo(
        "segmenter", "unet", {"base": 4, "depth": 4}, tiny_unet.geometry, Normalization(0.0, 1.0),
        recipe={"data": {"val_slices": [20, 25], "test_slices": [25, 30]}}))
    assert_user_error(run("evaluate", prob, truth, "--sweep", "--slices", "25:30", "--write-defaults", checkpoint),
                      "validation slices 20:25", "choose them on --slices 20:25")
    assert run("evaluate", prob, truth, "--sweep", "--slices", "20:25", "--write-defaults",
               checkpoint).exit_code == 0


def test_cli_predict_tta_and_instances(tmp_path, uint8_stack, tiny_checkpoint):
    common = ["-m", tiny_checkpoint, "--tile", 220, "-q"]
    result = run("predict", uint8_stack, "-o", tmp_path / "tta.tif", "--tta", "d4", "--output-type", "float16", *common)
    assert result.exit_code == 0, result.output
    assert "TTA d4 (8 passes)" in result.stderr
    result = run("predict", uint8_stack, "--instances", "--tta", "flips", *common)
    assert result.exit_code == 0, result.output
    labels = tifffile.imread(tmp_path / "stack_instances.tif")
    assert labels.dtype == np.uint32 and labels.shape == (3, 70, 91) and labels.min() >= 1


@pytest.mark.isbi
def test_bench_instances_script_scores_four_variants(isbi, tiny_checkpoint):
    import json
    import subprocess
    import sys

    script = REPO / "tools" / "bench_instances.py"
    out = subprocess.run([sys.executable, str(script), "-m", str(tiny_checkpoint), "--data", str(isbi), "--device",
                          "cpu", "--tta", "flips"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    variants = [row["variant"] for row in report["results"]]
    assert variants == ["connected components", "watershed", "TTA flips + connected components",
                        "TTA flips + watershed"]
    assert all(0 <= row["adapted_rand_error"] <= 1 and row["vi"] >= 0 for row in report["results"])


def test_segment_and_predict_instances_write_ids_unique_across_the_stack(tmp_path, uint8_stack, tiny_checkpoint):
    """Issue 23 item 2: each slice's ids continue after the previous slice's (uint32), read back from the
    TIFFs of `segkit segment` and `segkit predict --instances`; the header says so."""
    from tests.helpers import assert_ids_unique_across_slices

    prob, _ = _write_pair(tmp_path)
    result = run("segment", prob, "-o", tmp_path / "labels.tif", "--threshold", "0.4", "--min-size", 10, "-q")
    assert result.exit_code == 0 and "ids unique across the stack" in result.output, result.output
    labels = tifffile.imread(tmp_path / "labels.tif")
    per_slice = watershed_slice(to_probability(tifffile.imread(prob)[0]), WatershedParams(threshold=0.4, min_size=10))
    count = int(per_slice.max())
    assert count >= 2  # the three identical slices hold the same cells, numbered on
    for z in range(3):
        np.testing.assert_array_equal(labels[z], per_slice + z * count)
    assert_ids_unique_across_slices(labels)
    result = run("predict", uint8_stack, "--instances", "-o", tmp_path / "neurons.tif", "-m", tiny_checkpoint,
                 "--tile", 220, "-q")
    assert result.exit_code == 0, result.output
    assert "uint32 instances, ids unique across the stack" in result.stderr
    neurons = tifffile.imread(tmp_path / "neurons.tif")
    assert_ids_unique_across_slices(neurons)
    assert all(plane.max() > plane.min() for plane in neurons)  # every slice holds several ids


def test_object_ids_unique_across_the_stack_and_uint32_overflow():
    from segkit.errors import SegkitError
    from segkit.inference.encodings import ObjectEncoding, finish_planes
    from segkit.instances import MAX_ID, id_offsets, unique_ids

    probabilities = np.zeros((3, 30, 30), np.float32)
    probabilities[0] = 1.0
    for y, x in ((5, 5), (5, 20), (20, 12)):  # three square objects on a background
        probabilities[0, y:y + 8, x:x + 8] = 0.0
        probabilities[1, y:y + 8, x:x + 8] = 1.0
    planes = list(finish_planes(ObjectEncoding(), [probabilities, probabilities]))
    assert planes[0].dtype == np.uint32 and set(np.unique(planes[0])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(planes[1], np.where(planes[0] > 0, planes[0] + 3, 0))  # background stays 0
    assert id_offsets([3, 0, 5, 2]) == [0, 3, 3, 8]
    full = np.full((2, 2), MAX_ID, np.uint32)
    assert list(unique_ids([full]))[0].max() == MAX_ID  # the largest id fits
    with pytest.raises(SegkitError, match="too many for uint32 ids unique across the stack"):
        list(unique_ids([full, np.ones((2, 2), np.uint32)]))
    with pytest.raises(SegkitError, match="too many for uint32"):
        id_offsets([MAX_ID, 1])


def test_evaluate_scores_are_unchanged_by_the_offsets(tmp_path):
    """evaluate scores per slice: ids unique across the stack score exactly as each slice's own 1..n."""
    from segkit.evaluation import evaluate_matched_instances

    prob, truth = _write_pair(tmp_path)
    probability = to_probability(tifffile.imread(prob)[0])
    per_slice = np.stack([watershed_slice(probability, WatershedParams(threshold=t, seed_distance=0.0, min_size=10))
                          for t in (0.4, 0.5, 0.6)])
    shifted = per_slice + np.array([0, 10, 2_000_000_000], np.uint32)[:, None, None]
    tifffile.imwrite(tmp_path / "own.tif", per_slice, photometric="minisblack")
    tifffile.imwrite(tmp_path / "shifted.tif", shifted, photometric="minisblack")
    own, moved = (evaluate_instances(str(tmp_path / name), str(truth)) for name in ("own.tif", "shifted.tif"))
    assert own["per_slice"] == moved["per_slice"] and own["scores"] == moved["scores"]
    assert own["per_slice"][0] != own["per_slice"][1]  # the slices differ, so a mix-up would show
    tifffile.imwrite(tmp_path / "objects.tif", np.roll(per_slice, 1, axis=2), photometric="minisblack")
    own, moved = (evaluate_matched_instances(str(tmp_path / name), str(tmp_path / "objects.tif"))
                  for name in ("own.tif", "shifted.tif"))
    assert own["per_slice"] == moved["per_slice"] and own["scores"] == moved["scores"]
