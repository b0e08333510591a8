"""tools/baseline_smp.py (the plain smp baseline) and tools/bench_own_data.py (segkit init + train against
it): data forms, targets, schedule, post-processing choices on hand-made maps, and the benchmark's pure
parts (data set discovery, the baseline's data options from a recipe, winners, the README table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import tools.baseline_smp as baseline
from segkit.metrics import instance_scores
from tests.helpers import REPO, data_root
from tools.baseline_smp import (
    boundary_classes,
    choose_objects,
    choose_threshold,
    cosine_lr,
    normalize,
    objects_from,
    parse_slices,
    random_patch,
    resolve_data,
    run_baseline,
    semantic_scores,
    to_chw,
)

SCRIPT = REPO / "tools" / "baseline_smp.py"


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (y, x) in enumerate(centres, 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = i
    return labels


def fake_dataset(root: Path, name: str, *, channels_last: int = 0) -> Path:
    """Two images per split in the layout of /work/shared/data/<name> (small, so the test stays fast);
    `channels_last` > 0: (H, W, C) images of that many channels."""
    rng = np.random.default_rng(0)
    folder = root / name
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for split in ("train", "val", "test"):
        names = [f"{split}{i}" for i in range(2)]
        (folder / f"{split}.txt").write_text("\n".join(names) + "\n")
        for i, image_name in enumerate(names):
            shape = (60 + 7 * i, 75)  # smaller than a crop: reflection padding; not a multiple of 32
            if name == "bbbc039":
                labels = discs(shape, [(15, 15), (15, 27), (40, 50)])
                image = (labels > 0) * 3000 + rng.integers(100, 200, shape)
                image = image.astype(np.uint16)
            else:
                labels = discs(shape, [(20, 20), (40, 55)], radius=10).clip(0, 1).astype(np.uint8)
                labels += (discs(shape, [(20, 20), (40, 55)], radius=6) > 0).astype(np.uint8)  # axon in myelin
                image = (labels * 80 + rng.integers(0, 40, shape)).astype(np.uint8)
            if channels_last:
                image = np.stack([image] * channels_last, axis=-1)
            tifffile.imwrite(folder / "images" / f"{image_name}.tif", image)
            tifffile.imwrite(folder / "labels" / f"{image_name}.tif", labels)
    return root


def fake_stack(folder: Path, planes: int = 5) -> tuple[Path, Path]:
    """An ISBI-like pair of stacks: labels 0 = membrane (a cross), 255 = cell."""
    rng = np.random.default_rng(2)
    labels = np.full((planes, 48, 52), 255, np.uint8)
    labels[:, 24, :] = labels[:, :, 20] = 0
    images = np.where(labels == 0, 40, 200).astype(np.uint8) + rng.integers(0, 30, labels.shape).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "volume.tif", images)
    tifffile.imwrite(folder / "labels.tif", labels)
    return folder / "volume.tif", folder / "labels.tif"


@pytest.fixture
def small_patches(monkeypatch):
    """In-process runs train on 2 patches of 64 px (one resnet34 step on 8 x 256 px takes seconds)."""
    monkeypatch.setattr(baseline, "CROP", 64)
    monkeypatch.setattr(baseline, "BATCH", 2)


# -- data ------------------------------------------------------------------------------------------


def test_parse_slices_reads_three_ranges_and_refuses_others():
    assert parse_slices("0:20,20:25,25:30") == ((0, 20), (20, 25), (25, 30))
    for bad in ("0:20,20:25", "0:20,25:20,25:30", "a:b,1:2,2:3"):
        with pytest.raises(ValueError, match="slices"):
            parse_slices(bad)


def test_to_chw_and_per_channel_normalisation():
    assert to_chw(np.zeros((5, 6))).shape == (1, 5, 6)
    assert to_chw(np.zeros((3, 50, 60))).shape == (3, 50, 60)
    hwc = np.arange(50 * 60 * 3).reshape(50, 60, 3)
    np.testing.assert_array_equal(to_chw(hwc)[2], hwc[..., 2])
    with pytest.raises(ValueError, match="at most 4 channels"):
        to_chw(np.zeros((50, 60, 7)))
    image = np.stack([np.arange(100.0).reshape(10, 10), 1000 + 5 * np.arange(100.0).reshape(10, 10)])
    out = normalize(image)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1, atol=1e-5)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # each channel on its own


def test_resolve_data_forms(tmp_path):
    shared = {name: resolve_data(name, data_root=tmp_path) for name in ("bbbc039", "axondeepseg_sem", "isbi2012")}
    assert {name: d.kind for name, d in shared.items()} == {
        "bbbc039": "instances", "axondeepseg_sem": "semantic", "isbi2012": "membrane"}
    assert shared["bbbc039"].folder == tmp_path / "bbbc039"
    isbi = shared["isbi2012"]
    assert isbi.images == tmp_path / "isbi2012" / "train-volume.tif"
    assert isbi.labels == tmp_path / "isbi2012" / "train-labels.tif"
    assert isbi.slices == ((0, 20), (20, 25), (25, 30))
    assert resolve_data(data=tmp_path / "mine", kind="semantic").folder == tmp_path / "mine"
    with pytest.raises(ValueError, match="kind"):
        resolve_data(data=tmp_path / "mine")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_data("bbbc039", data=tmp_path)
    with pytest.raises(ValueError, match="labels"):
        resolve_data(images=tmp_path / "v.tif", kind="membrane")
    with pytest.raises(ValueError, match="not one of"):
        resolve_data("nuclei")
    with pytest.raises(ValueError, match="is instances"):
        resolve_data("bbbc039", kind="semantic")


def test_stack_planes_are_split_by_the_slices(tmp_path):
    images, labels = fake_stack(tmp_path)
    data = resolve_data(images=images, labels=labels, slices="0:3,3:4,4:5", kind="membrane")
    train, val, test = (data.load(split) for split in ("train", "val", "test"))
    assert [len(train), len(val), len(test)] == [3, 1, 1]
    assert train[0][1].shape == (1, 48, 52) and train[0][2].shape == (48, 52)
    assert test[0][0] == "volume.tif[4]"


def test_shared_isbi_split_from_the_real_stack():
    root = data_root()
    if not (root / "isbi2012" / "train-volume.tif").exists():
        pytest.skip(f"ISBI 2012 data not found in {root} (set SEGKIT_DATA)")
    data = resolve_data("isbi2012", data_root=root)
    val = data.load("val")
    assert [name for name, _, _ in val] == [f"train-volume.tif[{z}]" for z in range(20, 25)]
    assert val[0][1].shape == (1, 512, 512) and set(np.unique(val[0][2])) == {0, 255}


# -- targets and schedule --------------------------------------------------------------------------


def test_boundary_classes_marks_two_pixels_inside_each_object():
    labels = discs((40, 40), [(12, 12), (12, 22)], radius=5)  # two touching discs
    target = boundary_classes(labels)
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[labels == 0] == 0).all()  # the boundary lies within objects
    # row 12 of the first disc: x = 7 borders the background, 8 is 2 px from it, 9 is more than 2 px away
    assert target[12, 7] == target[12, 8] == 2 and target[12, 9] == 1 and target[12, 12] == 1
    # where the discs touch (x = 16 | 17 along row 12) both objects get 2 px of boundary, 15-16 and 17-18
    assert target[12, 14] == 1 and (target[12, 15:19] == 2).all() and target[12, 19] == 1
    edge = np.zeros((10, 10), np.uint16)
    edge[:, :6] = 1  # an object cut by the image edge: no boundary along the edge
    assert (boundary_classes(edge)[:, :4] == 1).all() and (boundary_classes(edge)[:, 4:6] == 2).all()


def test_random_patch_moves_image_and_target_together():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, (300, 120)).astype(np.uint8)  # one side smaller than the crop
    image = np.stack([target, 10 * target]).astype(np.float32)
    for _ in range(8):
        patch, crop = random_patch(image, target, rng)
        assert patch.shape == (2, 256, 256) and crop.shape == (256, 256) and patch.flags.c_contiguous
        np.testing.assert_array_equal(patch[0], crop)
        np.testing.assert_array_equal(patch[1], 10 * crop)


def test_cosine_lr_over_the_time_budget():
    assert cosine_lr(0, 600) == pytest.approx(1e-3)
    assert cosine_lr(150, 600) == pytest.approx(0.5e-3 * (1 + np.cos(np.pi / 4)))
    assert cosine_lr(300, 600) == pytest.approx(0.5e-3)
    assert cosine_lr(600, 600) == pytest.approx(0) and cosine_lr(900, 600) == pytest.approx(0)
    assert cosine_lr(0, 0) == pytest.approx(0)


def test_training_sets_the_cosine_lr_from_the_clock_every_iteration(monkeypatch, small_patches):
    import torch

    stepped = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            stepped.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    ticks = iter(np.arange(0, 1000, 7.5))  # every clock reading 7.5 s later: 15 s per iteration
    data = [(np.zeros((1, 40, 40), np.float32), np.zeros((40, 40), np.uint8))]
    trained = baseline.train(torch.nn.Conv2d(1, 3, 3, padding=1), data, minutes=1, device="cpu",
                             rng=np.random.default_rng(0), clock=lambda: float(next(ticks)))
    expected = [cosine_lr(7.5 + 15 * k, 60) for k in range(4)]  # read before each step
    assert trained.iterations == 4 and trained.seconds == 60
    assert trained.lrs == pytest.approx(expected) and stepped == pytest.approx(expected)


# -- post-processing choices -----------------------------------------------------------------------


def hand_made_objects() -> tuple[np.ndarray, np.ndarray]:
    """(truth, maps) where only t_seed 0.9, t_mask 0.5, min_size 10 recover every object exactly:
    a 0.85 bridge joins the cores of two touching discs (t_seed < 0.85 merges them); their outer rings
    have P(interior) + P(boundary) = 0.55 and a 2-px halo outside them 0.45 (t_mask 0.5 only); a 13-px
    object (min_size 30 drops it) and a 4-px false one (min_size 0 keeps it)."""
    from scipy.ndimage import distance_transform_edt

    shape = (40, 60)
    truth = discs(shape, [(15, 15), (15, 27)])
    truth[discs(shape, [(32, 45)], radius=2) > 0] = 3
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    interior, boundary = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    big = (truth == 1) | (truth == 2)
    interior[big], boundary[big] = 0.3, 0.25
    for y, x in ((15, 15), (15, 27)):
        core = (yy - y) ** 2 + (xx - x) ** 2 <= 16
        interior[core], boundary[core] = 0.95, 0.0
    interior[15, 20:23] = 0.85
    halo = ~big & (distance_transform_edt(~big) <= 2)
    boundary[halo] = 0.45
    interior[truth == 3] = 0.95
    interior[35:37, 10:12] = 0.95  # not an object
    return truth, np.stack([interior, interior + boundary])


def test_object_grid_finds_the_only_setting_that_recovers_every_object():
    truth, maps = hand_made_objects()
    best = choose_objects([maps, maps], [truth, truth])
    assert best["params"] == {"t_seed": 0.9, "t_mask": 0.5, "min_size": 10}
    assert best["scores"]["map"] == 1.0
    # and each neighbour on the grid is worse
    for params in ({"t_seed": 0.8, "t_mask": 0.5, "min_size": 10}, {"t_seed": 0.9, "t_mask": 0.4, "min_size": 10},
                   {"t_seed": 0.9, "t_mask": 0.6, "min_size": 10}, {"t_seed": 0.9, "t_mask": 0.5, "min_size": 0},
                   {"t_seed": 0.9, "t_mask": 0.5, "min_size": 30}):
        assert instance_scores(truth, objects_from(maps, **params))["map"] < 1.0, params


def test_watershed_grows_seeds_back_over_the_boundary():
    labels = discs((50, 60), [(15, 15), (15, 26), (35, 45)])
    probs = np.eye(3, dtype=np.float32)[boundary_classes(labels)].transpose(2, 0, 1)
    objects = objects_from(np.stack([probs[1], probs[1] + probs[2]]), 0.5, 0.5, 0)
    assert objects.max() == 3
    assert instance_scores(labels, objects)["map"] == 1.0


def test_membrane_threshold_is_the_one_with_the_lowest_adapted_rand_error():
    labels = np.full((30, 30), 255, np.uint8)
    labels[15, :] = labels[:, 15] = 0  # four cells
    probability = np.where(labels == 0, 0.75, 0.1).astype(np.float32)
    probability[:15, 7] = 0.65  # splits a cell at thresholds <= 0.6; at >= 0.8 the membranes vanish
    threshold, scores = choose_threshold([probability, probability], [labels, labels])
    assert threshold == 0.7
    assert scores["adapted_rand_error"] == 0.0 and scores["pixel_error"] == 0.0


def test_semantic_scores_report_segkit_dice_mean_and_foreground_dice():
    truth = np.zeros((10, 10), np.uint8)
    truth[:, 5:] = 1
    truth[:, 8:] = 2
    pred = truth.copy()
    pred[:, 7] = 2  # one column of class 1 called class 2
    scores = semantic_scores([pred], [truth], 3)
    assert scores["dice_0"] == 1.0
    assert scores["dice_foreground"] == pytest.approx((scores["dice_1"] + scores["dice_2"]) / 2)
    assert scores["dice_mean"] == pytest.approx((1 + scores["dice_1"] + scores["dice_2"]) / 3)  # class 0 counts
    assert scores["dice_foreground"] < scores["dice_mean"]


# -- whole runs (one training step) ----------------------------------------------------------------


def test_run_baseline_chooses_object_settings_on_val(tmp_path, small_patches):
    report = run_baseline("bbbc039", 0, threads=1, data_root=fake_dataset(tmp_path, "bbbc039"))
    assert report["iterations"] == 1 and report["patches"] == 2 and report["threads"] == 1
    assert report["kind"] == "instances" and report["classes"] == 3 and report["in_channels"] == 1
    assert set(report["chosen"]) == {"t_seed", "t_mask", "min_size"}
    assert report["chosen"]["t_seed"] in baseline.SEED_THRESHOLDS
    assert {"f1@0.5", "map"} <= set(report["test"]) and {"f1@0.5", "map"} <= set(report["val"])
    assert all(0 <= v <= 1 for v in report["test"].values())
    assert {"seconds_training", "seconds_scoring", "minutes", "data"} <= set(report)


def test_run_baseline_on_a_membrane_stack(tmp_path, small_patches):
    images, labels = fake_stack(tmp_path)
    report = run_baseline(None, 0, threads=1, images=images, labels=labels, slices="0:3,3:4,4:5", kind="membrane")
    assert report["kind"] == "membrane" and report["classes"] == 2
    assert report["chosen"]["threshold"] in baseline.MEMBRANE_THRESHOLDS
    assert {"adapted_rand_error", "vi", "pixel_error"} <= set(report["test"])


def test_command_prints_one_json_line_for_multichannel_semantic_data(tmp_path, small_patches, capsys):
    root = fake_dataset(tmp_path, "mine", channels_last=3)
    baseline.main(["--data", str(root / "mine"), "--kind", "semantic", "--minutes", "0", "--threads", "1"])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 1, out.out
    report = json.loads(lines[0])
    assert report["tool"] == "baseline_smp" and report["chosen"] == {"argmax": True}
    assert report["in_channels"] == 3 and report["classes"] == 3
    assert {"dice_mean", "dice_foreground", "dice_1", "dice_2", "iou_mean"} <= set(report["test"])
    assert "iteration 1" in out.err


def test_script_refuses_a_folder_without_kind(tmp_path):
    """`python tools/baseline_smp.py` runs as a script; a folder needs --kind."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), "--minutes", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "kind" in out.stderr


# -- tools/bench_own_data.py -----------------------------------------------------------------------


def shared_root(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        marker = "train-volume.tif" if name == "isbi2012" else "train.txt"
        (tmp_path / name / marker).write_text("x")
    return tmp_path


def test_bench_discovers_the_shared_sets_present(tmp_path):
    from tools.bench_own_data import discover

    root = shared_root(tmp_path / "data", "bbbc039", "isbi2012")
    found = discover(root)
    assert [(d.name, d.kind) for d in found] == [("bbbc039", "instances"), ("isbi2012", "membrane")]
    assert found[1].path == root / "isbi2012"
    assert found[1].init_args == ("--images", "train-volume.tif", "--labels", "train-labels.tif")
    assert [d.name for d in discover(root, "isbi2012")] == ["isbi2012"]
    with pytest.raises(ValueError, match="axondeepseg_sem not found"):
        discover(root, "bbbc039,axondeepseg_sem")
    with pytest.raises(ValueError, match="unknown data set 'nuclei'"):
        discover(root, "nuclei")
    with pytest.raises(ValueError, match="no shared data set"):
        discover(tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    only = discover(root, folders=[mine], kind="semantic")  # --data alone: just that folder
    assert [(d.name, d.path, d.kind, d.init_args) for d in only] == [("mine", mine, "semantic", ())]
    stack = discover(root, folders=[mine], images="v.tif", labels="l.tif")[0]
    assert stack.kind is None and stack.init_args == ("--images", "v.tif", "--labels", "l.tif")
    with pytest.raises(ValueError, match="go together"):
        discover(root, folders=[mine], images="v.tif")


def test_bench_options():
    from tools.bench_own_data import parser

    args = parser().parse_args([])
    assert (args.minutes, args.device, args.sequential, args.datasets, args.data, args.out) == (
        20.0, "cpu", False, None, [], None)
    args = parser().parse_args(["--datasets", "bbbc039,isbi2012", "--minutes", "0.5", "--sequential",
                                "--data", "a", "--data", "b", "--kind", "instances", "--device", "cuda"])
    assert args.datasets == "bbbc039,isbi2012" and args.minutes == 0.5 and args.sequential
    assert args.data == [Path("a"), Path("b")] and args.kind == "instances" and args.device == "cuda"


def test_baseline_gets_the_recipes_split(tmp_path):
    from tools.bench_own_data import baseline_data_args

    (tmp_path / "vol.tif").write_text("x")
    stack = {"root": str(tmp_path), "raw": "vol.tif", "labels": "lab.tif", "train_slices": [0, 24],
             "val_slices": [24, 27], "test_slices": [27, 30]}
    assert baseline_data_args(stack) == ["--images", str(tmp_path / "vol.tif"), "--labels", str(tmp_path / "lab.tif"),
                                         "--slices", "0:24,24:27,27:30"]
    folder = {"root": str(tmp_path), "raw": "images", "labels": "labels", "train_files": "train.txt",
              "val_files": "val.txt", "test_files": str(tmp_path / "test.txt")}
    assert baseline_data_args(folder) == ["--data", str(tmp_path)]
    with pytest.raises(ValueError, match="folder layout"):
        baseline_data_args({**folder, "val_files": ["a", "b"]})
    with pytest.raises(ValueError, match="folder layout"):
        baseline_data_args({**folder, "raw": "raw"})


def test_bench_headline_winners_and_table():
    from tools.bench_own_data import headline, markdown_table, with_foreground_dice

    values, winners = headline("instances", {"map": 0.61, "f1@0.5": 0.80}, {"map": 0.55, "f1@0.5": 0.85})
    assert values["map"] == {"segkit": 0.61, "baseline": 0.55}
    assert winners == {"map": "segkit", "f1@0.5": "baseline"}
    assert headline("membrane", {"adapted_rand_error": 0.2}, {"adapted_rand_error": 0.1})[1] == {
        "adapted_rand_error": "baseline"}
    assert headline("semantic", {"dice_foreground": 0.9}, {"dice_foreground": 0.9})[1] == {"dice_foreground": "tie"}
    segkit_semantic = with_foreground_dice({"dice_mean": 0.8, "dice_0": 0.9, "dice_1": 0.7, "dice_2": 0.8})
    assert segkit_semantic["dice_foreground"] == pytest.approx(0.75)
    results = [
        {"data_set": "bbbc039", "kind": "instances", "minutes": 20.0, "iterations": {"segkit": 900, "baseline": 150},
         "segkit": {"test": {"map": 0.61, "f1@0.5": 0.8}}, "baseline": {"test": {"map": 0.55, "f1@0.5": 0.85}}},
        {"data_set": "isbi2012", "kind": "membrane", "minutes": 0.5, "iterations": {"segkit": 3, "baseline": 2},
         "segkit": {"test": {"adapted_rand_error": 0.25, "vi": 1.0}}, "baseline": {"test": {"adapted_rand_error": 0.5}}},
    ]
    lines = markdown_table(results).splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].split("|")[1:-1] == [" data set ", " kind ", " tool ", " minutes ", " iterations ", " F1@0.5 ",
                                         " mean AP ", " fg Dice ", " adapted Rand error "]
    assert lines[2] == "| bbbc039 | instances | segkit | 20 | 900 | 0.800 | 0.610 | – | – |"
    assert lines[3] == "| bbbc039 | instances | smp baseline | 20 | 150 | 0.850 | 0.550 | – | – |"
    assert lines[5] == "| isbi2012 | membrane | smp baseline | 0.5 | 2 | – | – | – | 0.500 |"


def test_bench_runs_init_then_both_with_the_recipes_split(tmp_path, monkeypatch):
    """bench() without training: init is asked for a recipe (here written by a stand-in), segkit train and the
    baseline get the same data, kind, split, minutes and device, and the result line says who won."""
    import tools.bench_own_data as bench_module
    from tools.bench_own_data import DataSet, bench

    images, labels = fake_stack(tmp_path / "isbi")
    calls = {}

    def fake_init(cmd, **kwargs):
        calls["init"], calls["init_env"] = cmd, kwargs["env"]
        recipe = Path(cmd[cmd.index("-o") + 1])
        recipe.write_text(f"data: {{root: {images.parent}, raw: volume.tif, labels: labels.tif, labels_kind: membrane,"
                          f" train_slices: [0, 3], val_slices: [3, 4], test_slices: [4, 5]}}\n"
                          "train: {time_limit_min: 0.5, device: cpu}\n")
        return subprocess.CompletedProcess(cmd, 0, "fingerprint\n", "")

    def fake_side_by_side(segkit_cmd, baseline_cmd, out, *, sequential, threads):
        calls.update(train=segkit_cmd, baseline=baseline_cmd, threads=threads)
        return {"iterations": 2, "test": {"adapted_rand_error": 0.4}}, {"segkit": 31.0, "baseline": 35.0}

    monkeypatch.setattr(bench_module.subprocess, "run", fake_init)
    monkeypatch.setattr(bench_module, "run_side_by_side", fake_side_by_side)
    monkeypatch.setattr(bench_module, "score_segkit", lambda run_dir, recipe, device: {
        "iterations": 7, "epochs": 1, "test": {"adapted_rand_error": 0.3, "vi": 1.2}})
    dataset = DataSet("isbi", images.parent, "membrane", ("--images", "volume.tif", "--labels", "labels.tif"))
    result = bench(dataset, minutes=0.5, device="cpu", sequential=False, out=tmp_path / "runs")
    run_dir = tmp_path / "runs" / "isbi"
    assert calls["init"][2:] == ["segkit.cli", "init", str(images.parent), "--images", "volume.tif", "--labels",
                                 "labels.tif", "-o", str(run_dir / "recipe.yaml"), "--minutes", "0.5", "--device", "cpu",
                                 "--kind", "membrane"]
    assert calls["init_env"]["OMP_NUM_THREADS"] == "1" and calls["threads"] == 1
    assert calls["train"][2:] == ["segkit.cli", "train", str(run_dir / "recipe.yaml"), f"train.out={run_dir / 'segkit'}"]
    assert calls["baseline"][2:] == ["--images", str(images), "--labels", str(labels), "--slices", "0:3,3:4,4:5",
                                     "--kind", "membrane", "--minutes", "0.5", "--threads", "1", "--device", "cpu"]
    assert result["winner"] == {"adapted_rand_error": "segkit"}
    assert result["iterations"] == {"segkit": 7, "baseline": 2} and result["run_folder"] == str(run_dir)
    assert result["wall_seconds"] == {"segkit": 31.0, "baseline": 35.0}
    assert (run_dir / "init.log").read_text() == "fingerprint\n"
    with pytest.raises(SystemExit, match="earlier run"):  # run folders are kept, never overwritten
        bench(dataset, minutes=0.5, device="cpu", sequential=False, out=tmp_path / "runs")


def test_bench_reports_the_epoch_the_run_kept():
    """Membrane runs keep the epoch of the lowest error at the validation-chosen threshold."""
    sys.path.insert(0, str(REPO / "tools"))
    from _bench_train import best_epoch

    rows = [{"epoch": 1, "adapted_rand_error": 0.10, "best_adapted_rand_error": 0.09},
            {"epoch": 2, "adapted_rand_error": 0.12, "best_adapted_rand_error": 0.05}]
    assert best_epoch(rows) == 2
    assert best_epoch([{"epoch": 1, "map": 0.5}, {"epoch": 2, "map": 0.7}]) == 2
