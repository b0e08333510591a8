"""Training on the user's own data: image/label folders paired by name, split files, globs and lists,
label kinds (membrane, semantic, instances), channels and normalisation, and the one-line errors for
data segkit cannot train on. Images are tiny (48-64 px) and the U-Net is base 4, depth 2: the whole
file runs in well under a minute on two CPU cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from segkit.config import validate_recipe
from segkit.errors import ConfigError, InputError
from segkit.training.datasets import load_examples
from segkit.training.targets import LabelRule, check_labels, class_weights, instance_classes, weight_map

SIZE = 64  # image side
TILE = 64  # a valid input of the depth-2 U-Net (margin 20, step 4): 24 px output


# -- helpers -------------------------------------------------------------------------------------------

def _write(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3 and "photometric" not in kwargs:
        kwargs = {"photometric": "minisblack", "metadata": {"axes": "CYX"}, **kwargs}
    tifffile.imwrite(path, array, **kwargs)
    return path


def _recipe(tmp_path: Path, data: dict, **train) -> dict:
    """A validated recipe training a base-4 depth-2 U-Net for one epoch of two iterations on the CPU."""
    return validate_recipe({
        "model": {"name": "unet", "params": {"base": 4, "depth": 2}},
        "data": {"root": str(tmp_path), "raw": "images", "labels": "labels", "tile": TILE, **data},
        "augment": {"elastic": False},
        "train": {"epochs": 1, "iters_per_epoch": 2, "batch": 2, "val_batch": 4, "device": "cpu", "amp": False,
                  "lr": 1e-3, "out": str(tmp_path / "run"), **train},
    })


def _data(tmp_path: Path, **data) -> dict:
    return _recipe(tmp_path, data)["data"]


def _named_folders(tmp_path: Path, names: list[str], size: int = 48) -> None:
    """images/<name>.tif filled with 10 * (index + 1) and labels/<name>.tif filled with index + 1
    (written in reverse order, so pairing by position would not pair them)."""
    for index, name in reversed(list(enumerate(names))):
        _write(tmp_path / "images" / f"{name}.tif", np.full((size, size), 10 * (index + 1), np.uint8))
        _write(tmp_path / "labels" / f"{name}.tif", np.full((size, size), index + 1, np.uint8))


def _shapes(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes by intensity: (image uint8, classes uint8) of a background with a dim and a bright
    rectangle."""
    rng = np.random.default_rng(seed)
    classes = np.zeros((size, size), np.uint8)
    y, x = rng.integers(4, size // 2 - 8, 2)
    classes[y:y + size // 3, x:x + size // 3] = 1
    y, x = rng.integers(size // 2, size - size // 3 - 2, 2)
    classes[y:y + size // 4, x:x + size // 3] = 2
    image = np.array([30, 120, 220], np.float32)[classes] + rng.normal(0, 8, classes.shape)
    return np.clip(image, 0, 255).astype(np.uint8), classes


def _blobs(size: int, seed: int, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on a dark background: (image uint8, uint16 object ids; two discs touch)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    ids = np.zeros((size, size), np.uint16)
    centres = [(16, 16), (16, 29)] + [tuple(rng.integers(12, size - 12, 2)) for _ in range(count - 2)]
    for index, (cy, cx) in enumerate(centres, start=1):
        ids[((yy - cy) ** 2 + (xx - cx) ** 2 <= 49) & (ids == 0)] = 100 + 7 * index  # ids need not be 1..N
    image = np.where(ids > 0, 200.0, 40.0) + rng.normal(0, 10, ids.shape)
    return np.clip(image, 0, 255).astype(np.uint8), ids


def _train(recipe: dict):
    from segkit.training.loop import train

    return train(recipe, progress=False, echo=lambda _: None)


def _refused(recipe: dict, error: type, *words: str) -> str:
    """Training `recipe` fails with one line of `error` holding every word, and leaves no checkpoint."""
    with pytest.raises(error) as caught:
        _train(recipe)
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    run = Path(recipe["train"]["out"])
    assert not (run / "last.safetensors").exists() and not (run / "best.safetensors").exists()
    return message


def _config_refused(tmp_path: Path, data: dict, *words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _recipe(tmp_path, data)
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "run").exists()


# -- 1. which images: folders paired by name, split files, globs, lists, slice ranges -------------------

NAMES = ["s1_a", "s1_b", "s1_c", "s2_d", "s2_e"]


def _pairs(examples) -> list[tuple[str, int, int]]:
    """(name, image value, label value) of each example; a correct pair has image == 10 * label."""
    out = [(e.name, int(e.image[0, 0, 0]), int(e.labels[0, 0])) for e in examples]
    for name, image, label in out:
        assert image == 10 * label, f"{name}: image and labels of different files"
    return out


def test_split_files_pair_images_and_labels_by_name_in_split_order(tmp_path):
    _named_folders(tmp_path, NAMES)
    (tmp_path / "train.txt").write_text("s2_d\n# a comment\n\ns1_a\n  s1_c  \n")
    (tmp_path / "val.txt").write_text("s1_b.tif\n")  # names with the extension work too
    (tmp_path / "test.txt").write_text("s2_e\n")
    data = _data(tmp_path, train_files="train.txt", val_files="val.txt", test_files="test.txt")
    train = load_examples(data, "train")
    assert _pairs(train) == [("s2_d", 40, 4), ("s1_a", 10, 1), ("s1_c", 30, 3)]
    for example in train:
        assert example.image.shape == (1, 48, 48) and example.image.dtype == np.uint8
        assert example.labels.shape == (48, 48)
        assert example.source.endswith(f"{example.name}.tif") and example.pixel_size is None
    assert _pairs(load_examples(data, "val")) == [("s1_b", 20, 2)]
    assert _pairs(load_examples(data, "test")) == [("s2_e", 50, 5)]


def test_split_by_glob_list_and_slices(tmp_path):
    _named_folders(tmp_path, NAMES)
    data = _data(tmp_path, train_files="s1_*", val_files=["s2_e", "s2_d.tif"], test_files=None,
                 test_slices=[1, 3])
    assert [e.name for e in load_examples(data, "train")] == ["s1_a", "s1_b", "s1_c"]  # glob: name order
    assert _pairs(load_examples(data, "val")) == [("s2_e", 50, 5), ("s2_d", 40, 4)]  # list: listed order
    assert _pairs(load_examples(data, "test")) == [("s1_b", 20, 2), ("s1_c", 30, 3)]  # files 1-2 in name order
    # a list may hold globs too, and an absolute split file path works as well
    (tmp_path / "elsewhere.txt").write_text("s2_*\n")
    data = _data(tmp_path, train_files=["s1_c", "s2_?"], val_files=str(tmp_path / "elsewhere.txt"))
    assert [e.name for e in load_examples(data, "train")] == ["s1_c", "s2_d", "s2_e"]
    assert [e.name for e in load_examples(data, "val")] == ["s2_d", "s2_e"]


def test_label_files_may_be_tiff_and_folders_globs(tmp_path):
    for index, name in enumerate(["a", "b"], start=1):
        _write(tmp_path / "images" / f"{name}.tif", np.full((48, 48), 10 * index, np.uint8))
        _write(tmp_path / "masks" / f"{name}.tiff", np.full((48, 48), index, np.uint16))
    data = _data(tmp_path, raw="images/*.tif", labels="masks", train_files=["b", "a"])
    examples = load_examples(data, "train")
    assert _pairs(examples) == [("b", 20, 2), ("a", 10, 1)]
    assert examples[0].labels.dtype == np.uint16


def test_names_with_dots_pick_their_own_file(tmp_path):
    _named_folders(tmp_path, ["img", "img.v2", "img.v2.final"])
    data = _data(tmp_path, train_files=["img.v2", "img.v2.final.tif"], val_files=["img"])
    assert _pairs(load_examples(data, "train")) == [("img.v2", 20, 2), ("img.v2.final", 30, 3)]
    assert _pairs(load_examples(data, "val")) == [("img", 10, 1)]
    with pytest.raises(InputError, match="no image named img.v3"):  # never img.tif
        load_examples(_data(tmp_path, train_files=["img.v3"]), "train")


def test_isbi_single_stack_form_still_works(tmp_path):
    from segkit.demo import SAMPLE_LABELS, SAMPLE_RAW

    data = _data(tmp_path, root=str(SAMPLE_RAW.parent), raw=SAMPLE_RAW.name, labels=SAMPLE_LABELS.name,
                 train_slices=[0, 3], val_slices=[3, 4], test_slices=[4, 5])
    raw, labels = tifffile.imread(SAMPLE_RAW), tifffile.imread(SAMPLE_LABELS)
    train = load_examples(data, "train")
    assert [e.name for e in train] == [f"{SAMPLE_RAW.stem}[{z}]" for z in range(3)]
    for z, example in enumerate(train):
        assert example.image.shape == (1, *raw.shape[1:])
        np.testing.assert_array_equal(example.image[0], raw[z])
        np.testing.assert_array_equal(example.labels, labels[z])
    test = load_examples(data, "test")
    assert len(test) == 1
    np.testing.assert_array_equal(test[0].image[0], raw[4])


def test_multichannel_and_rgb_images_read_channel_first(tmp_path):
    rng = np.random.default_rng(0)
    cyx = rng.integers(0, 4000, (2, 48, 48), dtype=np.uint16)
    rgb = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    _write(tmp_path / "images" / "c.tif", cyx)
    _write(tmp_path / "images" / "rgb.tif", rgb, photometric="rgb")
    for name in ("c", "rgb"):
        _write(tmp_path / "labels" / f"{name}.tif", np.zeros((48, 48), np.uint8))
    (example,) = load_examples(_data(tmp_path, train_files=["c"]), "train")
    assert example.image.shape == (2, 48, 48)
    np.testing.assert_array_equal(example.image, cyx)
    (example,) = load_examples(_data(tmp_path, train_files=["rgb"], channels=3), "train")
    assert example.image.shape == (3, 48, 48)
    np.testing.assert_array_equal(example.image, rgb.transpose(2, 0, 1))


def test_pixel_size_rescales_images_and_labels(tmp_path):
    image = np.arange(48 * 48, dtype=np.uint16).reshape(48, 48)
    labels = np.zeros((48, 48), np.uint8)
    labels[:, 24:] = 1
    # 2 px per micrometre: 0.5 um per pixel, rescaled to 1 um per pixel -> half the size
    _write(tmp_path / "images" / "a.tif", image, resolution=(2.0, 2.0), resolutionunit="MICROMETER")
    _write(tmp_path / "labels" / "a.tif", labels)
    (example,) = load_examples(_data(tmp_path, train_files=["a"], pixel_size=1.0), "train")
    assert example.image.shape == (1, 24, 24) and example.labels.shape == (24, 24)
    assert example.pixel_size == pytest.approx(1.0)
    assert example.labels.dtype == np.uint8 and set(np.unique(example.labels)) == {0, 1}
    assert (example.labels[:, :11] == 0).all() and (example.labels[:, 13:] == 1).all()


def _two_channel_examples(tmp_path: Path):
    """Two CYX uint16 images whose channels differ in range (about 100 and about 3000)."""
    rng = np.random.default_rng(1)
    images = [np.stack([rng.normal(100, 10, (48, 48)), rng.normal(3000, 200, (48, 48))]).astype(np.uint16)
              for _ in range(2)]
    for index, image in enumerate(images):
        _write(tmp_path / "images" / f"i{index}.tif", image)
        _write(tmp_path / "labels" / f"i{index}.tif", np.zeros((48, 48), np.uint8))
    return load_examples(_data(tmp_path, train_files="i*"), "train"), images


def test_meanstd_normalization_is_per_channel(tmp_path):
    from segkit.training.loop import dataset_normalization
    from segkit.training.patches import model_input

    examples, images = _two_channel_examples(tmp_path)
    norm = dataset_normalization(examples, _data(tmp_path, train_files="i*"))
    assert norm.percentiles is None and len(norm.mean) == 2 and len(norm.std) == 2
    stacked = np.stack(images).astype(np.float64)
    np.testing.assert_allclose(norm.mean, stacked.mean(axis=(0, 2, 3)), rtol=1e-3)
    np.testing.assert_allclose(norm.std, stacked.std(axis=(0, 2, 3)), rtol=1e-2)
    normalized = model_input(examples[0].image, norm)
    assert normalized.shape == (2, 48, 48) and abs(normalized.mean()) < 0.3 and 0.7 < normalized.std() < 1.3


def test_percentile_normalization_is_per_channel(tmp_path):
    from segkit.training.loop import dataset_normalization
    from segkit.training.patches import model_input

    examples, _ = _two_channel_examples(tmp_path)
    data = _data(tmp_path, train_files="i*", normalization="percentile", percentiles=[0.0, 100.0])
    norm = dataset_normalization(examples, data)
    assert norm.percentiles == (0.0, 100.0) and len(norm.mean) == 2
    normalized = model_input(examples[0].image, norm)
    assert normalized.shape == (2, 48, 48)
    np.testing.assert_allclose(normalized.min(axis=(1, 2)), 0.0, atol=1e-5)  # each channel's own range -> [0, 1]
    np.testing.assert_allclose(normalized.max(axis=(1, 2)), 1.0, atol=1e-5)


# -- 2. targets and weights --------------------------------------------------------------------------

def _touching_squares() -> np.ndarray:
    labels = np.zeros((20, 30), np.uint16)
    labels[5:15, 5:15] = 3
    labels[5:15, 15:25] = 9
    return labels


@pytest.mark.parametrize("width, row", [
    (1, [0] * 5 + [2] + [1] * 8 + [2, 2] + [1] * 8 + [2] + [0] * 5),
    (3, [0] * 5 + [2] * 3 + [1] * 4 + [2] * 6 + [1] * 4 + [2] * 3 + [0] * 5),
])
def test_instance_classes_separate_touching_objects(width, row):
    labels = _touching_squares()
    target = instance_classes(labels, width)
    assert target.dtype == np.uint8 and target.shape == labels.shape
    assert target[10].tolist() == row
    assert (target[labels == 0] == 0).all()  # background stays background
    assert (target[5:15, 14] == 2).all() and (target[5:15, 15] == 2).all()  # the boundary between them
    assert (target[5:5 + width, 5:25] == 2).all() and (target[15 - width:15, 5:25] == 2).all()  # outer rims
    assert (target[5 + width:15 - width, 5 + width:15 - width] == 1).all()
    np.testing.assert_array_equal(LabelRule("instances", 3, None, width).target(labels), target)


def test_instance_weights_put_the_border_term_between_objects():
    labels = _touching_squares()
    rule = LabelRule("instances", 3, None, 1)
    target = rule.target(labels)
    weights = weight_map(labels, target, rule, [1.0, 2.0, 3.0], w0=10.0, sigma=5.0)
    assert weights.dtype == np.float32 and weights.shape == labels.shape
    np.testing.assert_allclose(weights[target == 1], 2.0)  # interiors: their class weight only
    assert weights[10, 14] > 3.0 + 5.0 and weights[10, 15] > 3.0 + 5.0  # boundary between the objects
    assert weights[1, 1] < weights[10, 14]  # far background: little border weight
    assert (weights[target == 0] >= 1.0).all()


def test_semantic_ignore_value_has_weight_zero():
    labels = np.array([[0, 1, 2, 255], [0, 0, 255, 2]], np.uint8)
    rule = LabelRule.from_data({"labels_kind": "semantic", "classes": 3, "ignore_index": 255})
    assert (rule.kind, rule.classes, rule.ignore) == ("semantic", 3, 255)
    target = rule.target(labels)
    assert target.tolist() == [[0, 1, 2, 0], [0, 0, 0, 2]]
    np.testing.assert_array_equal(rule.valid(labels), labels != 255)
    check_labels(labels, rule, "x.tif")  # 255 is the ignore value, not a class
    balance = class_weights([target], 3, [rule.valid(labels)])
    assert balance == pytest.approx([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)])  # ignored pixels not counted
    weights = weight_map(labels, target, rule, balance, w0=10.0, sigma=5.0)
    assert (weights[labels == 255] == 0).all()
    np.testing.assert_allclose(weights[labels != 255], np.asarray(balance, np.float32)[labels[labels != 255]])
    with pytest.raises(InputError, match="255"):
        check_labels(labels, LabelRule("semantic", 3), "x.tif")


def test_class_balance_weights_equalise_class_totals():
    target = np.zeros((10, 10), np.uint8)
    target[:3] = 1  # 30 px
    target[3, :] = 2  # 10 px; class 0: 60 px
    weights = class_weights([target[:5], target[5:]], 4)  # split over two images; class 3 absent
    assert weights == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10), 1.0])
    totals = [weights[k] * (target == k).sum() for k in range(3)]
    assert totals == pytest.approx([100 / 3] * 3)


def test_rules_per_kind():
    membrane = LabelRule.from_data({"labels_kind": "membrane"})
    assert membrane.classes == 2 and membrane.class_names() == ["interior", "membrane"]
    assert membrane.target(np.array([[0, 5]], np.uint8)).tolist() == [[1, 0]]
    instances = LabelRule.from_data({"labels_kind": "instances", "classes": None, "boundary_width": 3})
    assert (instances.classes, instances.boundary_width) == (3, 3)
    assert instances.class_names() == ["background", "interior", "boundary"]
    semantic = LabelRule.from_data({"labels_kind": "semantic", "classes": 4})
    assert semantic.class_names() == ["class 0", "class 1", "class 2", "class 3"]
    assert semantic.class_names(["a", "b", "c", "d"]) == ["a", "b", "c", "d"]


# -- 3. training end to end --------------------------------------------------------------------------

def _split_files(tmp_path: Path, names: list[str]) -> dict:
    (tmp_path / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (tmp_path / "val.txt").write_text(names[3] + "\n")
    (tmp_path / "test.txt").write_text(names[4] + "\n")
    return {"train_files": "train.txt", "val_files": "val.txt", "test_files": "test.txt"}


def test_train_semantic_classes(tmp_path):
    from segkit.checkpoint import read_info
    from segkit.training.validation import score_split

    names = [f"img{i}" for i in range(5)]
    for seed, name in enumerate(names):
        image, classes = _shapes(SIZE, seed)
        _write(tmp_path / "images" / f"{name}.tif", image)
        _write(tmp_path / "labels" / f"{name}.tif", classes)
    recipe = _recipe(tmp_path, {"labels_kind": "semantic", "classes": 3, "class_names": ["bg", "dim", "bright"],
                                **_split_files(tmp_path, names)})
    files = _train(recipe)
    assert files.best.exists() and files.last.exists()
    info = read_info(files.best)
    assert info.inference.labels_kind == "semantic"
    assert info.classes == ["bg", "dim", "bright"]
    assert info.model_kwargs["classes"] == 3 and info.model_kwargs["in_channels"] == 1
    assert info.normalization.percentiles is None and isinstance(info.normalization.mean, float)
    assert info.inference.input_dtype == "uint8" and info.inference.threshold is None
    assert len(info.training["class_weights"]) == 3
    header = files.log_csv.read_text().splitlines()[0].split(",")
    assert "dice_mean" in header and "adapted_rand_error" not in header
    result = score_split(str(files.best), recipe["data"], "test")
    assert result["split"] == "test" and result["images"] == 1
    scores = result["scores"]
    assert {"dice_mean", "iou_mean", "dice_0", "dice_1", "dice_2", "iou_2"} <= set(scores)
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in scores.values())


def test_train_instances(tmp_path):
    from segkit.checkpoint import read_info
    from segkit.training.validation import score_split

    names = [f"cells{i}" for i in range(5)]
    for seed, name in enumerate(names):
        image, ids = _blobs(SIZE, seed)
        _write(tmp_path / "images" / f"{name}.tif", image)
        _write(tmp_path / "labels" / f"{name}.tif", ids)
    recipe = _recipe(tmp_path, {"labels_kind": "instances", "boundary_width": 1, **_split_files(tmp_path, names)})
    files = _train(recipe)
    info = read_info(files.best)
    assert info.inference.labels_kind == "instances"
    assert info.classes == ["background", "interior", "boundary"] and info.model_kwargs["classes"] == 3
    assert info.model_kwargs["in_channels"] == 1
    assert {"seed_threshold", "seed_distance"} <= set(info.inference.watershed)  # chosen on validation
    header = files.log_csv.read_text().splitlines()[0].split(",")
    assert "map" in header and "seed_threshold" in header
    result = score_split(str(files.best), recipe["data"], "test")
    assert result["split"] == "test" and result["images"] == 1
    assert {"map", "f1@0.5", "ap@0.5", "ap@0.75"} <= set(result["scores"])


def test_train_two_channels_with_percentile_normalization(tmp_path):
    from segkit.checkpoint import read_info
    from segkit.training.validation import score_split

    rng = np.random.default_rng(3)
    names = [f"cyx{i}" for i in range(5)]
    for seed, name in enumerate(names):
        image, classes = _shapes(SIZE, seed)
        two = (classes > 0).astype(np.uint8)
        stack = np.stack([image.astype(np.uint16) * 16, rng.integers(0, 4000, (SIZE, SIZE))]).astype(np.uint16)
        _write(tmp_path / "images" / f"{name}.tif", stack)
        _write(tmp_path / "labels" / f"{name}.tif", two)
    recipe = _recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "channels": 2,
                                "normalization": "percentile", "percentiles": [2, 99.5],
                                **_split_files(tmp_path, names)})
    files = _train(recipe)
    info = read_info(files.best)
    assert info.model_kwargs["in_channels"] == 2 and info.model_kwargs["classes"] == 2
    assert info.normalization.percentiles == (2.0, 99.5)
    assert isinstance(info.normalization.mean, tuple) and len(info.normalization.mean) == 2
    assert all(s > 0 for s in info.normalization.std) and info.inference.input_dtype == "uint16"
    assert info.inference.labels_kind == "semantic" and info.classes == ["class 0", "class 1"]
    result = score_split(str(files.best), recipe["data"], "test")
    assert result["images"] == 1 and {"dice_mean", "dice_0", "dice_1"} <= set(result["scores"])


# -- 4. bad inputs: one line, no checkpoint ----------------------------------------------------------

def _folders(tmp_path: Path, count: int = 3, *, labels=None, images=None) -> dict:
    """`count` 48 px images with two-class labels; `labels` / `images` override some by index."""
    for index in range(count):
        image = np.full((48, 48), 50 + index, np.uint8)
        label = np.zeros((48, 48), np.uint8)
        label[:, 24:] = 1
        image = (images or {}).get(index, image)
        label = (labels or {}).get(index, label)
        _write(tmp_path / "images" / f"im{index}.tif", image)
        _write(tmp_path / "labels" / f"im{index}.tif", label)
    return {"train_files": [f"im{i}" for i in range(count - 1)], "val_files": [f"im{count - 1}"]}


def test_refuses_label_size_mismatch(tmp_path):
    split = _folders(tmp_path, labels={1: np.zeros((48, 40), np.uint8)})
    message = _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, **split}), InputError,
                       "im1.tif", "48 x 48", "48 x 40")
    assert "same size" in message


def test_refuses_channel_mismatch(tmp_path):
    split = _folders(tmp_path, images={1: np.zeros((2, 48, 48), np.uint8)})
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, **split}), InputError,
             "im1.tif", "2 channels", "same channels")


def test_refuses_channels_other_than_data_channels(tmp_path):
    split = _folders(tmp_path)
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "channels": 3, **split}), InputError,
             "data.channels is 3", "1 channel", "data.channels=1")


def test_refuses_semantic_values_outside_the_classes(tmp_path):
    bad = np.zeros((48, 48), np.uint8)
    bad[:, 30:] = 5
    split = _folders(tmp_path, labels={0: bad})
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 3, **split}), InputError,
             "im0.tif", "5", "outside the classes 0-2", "data.ignore_index")


def test_refuses_negative_instance_ids(tmp_path):
    ids = np.zeros((48, 48), np.int32)
    ids[10:20, 10:20] = 1
    ids[30:40, 30:40] = -2
    split = _folders(tmp_path, labels={1: ids})
    _refused(_recipe(tmp_path, {"labels_kind": "instances", **split}), InputError, "im1.tif", "negative ids")


def test_refuses_float_labels(tmp_path):
    split = _folders(tmp_path, labels={0: np.zeros((48, 48), np.float32)})
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, **split}), InputError,
             "im0.tif", "float32", "integers")


@pytest.mark.parametrize("case", ["empty file", "missing file", "unknown name", "glob matches nothing"])
def test_refuses_empty_or_unknown_splits(tmp_path, case):
    _folders(tmp_path)
    (tmp_path / "train.txt").write_text("im0\n")
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    val, words = {
        "empty file": ("empty.txt", ("data.val_files", "lists no images")),
        "missing file": ("nope.txt", ("data.val_files", "nope.txt", "does not exist")),
        "unknown name": (["im2", "ghost"], ("data.val_files", "no image named ghost")),
        "glob matches nothing": ("zz*", ("data.val_files", "no image named zz*")),
    }[case]
    recipe = _recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "train_files": "train.txt",
                                "val_files": val})
    _refused(recipe, InputError, *words)


def test_refuses_a_missing_label_image(tmp_path):
    split = _folders(tmp_path)
    (tmp_path / "labels" / "im1.tif").unlink()
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, **split}), InputError,
             "no label image for im1.tif", "same name")


def test_refuses_a_label_file_for_a_folder_of_images(tmp_path):
    split = _folders(tmp_path)
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "labels": "labels/im0.tif", **split}),
             InputError, "data.labels", "is one file", "folder")


def test_refuses_an_image_named_twice(tmp_path):
    _folders(tmp_path)
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "train_files": ["im0", "im0.tif"],
                                "val_files": ["im2"]}), InputError, "data.train_files", "same image twice")


def test_refuses_a_split_holding_one_class(tmp_path):
    split = _folders(tmp_path, labels={2: np.ones((48, 48), np.uint8)})
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, **split}), InputError,
             "hold only", "data.val_files")


def test_refuses_files_with_a_single_raw_file(tmp_path):
    from segkit.demo import SAMPLE_LABELS, SAMPLE_RAW

    recipe = _recipe(tmp_path, {"root": str(SAMPLE_RAW.parent), "raw": SAMPLE_RAW.name, "labels": SAMPLE_LABELS.name,
                                "train_files": ["a"], "val_files": ["b"]})
    _refused(recipe, InputError, "data.train_files", "is one file", "data.train_slices")


def test_refuses_pixel_size_without_resolution_tags(tmp_path):
    split = _folders(tmp_path)
    _refused(_recipe(tmp_path, {"labels_kind": "semantic", "classes": 2, "pixel_size": 0.5, **split}), InputError,
             "no pixel size", "data.pixel_size")


@pytest.mark.parametrize("data, words", [
    ({"labels_kind": "semantic"}, ("data.classes", "semantic")),
    ({"labels_kind": "semantic", "classes": 1}, ("data.classes", "K >= 2")),
    ({"labels_kind": "instances", "classes": 4}, ("data.classes", "instances trains 3 classes")),
    ({"labels_kind": "instances", "ignore_index": 255}, ("data.ignore_index", "semantic only")),
    ({"labels_kind": "membrane", "ignore_index": 0}, ("data.ignore_index",)),
    ({"percentiles": [99.8, 1]}, ("data.percentiles", "low < high")),
    ({"percentiles": [1, 101]}, ("data.percentiles",)),
    ({"percentiles": [1]}, ("data.percentiles",)),
    ({"labels_kind": "semantic", "classes": 2, "class_names": ["one"]}, ("data.class_names", "2 names")),
    ({"train_files": []}, ("data.train_files", "is empty")),
    ({"val_files": ""}, ("data.val_files", "is empty")),
    ({"labels_kind": "blobs"}, ("data.labels_kind", "membrane, semantic, instances")),
    ({"normalization": "minmax"}, ("data.normalization", "meanstd, percentile")),
    ({"channels": 0}, ("data.channels", "positive")),
    ({"boundary_width": 0}, ("data.boundary_width", "positive")),
])
def test_refuses_inconsistent_data_settings(tmp_path, data, words):
    _config_refused(tmp_path, data, *words)


def test_cli_reports_bad_data_in_one_line(tmp_path):
    from tests.helpers import assert_user_error, run

    split = _folders(tmp_path, labels={1: np.zeros((48, 40), np.uint8)})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name: unet, params: {base: 4, depth: 2}}\n"
        f"data: {{root: {tmp_path}, raw: images, labels: labels, tile: {TILE}, labels_kind: semantic, classes: 2,\n"
        f"  train_files: {split['train_files']}, val_files: {split['val_files']}}}\n"
        f"train: {{epochs: 1, iters_per_epoch: 1, device: cpu, out: {tmp_path / 'run'}}}\n")
    assert_user_error(run("train", recipe, "-q"), "im1.tif", "48 x 40")
    assert not (tmp_path / "run" / "last.safetensors").exists()
