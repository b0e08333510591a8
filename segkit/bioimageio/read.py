"""Run bioimage.io model packages (2D models, spec 0.5; 0.4 is converted on reading) with segkit's
streaming overlap-tile pipeline, on stacks of any size.

    from segkit.bioimageio.read import load_package
    engine = load_package("model.zip")          # a package zip, or the rdf.yaml of an unpacked one
    segkit.predict("stack.tif", "membranes.tif", model=engine)

What segkit takes from the package:

- geometry: the input's y and x sizes (`min + n * step`), the output's size offset (a valid-conv
  model's margin: `offset = -2 * margin`) and its halo (pixels to crop from each tile);
- normalisation: the input's preprocessing, which must be fixed and linear (`ensure_dtype`,
  `fixed_zero_mean_unit_variance`, `scale_linear`); segkit folds it into one (x - mean) / std and
  applies it to whole planes, never to tiles;
- the output's postprocessing (`ensure_dtype`, `scale_linear`, `sigmoid`, `softmax` over channels);
- weights: ONNX (ONNX Runtime, segkit's OnnxEngine), pytorch_state_dict (its architecture, built by
  bioimageio.core) or TorchScript, in that order unless `weights` says which;
- what a segkit package adds in `config.segkit` (kind, classes, inference defaults).

segkit's own packages (those with a checkpoint record in `config.segkit`) run from that record:
the model is built by segkit's registry and given the pytorch_state_dict tensors (read with
`torch.load(weights_only=True)`), with the record's geometry, normalisation (percentile rules too)
and classes, so the result is the checkpoint's. The package's architecture file (`arch.py`) is
never imported or run by segkit. Other packages, and other weight formats of segkit's packages,
run from the description as above.

A package segkit cannot run gets one line naming the field: a 3D or time model, other axes, fixed
or differing y/x sizes, statistics-based or non-linear preprocessing, several inputs or outputs,
weights in other formats, or files given as URLs (segkit downloads nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segkit._optional import require
from segkit.errors import CheckpointError
from segkit.inference.engines import OnnxEngine, TorchEngine
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization
from segkit.record import MODEL_KINDS, CheckpointInfo, InferenceDefaults

#: The weight formats segkit runs, in the order it picks them.
RUNNABLE_WEIGHTS = ("onnx", "pytorch_state_dict", "torchscript")
#: Names of a package's description file.
DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: bioimageio.core's fixed_zero_mean_unit_variance divides by std + eps.
_EPS = 1e-6


class PackageModelError(CheckpointError):
    """A bioimage.io package segkit cannot run, with the field that says why."""


def is_package(path: str | Path) -> bool:
    """Whether `path` names a bioimage.io package, by its name only (nothing is read).

    Parameters
    ----------
    path : str or Path
        A model file.

    Returns
    -------
    bool
        True for a .zip, or an rdf.yaml / bioimageio.yaml (also with a prefix: NAME.rdf.yaml).
    """
    name = Path(path).name.lower()
    return name.endswith(".zip") or name in DESCRIPTION_NAMES or name.endswith((".rdf.yaml", ".bioimageio.yaml"))


@dataclass(frozen=True)
class PackagePlan:
    """How segkit runs a package: its record (geometry, normalisation, kind, classes), the weights
    format, the output channel returned, the postprocessing steps ('sigmoid', 'softmax',
    ('affine', gain, offset)), and whether it runs from segkit's checkpoint record."""

    source: str
    name: str
    info: CheckpointInfo
    weights: str
    channel: int | None
    channels: int
    post: tuple[Any, ...]
    from_record: bool = False  # a segkit package run from its checkpoint record (segkit's registry)


def _fail(field: str, why: str) -> PackageModelError:
    return PackageModelError(f"bioimage.io package field {field}: {why}")


def read_description(source: Any) -> Any:
    """Read a package's description, without downloading anything.

    Parameters
    ----------
    source : str, Path or ModelDescr
        A package (.zip), the rdf.yaml of an unpacked one, or a description (returned as it is).

    Returns
    -------
    ModelDescr
        The description in format 0.5 (0.4 is converted).

    Raises
    ------
    PackageModelError
        The file is missing, not a bioimage.io package, invalid, or describes no model.
    """
    require("bioimageio.spec", feature="running bioimage.io packages", package="segkit-bio[bioimageio]")
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    if isinstance(source, v0_5.ModelDescr):
        return source
    path = Path(source)
    if not path.exists():
        raise PackageModelError(f"model {path} does not exist; pass a bioimage.io package (.zip) or its rdf.yaml")
    try:
        descr = load_description(str(path), format_version="latest", perform_io_checks=False)
    except Exception as exc:  # bioimageio.spec raises ValueError, OSError, BadZipFile, ... for foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PackageModelError(f"{path} is not a bioimage.io package: {first}") from exc
    if isinstance(descr, InvalidDescr):
        raise PackageModelError(f"{path} is not a valid bioimage.io package: "
                                f"{(descr.validation_summary.format() or 'invalid').strip().splitlines()[0][:300]}")
    if not isinstance(descr, v0_5.ModelDescr):
        raise PackageModelError(f"{path} describes a {getattr(descr, 'type', '?')}, not a model")
    return descr


def _space_axes(axes: Any, field: str) -> dict[str, Any]:
    """{'y': axis, 'x': axis} of a (batch, channel, y, x) tensor; PackageModelError for anything else."""
    kinds = [(str(a.type), str(a.id)) for a in axes]
    wanted = [("batch", "batch"), ("channel", "channel"), ("space", "y"), ("space", "x")]
    if kinds != wanted:
        others = [f"{i}" for t, i in kinds if (t, i) not in wanted]
        what = (f"a 3D model (axis {', '.join(others)})" if any(i == "z" for _, i in kinds) else
                f"a time-lapse model (axis {', '.join(others)})" if any(t == "time" for t, _ in kinds) else
                f"axes ({', '.join(i for _, i in kinds)})")
        raise _fail(field, f"{what}; segkit runs 2D models with axes (batch, channel, y, x)")
    return {str(a.id): a for a in axes if str(a.type) == "space"}


def _geometry(descr: Any) -> tuple[Geometry, int]:
    """The segkit geometry of a one-input, one-output package, and its output channel count."""
    from bioimageio.spec.model import v0_5

    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        which = "inputs" if len(descr.inputs) != 1 else "outputs"
        raise _fail(which, f"{len(getattr(descr, which))} tensors; segkit runs models with one input and one output")
    (inp,), (out,) = descr.inputs, descr.outputs
    in_space = _space_axes(inp.axes, "inputs[0].axes")
    out_space = _space_axes(out.axes, "outputs[0].axes")
    if inp.axes[1].size != 1:
        raise _fail("inputs[0].axes[channel]", f"{inp.axes[1].size} input channels; segkit feeds one grey-value "
                                               "channel")
    sizes = {a: in_space[a].size for a in "yx"}
    for a, size in sizes.items():
        if not isinstance(size, v0_5.ParameterizedSize):
            what = f"a fixed size ({size} px)" if isinstance(size, int) else "a size that refers to another tensor"
            raise _fail(f"inputs[0].axes[{a}].size", f"{what}; segkit tiles models whose sizes are min + n * step")
    if (sizes["y"].min, sizes["y"].step) != (sizes["x"].min, sizes["x"].step):
        raise _fail("inputs[0].axes", f"y takes {sizes['y'].min} + {sizes['y'].step}n px, x "
                                      f"{sizes['x'].min} + {sizes['x'].step}n px; segkit runs models whose y and x "
                                      "take the same sizes")
    offsets, halos = set(), set()
    for a in "yx":
        axis = out_space[a]
        size = axis.size
        if not (isinstance(size, v0_5.SizeReference) and str(size.tensor_id) == str(inp.id)
                and str(size.axis_id) == a and axis.scale == in_space[a].scale):
            raise _fail(f"outputs[0].axes[{a}].size", f"the output's {a} size must refer to input {inp.id}'s {a} "
                                                      "at the same scale; segkit runs models whose output is the "
                                                      "input's size, or smaller by a fixed margin")
        offsets.add(size.offset)
        halos.add(getattr(axis, "halo", 0))
    if len(offsets) != 1 or len(halos) != 1:
        raise _fail("outputs[0].axes", "y and x have different offsets or halos; segkit needs the same for both")
    offset, halo = offsets.pop(), halos.pop()
    if offset > 0 or offset % 2:
        raise _fail("outputs[0].axes[y].size.offset", f"{offset}; segkit runs models whose output loses the same "
                                                      "margin on every side (an even offset <= 0)")
    margin, step, smallest = -offset // 2, sizes["y"].step, sizes["y"].min
    if smallest - 2 * margin < 1:
        raise _fail("outputs[0].axes[y].size.offset", f"{offset} leaves no output for the smallest input "
                                                      f"({smallest} px)")
    return Geometry(margin=margin, step=step, min_output=smallest - 2 * margin, halo=halo), out.axes[1].size


def _affine(steps: Any, field: str, *, post: bool = False) -> list[Any]:
    """The processing steps as segkit runs them: ('affine', gain, offset), 'sigmoid', 'softmax'."""
    from bioimageio.spec.model import v0_5

    plan: list[Any] = []
    for i, step in enumerate(steps):
        kwargs = getattr(step, "kwargs", None)
        if isinstance(step, v0_5.EnsureDtypeDescr):
            continue  # segkit computes in float32 throughout
        if isinstance(step, v0_5.FixedZeroMeanUnitVarianceDescr) and isinstance(
                kwargs, v0_5.FixedZeroMeanUnitVarianceKwargs):
            plan.append(("affine", 1.0 / (kwargs.std + _EPS), -kwargs.mean / (kwargs.std + _EPS)))
        elif isinstance(step, v0_5.ScaleLinearDescr) and isinstance(kwargs, v0_5.ScaleLinearKwargs):
            plan.append(("affine", float(kwargs.gain), float(kwargs.offset)))
        elif post and isinstance(step, v0_5.SigmoidDescr):
            plan.append("sigmoid")
        elif post and isinstance(step, v0_5.SoftmaxDescr) and str(step.kwargs.axis) == "channel":
            plan.append("softmax")
        else:
            if post:
                fix = ("segkit applies ensure_dtype, scale_linear, sigmoid and softmax over channels after the model, "
                       "and thresholds itself (--threshold)")
            else:
                fix = ("segkit normalises whole planes with fixed values (ensure_dtype, fixed_zero_mean_unit_variance, "
                       "scale_linear), never with statistics of a tile or plane; normalise the data beforehand")
            per_axis = " along an axis" if kwargs is not None and getattr(kwargs, "axis", None) is not None else ""
            raise _fail(f"{field}[{i}]", f"'{step.id}'{per_axis} is not supported: {fix}")
    return plan


def _normalization(steps: list[Any], field: str) -> Normalization:
    """Fold the affine preprocessing steps into one (x - mean) / std."""
    gain, offset = 1.0, 0.0
    for _, g, o in steps:
        gain, offset = gain * g, offset * g + o
    if gain == 0:
        raise _fail(field, "its scaling multiplies by 0")
    return Normalization(mean=-offset / gain, std=1.0 / gain)


def segkit_record(descr: Any, source: Any) -> CheckpointInfo | None:
    """The checkpoint record a segkit package keeps in `config.segkit.checkpoint`, or None for other packages.

    Parameters
    ----------
    descr : ModelDescr
        The package's description.
    source : str, Path or ModelDescr
        Where it came from, named in errors.

    Returns
    -------
    CheckpointInfo or None
        The record (checked as a checkpoint's is), or None when the package has none.

    Raises
    ------
    PackageModelError
        The package has a segkit record that segkit refuses.
    """
    import json

    config = (descr.config.model_extra or {}).get("segkit") if descr.config is not None else None
    record = config.get("checkpoint") if isinstance(config, dict) else None
    if not isinstance(record, dict) or "pad" not in config:  # packages before arch.py: run from the description
        return None
    try:
        return CheckpointInfo.from_json(json.dumps(record), f"{getattr(source, 'name', source)} (config.segkit)")
    except CheckpointError as exc:
        raise _fail("config.segkit.checkpoint", str(exc)) from exc


def plan_package(source: Any, *, weights: str | None = None, channel: int | None = None,
                 kind: str | None = None) -> tuple[Any, PackagePlan]:
    """Read a package and decide how segkit runs it.

    Parameters
    ----------
    source : str, Path or ModelDescr
        A package (.zip), the rdf.yaml of an unpacked one, or its description.
    weights : {"onnx", "pytorch_state_dict", "torchscript"}, optional
        Default: the first present, in that order.
    channel : int, optional
        The output channel to return when there are several.
    kind : {"segmenter", "denoiser"}, optional
        Default: a segkit package's, else segmenter.

    Returns
    -------
    descr : ModelDescr
        The package's description (format 0.5).
    plan : PackagePlan
        Its record, weights, output channel and postprocessing.

    Raises
    ------
    PackageModelError
        One line naming the field of a package segkit cannot run.
    """
    descr = read_description(source)
    present = [w for w, entry in descr.weights if entry is not None]
    checkpoint = segkit_record(descr, source)
    if weights is None:
        order = RUNNABLE_WEIGHTS if checkpoint is None else ("pytorch_state_dict", *RUNNABLE_WEIGHTS)
        runnable = [w for w in order if w in present]
        if not runnable:
            raise _fail("weights", f"{', '.join(present)}; segkit runs {', '.join(RUNNABLE_WEIGHTS)} weights")
        weights = runnable[0]
    elif weights not in RUNNABLE_WEIGHTS or weights not in present:
        raise _fail("weights", f"weights={weights!r} is not among the package's runnable weights "
                               f"({', '.join(w for w in present if w in RUNNABLE_WEIGHTS) or 'none'})")
    entry = getattr(descr.weights, weights)
    for what, file in ((f"weights.{weights}.source", entry.source),
                       (f"weights.{weights}.architecture.source", getattr(getattr(entry, "architecture", None),
                                                                          "source", None))):
        if file is not None and str(file).lower().startswith(("http://", "https://")):
            raise _fail(what, f"{file} is a URL and segkit downloads nothing; download the package (.zip) first")
    if weights == "onnx" and getattr(entry, "external_data", None) is not None:
        raise _fail("weights.onnx.external_data", "ONNX weights in a separate data file are not supported")
    name = str(getattr(source, "name", source))
    if checkpoint is not None and weights == "pytorch_state_dict":
        if kind is not None and kind != checkpoint.kind:
            raise PackageModelError(f"{name} holds a {checkpoint.kind}, but a {kind} is needed here")
        if channel is not None:
            raise _fail("outputs[0].axes[channel]", "segkit runs its own packages as their checkpoint (membrane "
                                                    "models: the membrane; K classes: every class); leave channel out")
        classes = descr.outputs[0].axes[1].size
        return descr, PackagePlan(source=name, name=descr.name, info=checkpoint, weights=weights, channel=None,
                                  channels=int(classes), post=(), from_record=True)
    geometry, channels = _geometry(descr)
    normalization = _normalization(_affine(descr.inputs[0].preprocessing, "inputs[0].preprocessing"),
                                   "inputs[0].preprocessing")
    post = tuple(_affine(descr.outputs[0].postprocessing, "outputs[0].postprocessing", post=True))
    record = (descr.config.model_extra or {}).get("segkit", {}) if descr.config is not None else {}
    record = record.get("checkpoint", {}) if isinstance(record, dict) else {}
    names = list(descr.outputs[0].axes[1].channel_names)
    if channels > 1 and channel is None:
        raise _fail("outputs[0].axes[channel]", f"{channels} output channels ({', '.join(map(str, names))}); pass "
                                                "channel=N (0-based) to say which one segkit writes")
    if channel is not None and not 0 <= channel < channels:
        raise _fail("outputs[0].axes[channel]", f"channel={channel} is not one of the {channels} output channels "
                                                f"({', '.join(map(str, names))}); pass channel=0 to {channels - 1}")
    kind = kind or str(record.get("kind") or "segmenter")
    if kind not in MODEL_KINDS:
        raise PackageModelError(f"kind={kind!r}: choose segmenter or denoiser")
    chosen = names[channel or 0]
    info = CheckpointInfo(
        kind=kind, model="bioimageio", model_kwargs={"source": str(getattr(source, "name", source)),
                                                     "weights": weights},
        geometry=geometry, normalization=normalization,
        classes=list(record.get("classes") or (["background", str(chosen)] if kind == "segmenter" else [])),
        inference=InferenceDefaults.from_dict({k: v for k, v in dict(record.get("inference") or {}).items()
                                               if k != "tile"}),
    )
    return descr, PackagePlan(source=str(source if not hasattr(source, "name") else source.name), name=descr.name,
                              info=info, weights=weights, channel=channel, channels=channels, post=post)


class PackageEngine:
    """A bioimage.io package as a segkit engine (the engine protocol, plus `geometry` and `info`, so
    `segkit.predict(..., model=engine)` runs it through the streaming pipeline)."""

    def __init__(self, descr: Any, plan: PackagePlan, *, device: str = "auto") -> None:
        import torch

        self.plan, self.info, self.geometry = plan, plan.info, plan.info.geometry
        entry = getattr(descr.weights, plan.weights)
        try:
            data = entry.get_reader().read()
        except Exception as exc:  # a missing or unreadable file inside the package
            raise _fail(f"weights.{plan.weights}.source", f"cannot be read ({exc})") from exc
        if plan.from_record:
            self.inner: Any = TorchEngine(_record_model(self.info, data, plan.weights), device=device,
                                          channel=_record_channel(self.info))
        elif plan.weights == "onnx":
            self.inner = OnnxEngine(data, self.geometry, device=device)
        else:
            if plan.weights == "torchscript":
                import io

                model = torch.jit.load(io.BytesIO(data), map_location="cpu")
            else:
                require("bioimageio.core", feature="pytorch_state_dict weights of bioimage.io packages",
                        package="segkit-bio[bioimageio]")
                from bioimageio.core.backends.pytorch_backend import load_torch_model

                try:
                    model = load_torch_model(entry, devices=["cpu"])
                except Exception as exc:  # the package's own architecture code failed
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    raise _fail(f"weights.{plan.weights}.architecture", f"the model cannot be built: {first}") from exc
            model.geometry = self.geometry  # what TorchEngine reads
            self.inner = TorchEngine(model, device=device, channel=None)
        self.device = self.inner.device
        self.label = f"bioimage.io {plan.weights} via {self.inner.label}"

    def release_memory(self) -> None:
        release = getattr(self.inner, "release_memory", None)
        if release is not None:
            release()

    def __call__(self, x: Any) -> Any:
        import torch

        if self.plan.from_record:  # the checkpoint's model, as segkit runs a checkpoint
            return self.inner(x)
        y = self.inner(x).float()
        for step in self.plan.post:
            if step == "sigmoid":
                y = torch.sigmoid(y)
            elif step == "softmax":
                y = torch.softmax(y, dim=1)
            else:
                y = y * step[1] + step[2]
        if self.plan.channels > 1:
            y = y[:, self.plan.channel: self.plan.channel + 1]
        if self.info.kind == "denoiser":  # segkit's pipeline takes normalised intensities and undoes the normalisation
            y = self.info.normalization.apply(y)
        return y


def _record_channel(info: CheckpointInfo) -> int | str | None:
    """TorchEngine's channel for a record, as segkit runs checkpoints: the membrane, every class, or intensities."""
    if info.kind != "segmenter":
        return None
    return 1 if info.inference.labels_kind == "membrane" else "all"


def _record_model(info: CheckpointInfo, data: bytes, weights: str) -> Any:
    """The record's model from segkit's registry, with the package's state dict (tensors only, no pickled code)."""
    import io

    import torch

    from segkit.models import create_model

    field = f"weights.{weights}.source"
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or damaged files
        raise _fail(field, f"is not a PyTorch state dict of tensors ({str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and k.startswith("model.") for k in state):
        raise _fail(field, "is not a segkit package's state dict (keys model.*)")
    model = create_model(info.model, **info.model_kwargs)
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise _fail(field, f"does not fit the record's {info.model} ({str(exc).splitlines()[0][:200]})") from exc
    return model.eval()


def load_package(source: Any, *, weights: str | None = None, channel: int | None = None, kind: str | None = None,
                 device: str = "auto") -> PackageEngine:
    """A bioimage.io package as an engine for segkit's pipeline (`segkit.predict(..., model=engine)`).

    Parameters
    ----------
    source : str, Path or ModelDescr
        A package (.zip), the rdf.yaml of an unpacked one, or its description.
    weights : {"onnx", "pytorch_state_dict", "torchscript"}, optional
        The weight format to run (default: the first present, in that order).
    channel : int, optional
        The output channel returned when the model has several.
    kind : {"segmenter", "denoiser"}, optional
        Default: a segkit package's, else segmenter.
    device : str
        "auto", "cpu", "cuda" or "cuda:N".

    Returns
    -------
    PackageEngine
        The engine, with `geometry` and `info`.

    Raises
    ------
    PackageModelError
        One line naming the field of a package segkit cannot run.
    """
    descr, plan = plan_package(source, weights=weights, channel=channel, kind=kind)
    return PackageEngine(descr, plan, device=device)
