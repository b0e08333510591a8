"""`segkit init`: a data folder's fingerprint -> a complete, commented recipe that `segkit train` runs
as it is (nnU-Net's rule-based self-configuration; cellpose's object diameter for the scale).

Each choice is a fixed rule over the fingerprint (fingerprint.py), written into the recipe with its
reason as a comment:
- splits: the folder's train.txt / val.txt / test.txt, else a seeded ~70/15/15 split of the image
  names written as split files beside the recipe; one stack: contiguous planes (the last sixth
  test, the sixth before it validation, the rest training);
- normalisation: percentile for data that uses a small part of its integer range or is dominated by
  a dark background (fluorescence), else mean/std (EM);
- pixel size: the median when it differs between images; instances: data.scale so the median object
  is 30 px across (cellpose), when the factor is outside [0.8, 1.25];
- model, tile and batch by device (CPU: base-16 U-Net on 316 px tiles; GPU: base 32 on 572 px), the
  tile grown so an output tile spans 4 median objects;
- epochs and iterations from the time budget and three timed training iterations on the device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segkit.config import SCHEMA, apply_overrides, default_recipe, load_recipe, short, validate_recipe
from segkit.devices import resolve_device
from segkit.errors import ConfigError, InputError, OutputError, TileSizeError
from segkit.inference.tiler import plan_tiles
from segkit.io.outputs import atomic_path, check_output
from segkit.models import create_model
from segkit.models.geometry import valid_unet_geometry
from segkit.record import LABELS_KINDS
from segkit.training.datasets import split_sources
from segkit.training.fingerprint import DataLayout, Fingerprint, find_layout, fingerprint, read_samples
from segkit.training.runs import DEFAULT_WEIGHT_DECAY, cpu_cores
from segkit.words import counted

#: Median object diameter (px) instance data is rescaled to (cellpose's convention for its cyto model).
TARGET_DIAMETER = 30.0
#: Scale factors close enough to 1 to leave the images as they are, and the factors allowed at most.
SCALE_KEEP, SCALE_CLIP = (0.8, 1.25), (0.25, 4.0)
#: Default time budget (minutes) per device kind.
DEFAULT_MINUTES = {"cpu": 20.0, "gpu": 60.0}
#: Model, training tile, validation tile and batch per device kind.
MODELS = {"cpu": {"base": 16, "depth": 4, "batch_norm": True}, "gpu": {"base": 32, "depth": 4, "batch_norm": True}}
TILES = {"cpu": 316, "gpu": 572}
VAL_TILES = {"cpu": 572, "gpu": 572}
BATCHES = {"cpu": 4, "gpu": 8}
#: Largest tile the rules grow to.
MAX_TILE = 1052
#: Output tiles span at least this many median objects; the receptive field at least RF_OBJECTS.
TILE_OBJECTS, RF_OBJECTS = 4, 2
#: Share of the time budget validation may take, and the epochs allowed (one: validated once, at the end,
#: where the cosine schedule and the weight average leave the best weights anyway).
VALIDATION_SHARE, EPOCHS = 0.1, (1, 20)
#: Validation time per forward pass of a tile, post-processing included, by label kind: instances choose
#: their watershed settings over a grid on every validation image.
POSTPROCESSING_FACTOR = {"instances": 2.0, "semantic": 1.2, "membrane": 1.2}
MIN_ITERS = 10
#: Recipe file names segkit init writes.
RECIPE_SUFFIXES = (".yaml", ".yml")


# -- timings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timings:
    """Seconds of one training iteration and of one forward pass of a validation tile on the device;
    `measured` False for the nominal figures of `nominal_timings` (segkit init --no-measure)."""

    step_s: float
    forward_s: float
    measured: bool = True
    note: str = ""


def nominal_timings(*, gpu: bool, base: int, tile: int, batch: int, val_tile: int) -> Timings:
    """Timings scaled from reference figures (2 CPU cores; one recent GPU) by pixels and width^2:
    what `--no-measure` uses (tests, quick looks); the recipe says they were not measured."""
    ref_base = 32 if gpu else 16
    width = (base / ref_base) ** 2
    if gpu:
        step = 0.15 * (batch / 8) * (tile / 572) ** 2 * width
        forward = 0.02 * (val_tile / 572) ** 2 * width
    else:
        step = 2.0 * (batch / 4) * (tile / 316) ** 2 * width
        forward = 1.0 * (val_tile / 572) ** 2 * width
    return Timings(step, forward, measured=False, note="nominal, not measured")


def measure_timings(*, params: dict[str, Any], channels: int, classes: int, tile: int, batch: int, val_tile: int,
                    device: str) -> Timings:
    """Time one training iteration (forward, cross-entropy, backward, AdamW step on random input; one
    warm-up then the mean of 3) and one forward pass of a `val_tile` tile (after a warm-up, the faster of
    two), on `device` with torch's threads as they are."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model("unet", in_channels=channels, classes=classes, **params).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cuda = device.startswith("cuda")
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one_step(x: Any, y: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()

    note = ""
    while True:
        out = model.geometry.output_size(tile)
        x = torch.randn(batch, channels, tile, tile, device=device)
        y = torch.randint(0, classes, (batch, out, out), device=device)
        try:
            one_step(x, y)
            sync()
            started = time.perf_counter()
            for _ in range(3):
                one_step(x, y)
            sync()
            step = (time.perf_counter() - started) / 3
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            del x, y
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2
            note = f"batch {batch} (a larger one ran out of GPU memory)"
    model.eval()
    with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=dtype is not None):
        x = torch.randn(1, channels, val_tile, val_tile, device=device)
        model(x)
        sync()
        forward = math.inf
        for _ in range(2):  # the faster of two: one pass disturbed by another process is not the device's speed
            started = time.perf_counter()
            model(x)
            sync()
            forward = min(forward, time.perf_counter() - started)
    threads = f", {torch.get_num_threads()} threads" if not cuda else ""
    return Timings(step, forward, measured=True, note=f"measured on {device}{threads}" + (f"; {note}" if note else ""))


def schedule(minutes: float, timings: Timings, val_tiles: int, *, epochs: int | None = None,
             kind: str = "instances") -> tuple[int, int, float, float]:
    """(epochs, iterations per epoch, EMA decay, validation seconds per epoch) for a budget of `minutes`:
    validation (`val_tiles` forwards, times POSTPROCESSING_FACTOR[kind]) takes about VALIDATION_SHARE of
    the budget, the training iterations (a step plus a tenth for patch sampling) fill the rest, less every
    validation (the time limit counts them: `runs.run_epochs`); `epochs` given is kept."""
    budget = minutes * 60.0
    val_s = POSTPROCESSING_FACTOR[kind] * timings.forward_s * val_tiles
    if epochs is None:
        epochs = int(np.clip(round(VALIDATION_SHARE * budget / val_s), *EPOCHS)) if val_s > 0 else EPOCHS[1]
    # the time limit counts every validation; patch sampling costs about a tenth of a step
    iters = max(MIN_ITERS, int((budget - epochs * val_s) / (1.1 * epochs * timings.step_s)))
    ema = float(np.clip(1.0 - 10.0 / (epochs * iters), 0.9, 0.999))
    return epochs, iters, round(ema, 4), val_s


# -- the recipe as settings with reasons ---------------------------------------------------------------

SECTIONS = ("model", "data", "augment", "loss", "train")


@dataclass
class Plan:
    """The recipe being written: values by section and key, each with its reason; `derived` keys (read
    from the data or measured) are also printed."""

    values: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    reasons: dict[str, str] = field(default_factory=dict)
    derived: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any, reason: str = "", *, derived: bool = False) -> None:
        section, name = key.split(".", 1)
        self.values[section][name] = value
        if reason:
            self.reasons[key] = reason
        if derived and key not in self.derived:
            self.derived.append(key)

    def get(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return self.values[section][name]

    def override(self, overrides: Sequence[str]) -> None:
        """Apply dotted `section.key=value` overrides (as `segkit train` takes them); the keys they name
        say so in their comment."""
        merged = apply_overrides(self.values, list(overrides))
        for item in overrides:
            parts = item.split("=", 1)[0].strip().split(".")
            self.reasons[".".join(parts[:2])] = "set on the command line"
        self.values = {section: dict(values) if isinstance(values, dict) else values
                       for section, values in merged.items()}

    def yaml_text(self, header: Sequence[str]) -> str:
        lines = [f"# {line}" if line else "#" for line in header]
        for section, values in self.values.items():
            lines.append(f"{section}:")
            for name, value in values.items():
                reason = self.reasons.get(f"{section}.{name}")
                if reason:
                    lines.append(f"  # {reason}")
                lines.append(f"  {name}: {_yaml_value(value)}")
        return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


# -- rules ------------------------------------------------------------------------------------------

def normalization_rule(fp: Fingerprint) -> tuple[str, str]:
    """('percentile' or 'meanstd', the reason): percentile when the 0.5-99.5 % intensity span covers
    under a quarter of an integer dtype's range (high dynamic range, dim signal), or when the median
    sits in the lowest fifth of that span (a dark background with bright objects: fluorescence), or
    when the images mix dtypes; otherwise mean/std over the training images (EM-like, values spread)."""
    if "," in fp.dtype:
        return "percentile", f"the images mix dtypes ({fp.dtype}): each image is scaled by its own percentiles"
    for low, mid, high in fp.percentiles:
        span = high - low
        if fp.dtype_max is not None and span < 0.25 * fp.dtype_max:
            return "percentile", (f"intensities use a small part of the {fp.dtype} range (p0.5-p99.5 {low:g}-{high:g} "
                                  f"of 0-{fp.dtype_max:g}): each image scaled by its own percentiles (fluorescence)")
        if span > 0 and (mid - low) < 0.2 * span:
            return "percentile", (f"background-dominated intensities (median {mid:g} in the lowest fifth of "
                                  f"p0.5-p99.5 {low:g}-{high:g}): each image scaled by its own percentiles (fluorescence)")
    low, mid, high = fp.percentiles[0]
    return "meanstd", (f"intensities spread over the range (p0.5 / p50 / p99.5 {low:g} / {mid:g} / {high:g}): global "
                       "mean/std of the training images (EM); percentile is for data using a small part of its range "
                       "or with a dark background")


def scale_rule(fp: Fingerprint) -> tuple[float | None, str]:
    """(data.scale or None, the reason): instances are resized so the median object is TARGET_DIAMETER px
    across, when that factor lies outside SCALE_KEEP (clipped to SCALE_CLIP)."""
    if fp.kind != "instances" or fp.diameters is None:
        return None, ""
    median = fp.diameters[1]
    factor = TARGET_DIAMETER / median
    if SCALE_KEEP[0] <= factor <= SCALE_KEEP[1]:
        return None, ""
    clipped = float(np.clip(factor, *SCALE_CLIP))
    clipped = round(clipped, 3 if clipped < 1 else 2)
    inside = SCALE_CLIP[0] <= factor <= SCALE_CLIP[1]
    note = "" if inside else f" (clipped from {factor:.3g} to {SCALE_CLIP[0]:g}-{SCALE_CLIP[1]:g})"
    return clipped, (f"median object {median:.1f} px across -> {median * clipped:.1f} px: objects resized towards "
                     f"{TARGET_DIAMETER:g} px (cellpose's diameter), undone at prediction{note}")


def _valid_at_least(geometry: Any, size: int) -> int:
    below, above = geometry.nearest_valid(max(size, geometry.min_input))
    return below if below == max(size, geometry.min_input) else above


def tile_rule(fp: Fingerprint, *, gpu: bool, scale: float, echo: Callable[[str], None]
              ) -> tuple[dict[str, Any], int, list[str]]:
    """(model params, data.tile, reasons) for the device kind; for instances the output tile spans
    TILE_OBJECTS median objects and the receptive field RF_OBJECTS (depth 5 when 4 is short)."""
    kind = "gpu" if gpu else "cpu"
    params = dict(MODELS[kind])
    geometry = valid_unet_geometry(params["depth"])
    tile = TILES[kind]
    reasons = [f"{'GPU' if gpu else 'CPU'}: a {tile} px tile -> {geometry.output_size(tile)} px output"]
    if fp.kind == "instances" and fp.diameters is not None:
        diameter = fp.diameters[1] * scale
        if 2 * geometry.margin + 1 < RF_OBJECTS * diameter:
            deeper = valid_unet_geometry(5)
            echo(f"note: objects of {diameter:.0f} px are larger than half the depth-4 U-Net's view "
                 f"({2 * geometry.margin + 1} px); using depth 5 ({2 * deeper.margin + 1} px)")
            params["depth"], geometry = 5, deeper
            tile = _valid_at_least(geometry, tile)
            reasons.append(f"depth 5: its view ({2 * geometry.margin + 1} px) spans {RF_OBJECTS} median objects "
                           f"({diameter:.0f} px)")
        need = math.ceil(TILE_OBJECTS * diameter)
        if geometry.output_size(tile) < need:
            grown = min(_valid_at_least(geometry, need + 2 * geometry.margin), _valid_at_least(geometry, MAX_TILE))
            echo(f"note: data.tile {tile} -> {grown}: its output ({geometry.output_size(grown)} px) spans "
                 f"{TILE_OBJECTS} median objects of {diameter:.0f} px")
            tile = grown
            reasons.append(f"grown so the output ({geometry.output_size(tile)} px) spans {TILE_OBJECTS} median objects "
                           f"of {diameter:.0f} px")
        else:
            reasons.append(f"the output spans {geometry.output_size(tile) / diameter:.1f} median objects "
                           f"({diameter:.0f} px)")
    return params, tile, reasons


def tile_count(planes: Sequence[tuple[int, int, int]], geometry: Any, tile: int) -> int:
    """Tiles the tiler cuts from `planes` ((count, height, width) each) at input tile `tile`."""
    total = 0
    for count, height, width in planes:
        tiles = plan_tiles((height, width), geometry, tile=tile)
        total += count * len(tiles.origins_y) * len(tiles.origins_x)
    return total


def val_tile_rule(planes: Sequence[tuple[int, int, int]], geometry: Any, *, tile: int, gpu: bool) -> tuple[int, str]:
    """(train.val_tile, reason): the valid size from the device's (572) up to MAX_TILE (and at least the
    training tile) that cuts the validation images into the fewest input pixels (tiles x tile^2); the
    smaller on a tie. Larger tiles recompute less context; beyond the image they only add padding."""
    low = max(tile, _valid_at_least(geometry, VAL_TILES["gpu" if gpu else "cpu"]))
    sizes = list(range(low, max(low, MAX_TILE) + 1, geometry.step))
    cost = {size: tile_count(planes, geometry, size) * size * size for size in sizes}
    best = min(sizes, key=lambda size: (cost[size], size))
    if best == low:
        return best, "validation and prediction on larger tiles than training (less context recomputed)"
    return best, (f"the tile from {low} to {sizes[-1]} px that cuts the validation images into the fewest input "
                  f"pixels ({cost[best] / cost[low]:.2f} x those of {low} px tiles)")


# -- splits -----------------------------------------------------------------------------------------

def free_path(path: Path) -> Path:
    """`path`, or NAME-2.txt, NAME-3.txt ... beside it: the first that does not exist."""
    if not path.exists():
        return path
    stem, suffix = path.name[: -len(path.suffix)], path.suffix
    number = 2
    while (path.parent / f"{stem}-{number}{suffix}").exists():
        number += 1
    return path.parent / f"{stem}-{number}{suffix}"


def stack_slices(planes: int) -> dict[str, list[int]]:
    """Contiguous [start, stop) ranges of one stack: test the last sixth, validation the sixth before it,
    training the rest (at least one plane each; neighbouring sections do not leak across splits)."""
    if planes < 3:
        raise InputError(f"the stack has {counted(planes, 'plane')}, too few to split into training, "
                         "validation and test planes; add planes (at least 3) or more images")
    sixth = max(1, round(planes / 6))
    test = [planes - sixth, planes]
    val = [max(1, planes - 2 * sixth), planes - sixth]
    return {"train": [0, val[0]], "val": val, "test": test}


def random_split(names: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """A seeded ~70/15/15 split of image names (at least one image in validation and test)."""
    count = len(names)
    if count < 3:
        what = "one image only" if count == 1 else f"{counted(count, 'image')} only"
        raise InputError(f"{what}: no split into training, validation and test is possible; add at least "
                         f"{counted(3 - count, 'more labelled image')} (one each for validation and "
                         "test), write train.txt / val.txt / test.txt, or pass one stack with images=NAME and "
                         "labels=NAME to split it by planes")
    order = [names[i] for i in np.random.default_rng(seed).permutation(count)]
    held = max(1, round(0.15 * count))
    test, val = order[:held], order[held: 2 * held]
    train = order[2 * held:]
    if not train:  # 3 images: one each
        train, val = order[2:], order[1:2]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def split_plan(layout: DataLayout, recipe: Path, plan: Plan) -> dict[Path, list[str]]:
    """Set the recipe's split keys; returns the split files to write {path: names}."""
    if layout.form == "stack":
        slices = stack_slices(layout.pairs[0].planes)
        for split, what in (("train", "the rest"), ("val", "the sixth before the test planes"),
                            ("test", "the last sixth of the planes")):
            plan.set(f"data.{split}_slices", slices[split],
                     f"{what}; contiguous planes, so neighbouring sections do not leak between splits" if split == "test"
                     else what, derived=split == "test")
        return {}
    found = layout.split_files
    if found:
        missing = [name for name in ("train", "val") if name not in found]
        if missing:
            raise InputError(f"{layout.root} has {', '.join(p.name for p in found.values())} but no {missing[0]}.txt; "
                             f"add {missing[0]}.txt (one image name per line) or remove the split files to have a "
                             "split made")
        for split, path in found.items():
            plan.set(f"data.{split}_files", str(path), f"the data folder's split file ({path.name})",
                     derived=split == "train")
        return {}
    names = [pair.name for pair in layout.pairs]
    split = random_split(names)
    writes: dict[Path, list[str]] = {}
    stem = recipe.name[: -len(recipe.suffix)] if recipe.suffix else recipe.name
    for name in ("train", "val", "test"):
        path = free_path(recipe.parent / f"{stem}.{name}.txt")
        writes[path] = split[name]
        plan.set(f"data.{name}_files", str(path),
                 f"{len(split[name])} of {len(names)} images, a seeded random split (~70/15/15) written by segkit init",
                 derived=name == "train")
    return writes


def val_planes(layout: DataLayout, plan: Plan, pending: dict[Path, list[str]] | None = None
               ) -> list[tuple[int, int, int]]:
    """(planes, height, width) of each validation image as training sees it (after data.pixel_size and
    data.scale); `pending`: split files not written yet, {path: names}."""
    data = {**_data_defaults(), **plan.values["data"]}
    if isinstance(data["val_files"], str) and Path(data["val_files"]) in (pending or {}):
        data["val_files"] = pending[Path(data["val_files"])]  # type: ignore[index]
    sizes = {pair.image: pair for pair in layout.pairs}
    target, scale = data.get("pixel_size"), data.get("scale") or 1.0
    planes = []
    for image, _labels, plane in split_sources(data, "val"):
        pair = sizes.get(image) or next(p for p in layout.pairs if os.path.samefile(p.image, image))
        factor = scale * (pair.pixel_size / target if target and pair.pixel_size else 1.0)
        height, width = (max(1, round(n * factor)) for n in pair.shape)
        planes.append((1 if plane is not None else pair.planes, height, width))
    return planes


def _data_defaults() -> dict[str, Any]:
    return default_recipe()["data"]


# -- init -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InitResult:
    """What `init_recipe` wrote: the recipe, the split files, and what it read and measured."""

    recipe: Path
    split_files: tuple[Path, ...]
    fingerprint: Fingerprint
    timings: Timings
    text: str


def recipe_device(requested: str, setting: str = "device") -> tuple[str, str]:
    """The device a recipe names and the one `segkit init` times on.

    Parameters
    ----------
    requested : str
        'auto', 'cpu', 'cuda' or 'cuda:N'.
    setting : str
        The name errors give it ('device', '--device').

    Returns
    -------
    written : str
        For the recipe: 'cuda' where 'auto' or 'cuda' found a GPU (any machine's current GPU), else as resolved.
    timed : str
        The resolved device ('cpu', 'cuda:N').

    Raises
    ------
    SegkitError
        CUDA was asked for but is not available, or the device is unknown.
    """
    device = resolve_device(requested, option=setting)
    if requested in ("auto", "cuda") and device.startswith("cuda"):
        return "cuda", device
    return device, device


def check_recipe_path(path: str | Path, *, overwrite: bool) -> Path:
    """The recipe path, once it is known that it can be written (a .yaml name, not there unless `overwrite`)."""
    path = Path(path)
    if not path.name.lower().endswith(RECIPE_SUFFIXES):
        raise OutputError(f"recipe {path}: name it with .yaml (a recipe is a YAML file)")
    return check_output(path, kind=None, overwrite=overwrite)


def init_recipe(data: str | Path, output: str | Path | None = None, *, minutes: float | None = None,
                device: str = "auto", kind: str | None = None, images: str | None = None, labels: str | None = None,
                overwrite: bool = False, measure: bool = True, timings: Timings | None = None,
                overrides: Sequence[str] = (), out: str | None = None, echo: Callable[[str], None] = print,
                settings: dict[str, str] | None = None) -> InitResult:
    """Read the data folder `data`, print its fingerprint through `echo`, write a recipe to `output`
    (default: ./<data name>.yaml) that `segkit train` runs as it is, with split files beside it when the
    folder has none; returns what was written.

    minutes: the time budget (default 20 on a CPU, 60 on a GPU); device: auto | cpu | cuda[:N];
    kind: membrane | semantic | instances (default: guessed from the labels); images, labels: their
    folders or stack files inside `data` (default: found); measure: time 3 training iterations on the
    device (False: nominal timings), or pass `timings`; overrides: dotted recipe settings applied last
    (and before timing, so a smaller model is timed as it will train); out: train.out (default
    runs/<data name>). settings: the names errors use for device, kind, minutes (e.g. train.device).
    """
    names = {"device": "device", "kind": "kind", "minutes": "minutes", "images": "images", "labels": "labels",
             **(settings or {})}
    root = Path(data).expanduser()
    if kind is not None and kind not in LABELS_KINDS:
        raise ConfigError(f"{names['kind']}={short(kind)} is not one of membrane, semantic, instances")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes <= 0):
        raise ConfigError(f"{names['minutes']}={short(minutes)}: the time budget must be a positive number of minutes")
    if not isinstance(device, str):
        raise ConfigError(f"{names['device']}={short(device)}: use auto, cpu, cuda or cuda:N")
    for setting, value in ((names["images"], images), (names["labels"], labels)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{setting}={short(value)}: name a folder or TIFF file in the data folder")
    written_device, actual_device = recipe_device(device, names["device"])
    gpu = actual_device.startswith("cuda")
    layout = find_layout(root, images=images, labels=labels, settings=(names["images"], names["labels"]))
    recipe = check_recipe_path(output if output is not None else Path.cwd() / f"{layout.root.name}.yaml",
                               overwrite=overwrite).absolute()
    samples = read_samples(layout)
    fp = fingerprint(layout, samples, kind=kind, kind_setting=names["kind"])
    del samples
    for line in fp.lines():
        echo(line)
    minutes = float(minutes if minutes is not None else DEFAULT_MINUTES["gpu" if gpu else "cpu"])
    plan = base_plan(fp, layout, gpu=gpu, device=written_device, minutes=minutes,
                     out=out or f"runs/{layout.root.name}", echo=echo)
    writes = split_plan(layout, recipe, plan)
    if overrides:
        plan.override(overrides)
    resolved = _validated(plan)
    geometry_params = resolved["model"]["params"]
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    if resolved["model"]["name"] != "unet":
        raise ConfigError(f"model.name={resolved['model']['name']}: segkit init sizes and times the U-Net; train "
                          "another model from a recipe of your own")

    geometry = valid_unet_geometry(int(geometry_params.get("depth", 4)))
    tile = resolved["data"]["tile"]
    _check_tile(geometry, tile, "data.tile")
    planes = val_planes(layout, plan, writes)
    if "train.val_tile" not in overridden:
        val_tile, reason = val_tile_rule(planes, geometry, tile=tile, gpu=gpu)
        plan.set("train.val_tile", val_tile, reason, derived=True)
    val_tile = plan.get("train.val_tile") or tile
    _check_tile(geometry, val_tile, "train.val_tile")
    classes = {"membrane": 2, "instances": 3}.get(fp.kind) or int(resolved["data"]["classes"])
    if timings is None:
        if measure:
            echo(f"timing 3 training iterations (batch {resolved['train']['batch']}, tile {tile}) and one forward pass "
                 f"of a {val_tile} px tile on {written_device} ...")
            timings = measure_timings(params={k: v for k, v in geometry_params.items()}, channels=fp.channels,
                                      classes=classes, tile=tile, batch=resolved["train"]["batch"], val_tile=val_tile,
                                      device=actual_device)
        else:
            timings = nominal_timings(gpu=gpu, base=int(geometry_params.get("base", 64)), tile=tile,
                                      batch=resolved["train"]["batch"], val_tile=val_tile)
    tiles = tile_count(planes, geometry, val_tile)
    budget = resolved["train"]["time_limit_min"] or minutes
    fixed_epochs = resolved["train"]["epochs"] if "train.epochs" in overridden else None
    epochs, iters, ema, val_s = schedule(budget, timings, tiles, epochs=fixed_epochs, kind=fp.kind)
    factor = f"x{POSTPROCESSING_FACTOR[fp.kind]:g} for post-processing"
    echo(f"timings, {timings.note}: {timings.step_s:.3g} s per training iteration, {timings.forward_s:.3g} s per "
         f"{val_tile} px forward; validation about {val_s:.0f} s per epoch ({counted(tiles, 'tile')}, {factor})")
    timing_text = (f"{timings.note}: {timings.step_s:.3g} s per iteration, validation ~{val_s:.0f} s per epoch "
                   f"({counted(tiles, 'tile')} of {val_tile} px, {factor}), budget {budget:g} min")
    schedule_plan(plan, epochs=epochs, iters=iters, ema=ema, timing_text=timing_text)
    if overrides:
        plan.override(overrides)  # the command line wins over the schedule too
    _validated(plan)
    header = [f"Recipe written by `segkit init` from {layout.root}; `segkit train {recipe.name}` runs it as it is.",
              "Every setting says why it was chosen; edit any of them. Fingerprint of the data:", "",
              *(f"  {line}" for line in fp.lines()), ""]
    text = plan.yaml_text(header)
    echo("recipe choices:")
    for section, values in plan.values.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in plan.derived or plan.reasons.get(key) == "set on the command line":
                echo(f"  {key}: {_yaml_value(value)}  # {plan.reasons.get(key, '')}")
    written = _write(recipe, text, writes)
    for path in written:
        echo(f"wrote {path}")
    echo(f"wrote {recipe}")
    return InitResult(recipe, tuple(written), fp, timings, text)


def _check_tile(geometry: Any, tile: int, key: str) -> None:
    try:
        geometry.check_tile(tile)
    except TileSizeError as exc:
        raise ConfigError(f"{key}: " + str(exc).replace("use tile ", f"use {key}=")) from None


def _validated(plan: Plan) -> dict[str, Any]:
    return validate_recipe(plan.values)


def base_plan(fp: Fingerprint, layout: DataLayout, *, gpu: bool, device: str, minutes: float, out: str,
              echo: Callable[[str], None]) -> Plan:
    """Every recipe setting but the split and the schedule, each with its reason."""
    plan = Plan()
    kind = fp.kind
    scale, scale_reason = scale_rule(fp)
    params, tile, tile_reasons = tile_rule(fp, gpu=gpu, scale=scale or 1.0, echo=echo)
    device_kind = "GPU" if gpu else "CPU"
    plan.set("model.name", "unet", "the valid-conv U-Net: exact overlap-tile prediction of images of any size")
    plan.set("model.params", params,
             f"{device_kind}: base width {params['base']}, depth {params['depth']}, batch norm", derived=True)

    plan.set("data.root", str(layout.root), "the data folder (absolute: the recipe runs from any folder)")
    plan.set("data.raw", layout.raw, "the images" + (" (one stack)" if layout.form == "stack" else " (a folder)"))
    plan.set("data.labels", layout.labels, "their labels" + (", paired by file name" if layout.form == "folders" else ""))
    plan.set("data.labels_kind", kind, fp.kind_reason, derived=True)
    if kind == "semantic":
        classes = max(fp.values) + 1
        plan.set("data.classes", classes, f"label values 0..{classes - 1}", derived=True)
    if kind == "instances":
        diameter = (fp.diameters[1] if fp.diameters else TARGET_DIAMETER) * (scale or 1.0)
        width = max(1, round(diameter / 15))
        plan.set("data.boundary_width", width,
                 f"median object {diameter:.0f} px across (after resizing) / 15: the rim trained as boundary, so "
                 "touching objects are parted", derived=True)
    normalization, reason = normalization_rule(fp)
    plan.set("data.normalization", normalization, reason, derived=True)
    if normalization == "percentile":
        plan.set("data.percentiles", [1.0, 99.8], "low / high percentiles mapped to 0 / 1 (as CSBDeep and StarDist)")
    target = fp.common_pixel_size
    if target:
        known = [p for p in fp.pixel_sizes if p is not None]
        plan.set("data.pixel_size", target,
                 f"the images' pixel sizes differ ({min(known):.3g}-{max(known):.3g} um): all rescaled to their "
                 "median; prediction rescales other input the same way", derived=True)
    elif fp.pixel_size_varies:
        echo(f"note: pixel sizes differ between images but none is stored in {counted(fp.uncalibrated, 'image')}, "
             "so data.pixel_size "
             "is left out (calibrate them to have them rescaled)")
    if scale:
        plan.set("data.scale", scale, scale_reason, derived=True)

    plan.set("data.foreground_fraction", SCHEMA["data"]["foreground_fraction"][1],
             "a third of the patches centred on a foreground class (nnU-Net's oversampling), so sparse objects are seen")
    plan.set("data.tile", tile, "; ".join(tile_reasons), derived=True)

    plan.set("augment.on_device", False, "augmentation on the CPU workers")
    plan.set("augment.flips", True, "flips and 90 degree rotations: microscopy has no preferred orientation")
    plan.set("augment.rot90", True)
    plan.set("augment.elastic", True, "elastic deformation (the U-Net paper's key augmentation), albumentations 2.0 units")
    plan.set("augment.elastic_alpha", 1000)
    plan.set("augment.elastic_sigma", 25)
    plan.set("augment.brightness_contrast", 0.2, "brightness/contrast jitter of +-20 %")
    plan.set("augment.noise_std", 0.03, "Gaussian noise, 3 % of the intensity range")

    plan.set("loss.class_balance", True, "class-balance weights n / (K n_c): rare classes weigh as much as common ones")
    if kind == "semantic":
        plan.set("loss.border_w0", 0, "no border weight: semantic classes have no touching objects to part")
        plan.set("loss.border_sigma", 5)
        plan.set("loss.dice_weight", 0.5, "cross-entropy + 0.5 soft Dice over the classes (nnU-Net's CE + Dice)")
    else:
        what = "membranes between cells" if kind == "membrane" else "gaps between touching objects"
        plan.set("loss.border_w0", 10, f"the U-Net paper's border weight (w0 10, sigma 5 px) on {what}")
        plan.set("loss.border_sigma", 5)
        plan.set("loss.dice_weight", 0.5 if kind == "instances" else 0,
                 "cross-entropy + 0.5 soft Dice" if kind == "instances"
                 else "cross-entropy alone (membrane: the paper's weighted loss)")

    plan.set("train.epochs", 1)  # set by schedule_plan
    plan.set("train.iters_per_epoch", 1)
    batch = BATCHES["gpu" if gpu else "cpu"]
    plan.set("train.batch", batch, f"{device_kind}: {batch} patches per iteration"
             + ("" if not gpu else " (no training-memory estimate is available; 8 fits 572 px tiles of a base-32 "
                "U-Net on common GPUs)"))
    plan.set("train.optimizer", "adamw", "AdamW, lr 1e-3, weight decay 0.01, linear warm-up (5 %) then cosine decay")
    plan.set("train.lr", 0.001)
    plan.set("train.weight_decay", DEFAULT_WEIGHT_DECAY["adamw"])
    plan.set("train.schedule", "cosine")
    plan.set("train.warmup", SCHEMA["train"]["warmup"][1])
    plan.set("train.ema_decay", SCHEMA["train"]["ema_decay"][1])  # set by schedule_plan
    plan.set("train.amp", gpu, "mixed precision (bf16 where supported)" if gpu else "full precision on the CPU")
    plan.set("train.device", device, f"the device the timings were made on ({device_kind})", derived=True)
    plan.set("train.seed", 0)
    workers = min(8, cpu_cores()) if gpu else 0
    plan.set("train.workers", workers, "GPU: patch sampling and augmentation in worker processes" if gpu
             else "CPU: patches made in the training process (workers would compete for the same cores)")
    plan.set("train.out", out, "the run folder (relative to where segkit train runs)")
    plan.set("train.val_batch", batch)
    plan.set("train.val_tile", tile)  # set by val_tile_rule once the validation images are known
    plan.set("train.time_limit_min", minutes, "the time budget: training stops there, validated and saved", derived=True)
    return plan


def schedule_plan(plan: Plan, *, epochs: int, iters: int, ema: float, timing_text: str) -> None:
    plan.set("train.epochs", epochs, f"validation about {100 * VALIDATION_SHARE:.0f} % of the budget "
             f"({EPOCHS[0]}-{EPOCHS[1]} epochs); {timing_text}", derived=True)
    plan.set("train.iters_per_epoch", iters, "what fills the budget (a step plus a tenth for sampling) less the "
             "validations (the time limit counts them)", derived=True)
    plan.set("train.ema_decay", ema, "1 - 10 / total iterations (0.9-0.999): the EMA averages the last ~10 % of "
             "the run", derived=True)


def _write(recipe: Path, text: str, writes: dict[Path, list[str]]) -> list[Path]:
    """Write the split files (never over an existing file) and then the recipe, each atomically."""
    written = []
    for path, names in writes.items():
        if path.exists():  # appeared since the name was chosen
            raise InputError(f"split file {path} appeared while segkit init ran; run it again")
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(names) + "\n", encoding="utf-8")
        written.append(path)
    with atomic_path(recipe) as tmp:
        tmp.write_text(text, encoding="utf-8")
        load_recipe(tmp)  # the recipe as written loads and validates, or nothing is left
    return written
