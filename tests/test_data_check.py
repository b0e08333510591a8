"""`segkit data check`, segkit/data_check.py and tools/make_data_catalog.py: a data set's folder compared with
the catalogue (files present, missing, or differing: an image's shape, dtype, pixel size or decoded pixels,
whatever its TIFF compression; a text file's size or sha256), exit codes 0 / 1 / 2, the catalogue against the
recipes and the real data, and training's missing-data error pointing at the command."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from segkit.data_check import (
    CATALOG,
    bytes_to_hash,
    check_dataset,
    data_root,
    format_report,
    load_catalog,
    pixels_sha256,
)
from segkit.errors import InputError
from tests.helpers import REPO, assert_user_error, run
from tools.make_data_catalog import make_catalog

STACK = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)  # a.tif: a ZYX stack
LABELS = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # labels/b.tif, 0.5 um pixels
ENTRY = {"title": "a toy set", "source": "https://example.org/toyset", "license": "CC0 1.0", "citation": "Doe 2024",
         "layout": "a.tif, labels/b.tif, train.txt", "split": "train.txt", "recipes": ["toy.yaml"], "files": {}}


def _write_stack(path: Path, data: np.ndarray = STACK, **kwargs) -> None:
    tifffile.imwrite(path, data, **({"compression": "zlib", "photometric": "minisblack"} | kwargs))


def _write_labels(path: Path, data: np.ndarray = LABELS, pixel_size: float | None = 0.5, **kwargs) -> None:
    calibration = {} if pixel_size is None else {"resolution": (1 / pixel_size, 1 / pixel_size),
                                                 "metadata": {"unit": "um"}}
    tifffile.imwrite(path, data, imagej=True, **({"compression": "zlib"} | calibration | kwargs))


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    """A data root holding a complete `toyset` (a.tif, labels/b.tif, train.txt), and the catalogue the CLI reads
    replaced by one tools/make_data_catalog.py wrote from it."""
    folder = tmp_path / "root" / "toyset"
    (folder / "labels").mkdir(parents=True)
    _write_stack(folder / "a.tif")
    _write_labels(folder / "labels" / "b.tif")
    (folder / "train.txt").write_bytes(b"a\n")
    (folder / "README.md").write_text("notes on the copy: not in the catalogue, ignored")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"about": "test", "datasets": {"toyset": ENTRY}}), encoding="utf-8")
    assert make_catalog(tmp_path / "root", catalog) == {"toyset": 3}
    monkeypatch.setattr("segkit.data_check.CATALOG", catalog)
    return tmp_path / "root"


def test_a_complete_folder_exits_0(toy):
    result = run("data", "check", "--root", toy)
    assert result.exit_code == 0, result.output
    assert "toyset: complete, 3 files (pixels and checksums checked)" in result.stdout
    assert "complete: toyset" in result.stdout


def test_images_saved_with_another_compression_byte_order_or_layout_pass(toy):
    """What the sources give (ISBI's uncompressed TIFFs, say) holds the reference copy's pixels in other bytes."""
    folder = toy / "toyset"
    before = (folder / "a.tif").read_bytes()
    _write_stack(folder / "a.tif", compression=None, byteorder=">")
    _write_labels(folder / "labels" / "b.tif", compression="lzw", tile=(16, 16))
    assert (folder / "a.tif").read_bytes() != before
    result = run("data", "check", "--root", toy)
    assert result.exit_code == 0, result.output
    assert "toyset: complete" in result.stdout


def test_one_changed_pixel_fails_naming_the_file_and_quick_does_not_decode(toy):
    changed = STACK.copy()
    changed[1, 2, 3] += 1
    _write_stack(toy / "toyset" / "a.tif", changed)
    result = run("data", "check", "--root", toy)
    assert result.exit_code == 1, result.output
    assert "1 differ from the reference copy (a.tif (pixels differ from the reference))" in result.stdout
    assert "note:     images are compared by their decoded pixels (any TIFF compression passes)" in result.stdout
    quick = run("data", "check", "--root", toy, "--quick")
    assert quick.exit_code == 0, quick.output
    assert "--quick: image headers and text sizes checked, pixels not decoded" in quick.stdout


def test_a_wrong_shape_or_dtype_fails_in_quick_too(toy):
    _write_stack(toy / "toyset" / "a.tif", STACK[:2])
    _write_labels(toy / "toyset" / "labels" / "b.tif", LABELS.astype(np.float32))
    result = run("data", "check", "--root", toy, "--quick")
    assert result.exit_code == 1, result.output
    assert ("2 differ from the reference copy (a.tif (2 x 8 x 8 uint8, expected 3 x 8 x 8 uint8), labels/b.tif "
            "(8 x 8 float32, expected 8 x 8 uint16))") in result.stdout


def test_a_missing_or_other_pixel_size_fails_in_quick_too(toy):
    """The axon recipes rescale by each image's pixel size: a copy without it passes no check."""
    _write_labels(toy / "toyset" / "labels" / "b.tif", pixel_size=None)
    result = run("data", "check", "--root", toy, "--quick")
    assert result.exit_code == 1 and "labels/b.tif (no pixel size in its metadata, expected 0.5 um)" in result.stdout
    _write_labels(toy / "toyset" / "labels" / "b.tif", pixel_size=0.25)
    result = run("data", "check", "--root", toy, "--quick")
    assert result.exit_code == 1 and "labels/b.tif (pixel size 0.25 um, expected 0.5 um)" in result.stdout


def test_a_file_that_is_not_a_tiff_is_named(toy):
    (toy / "toyset" / "a.tif").write_bytes(b"not a tiff")
    result = run("data", "check", "--root", toy, "--quick")
    assert result.exit_code == 1, result.output
    assert "a.tif (cannot be read as a TIFF (not a TIFF file" in result.stdout


def test_a_text_file_is_compared_by_its_bytes(toy):
    (toy / "toyset" / "train.txt").write_bytes(b"b\n")  # same size, other bytes
    result = run("data", "check", "--root", toy)
    assert result.exit_code == 1 and "train.txt (sha256 differs)" in result.stdout
    assert run("data", "check", "--root", toy, "--quick").exit_code == 0
    (toy / "toyset" / "train.txt").write_bytes(b"a\nb\n")
    result = run("data", "check", "--root", toy, "--quick")
    assert result.exit_code == 1 and "train.txt (4 bytes, expected 2)" in result.stdout


def test_a_missing_file_is_named_with_where_to_get_it_and_exits_1(toy):
    (toy / "toyset" / "labels" / "b.tif").unlink()
    result = run("data", "check", "toyset", "--root", toy)
    assert result.exit_code == 1, result.output
    assert "toyset: incomplete in" in result.stdout and "1 of 3 files missing (labels/b.tif)" in result.stdout
    assert "get it:   https://example.org/toyset" in result.stdout and "CC0 1.0" in result.stdout
    assert "files:    2 TIFF images (0.0 MB of pixels) and 1 text file, in" in result.stdout
    assert "incomplete: toyset (exit code 1)" in result.stdout


def test_a_missing_root_says_so_and_exits_1(toy, tmp_path):
    result = run("data", "check", "--root", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert f"toyset: missing: {tmp_path / 'nowhere' / 'toyset'} does not exist" in result.stdout
    assert f"data root: {tmp_path / 'nowhere'} (--root)" in result.stdout


def test_an_unknown_name_is_a_user_error_listing_the_known_names():
    result = run("data", "check", "isbi2013")
    assert_user_error(result, "unknown data set 'isbi2013'; name one of isbi2012, bbbc039, axondeepseg_sem")


def test_the_default_root_is_segkit_data(toy, monkeypatch):
    monkeypatch.setenv("SEGKIT_DATA", str(toy))
    assert data_root() == toy
    result = run("data", "check")
    assert result.exit_code == 0 and f"data root: {toy} ($SEGKIT_DATA)" in result.stdout


def test_the_progress_bar_counts_every_decoded_page_and_text_chunk(toy):
    from segkit.data_check import CATALOG as catalog  # the fixture's

    dataset = load_catalog(catalog)["toyset"]
    steps: list[int] = []
    assert check_dataset(dataset, toy / "toyset", progress=steps.append, workers=2).complete
    assert len(steps) == 3 + 1 + 1  # a.tif's 3 pages, b.tif's one, train.txt's one chunk
    assert sum(steps) == bytes_to_hash(dataset, toy / "toyset") == STACK.nbytes + LABELS.nbytes + 2


def test_the_report_of_a_partial_set_lists_a_few_names_then_a_count(tmp_path):
    files = {f"images/{i}.txt": {"size": 1, "sha256": hashlib.sha256(bytes([i])).hexdigest()} for i in range(6)}
    catalog = tmp_path / "c.json"
    catalog.write_text(json.dumps({"datasets": {"toyset": ENTRY | {"files": files}}}), encoding="utf-8")
    dataset = load_catalog(catalog)["toyset"]
    (tmp_path / "toyset" / "images").mkdir(parents=True)
    (tmp_path / "toyset" / "images" / "0.txt").write_bytes(bytes([0]))
    report = check_dataset(dataset, tmp_path / "toyset")
    assert not report.complete and report.missing == tuple(f"images/{i}.txt" for i in range(1, 6))
    assert "5 of 6 files missing (images/1.txt, images/2.txt, images/3.txt and 2 more)" in format_report(report)


@pytest.mark.parametrize("options", [{"compression": "zlib", "tile": (16, 16), "byteorder": ">"},
                                     {"imagej": True, "truncate": True}],
                         ids=["tiled-big-endian", "imagej-truncated"])
def test_the_pixel_hash_is_that_of_the_array_tifffile_reads(tmp_path, options):
    """Page by page (or whole, for ImageJ's truncated pages), the bytes hashed are imread's, little-endian."""
    stack = (np.arange(4 * 20 * 24, dtype=np.uint16) * 37).reshape(4, 20, 24)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack", **options)
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        digest = pixels_sha256(tif)
    assert digest == hashlib.sha256(tifffile.imread(tmp_path / "s.tif").astype("<u2").tobytes()).hexdigest()


# -- tools/make_data_catalog.py -------------------------------------------------------------------------------

def test_the_catalogue_tool_keeps_the_sets_fields_and_is_repeatable(toy):
    from segkit.data_check import CATALOG as catalog  # the fixture's, written by the tool

    first = catalog.read_text(encoding="utf-8")
    entry = json.loads(first)["datasets"]["toyset"]
    assert {k: v for k, v in entry.items() if k != "files"} == {k: v for k, v in ENTRY.items() if k != "files"}
    assert entry["files"] == {
        "a.tif": {"shape": [3, 8, 8], "dtype": "uint8", "pixels_sha256": hashlib.sha256(STACK.tobytes()).hexdigest()},
        "labels/b.tif": {"shape": [8, 8], "dtype": "uint16", "pixel_size_um": 0.5,
                         "pixels_sha256": hashlib.sha256(LABELS.astype("<u2").tobytes()).hexdigest()},
        "train.txt": {"size": 2, "sha256": hashlib.sha256(b"a\n").hexdigest()},
    }
    make_catalog(toy, catalog)
    assert catalog.read_text(encoding="utf-8") == first


def test_the_catalogue_tool_refuses_a_file_segkit_does_not_read(toy):
    from segkit.data_check import CATALOG as catalog

    (toy / "toyset" / "mask.png").write_bytes(b"png")
    before = catalog.read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match=r"mask.png is neither a TIFF image nor a .txt list"):
        make_catalog(toy, catalog)
    assert catalog.read_text(encoding="utf-8") == before


# -- the real catalogue ---------------------------------------------------------------------------------------

def test_the_catalogue_names_each_recipes_data_set():
    """Every recipe whose data.root is a catalogued folder is listed under that set, and the other way round."""
    catalog = load_catalog()
    uses = {}
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        root = Path(yaml.safe_load(recipe.read_text(encoding="utf-8"))["data"]["root"]).name
        uses.setdefault(root, set()).add(recipe.name)
    for name, dataset in catalog.items():
        assert set(dataset.recipes) == uses.get(name, set()), name


def test_the_catalogue_records_images_by_pixels_and_lists_by_bytes_and_stays_small():
    raw = json.loads(CATALOG.read_text(encoding="utf-8"))["datasets"]
    for name, dataset in raw.items():
        for path, entry in dataset["files"].items():
            keys = ({"shape", "dtype", "pixels_sha256"} | ({"pixel_size_um"} if "pixel_size_um" in entry else set())
                    if path.endswith(".tif") else {"size", "sha256"})
            assert set(entry) == keys, (name, path)
            assert len(entry.get("pixels_sha256", entry.get("sha256"))) == 64
    assert CATALOG.stat().st_size < 100_000  # package data: one line per file, no more


def test_the_catalogue_is_package_data():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["segkit"]
    assert any(fnmatch.fnmatch(CATALOG.relative_to(REPO / "segkit").as_posix(), p) for p in patterns)


def test_the_real_data_sets_are_complete():
    root = data_root()
    absent = [name for name in load_catalog() if not (root / name).is_dir()]
    if absent:
        pytest.skip(f"{', '.join(absent)} not found in {root} (set SEGKIT_DATA)")
    result = run("data", "check", "--root", root)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("complete: isbi2012, bbbc039, axondeepseg_sem")


# -- training's missing-data error ----------------------------------------------------------------------------

def test_missing_training_data_points_at_segkit_data_check(tmp_path, monkeypatch):
    from segkit.training.patches import data_source

    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = {"root": str(tmp_path / "moved" / "bbbc039"), "raw": "images-that-exist-nowhere"}
    with pytest.raises(InputError, match=r"; `segkit data check bbbc039` says which files it needs and where to get"):
        data_source(data, "raw")
    (tmp_path / "moved" / "bbbc039").mkdir(parents=True)
    with pytest.raises(InputError, match=r"data.raw: .* does not exist; .*`segkit data check bbbc039`"):
        data_source(data, "raw")
    with pytest.raises(InputError) as other:
        data_source({"root": str(tmp_path / "mine"), "raw": "images"}, "raw")
    assert "segkit data check" not in str(other.value)  # not a catalogued data set: no hint
