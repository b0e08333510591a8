"""The own-data recipes (nuclei_bbbc039*.yaml, axon_myelin_sem*.yaml) train and are scored in CI-sized
form: their data, split files, label kind, normalisation and pixel size as shipped, with a tiny
model, a few images and a few iterations. Skipped where the data sets are absent ($SEGKIT_DATA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, data_root

RECIPES = REPO / "recipes"


def _names(folder: Path, split: str, count: int) -> list[str]:
    return (folder / f"{split}.txt").read_text().split()[:count]


@pytest.mark.parametrize("recipe, dataset, keys", [
    ("nuclei_bbbc039_cpu.yaml", "bbbc039", ("f1@0.5", "ap@0.5", "map")),
    ("axon_myelin_sem_cpu.yaml", "axondeepseg_sem", ("dice_mean", "dice_1", "dice_2")),
])
def test_recipe_trains_and_scores_in_ci_size(tmp_path, recipe, dataset, keys):
    from segkit.checkpoint import read_info
    from segkit.config import load_recipe
    from segkit.training.loop import train
    from segkit.training.validation import score_split

    folder = data_root() / dataset
    if not (folder / "train.txt").exists():
        pytest.skip(f"{dataset} not found in {folder.parent} (set SEGKIT_DATA)")
    overrides = [f"data.root={folder}", "model.params={base: 4, depth: 4, batch_norm: true}", "train.epochs=1",
                 "train.iters_per_epoch=2", "train.batch=2", f"train.out={tmp_path / 'run'}",
                 f"data.train_files={_names(folder, 'train', 2)}", f"data.val_files={_names(folder, 'val', 1)}",
                 f"data.test_files={_names(folder, 'test', 1)}", "train.time_limit_min=null"]
    recipe_data = load_recipe(RECIPES / recipe, overrides)
    files = train(recipe_data, progress=False, echo=lambda _: None)
    info = read_info(files.best)
    assert info.inference.labels_kind == recipe_data["data"]["labels_kind"]
    if dataset == "axondeepseg_sem":
        assert info.inference.pixel_size == 0.1 and info.classes == ["background", "myelin", "axon"]
    else:
        assert info.normalization.percentiles == (1.0, 99.8) and info.inference.watershed is not None
    scores = score_split(str(files.best), recipe_data["data"], "test")
    assert scores["images"] == 1 and all(0.0 <= scores["scores"][k] <= 1.0 for k in keys)


def test_cpu_recipes_match_the_gpu_recipes_data():
    """The CPU variants train the same data, split, labels and pixel size as the full recipes."""
    from segkit.config import load_recipe

    for full, small in (("nuclei_bbbc039.yaml", "nuclei_bbbc039_cpu.yaml"),
                        ("axon_myelin_sem.yaml", "axon_myelin_sem_cpu.yaml")):
        a, b = load_recipe(RECIPES / full)["data"], load_recipe(RECIPES / small)["data"]
        for key in ("root", "raw", "labels", "train_files", "val_files", "test_files", "labels_kind", "classes",
                    "normalization", "percentiles", "pixel_size", "boundary_width"):
            assert a[key] == b[key], key
