"""tools/baseline_smp.py: the plain smp baseline, on tiny synthetic copies of bbbc039 and axondeepseg_sem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tools.baseline_smp import instances_from, random_patch, run_baseline, three_classes

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "baseline_smp.py"


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (y, x) in enumerate(centres, 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = i
    return labels


def fake_dataset(root: Path, name: str) -> Path:
    """Two images per split in the layout of /work/shared/data/<name> (small, so the test stays fast)."""
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
            tifffile.imwrite(folder / "images" / f"{image_name}.tif", image)
            tifffile.imwrite(folder / "labels" / f"{image_name}.tif", labels)
    return root


def test_three_classes_marks_a_one_pixel_inner_boundary():
    labels = discs((40, 40), [(12, 12), (12, 22)], radius=5)  # two touching discs
    target = three_classes(labels)
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[labels == 0] == 0).all()  # the boundary lies within objects
    assert target[12, 12] == 1 and target[12, 7] == 2 and target[12, 6] == 0


def test_random_patch_moves_image_and_target_together():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, (300, 120)).astype(np.uint8)  # one side smaller than the crop
    for _ in range(8):
        image, crop = random_patch(target.astype(np.float32), target, rng)
        assert image.shape == crop.shape == (256, 256) and image.flags.c_contiguous
        np.testing.assert_array_equal(image, crop)


def test_watershed_grows_components_back_to_the_objects():
    from segkit.metrics import instance_scores

    labels = discs((50, 60), [(15, 15), (15, 26), (35, 45)])
    probs = np.eye(3, dtype=np.float32)[three_classes(labels)].transpose(2, 0, 1)
    variants = instances_from(probs)
    assert variants["components"].max() == variants["watershed"].max() == 3
    assert instance_scores(labels, variants["watershed"])["map"] == 1.0
    assert instance_scores(labels, variants["components"])["map"] < 1.0


def test_run_baseline_reports_both_bbbc039_variants(tmp_path):
    report = run_baseline("bbbc039", 0, threads=1, data_root=fake_dataset(tmp_path, "bbbc039"))
    assert report["iterations"] == 1 and report["patches"] == 8 and report["threads"] == 1
    assert set(report["val"]) == set(report["test"]) == {"components", "watershed"}
    assert report["chosen"] in report["test"]
    assert set(report["test"]["watershed"]) == {"f1@0.5", "ap@0.5", "map", "f1@0.75"}
    assert all(0 <= v <= 1 for row in report["test"].values() for v in row.values())


def test_script_prints_one_json_line_for_axondeepseg(tmp_path):
    root = fake_dataset(tmp_path, "axondeepseg_sem")
    out = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "axondeepseg_sem", "--minutes", "0",
                          "--threads", "1", "--data-root", str(root)], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    report = json.loads(lines[0])
    assert report["tool"] == "baseline_smp" and report["chosen"] == "argmax"
    assert set(report["test"]["argmax"]) == {"dice_mean", "iou_mean", "dice_1", "dice_2"}
    assert "iteration 1" in out.stderr


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="isbi2012"):
        run_baseline("isbi2012", 0)
