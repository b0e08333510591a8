"""Issue 25, the Python training and scoring calls (`segkit.training.loop.train`, `denoise_loop.train_denoiser`,
`validation.score_split`): every argument checked before any work, one line naming it, as a TypeError or
ValueError (OptionTypeError / OptionValueError), like segkit.predict's."""

from __future__ import annotations

import pytest

from segkit.config import DENOISE_SCHEMA, validate_recipe
from segkit.errors import OptionTypeError, OptionValueError
from segkit.training.denoise_loop import train_denoiser
from segkit.training.loop import train
from segkit.training.validation import score_split
from tests.helpers import tiny_recipe


def _quiet(_: str) -> None:
    return None


@pytest.mark.parametrize("change, error, message", ids=[
    "path", "list", "resume", "progress", "echo", "batch-text", "amp-text", "seed", "unknown-section"], argvalues=[
    (lambda r: {"recipe": "recipes/em_neurons.yaml"}, TypeError,
     r"^recipe is a path \('recipes/em_neurons.yaml'\); load it first: recipe = segkit.config.load_recipe\(path"),
    (lambda r: {"recipe": [r]}, TypeError, r"^recipe must be a recipe mapping \(segkit.config.load_recipe\(path\)\), "
                                           "not list$"),
    (lambda r: {"resume": "yes"}, TypeError, r"^resume must be True or False, not 'yes' \(str\)$"),
    (lambda r: {"progress": 1}, TypeError, r"^progress must be True or False, not 1 \(int\)$"),
    (lambda r: {"echo": "print"}, TypeError, r"^echo must be a function taking one line \(e.g. print\), not 'print'$"),
    (lambda r: {"recipe": {**r, "train": {**r["train"], "batch": "4"}}}, ValueError,
     r"^recipe: train.batch: expected int, got str \('4'\)$"),
    (lambda r: {"recipe": {**r, "train": {**r["train"], "amp": "false"}}}, ValueError,
     r"^recipe: train.amp: expected true.*, got 'false' \(str\)"),
    (lambda r: {"recipe": {**r, "train": {**r["train"], "seed": 2**70}}}, ValueError,
     r"^recipe: train.seed: must be in \[0, 4294967295\]"),
    (lambda r: {"recipe": {**r, "trian": {}}}, ValueError, r"^recipe: trian: unknown key; did you mean 'train'\?"),
])
def test_train_checks_its_arguments_before_any_work(tmp_path, change, error, message):
    recipe = tiny_recipe(tmp_path)
    arguments = {"recipe": recipe, "progress": False, "echo": _quiet, **change(recipe)}
    kind = OptionTypeError if error is TypeError else OptionValueError
    with pytest.raises(kind, match=message) as caught:
        train(**arguments)
    assert isinstance(caught.value, error)
    assert not (tmp_path / "run").exists()


def test_train_denoiser_checks_its_recipe_against_the_denoiser_schema(tmp_path):
    recipe = validate_recipe({"train": {"out": str(tmp_path / "run")}}, DENOISE_SCHEMA)
    with pytest.raises(OptionValueError, match=r"^recipe: train.mode: 'noise2void' is not one of supervised, blind_spot"):
        train_denoiser({**recipe, "train": {**recipe["train"], "mode": "noise2void"}}, progress=False, echo=_quiet)
    with pytest.raises(OptionTypeError, match="^resume must be True or False, not None"):
        train_denoiser(recipe, resume=None, echo=_quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arguments, error, message", ids=[
    "checkpoint", "data", "split", "device", "batch-0", "batch-float", "tile-bool", "data-value"], argvalues=[
    ({"checkpoint": 3}, OptionTypeError, "^checkpoint must be a path to a .safetensors checkpoint, not int$"),
    ({"data": "data.yaml"}, OptionTypeError, r"^data must be the data section of a recipe \(recipe\['data'\]\), not str"),
    ({"split": "validation"}, OptionValueError, "^split must be one of 'train', 'val', 'test', not 'validation'$"),
    ({"device": None}, OptionTypeError, "^device must be a str"),
    ({"batch": 0}, OptionValueError, "^batch must be at least 1, got 0$"),
    ({"batch": 2.0}, OptionTypeError, r"^batch must be an int, not 2.0 \(float\)$"),
    ({"tile": True}, OptionTypeError, r"^tile must be an int or None, not True \(bool\)$"),
    ({"data": {"labels_kind": "cells"}}, OptionValueError, "^data: data.labels_kind: 'cells' is not one of"),
])
def test_score_split_checks_its_arguments_before_reading_the_checkpoint(tmp_path, arguments, error, message):
    given = {"checkpoint": str(tmp_path / "missing.safetensors"), "data": tiny_recipe(tmp_path)["data"],
             "split": "test", **arguments}
    with pytest.raises(error, match=message):
        score_split(**given)
