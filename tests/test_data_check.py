"""`segkit data check` and segkit/data_check.py: a data set's folder compared with the catalogue (files present,
missing, of another size or sha256), exit codes 0 / 1 / 2, the catalogue against the recipes and the real data,
and training's missing-data error pointing at the command."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from segkit.data_check import CATALOG, check_dataset, data_root, format_report, load_catalog
from segkit.errors import InputError
from tests.helpers import REPO, assert_user_error, run

FILES = {"a.tif": b"first file", "labels/b.tif": b"second", "train.txt": b"a\n"}


def _write_catalog(path: Path, files: dict[str, bytes]) -> Path:
    """A catalogue of one data set, `toyset`, holding `files` (its sizes and sha256)."""
    entry = {"title": "a toy set", "source": "https://example.org/toyset", "license": "CC0 1.0",
             "citation": "Doe 2024", "layout": "a.tif, labels/b.tif, train.txt", "split": "train.txt",
             "recipes": ["toy.yaml"],
             "files": {name: [len(data), hashlib.sha256(data).hexdigest()] for name, data in files.items()}}
    path.write_text(json.dumps({"about": "test", "datasets": {"toyset": entry}}), encoding="utf-8")
    return path


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    """A data root holding a complete `toyset`, and the catalogue the CLI reads replaced by one naming it."""
    monkeypatch.setattr("segkit.data_check.CATALOG", _write_catalog(tmp_path / "catalog.json", FILES))
    root = tmp_path / "root"
    for name, data in FILES.items():
        (root / "toyset" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "toyset" / name).write_bytes(data)
    (root / "toyset" / "README.md").write_text("not in the catalogue: ignored")
    return root


def test_a_complete_folder_exits_0(toy):
    result = run("data", "check", "--root", toy)
    assert result.exit_code == 0, result.output
    assert "toyset: complete, 3 files (sizes and sha256 checked)" in result.stdout
    assert "complete: toyset" in result.stdout


def test_a_missing_file_is_named_with_where_to_get_it_and_exits_1(toy):
    (toy / "toyset" / "labels" / "b.tif").unlink()
    result = run("data", "check", "toyset", "--root", toy)
    assert result.exit_code == 1, result.output
    assert "toyset: incomplete in" in result.stdout and "1 of 3 files missing (labels/b.tif)" in result.stdout
    assert "get it:   https://example.org/toyset" in result.stdout and "CC0 1.0" in result.stdout
    assert "incomplete: toyset (exit code 1)" in result.stdout


def test_a_wrong_checksum_exits_1_and_quick_compares_sizes_only(toy):
    (toy / "toyset" / "a.tif").write_bytes(b"first FILE")  # same size, other bytes
    result = run("data", "check", "--root", toy)
    assert result.exit_code == 1, result.output
    assert "1 differ from the reference copy (a.tif (sha256 differs))" in result.stdout
    quick = run("data", "check", "--root", toy, "--quick")
    assert quick.exit_code == 0, quick.output
    assert "sizes checked, not hashed (--quick)" in quick.stdout


def test_a_wrong_size_is_found_without_hashing(toy):
    (toy / "toyset" / "train.txt").write_bytes(b"a\nb\n")
    result = run("data", "check", "--root", toy, "--quick")
    assert result.exit_code == 1
    assert "train.txt (4 bytes, expected 2)" in result.stdout


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


def test_the_report_of_a_partial_set_lists_a_few_names_then_a_count(tmp_path):
    files = {f"images/{i}.tif": bytes([i]) for i in range(6)}
    dataset = load_catalog(_write_catalog(tmp_path / "c.json", files))["toyset"]
    (tmp_path / "toyset" / "images").mkdir(parents=True)
    (tmp_path / "toyset" / "images" / "0.tif").write_bytes(bytes([0]))
    report = check_dataset(dataset, tmp_path / "toyset")
    assert not report.complete and report.missing == tuple(f"images/{i}.tif" for i in range(1, 6))
    assert "5 of 6 files missing (images/1.tif, images/2.tif, images/3.tif and 2 more)" in format_report(report)


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
        assert all(len(f.sha256) == 64 and f.size > 0 for f in dataset.files)


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
