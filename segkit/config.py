"""Recipes: YAML files checked against a closed schema, with dotted command-line overrides.

Unknown keys and wrong types fail at load time with the dotted key path and the allowed keys.
Recipes hold data only: no import strings, no expressions.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from segkit.errors import ConfigError

# Leaf: (allowed types, default). A dict leaf of type `dict` is free-form (checked elsewhere).
Leaf = tuple[tuple[type, ...], Any]
_NUM = (int, float)

SCHEMA: dict[str, dict[str, Leaf]] = {
    "model": {
        "name": ((str,), "unet"),
        "params": ((dict,), {}),
        # local ImageNet weights for the backbone (torchvision VGG16 .pth for FCN, an encoder state dict for smp)
        "pretrained": ((str, type(None)), None),
        # a segkit checkpoint whose matching tensors initialise the model (staged FCN-32s -> 16s -> 8s)
        "init_from": ((str, type(None)), None),
        # a denoiser checkpoint run frozen in front of the segmenter (data.tile then includes its margin)
        "denoiser": ((str, type(None)), None),
    },
    "data": {
        "root": ((str,), "../shared/data/isbi2012"),
        "raw": ((str,), "train-volume.tif"),
        "labels": ((str,), "train-labels.tif"),
        "train_slices": ((list,), [0, 20]),
        "val_slices": ((list,), [20, 25]),
        "test_slices": ((list,), [25, 30]),
        "tile": ((int,), 572),
    },
    "augment": {
        "elastic": ((bool,), True),
        "elastic_alpha": (_NUM, 34.0),
        "elastic_sigma": (_NUM, 4.0),
        "flips": ((bool,), True),
        "rot90": ((bool,), True),
        "brightness_contrast": (_NUM, 0.2),
        "noise_std": (_NUM, 0.03),
    },
    "loss": {
        "class_balance": ((bool,), True),
        "border_w0": (_NUM, 10.0),
        "border_sigma": (_NUM, 5.0),
        "dice_weight": (_NUM, 0.0),
    },
    "train": {
        "epochs": ((int,), 50),
        "iters_per_epoch": ((int,), 100),
        "batch": ((int,), 4),
        "optimizer": ((str,), "adam"),
        "lr": (_NUM, 1e-4),
        "momentum": (_NUM, 0.99),
        "weight_decay": (_NUM, 0.0),
        "amp": ((bool,), True),
        "device": ((str,), "auto"),
        "seed": ((int,), 0),
        "workers": ((int,), 0),
        "out": ((str,), "runs/em_neurons"),
        "val_batch": ((int,), 4),
        "val_threshold": (_NUM, 0.5),
        "time_limit_min": (_NUM + (type(None),), None),
    },
}

#: Recipes for `segkit train-denoiser`: unlabelled raw data, a corruption and a training mode.
DENOISE_SCHEMA: dict[str, dict[str, Leaf]] = {
    "model": {
        "name": ((str,), "denoiser"),
        "params": ((dict,), {}),
    },
    "data": {
        "root": ((str,), "../shared/data/isbi2012"),
        "raw": ((str,), "train-volume.tif"),
        "train_slices": ((list,), [0, 20]),
        "val_slices": ((list,), [20, 25]),
        "test_slices": ((list,), [25, 30]),
        "tile": ((int,), 236),
    },
    "corruption": {
        # synthetic noise added to the raw data (intensities scaled to [0, 1]); "none" for
        # blind-spot training on the data's own noise
        "noise": ((str,), "gaussian"),
        "sigma": (_NUM, 0.1),
        "gain": (_NUM, 30.0),
        "fraction": (_NUM, 0.25),
    },
    "augment": {
        "flips": ((bool,), True),
        "rot90": ((bool,), True),
    },
    "train": {
        # supervised: noisy input -> clean target (a denoising autoencoder);
        # blind_spot: Noise2Void, noisy -> the same noisy pixels it cannot see (no clean data needed)
        "mode": ((str,), "supervised"),
        "blind_spot_fraction": (_NUM, 0.02),
        "blind_spot_radius": ((int,), 2),
        "loss": ((str,), "mse"),
        "epochs": ((int,), 30),
        "iters_per_epoch": ((int,), 100),
        "batch": ((int,), 8),
        "optimizer": ((str,), "adam"),
        "lr": (_NUM, 1e-3),
        "momentum": (_NUM, 0.9),
        "weight_decay": (_NUM, 0.0),
        "amp": ((bool,), True),
        "device": ((str,), "auto"),
        "seed": ((int,), 0),
        "out": ((str,), "runs/denoise_em"),
        "val_batch": ((int,), 8),
        "time_limit_min": (_NUM + (type(None),), None),
    },
}

CHOICES = {
    "train.optimizer": ("adam", "sgd"),
    "train.mode": ("supervised", "blind_spot"),
    "train.loss": ("mse", "l1"),
    "corruption.noise": ("none", "gaussian", "poisson_gaussian", "masking", "salt_pepper"),
}
POSITIVE = {"data.tile", "train.epochs", "train.iters_per_epoch", "train.batch", "train.val_batch", "train.lr",
            "corruption.gain", "train.blind_spot_fraction", "train.blind_spot_radius"}


def default_recipe(schema: dict[str, dict[str, Leaf]] = SCHEMA) -> dict[str, Any]:
    return {section: {key: copy.deepcopy(leaf[1]) for key, leaf in fields.items()} for section, fields in schema.items()}


def _unknown(path: str, key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = f"{path}.{key}" if path else key
    return ConfigError(f"{where}: unknown key{hint} allowed: {', '.join(allowed)}")


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def validate_recipe(raw: Any, schema: dict[str, dict[str, Leaf]] = SCHEMA) -> dict[str, Any]:
    """Merge `raw` over the defaults, checking every key and type; returns the resolved recipe."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping of sections ({', '.join(schema)}), got {type(raw).__name__}")
    recipe = default_recipe(schema)
    for section, values in raw.items():
        if section not in schema:
            raise _unknown("", str(section), list(schema))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping of keys, got {type(values).__name__}")
        for key, value in values.items():
            fields = schema[section]
            if key not in fields:
                raise _unknown(section, str(key), list(fields))
            types = fields[key][0]
            path = f"{section}.{key}"
            if isinstance(value, bool) and bool not in types:
                raise ConfigError(f"{path}: expected {_type_name(types)}, got a boolean ({value})")
            if not isinstance(value, types):
                raise ConfigError(f"{path}: expected {_type_name(types)}, got {type(value).__name__} ({value!r})")
            if path in CHOICES and value not in CHOICES[path]:
                raise ConfigError(f"{path}: {value!r} is not one of {', '.join(CHOICES[path])}")
            if path in POSITIVE and value <= 0:
                raise ConfigError(f"{path}: must be positive, got {value}")
            if float in types and isinstance(value, int):
                value = float(value)
            recipe[section][key] = value
    for name in ("train_slices", "val_slices", "test_slices"):
        _check_range(f"data.{name}", recipe["data"][name])
    return recipe


def _check_range(path: str, value: Any) -> None:
    if (
        not isinstance(value, list) or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ConfigError(f"{path}: expected [start, stop) slice indices like [0, 20], got {value!r}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw recipe mapping."""
    raw = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=2")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: key must be section.key, e.g. train.epochs=2")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                schema: dict[str, dict[str, Leaf]] = SCHEMA) -> dict[str, Any]:
    """Read, override and validate a recipe file against `schema`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; pass a YAML recipe such as recipes/em_neurons.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")
        raise ConfigError(f"recipe {path} is not valid YAML: {first}") from exc
    return validate_recipe(apply_overrides(raw or {}, list(overrides)), schema)
