"""Issue 25, finding 19 and recipe switches: seeds and integers beyond what numpy and torch take are one line
naming the setting, and every recipe switch takes only true or false (a quoted 'false' read as true)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segkit.config import DENOISE_SCHEMA, SCHEMA, apply_overrides, load_recipe, validate_recipe
from segkit.errors import ConfigError
from tests.helpers import assert_user_error, run, tiny_recipe


def _recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, epochs=1, iters_per_epoch=1)))
    return path


# -- seeds and integers --------------------------------------------------------------------------------

def test_a_seed_outside_32_bits_is_one_line_naming_the_range(tmp_path):
    """train.seed=99999999999999999999 ended in torch's "Overflow when unpacking long long" traceback."""
    with pytest.raises(ConfigError, match=r"^train.seed: must be in \[0, 4294967295\], got 99999999999999999999$"):
        validate_recipe(apply_overrides({}, ["train.seed=99999999999999999999"]))
    with pytest.raises(ConfigError, match=r"train.seed: must be in \[0, 4294967295\], got 4294967296"):
        validate_recipe({"train": {"seed": 2**32}}, DENOISE_SCHEMA)
    assert validate_recipe({"train": {"seed": 2**32 - 1}})["train"]["seed"] == 2**32 - 1
    result = run("train", _recipe_file(tmp_path), "train.seed=99999999999999999999")
    assert_user_error(result, "train.seed: must be in [0, 4294967295]")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", ids=["batch", "lr", "epochs"], argvalues=[
    ("train.batch=" + "9" * 400, "train.batch: 999999999999999999...9999999999999999999 is too large (at most "
                                 "9223372036854775807)"),
    ("train.lr=" + "9" * 400, "train.lr: 999999999999999999...9999999999999999999 is too large"),  # was OverflowError
    ("train.epochs=" + "9" * 5000, "it holds an integer of more than 4300 digits"),  # was Python's ValueError
])
def test_integers_beyond_int64_are_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError) as caught:
        load_recipe(_recipe_file(tmp_path), [override])
    assert message in str(caught.value) and len(str(caught.value)) < 200


def test_a_huge_integer_in_a_recipe_file_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: {seed: " + "9" * 5000 + "}\n")
    with pytest.raises(ConfigError, match=f"recipe {path}: it holds an integer of more than 4300 digits"):
        load_recipe(path)


# -- recipe booleans -----------------------------------------------------------------------------------

SWITCHES = [(schema, f"{section}.{key}") for schema in (SCHEMA, DENOISE_SCHEMA)
            for section, fields in schema.items() for key, (types, _) in fields.items() if bool in types]


@pytest.mark.parametrize("schema, path", SWITCHES, ids=[f"{'denoise-' if s is DENOISE_SCHEMA else ''}{p}"
                                                        for s, p in SWITCHES])
@pytest.mark.parametrize("text", ["'false'", '"true"', "0", "1"])
def test_every_recipe_switch_takes_only_true_or_false(schema, path, text):
    """A quoted 'false' is a non-empty string, which Python takes as true: refused, as model.params are."""
    section, key = path.split(".")
    with pytest.raises(ConfigError, match=f"^{path}: expected true(, false or null| or false), got .*; write {key}: "
                                          f"true or {key}: false without quotes$"):
        validate_recipe(apply_overrides({}, [f"{path}={text}"]), schema)
    assert validate_recipe(apply_overrides({}, [f"{path}=false"]), schema)[section][key] is False
