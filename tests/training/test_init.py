"""segkit init: the data fingerprint (numbers on hand-made labels), the recipe it writes (rules, splits,
validation by load_recipe), bad input through the CLI, the real data sets, and `segkit train DATA`."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from segkit.training.fingerprint import (
    find_layout,
    fingerprint,
    guess_kind,
    kind_problem,
    object_diameters,
    read_samples,
    summarize_labels,
    touching_objects,
)
from segkit.training.init import Timings, init_recipe, random_split, schedule, stack_slices
from tests.helpers import assert_user_error, data_root, run

#: Fixed timings, so no test depends on the speed of the machine.
FIXED = Timings(step_s=1.0, forward_s=0.5, measured=False, note="fixed for the test")


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def make_instances(root: Path, count: int = 6, size: int = 64, radius: int = 5, dtype=np.uint16, pixel_size=None) -> Path:
    """images/ + labels/ of `count` images with 5 separate nuclei each (ids 1..5), dim fluorescence."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    spacing = size // 3
    for i in range(count):
        labels = np.zeros((size, size), np.uint16)
        centres = [(spacing // 2 + spacing * (k // 3), spacing // 2 + spacing * (k % 3)) for k in range(5)]
        for n, centre in enumerate(centres, 1):
            labels[_disc(labels.shape, centre, radius)] = n
        image = (100 + 900 * (labels > 0) + rng.normal(0, 10, labels.shape)).clip(0).astype(dtype)
        extra = {"resolution": (1 / pixel_size, 1 / pixel_size), "metadata": {"unit": "um"}, "imagej": True} \
            if pixel_size else {}
        tifffile.imwrite(root / "images" / f"img{i}.tif", image, **extra)
        tifffile.imwrite(root / "labels" / f"img{i}.tif", labels)
    return root


def make_semantic(root: Path, count: int = 6, size: int = 64) -> Path:
    """images/ + labels/ of classes 0/1/2 as many small squares each (regions in many pieces), uint8 spread."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        labels = np.zeros((size, size), np.uint8)
        for y in range(2, size - 6, 10):
            for x in range(2, size - 6, 10):
                labels[y:y + 5, x:x + 5] = 1 + ((x + y) // 10) % 2
        image = rng.integers(0, 256, labels.shape).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"s{i}.tif", image)
        tifffile.imwrite(root / "labels" / f"s{i}.tif", labels)
    return root


def membrane_labels(planes: int = 12, size: int = 64, spacing: int = 32) -> np.ndarray:
    """Cells 255 parted by 2 px membranes 0 on a grid (ISBI 2012's form)."""
    labels = np.full((planes, size, size), 255, np.uint8)
    for k in range(0, size, spacing):
        labels[:, k:k + 2, :] = 0
        labels[:, :, k:k + 2] = 0
    return labels


def make_stack(root: Path, planes: int = 12) -> Path:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    labels = membrane_labels(planes)
    tifffile.imwrite(root / "train-volume.tif", rng.integers(0, 256, labels.shape).astype(np.uint8))
    tifffile.imwrite(root / "train-labels.tif", labels)
    tifffile.imwrite(root / "test-volume.tif", rng.integers(0, 256, (3, 32, 32)).astype(np.uint8), photometric="minisblack")
    return root


def init(root, out, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("timings", FIXED)
    return init_recipe(root, out, echo=lambda line: None, **kwargs)


def load(result):
    from segkit.config import load_recipe

    return load_recipe(result.recipe)


# -- fingerprint numbers -----------------------------------------------------------------------------

def test_object_diameters_and_touching_share_on_hand_made_labels():
    labels = np.zeros((40, 40), np.uint16)
    labels[0:10, 0:10] = 1  # 100 px -> diameter sqrt(400 / pi) = 11.28
    labels[0:10, 10:20] = 2  # touches 1
    labels[30:34, 30:34] = 3  # 16 px, alone
    labels[20:22, 20:22] = 4  # 4 px
    labels[22, 22] = 5  # diagonal neighbour of 4: touching under 8-connectivity
    diameters = np.sort(object_diameters(labels))
    assert diameters == pytest.approx(np.sort(np.sqrt(4 * np.array([100, 100, 16, 4, 1]) / np.pi)))
    assert touching_objects(labels) == (4, 5)
    assert object_diameters(labels, factor=2.0).max() == pytest.approx(2 * np.sqrt(400 / np.pi))


def test_kind_guess_for_each_kind():
    instances = [np.where(_disc((64, 64), (20, 20), 6), 1, 0) + np.where(_disc((64, 64), (40, 44), 6), 2, 0)
                 for _ in range(3)]
    kind, reason = guess_kind(summarize_labels(instances))
    assert kind == "instances" and "one connected piece" in reason
    # one image with only 5 nuclei still reads as instances (decided over all images)
    few = np.zeros((64, 64), np.uint8)
    for n, centre in enumerate([(10, 10), (10, 40), (40, 10), (40, 40), (55, 25)], 1):
        few[_disc(few.shape, centre, 4)] = n
    assert guess_kind(summarize_labels([few]))[0] == "instances"
    semantic = np.zeros((64, 64), np.uint8)
    for y in range(0, 60, 10):
        semantic[y:y + 4, :30] = 1
        semantic[y:y + 4, 34:] = 2
    assert guess_kind(summarize_labels([semantic]))[0] == "semantic"
    assert guess_kind(summarize_labels(list(membrane_labels(3))))[0] == "membrane"
    # two values, 0 background (wide) and 255 blobs: not membrane; classes 0/255 cannot train as semantic
    blobs = np.zeros((64, 64), np.uint8)
    blobs[_disc(blobs.shape, (20, 20), 5)] = 255
    blobs[_disc(blobs.shape, (45, 45), 5)] = 255
    summary = summarize_labels([blobs, blobs])
    assert not summary.zero_is_thin
    assert guess_kind(summary)[0] == "semantic"
    assert "relabel them as 0..K-1" in kind_problem("semantic", summary)


def test_fingerprint_of_an_instance_folder(tmp_path):
    root = make_instances(tmp_path / "nuclei")
    layout = find_layout(root)
    fp = fingerprint(layout, read_samples(layout))
    assert (fp.images, fp.sampled, fp.heights, fp.widths, fp.dtype, fp.channels) == (6, 6, (64, 64, 64), (64, 64, 64),
                                                                                     "uint16", 1)
    assert fp.kind == "instances" and fp.objects == 30
    area = _disc((64, 64), (30, 30), 5).sum()
    assert fp.diameters == pytest.approx((np.sqrt(4 * area / np.pi),) * 3)
    assert fp.touching == 0
    low, mid, high = fp.percentiles[0]
    assert low < mid < 200 < 900 < high
    names = dict(fp.class_fractions)
    assert names["objects (> 0)"] == pytest.approx(5 * area / 64**2)
    assert any("equivalent diameter" in line for line in fp.lines())


def test_fingerprint_subsamples_and_reads_pixel_sizes(tmp_path):
    root = make_instances(tmp_path / "many", count=8, pixel_size=0.5)
    layout = find_layout(root)
    assert [p.pixel_size for p in layout.pairs] == pytest.approx([0.5] * 8)
    samples = read_samples(layout, limit=3)
    assert [Path(s.source).name for s in samples] == ["img0.tif", "img4.tif", "img7.tif"]
    fp = fingerprint(layout, samples)
    assert fp.sampled == 3 and fp.images == 8 and not fp.pixel_size_varies and fp.common_pixel_size is None
    assert "pixel size: 0.5 um" in fp.text()


# -- the recipe -----------------------------------------------------------------------------------

def test_instance_recipe_scales_big_objects_and_sets_boundary_width(tmp_path):
    root = make_instances(tmp_path / "big", size=128, radius=14)  # median diameter ~28 -> no scale
    recipe = load(init(root, tmp_path / "a.yaml"))
    assert recipe["data"]["labels_kind"] == "instances" and recipe["data"]["scale"] is None
    assert recipe["data"]["boundary_width"] == 2  # round(28 / 15)
    root = make_instances(tmp_path / "huge", size=256, radius=30)  # diameter ~60 -> scale 0.5
    result = init(root, tmp_path / "b.yaml")
    recipe = load(result)
    diameter = result.fingerprint.diameters[1]
    assert recipe["data"]["scale"] == pytest.approx(30 / diameter, abs=0.01)
    assert recipe["data"]["boundary_width"] == 2  # 30 px after scaling / 15
    assert "# median object" in result.text and "cellpose" in result.text
    small = make_instances(tmp_path / "small", radius=3)  # diameter ~6 -> scale 4 (clipped from ~5)
    recipe = load(init(small, tmp_path / "c.yaml"))
    assert recipe["data"]["scale"] == 4.0 and recipe["data"]["boundary_width"] == 2


def test_instance_tile_grows_to_span_four_objects(tmp_path):
    from segkit.models.geometry import valid_unet_geometry

    root = make_instances(tmp_path / "n", size=256, radius=18)  # diameter ~36: no scale, 4 objects = 144 px > 132
    recipe = load(init(root, tmp_path / "r.yaml"))
    assert recipe["data"]["scale"] is None
    out = valid_unet_geometry(4).output_size(recipe["data"]["tile"])
    assert recipe["data"]["tile"] > 316 and out >= 4 * 35


def test_normalization_rule_uint16_sparse_vs_uint8_spread(tmp_path):
    sparse = load(init(make_instances(tmp_path / "fluo"), tmp_path / "fluo.yaml"))
    assert sparse["data"]["normalization"] == "percentile"
    spread = load(init(make_semantic(tmp_path / "em"), tmp_path / "em.yaml"))
    assert spread["data"]["normalization"] == "meanstd"
    assert spread["data"]["labels_kind"] == "semantic" and spread["data"]["classes"] == 3
    assert spread["loss"]["border_w0"] == 0 and spread["loss"]["dice_weight"] == 0.5


def test_recipe_validates_and_holds_cpu_rules(tmp_path):
    result = init(make_instances(tmp_path / "d"), tmp_path / "d.yaml", minutes=20)
    recipe = load(result)
    assert recipe["model"] == {"name": "unet", "params": {"base": 16, "depth": 4, "batch_norm": True},
                               "pretrained": None, "init_from": None, "denoiser": None}
    assert recipe["data"]["root"] == str((tmp_path / "d").resolve())
    assert (recipe["data"]["tile"], recipe["train"]["batch"], recipe["train"]["workers"]) == (316, 4, 0)
    assert recipe["train"]["val_tile"] == 572  # the smallest from 572: the images are small
    assert (recipe["train"]["optimizer"], recipe["train"]["lr"], recipe["train"]["schedule"]) == ("adamw", 1e-3, "cosine")
    assert recipe["augment"]["elastic_alpha"] == 1000 and recipe["augment"]["elastic_sigma"] == 25
    assert recipe["train"]["time_limit_min"] == 20 and recipe["train"]["device"] == "cpu"
    # every setting has its reason on the line above
    lines = result.text.splitlines()
    for key in ("labels_kind:", "normalization:", "tile:", "epochs:", "iters_per_epoch:", "ema_decay:"):
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(key))
        assert lines[index - 1].strip().startswith("# ")


def test_schedule_from_the_budget():
    # 20 min, 1 s per iteration, 0.5 s per forward x 12 tiles x 2 = 12 s validation per epoch
    epochs, iters, ema, val_s = schedule(20, FIXED, 12)
    assert val_s == 12 and epochs == 10  # 10 % of 1200 s / 12 s
    assert iters == int((1200 - 10 * 12) / (1.1 * 10))  # the time limit counts every validation
    assert ema == pytest.approx(round(1 - 10 / (epochs * iters), 4))
    assert schedule(20, FIXED, 1000)[0:2] == (1, 181)  # validation slow: once, at the end, within the limit
    assert schedule(0.1, FIXED, 12)[0:2] == (1, 10)  # a budget of a few steps: at least 10 iterations
    assert schedule(20, FIXED, 12, kind="semantic")[3] == pytest.approx(7.2)  # no watershed grid: x1.2
    assert schedule(600, FIXED, 1)[0] == 20
    assert schedule(1, Timings(100.0, 10.0), 1)[2] == 0.9  # 1 epoch x 10 iterations: 1 - 10 / 10, clamped


def test_split_files_are_written_beside_the_recipe_and_never_overwritten(tmp_path):
    root = make_instances(tmp_path / "data", count=10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r.train.txt").write_text("keep me\n")
    result = init(root, tmp_path / "out" / "r.yaml")
    assert (tmp_path / "out" / "r.train.txt").read_text() == "keep me\n"
    names = {path.name: path.read_text().split() for path in result.split_files}
    assert set(names) == {"r.train-2.txt", "r.val.txt", "r.test.txt"}
    assert sorted(sum(names.values(), [])) == sorted(f"img{i}" for i in range(10))
    assert [len(names[n]) for n in ("r.train-2.txt", "r.val.txt", "r.test.txt")] == [6, 2, 2]
    recipe = load(result)
    assert recipe["data"]["train_files"] == str(tmp_path / "out" / "r.train-2.txt")
    assert random_split([f"n{i}" for i in range(10)]) == random_split([f"n{i}" for i in range(10)])
    assert [len(v) for v in random_split(["a", "b", "c"]).values()] == [1, 1, 1]
    # existing split files in the data folder are used as they are
    for split, part in (("train", "img0\nimg1\nimg2\n"), ("val", "img3\n"), ("test", "img4\n")):
        (root / f"{split}.txt").write_text(part)
    again = init(root, tmp_path / "out" / "s.yaml")
    assert again.split_files == () and load(again)["data"]["val_files"] == str(root / "val.txt")


def test_stack_slice_rule(tmp_path):
    assert stack_slices(30) == {"train": [0, 20], "val": [20, 25], "test": [25, 30]}
    assert stack_slices(3) == {"train": [0, 1], "val": [1, 2], "test": [2, 3]}
    assert stack_slices(12) == {"train": [0, 8], "val": [8, 10], "test": [10, 12]}
    result = init(make_stack(tmp_path / "em"), tmp_path / "em.yaml")
    recipe = load(result)
    assert (recipe["data"]["raw"], recipe["data"]["labels"]) == ("train-volume.tif", "train-labels.tif")
    assert recipe["data"]["labels_kind"] == "membrane" and recipe["data"]["normalization"] == "meanstd"
    assert (recipe["data"]["train_slices"], recipe["data"]["val_slices"], recipe["data"]["test_slices"]) == \
        ([0, 8], [8, 10], [10, 12])
    assert recipe["loss"]["border_w0"] == 10 and recipe["loss"]["dice_weight"] == 0
    assert result.split_files == ()


def test_differing_pixel_sizes_set_the_median(tmp_path):
    root = make_instances(tmp_path / "px", count=3)
    for i, size in enumerate((0.1, 0.2, 0.4)):  # re-save with calibrations
        image = tifffile.imread(root / "images" / f"img{i}.tif")
        tifffile.imwrite(root / "images" / f"img{i}.tif", image, resolution=(1 / size, 1 / size),
                         metadata={"unit": "um"}, imagej=True)
    result = init(root, tmp_path / "px.yaml")
    assert load(result)["data"]["pixel_size"] == 0.2
    assert result.fingerprint.pixel_size_varies
    # diameters are measured at the median pixel size: images at 0.1 um shrink by 2, at 0.4 um grow by 2
    assert result.fingerprint.diameters[0] < result.fingerprint.diameters[2]


# -- bad input through the CLI ---------------------------------------------------------------------

def cli_init(*args):
    return run("init", *args, "--no-measure", "--device", "cpu")


def test_help_names_the_defaults():
    result = run("init", "--help")
    assert result.exit_code == 0 and "Example" in result.output
    assert "20 on a CPU, 60 on a GPU" in result.output and "--no-measure" in result.output


def test_missing_folder_and_file(tmp_path):
    assert_user_error(cli_init(tmp_path / "nope"), "does not exist")
    (tmp_path / "f.tif").write_bytes(b"x")
    assert_user_error(cli_init(tmp_path / "f.tif"), "is a file, not a folder")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(cli_init(tmp_path / "empty"), "holds no TIFF images")


def test_images_without_labels(tmp_path):
    root = make_instances(tmp_path / "d")
    (root / "labels" / "img3.tif").unlink()
    assert_user_error(cli_init(root, "-o", tmp_path / "r.yaml"), "no label image for img3.tif")
    (tmp_path / "nolabels" / "images").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "nolabels" / "images" / "a.tif", np.zeros((8, 8), np.uint8))
    assert_user_error(cli_init(tmp_path / "nolabels", "-o", tmp_path / "r.yaml"), "no", "labels folder")


def test_labels_of_another_size(tmp_path):
    root = make_instances(tmp_path / "d")
    tifffile.imwrite(root / "labels" / "img2.tif", np.zeros((32, 64), np.uint16))
    assert_user_error(cli_init(root, "-o", tmp_path / "r.yaml"), "img2.tif is 64 x 64 px", "32 x 64")


def test_one_image_only(tmp_path):
    root = make_instances(tmp_path / "one", count=1)
    assert_user_error(cli_init(root, "-o", tmp_path / "r.yaml"), "one image only", "add at least 2 more")
    stack = tmp_path / "st"
    stack.mkdir()
    tifffile.imwrite(stack / "vol.tif", np.zeros((2, 64, 64), np.uint8))
    tifffile.imwrite(stack / "vol_labels.tif", membrane_labels(2))
    assert_user_error(cli_init(stack, "-o", tmp_path / "s.yaml"), "2 planes, too few")


def test_labels_all_one_value(tmp_path):
    root = make_instances(tmp_path / "d")
    for i in range(6):
        tifffile.imwrite(root / "labels" / f"img{i}.tif", np.zeros((64, 64), np.uint16))
    assert_user_error(cli_init(root, "-o", tmp_path / "r.yaml"), "only the value 0 everywhere")


def test_kind_that_contradicts_the_labels(tmp_path):
    stack = make_stack(tmp_path / "em")
    assert_user_error(cli_init(stack, "--kind", "semantic", "-o", tmp_path / "r.yaml"),
                      "--kind semantic needs classes 0..K-1", "0, 255", "--kind membrane")
    assert_user_error(cli_init(make_semantic(tmp_path / "sem"), "--kind", "instances", "-o", tmp_path / "r.yaml"),
                      "--kind instances needs one id per object")
    assert_user_error(cli_init(make_instances(tmp_path / "n"), "--kind", "membrane", "-o", tmp_path / "r.yaml"),
                      "--kind membrane needs thin membranes")
    assert not (tmp_path / "r.yaml").exists()


def test_bad_budget_and_device(tmp_path):
    import torch

    root = make_instances(tmp_path / "d")
    assert_user_error(cli_init(root, "--minutes", "-5", "-o", tmp_path / "r.yaml"), "--minutes -5",
                      "positive number of minutes")
    if not torch.cuda.is_available():
        result = run("init", root, "--device", "cuda", "--no-measure", "-o", tmp_path / "r.yaml")
        assert_user_error(result, "--device cuda", "CUDA is not available")


def test_existing_recipe_needs_overwrite(tmp_path):
    root = make_instances(tmp_path / "d")
    (tmp_path / "r.yaml").write_text("keep")
    assert_user_error(cli_init(root, "-o", tmp_path / "r.yaml"), "already exists", "--overwrite")
    assert (tmp_path / "r.yaml").read_text() == "keep"
    assert_user_error(cli_init(root, "-o", tmp_path / "r.txt"), "name it with .yaml")
    result = cli_init(root, "-o", tmp_path / "r.yaml", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "labels: instances" in result.stdout and "wrote" in result.stdout


def test_several_label_stacks_and_explicit_names(tmp_path):
    root = make_stack(tmp_path / "em")
    tifffile.imwrite(root / "other-labels.tif", membrane_labels())
    assert_user_error(cli_init(root, "-o", tmp_path / "r.yaml"), "several label files", "--images NAME and --labels NAME")
    result = cli_init(root, "--images", "train-volume.tif", "--labels", "other-labels.tif", "-o", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    assert_user_error(cli_init(root, "--images", "train-volume.tif", "-o", tmp_path / "s.yaml"),
                      "give both --images NAME and --labels NAME")


# -- the real data sets (skipped when absent) -------------------------------------------------------

@pytest.mark.parametrize("name, kind, normalization", [("isbi2012", "membrane", "meanstd"),
                                                       ("bbbc039", "instances", "percentile"),
                                                       ("axondeepseg_sem", "semantic", "meanstd")])
def test_init_on_the_real_data(tmp_path, name, kind, normalization):
    root = data_root() / name
    if not root.is_dir():
        pytest.skip(f"{name} not found in {root.parent} (set SEGKIT_DATA)")
    result = cli_init(root, "-o", tmp_path / f"{name}.yaml")
    assert result.exit_code == 0, result.output
    from segkit.config import load_recipe

    recipe = load_recipe(tmp_path / f"{name}.yaml")
    assert recipe["data"]["labels_kind"] == kind and recipe["data"]["normalization"] == normalization
    if name == "isbi2012":
        assert (recipe["data"]["train_slices"], recipe["data"]["val_slices"], recipe["data"]["test_slices"]) == \
            ([0, 20], [20, 25], [25, 30])
    if name == "bbbc039":
        assert recipe["data"]["boundary_width"] == 2 and recipe["data"]["scale"] is None
        assert recipe["data"]["train_files"] == str(root.resolve() / "train.txt")
    if name == "axondeepseg_sem":
        assert recipe["data"]["classes"] == 3 and recipe["data"]["pixel_size"] == 0.1


# -- segkit train DATA -----------------------------------------------------------------------------------

def test_train_on_a_data_folder(tmp_path, monkeypatch):
    root = make_instances(tmp_path / "nuclei")
    monkeypatch.chdir(tmp_path)
    result = run("train", root, "-q", "model.params.base=4", "train.epochs=1", "train.iters_per_epoch=2",
                 "data.tile=204", "train.val_tile=204", "train.batch=1", "train.device=cpu", "train.val_batch=1")
    assert result.exit_code == 0, result.output
    run_folder = tmp_path / "runs" / "nuclei"
    assert (run_folder / "best.safetensors").is_file()
    from segkit.config import load_recipe

    recipe = load_recipe(run_folder / "init_recipe.yaml")
    assert recipe["model"]["params"]["base"] == 4 and recipe["train"]["epochs"] == 1
    assert recipe["data"]["labels_kind"] == "instances"
    assert "# set on the command line" in (run_folder / "init_recipe.yaml").read_text()
    assert (run_folder / "recipe.yaml").is_file()
    assert sorted(p.name for p in run_folder.glob("init_recipe.*.txt")) == \
        ["init_recipe.test.txt", "init_recipe.train.txt", "init_recipe.val.txt"]
    again = run("train", root, "model.params.base=4")
    assert_user_error(again, "already holds a run")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("train", tmp_path / "empty"), "holds no TIFF images")
    assert not (tmp_path / "runs" / "empty").exists()
