"""Recipes: YAML files checked against a closed schema, with dotted command-line overrides.

Unknown keys and wrong types fail at load time with the dotted key path and the allowed keys.
Recipes hold data only: no import strings, no expressions.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import reprlib
import sys
from pathlib import Path
from typing import Any

import yaml

from segkit.errors import ConfigError
from segkit.record import LABELS_KINDS

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
        # images chosen by name instead of by slice range: a split file in data.root (train.txt: one
        # name per line), a glob of file names, or a list of names; null: the *_slices ranges apply
        "train_files": ((str, list, type(None)), None),
        "val_files": ((str, list, type(None)), None),
        "test_files": ((str, list, type(None)), None),
        # membrane: ISBI labels (0 = membrane, > 0 = cell); semantic: classes 0..K-1; instances: object ids
        # (0 = background), trained as background / interior / boundary
        "labels_kind": ((str,), "membrane"),
        "classes": ((int, type(None)), None),  # semantic only: K
        "class_names": ((list, type(None)), None),
        "ignore_index": ((int, type(None)), None),  # semantic only: a label value left out of loss and scores
        "boundary_width": ((int,), 2),  # instances only: px of each object's rim trained as boundary
        "channels": ((int, type(None)), None),  # input channels; null: what the images hold
        # meanstd: global per-channel mean/std of the training images (EM); percentile: each image scaled
        # so its low/high percentiles map to 0/1 (fluorescence, as CSBDeep and StarDist do)
        "normalization": ((str,), "meanstd"),
        "percentiles": ((list,), [1.0, 99.8]),
        "pixel_size": (_NUM + (type(None),), None),  # micrometres per pixel every image is rescaled to
        # factor every image and its labels are resized by before training (0.5: half the size), e.g. so the
        # typical object has the diameter the model sees best; stored in the checkpoint, undone at prediction
        "scale": (_NUM + (type(None),), None),
        # share of training patches centred on a pixel of a foreground class (a class drawn uniformly among
        # the classes other than 0 present in the image), so sparse objects and rare classes are not starved;
        # 0: patches drawn uniformly (the old behaviour)
        "foreground_fraction": (_NUM, 0.33),
        "tile": ((int,), 572),
    },
    "augment": {
        "on_device": ((bool,), False),
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
        # adamw (decoupled weight decay), adam or sgd (with train.momentum)
        "optimizer": ((str,), "adamw"),
        "lr": (_NUM, 1e-4),
        "momentum": (_NUM, 0.99),
        # null: 0.01 for adamw, 0 for adam and sgd
        "weight_decay": (_NUM + (type(None),), None),
        # cosine: linear warm-up over train.warmup of the run, then cosine decay to 0 over the planned
        # iterations (epochs x iters_per_epoch) or over train.time_limit_min, whichever ends the run first;
        # constant: train.lr throughout (the old behaviour)
        "schedule": ((str,), "cosine"),
        "warmup": (_NUM, 0.05),
        # exponential moving average of the weights, used for validation and saved in the checkpoints
        # (0: off, the raw weights as before); the decay per iteration
        "ema_decay": (_NUM, 0.99),
        # bf16/fp16 autocast on a GPU; null: on a GPU, off on the CPU (true on the CPU is ignored, with a note)
        "amp": ((bool, type(None)), None),
        "device": ((str,), "auto"),
        "seed": ((int,), 0),
        "workers": ((int,), 0),
        "out": ((str,), "runs/em_neurons"),
        "val_batch": ((int,), 4),
        # tile for validation and the checkpoint's prediction default; null: data.tile. Larger tiles
        # predict whole images faster (less context recomputed), so small training tiles can use one
        "val_tile": ((int, type(None)), None),
        "val_threshold": (_NUM, 0.5),
        "time_limit_min": (_NUM + (type(None),), None),
        # several processes (torchrun, srun): the global batch is train.batch x processes; the learning
        # rate is train.lr times 1 (none), the number of processes (linear) or its square root (sqrt)
        "lr_scaling": ((str,), "none"),
        # several processes on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm) instead of
        # each GPU's own batch; costs one all-gather per BatchNorm layer and step
        "sync_batchnorm": ((bool,), False),
        # several processes: how long a rank waits for the others (rank 0's validation included) before it
        # stops with an error, so a rank that died never leaves the others waiting for ever
        "dist_timeout_min": (_NUM, 15.0),
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
        "amp": ((bool, type(None)), None),  # as for segmenters: null is on a GPU, off on the CPU
        "device": ((str,), "auto"),
        "seed": ((int,), 0),
        "out": ((str,), "runs/denoise_em"),
        "val_batch": ((int,), 8),
        "time_limit_min": (_NUM + (type(None),), None),
    },
}

CHOICES = {
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.schedule": ("cosine", "constant"),
    "train.lr_scaling": ("none", "linear", "sqrt"),
    "train.mode": ("supervised", "blind_spot"),
    "train.loss": ("mse", "l1"),
    "corruption.noise": ("none", "gaussian", "poisson_gaussian", "masking", "salt_pepper"),
    "data.labels_kind": LABELS_KINDS,
    "data.normalization": ("meanstd", "percentile"),
}
POSITIVE = {"data.tile", "train.epochs", "train.iters_per_epoch", "train.batch", "train.val_batch", "train.lr",
            "corruption.gain", "train.blind_spot_fraction", "train.blind_spot_radius", "loss.border_sigma",
            "augment.elastic_sigma", "train.time_limit_min", "data.boundary_width", "data.channels", "train.val_tile",
            "data.pixel_size", "data.scale", "train.dist_timeout_min"}
NON_NEGATIVE = {"train.workers", "train.seed", "train.weight_decay", "loss.border_w0", "loss.dice_weight",
                "augment.elastic_alpha", "corruption.sigma"}
#: Bounded settings: path -> (low, high, low excluded, high excluded).
RANGES = {
    "train.val_threshold": (0.0, 1.0, True, True),
    "train.momentum": (0.0, 1.0, False, True),
    "train.warmup": (0.0, 0.5, False, False),
    "train.ema_decay": (0.0, 1.0, False, True),
    "data.foreground_fraction": (0.0, 1.0, False, False),
    "train.blind_spot_fraction": (0.0, 1.0, True, False),
    "corruption.fraction": (0.0, 1.0, False, False),
    "augment.brightness_contrast": (0.0, 1.0, False, False),
    "augment.noise_std": (0.0, 1.0, False, False),
    # numpy's and torch's seeds (np.random.seed, DataLoader workers) are 32-bit
    "train.seed": (0, 2**32 - 1, False, False),
}
#: The largest integer any setting may hold: torch's int64 (a 20-digit value overflows there, a 400-digit one
#: cannot even become a float).
MAX_INTEGER = 2**63 - 1
#: Recipe files are a few hundred bytes; anything this large is not a recipe.
MAX_RECIPE_BYTES = 1_000_000
#: Values (scalars, lists, mappings) a recipe may hold once its YAML aliases are expanded.
MAX_RECIPE_NODES = 100_000
#: Recipe keys that name input data: a relative path in a recipe file is relative to the file's folder.
#: Run paths (train.out, model.init_from, model.denoiser) stay relative to the working directory.
RECIPE_RELATIVE = (("data", "root"), ("model", "pretrained"))

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 50, 50, 4, 8, 2


def short(value: Any, limit: int = 60) -> str:
    """repr(value) on one line, cut to `limit` characters: messages never print a whole (possibly huge) value,
    nor a numpy array's line breaks."""
    text = " ".join(_SHORT.repr(value).split()) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def default_recipe(schema: dict[str, dict[str, Leaf]] = SCHEMA) -> dict[str, Any]:
    return {section: {key: copy.deepcopy(leaf[1]) for key, leaf in fields.items()} for section, fields in schema.items()}


def _unknown(path: str, key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    key = key if len(key) <= 60 else key[:57] + "..."
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
            if bool in types and not isinstance(value, types):  # 'false' (quoted) would read as true downstream
                allowed = "true, false or null" if type(None) in types else "true or false"
                raise ConfigError(f"{path}: expected {allowed}, got "
                                  f"{short(value)} ({type(value).__name__}); write {key}: true or {key}: false "
                                  "without quotes")
            if not isinstance(value, types):
                raise ConfigError(f"{path}: expected {_type_name(types)}, got {type(value).__name__} ({short(value)})")
            if path in CHOICES and value not in CHOICES[path]:
                raise ConfigError(f"{path}: {short(value)} is not one of {', '.join(CHOICES[path])}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _check_number(path, value)
            if float in types and isinstance(value, int):
                value = float(value)
            recipe[section][key] = value
    names = ("train_slices", "val_slices", "test_slices")
    for name in names:
        _check_range(f"data.{name}", recipe["data"][name])
    # a segmenter's splits are disjoint; a denoiser learns from raw slices alone (no labels to leak,
    # Noise2Void trains on the whole stack), so its ranges may overlap
    by_range = [n for n in names if recipe["data"].get(n.replace("_slices", "_files")) is None]
    for i, first in enumerate(by_range if schema is SCHEMA else ()):
        for second in by_range[i + 1:]:
            (a, b), (c, d) = recipe["data"][first], recipe["data"][second]
            if max(a, c) < min(b, d):
                raise ConfigError(
                    f"data.{first} {[a, b]} and data.{second} {[c, d]} overlap (slices {max(a, c)}-{min(b, d) - 1}): "
                    "held-out slices must not be trained or validated on; give them separate [start, stop) ranges")
    if schema is SCHEMA:
        _check_data_kinds(recipe["data"])
    return recipe


def _check_data_kinds(data: dict[str, Any]) -> None:
    """The label kind's settings agree: semantic recipes name their classes, the others have fixed ones."""
    kind, classes, names = data["labels_kind"], data["classes"], data["class_names"]
    fixed = {"membrane": 2, "instances": 3}
    if kind == "semantic":
        if classes is None or classes < 2:
            raise ConfigError(f"data.classes: labels_kind semantic needs the number of classes K >= 2 (labels hold "
                              f"0..K-1), got {short(classes)}; e.g. data.classes=3")
    elif classes is not None and classes != fixed[kind]:
        raise ConfigError(f"data.classes: labels_kind {kind} trains {fixed[kind]} classes, got {classes}; leave "
                          "data.classes out (it is for labels_kind semantic)")
    count = classes if kind == "semantic" else fixed[kind]
    if names is not None and (len(names) != count or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"data.class_names: expected {count} names for the {count} classes, got {short(names)}")
    if data["ignore_index"] is not None and kind != "semantic":
        raise ConfigError("data.ignore_index applies to labels_kind semantic only; leave it out")
    low_high = data["percentiles"]
    if (len(low_high) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high)
            or not 0 <= low_high[0] < low_high[1] <= 100):
        raise ConfigError(f"data.percentiles: expected [low, high] with 0 <= low < high <= 100, e.g. [1, 99.8], "
                          f"got {short(low_high)}")
    for split in ("train", "val", "test"):
        files = data[f"{split}_files"]
        if isinstance(files, list) and not all(isinstance(n, str) and n for n in files):
            raise ConfigError(f"data.{split}_files: expected a list of image names, got {short(files)}")
        if isinstance(files, (list, str)) and not files:
            raise ConfigError(f"data.{split}_files: is empty; name a split file (e.g. {split}.txt), a glob or a list "
                              f"of image names, or leave it out to use data.{split}_slices")


def _check_number(path: str, value: int | float) -> None:
    """Finite, and in the range the setting allows (POSITIVE, NON_NEGATIVE, RANGES, MAX_INTEGER)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    if path in POSITIVE and value <= 0:
        raise ConfigError(f"{path}: must be positive, got {short(value)}")
    if path in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{path}: must be 0 or more, got {short(value)}")
    if path in RANGES:
        low, high, low_open, high_open = RANGES[path]
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            interval = f"{'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
            raise ConfigError(f"{path}: must be in {interval}, got {short(value)}")
    if isinstance(value, int) and abs(value) > MAX_INTEGER:
        raise ConfigError(f"{path}: {short(value)} is too large (at most {MAX_INTEGER})")


def _bound(value: int | float) -> str:
    """A range's end in messages: 0.5, 1, 4294967295 (never 4.29497e+09)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_range(path: str, value: Any) -> None:
    if (
        not isinstance(value, list) or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ConfigError(f"{path}: expected [start, stop) slice indices like [0, 20], got {short(value)}")


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents whose aliases expand to more than MAX_RECIPE_NODES
    values (an "alias bomb" of a few hundred bytes expands to gigabytes) or that refer to themselves."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return self.construct_document(node)


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """How many values `node` holds with its aliases expanded (each shared node counted per use)."""
    key = id(node)
    if key in sizes:
        known = sizes[key]
        if known is None:
            raise ConfigError("an alias refers to the value that holds it (a recursive structure); write the values out")
        return known
    sizes[key] = None
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if size > MAX_RECIPE_NODES:
        raise ConfigError(f"it holds more than {MAX_RECIPE_NODES} values with its aliases expanded (a YAML alias "
                          "bomb?); recipes hold a few dozen settings")
    sizes[key] = size
    return size


def parse_yaml(text: str) -> Any:
    """YAML text as Python data, safely: plain data only, aliases capped (_RecipeLoader)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError("it is nested too deeply to be a recipe; write it as plain sections") from None
    except ValueError as exc:  # Python's 4300-digit limit on reading an integer (PyYAML raises it as is)
        if "integer string conversion" not in str(exc):
            raise
        raise ConfigError(f"it holds an integer of more than {sys.get_int_max_str_digits()} digits; recipe settings "
                          "are small numbers") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw recipe mapping."""
    if raw and not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(raw).__name__}; "
                          "write it as section: {key: value} lines, e.g. train: {epochs: 2}")
    raw = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        shown = short(item)
        if "=" not in item:
            raise ConfigError(f"override {shown} must look like section.key=value, e.g. train.epochs=2")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {shown}: key must be section.key, e.g. train.epochs=2")
        try:
            value = parse_yaml(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {shown}: value is not valid YAML ({_first_line(exc)})") from exc
        except ConfigError as exc:
            raise ConfigError(f"override {shown}: {exc}") from None
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {shown}: {short(part)} is not a section")
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
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe {path} is {size / 1e6:.1f} MB; recipes are small YAML files "
                              f"(at most {MAX_RECIPE_BYTES // 1_000_000} MB): pass the recipe, not a data file")
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {_first_line(exc)}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text; pass a YAML recipe such as recipes/em_neurons.yaml") from None
    except OSError as exc:
        raise ConfigError(f"recipe {path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except ConfigError as exc:
        if str(exc).startswith("recipe "):
            raise
        raise ConfigError(f"recipe {path}: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} holds a {type(raw).__name__}, not a mapping of sections "
                          f"({', '.join(schema)}); write it as section: {{key: value}} lines, e.g. train: {{epochs: 2}}")
    if raw:
        raw = _relative_to(raw, path.parent)
    return validate_recipe(apply_overrides(raw or {}, list(overrides)), schema)


def _relative_to(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The recipe file's relative input paths (RECIPE_RELATIVE) joined to its folder, as absolute paths:
    a recipe names the same data from any working directory and in its copy in the run folder."""
    raw = dict(raw)
    for section, key in RECIPE_RELATIVE:
        values = raw.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str) and values[key]:
            value = os.path.expanduser(values[key])
            if not os.path.isabs(value):
                raw[section] = {**values, key: os.path.abspath(os.path.join(folder, value))}
    return raw


def _first_line(exc: Exception) -> str:
    """A library exception's text in one line of at most 200 characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
