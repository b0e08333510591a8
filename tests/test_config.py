
import pytest

from segkit.config import DENOISE_SCHEMA, SCHEMA, apply_overrides, default_recipe, load_recipe, validate_recipe
from segkit.errors import ConfigError
from tests.helpers import REPO

RECIPES = REPO / "recipes"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    resolved = load_recipe(recipe, schema=DENOISE_SCHEMA if recipe.name.startswith("denoise") else SCHEMA)
    assert resolved["data"]["train_slices"] == [0, 20] and resolved["data"]["val_slices"] == [20, 25]


def test_overrides_and_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: {epochs: 5}\n")
    r = load_recipe(path, ["train.epochs=2", "data.root=../x", "train.lr=1", "model.params={base: 8}"])
    assert r["train"]["epochs"] == 2 and r["data"]["root"] == "../x"
    assert r["train"]["lr"] == 1.0 and isinstance(r["train"]["lr"], float)
    assert r["model"]["params"] == {"base": 8}
    assert validate_recipe({}) == default_recipe()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, "trian: unknown key; did you mean 'train'"),
        ({"train": {"epoch": 2}}, "train.epoch: unknown key; did you mean 'epochs'.*allowed: epochs"),
        ({"train": {"epochs": "2"}}, "train.epochs: expected int, got str"),
        ({"train": {"epochs": True}}, "train.epochs: expected int, got a boolean"),
        ({"train": {"optimizer": "rmsprop"}}, "not one of adamw, adam, sgd"),
        ({"train": {"batch": 0}}, "train.batch: must be positive"),
        ({"data": {"val_slices": [25, 20]}}, r"data.val_slices: expected \[start, stop\)"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe(raw)


def test_bad_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
