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
- what a segkit package adds in `config.segkit` (kind, classes, inference defaults);
- the tile prediction takes unless told (`PackagePlan.tile_note` says which): the checkpoint's trained
  tile where segkit runs its own package from the record, else the package's test tile
  (`config.segkit.test_tile`), else the size of its test input where that is a valid size, else
  segkit's default for its sizes.

segkit's own packages (those with a checkpoint record in `config.segkit`) run from that record:
the model is built by segkit's registry and given the pytorch_state_dict tensors (read with
`torch.load(weights_only=True)`), with the record's geometry, normalisation (percentile rules too)
and classes, so the result is the checkpoint's. The package's architecture file (`arch.py`) is
never imported or run by segkit. Other packages, and other weight formats of segkit's packages,
run from the description as above.

Trust: a model file is data, not a program. segkit never imports or runs Python code that comes
from a package (a pytorch_state_dict architecture `source` file or `import_from` callable, or
TorchScript, which is a program too) unless the caller opts in (`trust_model_code=True`,
`segkit predict --trust-model-code`); without it a foreign package runs from its ONNX weights, and
one without them is refused with the field that carries code. Every file a package names is read
from inside the package (no absolute or `..` paths, no symlinks, no fall-back to a local file),
after caps on the zip's member count and uncompressed size, and a weight file larger than the
memory available is refused before it is read. rdf.yaml is parsed with the recipes' alias-bomb
guard first, and `config.segkit` and the package's defaults are checked as a checkpoint record's are.

A package segkit cannot run gets one line naming the field: a 3D or time model, other axes, fixed
or differing y/x sizes, statistics-based or non-linear preprocessing, several inputs or outputs,
weights in other formats, files given as URLs (segkit downloads nothing) or missing from the package,
or a description bioimageio.spec refuses (the field as rdf.yaml writes it, and its value:
`segkit.bioimageio.problems`).
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from segkit._optional import require
from segkit.errors import CheckpointError, ConfigError
from segkit.inference.engines import OnnxEngine, TorchEngine
from segkit.memory import available_memory, format_bytes
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization
from segkit.record import (
    MODEL_KINDS,
    CheckpointInfo,
    InferenceDefaults,
    check_inference_defaults,
    check_normalization_record,
)
from segkit.words import counted

#: The weight formats segkit runs, in the order it picks them.
RUNNABLE_WEIGHTS = ("onnx", "pytorch_state_dict", "torchscript")
#: Names of a package's description file.
DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: bioimageio.core's fixed_zero_mean_unit_variance divides by std + eps.
_EPS = 1e-6
#: Caps on a package zip, checked from its directory before any member is read.
MAX_PACKAGE_BYTES = 4 << 30
MAX_PACKAGE_MEMBERS = 10_000
#: The largest description (rdf.yaml) read.
MAX_DESCRIPTION_BYTES = 16 << 20
#: The largest input tile side (min or step of a package's input size) segkit plans with.
MAX_TILE_SIDE = 16384
#: The opt-in to running a package's code, as Python names it (the CLI's messages say --trust-model-code:
#: segkit.cli.cli_message; the napari widget's, its Trust model code box).
TRUST_OPTION = "trust_model_code=True"


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
    """How segkit runs a package: its record (geometry, normalisation, kind, classes, and as its
    inference tile the tile the package records), the weights format, the output channel returned,
    the postprocessing steps ('sigmoid', 'softmax', ('affine', gain, offset)), and whether it runs
    from segkit's checkpoint record."""

    source: str
    name: str
    info: CheckpointInfo
    weights: str
    channel: int | None
    channels: int
    post: tuple[Any, ...]
    from_record: bool = False  # a segkit package run from its checkpoint record (segkit's registry)
    code: str | None = None  # the field and value of the package's code that runs (trust_model_code only)
    tile_note: str = ""  # the tile prediction takes unless told (`info.inference.tile`), and why


def _fail(field: str, why: str) -> PackageModelError:
    return PackageModelError(f"bioimage.io package field {field}: {why}")


def _member_name(file: Any, field: str) -> str:
    """The path of a file a package names, relative to the package and inside it; PackageModelError for
    an absolute path, a `..`, a URL, or a path bioimageio.spec resolved outside the package."""
    from bioimageio.spec._internal.io import RelativeFilePath

    if not isinstance(file, RelativeFilePath):
        raise _fail(field, f"{str(file)[:200]} is not a file inside the package; segkit reads a package's files from "
                           "the package only (no absolute paths, URLs or local files)")
    name = str(file.path if hasattr(file, "path") else file).replace("\\", "/")
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or ":" in parts[0]:
        raise _fail(field, f"{name[:200]} is outside the package; segkit reads a package's files from the package only")
    return "/".join(p for p in parts if p != ".")


def _holds(package: Path, name: str) -> bool:
    """Whether a package holds the file `name`: a member of the zip, or a file (or link, refused when read)
    beside an unpacked package's rdf.yaml."""
    if package.suffix.lower() != ".zip":
        return os.path.lexists(package.parent / name)
    try:
        with zipfile.ZipFile(package) as zf:
            return name in set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageModelError(f"{package} is not a bioimage.io package: {str(exc)[:200]}") from exc


def _missing_file(package: Path, field: str, name: str) -> PackageModelError:
    """The error for a file a package names but does not hold (segkit never reads a local file instead)."""
    return PackageModelError(f"{package.name} names {field}: {name} but the package has no such file; the package is "
                             "incomplete: get or build it again (segkit reads a package's files from the package only)")


def _bad_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member may not be in a package (an absolute or `..` name, a symlink), or None."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or ".." in PurePosixPath(name).parts or ":" in name.split("/")[0]:
        return "a name outside the package"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def check_package_files(path: Path) -> bytes:
    """Check a package before bioimageio.spec reads it, and return its description's text.

    A zip: at most MAX_PACKAGE_MEMBERS members of at most MAX_PACKAGE_BYTES in all (declared
    uncompressed sizes, read from the zip's directory: nothing is decompressed), no absolute or
    `..` names and no symlinks. An unpacked package: its rdf.yaml is a regular file. The
    description (at most MAX_DESCRIPTION_BYTES) is parsed with the recipes' YAML guard (aliases
    capped, plain data only), so an alias bomb anywhere in it is refused before it expands.

    Parameters
    ----------
    path : Path
        A package zip or the rdf.yaml of an unpacked one.

    Returns
    -------
    bytes
        The description's text.

    Raises
    ------
    PackageModelError
        One line naming the cap or the member.
    """
    from segkit.config import parse_yaml

    if path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_PACKAGE_MEMBERS:
                    raise PackageModelError(f"{path} holds {len(infos)} files; segkit opens packages of at most "
                                            f"{MAX_PACKAGE_MEMBERS} files")
                total = sum(info.file_size for info in infos)
                if total > MAX_PACKAGE_BYTES:
                    raise PackageModelError(f"{path} unpacks to {format_bytes(total)}; segkit opens packages of at most "
                                            f"{format_bytes(MAX_PACKAGE_BYTES)} (a zip bomb?)")
                for info in infos:
                    why = _bad_member(info)
                    if why is not None:
                        raise PackageModelError(f"{path} holds {info.filename[:200]!r}, {why}; segkit opens "
                                                "packages whose files are plain files inside them")
                names = {info.filename: info for info in infos}
                found = next((names[n] for n in DESCRIPTION_NAMES if n in names), None)
                if found is None:
                    raise PackageModelError(f"{path} is not a bioimage.io package: it holds no rdf.yaml")
                if found.file_size > MAX_DESCRIPTION_BYTES:
                    raise PackageModelError(f"{path}: its {found.filename} is {format_bytes(found.file_size)}; a "
                                            f"description holds at most {format_bytes(MAX_DESCRIPTION_BYTES)}")
                text = _read_member(zf, found, MAX_DESCRIPTION_BYTES)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise PackageModelError(f"{path} is not a bioimage.io package: {str(exc)[:200]}") from exc
        where = found.filename
    else:
        text = _read_local(path.parent, path.name, "rdf.yaml", MAX_DESCRIPTION_BYTES, what="description")
        where = path.name
    try:
        parse_yaml(text.decode("utf-8", errors="replace"))
    except ConfigError as exc:
        raise PackageModelError(f"{path}: its {where} is refused: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and the like: bioimageio.spec names the problem better
        del exc
    return text


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A zip member's bytes, read in pieces and never beyond its declared size or `limit`."""
    chunks, total = [], 0
    with zf.open(info) as handle:
        while chunk := handle.read(1 << 20):
            total += len(chunk)
            if total > min(limit, info.file_size):
                raise PackageModelError(f"{info.filename} unpacks to more than its declared "
                                        f"{format_bytes(info.file_size)}; the package is damaged")
            chunks.append(chunk)
    return b"".join(chunks)


def _local_file(root: Path, name: str, field: str) -> Path:
    """A file of an unpacked package, `root/name`: a regular file with no symlink on the way."""
    path = root
    for part in PurePosixPath(name).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            raise _fail(field, f"{name} is not in the package ({exc.strerror})") from exc
        if stat.S_ISLNK(mode):
            raise _fail(field, f"{name} is a symbolic link; segkit reads a package's files from the package only")
    if not stat.S_ISREG(mode):
        raise _fail(field, f"{name} is not a regular file")
    return path


def _read_local(root: Path, name: str, field: str, limit: int, *, what: str = "file") -> bytes:
    """The bytes of a file of an unpacked package (`_local_file`), at most `limit`."""
    path = _local_file(root, name, field)
    size = os.lstat(path).st_size
    if size > limit:
        raise _fail(field, f"{name} is {format_bytes(size)}; the {what} may hold at most {format_bytes(limit)}")
    with open(path, "rb") as handle:
        return handle.read(limit + 1)


def _memory_limit() -> int:
    """The largest weight file read into memory: what is available now (MAX_PACKAGE_BYTES if unknown)."""
    available = available_memory()
    return MAX_PACKAGE_BYTES if available is None else min(MAX_PACKAGE_BYTES, available // 2)


def read_package_file(source: Any, file: Any, field: str) -> bytes:
    """The bytes of a file a package names, from inside the package only.

    Parameters
    ----------
    source : str, Path or ModelDescr
        The package (.zip), the rdf.yaml of an unpacked one, or a description object (whose
        files are read as bioimageio.spec resolves them: its caller built it).
    file : FileDescr
        The entry naming the file (its `source`), e.g. a weights entry.
    field : str
        Its field, named in errors.

    Returns
    -------
    bytes
        The file's content.

    Raises
    ------
    PackageModelError
        The file is outside the package, missing from it (nothing local is read instead), a
        symlink, or larger than the memory available.
    """
    if not isinstance(source, (str, Path)):
        try:
            return file.get_reader().read()
        except Exception as exc:  # a missing or unreadable file
            raise _fail(field, f"cannot be read ({str(exc)[:200]})") from exc
    path, name, limit = Path(source), _member_name(file.source, field), _memory_limit()
    if path.suffix.lower() != ".zip":
        return _read_local(path.parent, name, field, limit, what="weight file")
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise _missing_file(path, field, name) from None
            if info.file_size > limit:
                raise _fail(field, f"{name} unpacks to {format_bytes(info.file_size)}, more than segkit reads into "
                                   f"memory here ({format_bytes(limit)})")
            return _read_member(zf, info, limit)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _fail(field, f"cannot be read ({str(exc)[:200]})") from exc


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
        The file is missing, not a bioimage.io package, invalid, or describes no model; the zip
        breaks the caps or holds links or outside names; its YAML is an alias bomb
        (`check_package_files`).
    """
    require("bioimageio.spec", feature="running bioimage.io packages", package="segkit-bio[bioimageio]")
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    if isinstance(source, v0_5.ModelDescr):
        return source
    path = Path(source)
    if not path.exists():
        raise PackageModelError(f"model {path} does not exist; pass a bioimage.io package (.zip) or its rdf.yaml")
    text = check_package_files(path)
    try:
        descr = load_description(str(path), format_version="latest", perform_io_checks=False)
    except Exception as exc:  # bioimageio.spec raises ValueError, OSError, BadZipFile, ... for foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PackageModelError(f"{path} is not a bioimage.io package: {first}") from exc
    if isinstance(descr, InvalidDescr):
        raise PackageModelError(f"{path} is not a valid bioimage.io package: its field {_invalid(descr, text)}; "
                                "correct it in the package's rdf.yaml or ask its authors for a valid package "
                                f"(`bioimageio validate-format {path.name}` lists every problem)")
    if not isinstance(descr, v0_5.ModelDescr):
        raise PackageModelError(f"{path} describes a {getattr(descr, 'type', '?')}, not a model")
    return descr


def _invalid(descr: Any, text: bytes) -> str:
    """What bioimageio.spec refuses in a description, in one phrase naming the field and its value."""
    from segkit.bioimageio.problems import first_problem
    from segkit.config import parse_yaml

    summary = descr.validation_summary
    try:
        raw = parse_yaml(text.decode("utf-8", errors="replace"))
    except Exception:  # noqa: BLE001 - YAML bioimageio.spec read but the guard's loader does not: no values then
        raw = None
    errors = [e for detail in summary.details for e in detail.errors]
    problem = first_problem(errors, raw)
    if problem is None:  # no error names a field of the file: bioimageio.spec's first message
        problem = (f"{'.'.join(map(str, errors[0].loc)) or 'rdf.yaml'}: {str(errors[0].msg).splitlines()[0][:200]}"
                   if errors else "rdf.yaml: refused by bioimageio.spec")
    return problem


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
    for a, size in sizes.items():
        if size.min > MAX_TILE_SIDE or size.step > MAX_TILE_SIDE:
            raise _fail(f"inputs[0].axes[{a}].size", f"min {size.min}, step {size.step} px; segkit tiles with sides of at "
                                                     f"most {MAX_TILE_SIDE} px")
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


#: What a package whose `config.segkit` segkit refuses is told.
_EDITED = "the package is damaged or was edited: use another one"
#: The record's field in a package.
_RECORD = "config.segkit.checkpoint"


def _segkit_config(descr: Any) -> dict[str, Any]:
    """A package's `config.segkit` (empty when there is none); PackageModelError when it, or its
    checkpoint entry, is not a mapping."""
    extra = (descr.config.model_extra or {}) if descr.config is not None else {}
    config = extra.get("segkit")
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise _fail("config.segkit", f"is a {type(config).__name__}, not a mapping; {_EDITED}")
    record = config.get("checkpoint")
    if record is not None and not isinstance(record, Mapping):
        raise _fail(_RECORD, f"is a {type(record).__name__}, not a mapping; {_EDITED}")
    test_tile = config.get("test_tile")
    if test_tile is not None and (isinstance(test_tile, bool) or not isinstance(test_tile, int) or test_tile < 1):
        raise _fail("config.segkit.test_tile", f"{str(test_tile)[:50]!r} is not a tile size (px); {_EDITED}")
    return dict(config)


def _record_values(record: Mapping[str, Any], source: str) -> tuple[str | None, list[str] | None, InferenceDefaults]:
    """The kind, class names and inference defaults (its tile left out) of a package's `config.segkit.checkpoint`,
    their types and values checked as a checkpoint record's are, one line naming the field."""
    stored_kind = record.get("kind")
    if stored_kind is not None and stored_kind not in MODEL_KINDS:
        raise _fail(f"{_RECORD}.kind", f"{str(stored_kind)[:100]!r} is not segmenter or denoiser; {_EDITED}")
    classes = record.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise _fail(f"{_RECORD}.classes", f"{str(classes)[:100]} is not a list of class names; {_EDITED}")
    inference = record.get("inference")
    if inference is not None and not isinstance(inference, Mapping):
        raise _fail(f"{_RECORD}.inference", f"is a {type(inference).__name__}, not a mapping of defaults; {_EDITED}")
    try:
        defaults = InferenceDefaults.from_dict({k: v for k, v in dict(inference or {}).items() if k != "tile"})
        # the tile is left out (a record's tile is checked against the record's geometry, by CheckpointInfo),
        # so the geometry given here is never read
        check_inference_defaults(defaults, Geometry(margin=0, step=1, min_output=1), source, _EDITED)
    except (TypeError, CheckpointError) as exc:
        raise _fail(f"{_RECORD}.inference", str(exc).splitlines()[0][:300]) from exc
    for key, value in (defaults.watershed or {}).items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(f"{_RECORD}.inference.watershed", f"{str(key)[:50]}: {str(value)[:50]!r} is not a number; "
                                                          f"{_EDITED}")
    return stored_kind, classes, defaults


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
        The package has a segkit record that segkit refuses, or a `config.segkit` that is not a mapping.
    """
    import json
    import re

    config = _segkit_config(descr)
    record = config.get("checkpoint")
    if record is None or "pad" not in config:  # packages before arch.py: run from the description
        return None
    name = Path(str(getattr(source, "name", source))).name
    _record_values(record, name)
    try:
        return CheckpointInfo.from_json(json.dumps(record), f"{name} ({_RECORD})")
    except (CheckpointError, TypeError, ValueError) as exc:
        # a checkpoint's fix (train again) is not a package's
        problem = re.sub(r"; the checkpoint is damaged.*$", "", str(exc).splitlines()[0][:300])
        raise _fail(_RECORD, f"{problem}; {_EDITED}") from exc


def _package_defaults(descr: Any, normalization: Normalization, source: str,
                      kind: str | None) -> tuple[str, list[str] | None, InferenceDefaults]:
    """The kind, class names and inference defaults a foreign-run package keeps in
    `config.segkit.checkpoint`, checked as a checkpoint record's are (`segkit.record`)."""
    stored_kind, classes, defaults = _record_values(dict(_segkit_config(descr).get("checkpoint") or {}), source)
    kind = kind or str(stored_kind or "segmenter")
    if kind not in MODEL_KINDS:
        raise PackageModelError(f"kind={kind!r}: choose segmenter or denoiser")
    try:
        check_normalization_record(normalization.mean, normalization.std, source, _EDITED)
    except CheckpointError as exc:
        raise _fail("inputs[0].preprocessing", str(exc)) from exc
    return kind, classes, defaults


def _npy_shape(package: Path, name: str) -> tuple[int, ...] | None:
    """The shape in the header of a .npy file a package holds (nothing more is read); None when it cannot be
    read (missing, a link, not .npy)."""
    import numpy as np

    def shape(handle: Any) -> tuple[int, ...] | None:
        version = np.lib.format.read_magic(handle)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        return None if read is None else tuple(read(handle)[0])

    try:
        if package.suffix.lower() == ".zip":
            with zipfile.ZipFile(package) as zf, zf.open(name) as handle:
                return shape(handle)
        with open(_local_file(package.parent, name, "inputs[0].test_tensor"), "rb") as handle:
            return shape(handle)
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, PackageModelError):
        return None


def _recorded_tile(descr: Any, source: Any, geometry: Geometry) -> tuple[int, str]:
    """The tile segkit runs a package's description with, unless told, and why: its test tile (`config.segkit.test_tile`,
    segkit's packages), else the side of its test input where that is a valid size, else segkit's default."""
    test_tile = _segkit_config(descr).get("test_tile")
    if test_tile is not None:
        if not geometry.is_valid_input(test_tile):
            raise _fail("config.segkit.test_tile", f"{test_tile} is not a valid input size of the package "
                                                   f"({geometry.min_input} + {geometry.step}n px); {_EDITED}")
        return test_tile, "the package's test tile (config.segkit.test_tile)"
    shape = None
    test_tensor = getattr(descr.inputs[0], "test_tensor", None)
    if isinstance(source, (str, Path)) and test_tensor is not None:
        try:
            shape = _npy_shape(Path(source), _member_name(test_tensor.source, "inputs[0].test_tensor"))
        except PackageModelError:
            shape = None  # outside the package: never read
    if shape is not None and len(shape) == 4:
        side = min(shape[2:])
        if geometry.is_valid_input(side):
            return side, f"the size of the package's test input (inputs[0].test_tensor, {shape[2]} x {shape[3]} px)"
    tile = geometry.default_tile
    return tile, (f"segkit's default for the package's sizes ({geometry.min_input} + {geometry.step}n px): the package "
                  "records no tile (no config.segkit.test_tile, no test input of a valid size)")


def code_field(entry: Any, weights: str) -> tuple[str, str] | None:
    """The field of a weights entry that carries Python code segkit would have to run, and its value:
    TorchScript (a program), a pytorch_state_dict architecture from a file or from an importable
    callable; None for ONNX (a graph of operators, run by ONNX Runtime)."""
    if weights == "torchscript":
        return "weights.torchscript.source", str(entry.source)
    architecture = getattr(entry, "architecture", None)
    if architecture is None:
        return None
    if getattr(architecture, "source", None) is not None:
        return "weights.pytorch_state_dict.architecture.source", str(architecture.source)
    return ("weights.pytorch_state_dict.architecture.import_from",
            f"{getattr(architecture, 'import_from', '?')}.{getattr(architecture, 'callable', '?')}")


def _refuse_code(field: str, value: str, present: list[str]) -> PackageModelError:
    if "onnx" in present:
        safe = "the package's ONNX weights run without it: pass weights='onnx' (or leave weights out)"
    else:
        safe = "the package has no ONNX weights (weights.onnx), which segkit would run without it"
    return _fail(field, f"{value[:200]} is code that segkit would run, and segkit runs a model file's code only with "
                        f"{TRUST_OPTION}: trust the package like a program you install, since its code can do anything "
                        f"your account can; {safe}")


def plan_package(source: Any, *, weights: str | None = None, channel: int | None = None,
                 kind: str | None = None, trust_model_code: bool = False) -> tuple[Any, PackagePlan]:
    """Read a package and decide how segkit runs it.

    Parameters
    ----------
    source : str, Path or ModelDescr
        A package (.zip), the rdf.yaml of an unpacked one, or its description.
    weights : {"onnx", "pytorch_state_dict", "torchscript"}, optional
        Default: the first present, in that order (segkit's own packages: their pytorch_state_dict
        first, run from the record); without `trust_model_code`, only weights that need no code
        from the package.
    channel : int, optional
        The output channel to return when there are several.
    kind : {"segmenter", "denoiser"}, optional
        Default: a segkit package's, else segmenter.
    trust_model_code : bool
        Allow weights whose Python code comes from the package (TorchScript, a pytorch_state_dict
        architecture); without it those are refused, naming the field.

    Returns
    -------
    descr : ModelDescr
        The package's description (format 0.5).
    plan : PackagePlan
        Its record, weights, output channel and postprocessing.

    Raises
    ------
    PackageModelError
        One line naming the field of a package segkit cannot run, or will not run without the opt-in.
    """
    descr = read_description(source)
    present = [w for w, entry in descr.weights if entry is not None]
    checkpoint = segkit_record(descr, source)

    def code(w: str) -> tuple[str, str] | None:
        if checkpoint is not None and w == "pytorch_state_dict":
            return None  # segkit's registry and the record: the package's arch.py is never imported
        return code_field(getattr(descr.weights, w), w)

    if weights is None:
        order = RUNNABLE_WEIGHTS if checkpoint is None else ("pytorch_state_dict", *RUNNABLE_WEIGHTS)
        runnable = [w for w in order if w in present]
        if not runnable:
            raise _fail("weights", f"{', '.join(present)}; segkit runs {', '.join(RUNNABLE_WEIGHTS)} weights")
        safe = [w for w in runnable if code(w) is None]
        if not safe and not trust_model_code:
            raise _refuse_code(*code(runnable[0]), present)  # type: ignore[misc]
        weights = runnable[0] if trust_model_code else safe[0]
    elif weights not in RUNNABLE_WEIGHTS or weights not in present:
        raise _fail("weights", f"weights={weights!r} is not among the package's runnable weights "
                               f"({', '.join(w for w in present if w in RUNNABLE_WEIGHTS) or 'none'})")
    carries = code(weights)
    if carries is not None and not trust_model_code:
        raise _refuse_code(*carries, present)
    entry = getattr(descr.weights, weights)
    files = [(f"weights.{weights}.source", entry.source)]
    if carries is not None and carries[0].endswith("architecture.source"):
        files.append((carries[0], entry.architecture.source))
    for what, file in files:
        if str(file).lower().startswith(("http://", "https://")):
            raise _fail(what, f"{file} is a URL and segkit downloads nothing; download the package (.zip) first")
        if isinstance(source, (str, Path)) and not _holds(Path(source), _member_name(file, what)):
            raise _missing_file(Path(source), what, _member_name(file, what))
    if weights == "onnx" and getattr(entry, "external_data", None) is not None:
        raise _fail("weights.onnx.external_data", "ONNX weights in a separate data file are not supported")
    name = str(getattr(source, "name", source))
    note = f"{carries[0]} {carries[1]}" if carries is not None else None
    if checkpoint is not None and weights == "pytorch_state_dict":
        if kind is not None and kind != checkpoint.kind:
            raise PackageModelError(f"{name} holds a {checkpoint.kind}, but a {kind} is needed here")
        if channel is not None:
            raise _fail("outputs[0].axes[channel]", "segkit runs its own packages as their checkpoint (membrane "
                                                    "models: the membrane; K classes: every class); leave channel out")
        _geometry(descr)  # a description segkit would refuse is refused here too, though the record runs
        classes = descr.outputs[0].axes[1].size
        if checkpoint.inference.tile is not None:
            why = f"the tile its checkpoint was trained with ({_RECORD}.inference.tile)"
        else:
            why = f"segkit's default for the model: {_RECORD} records no tile"
        tile = int(checkpoint.inference.tile or checkpoint.geometry.default_tile)
        return descr, PackagePlan(source=name, name=descr.name, info=checkpoint, weights=weights, channel=None,
                                  channels=int(classes), post=(), from_record=True,
                                  tile_note=f"tiles of {tile} px, {why}")
    geometry, channels = _geometry(descr)
    normalization = _normalization(_affine(descr.inputs[0].preprocessing, "inputs[0].preprocessing"),
                                   "inputs[0].preprocessing")
    post = tuple(_affine(descr.outputs[0].postprocessing, "outputs[0].postprocessing", post=True))
    kind, classes, defaults = _package_defaults(descr, normalization, name, kind)
    tile, why = _recorded_tile(descr, source, geometry)
    names = list(descr.outputs[0].axes[1].channel_names)
    if channels > 1 and channel is None:
        raise _fail("outputs[0].axes[channel]", f"{channels} output channels ({', '.join(map(str, names))}); pass "
                                                "channel=N (0-based) to say which one segkit writes")
    if channel is not None and not 0 <= channel < channels:
        raise _fail("outputs[0].axes[channel]", f"channel={channel} is not one of the {counted(channels, 'output channel')} "
                                                f"({', '.join(map(str, names))}); pass channel=0 to {channels - 1}")
    chosen = names[channel or 0]
    info = CheckpointInfo(
        kind=kind, model="bioimageio", model_kwargs={"source": name, "weights": weights},
        geometry=geometry, normalization=normalization,
        classes=list(classes or (["background", str(chosen)] if kind == "segmenter" else [])),
        inference=defaults.replace(tile=tile),  # the tile prediction takes unless told
    )
    return descr, PackagePlan(source=name, name=descr.name, info=info, weights=weights, channel=channel,
                              channels=channels, post=post, code=note, tile_note=f"tiles of {tile} px, {why}")


class PackageEngine:
    """A bioimage.io package as a segkit engine (the engine protocol, plus `geometry` and `info`, so
    `segkit.predict(..., model=engine)` runs it through the streaming pipeline)."""

    def __init__(self, descr: Any, plan: PackagePlan, *, device: str = "auto", source: Any = None) -> None:
        self.plan, self.info, self.geometry = plan, plan.info, plan.info.geometry
        entry = getattr(descr.weights, plan.weights)
        # from inside the package only, its size checked against the memory available before it is read
        data = read_package_file(descr if source is None else source, entry, f"weights.{plan.weights}.source")
        if plan.from_record:
            self.inner: Any = TorchEngine(_record_model(self.info, data, plan.weights), device=device,
                                          channel=_record_channel(self.info))
        elif plan.weights == "onnx":
            self.inner = OnnxEngine(data, self.geometry, device=device)
        else:
            if plan.weights == "torchscript":
                model = _load_torchscript(data)
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


def _load_torchscript(data: bytes) -> Any:
    """A TorchScript module from its bytes, without torch's FutureWarning that torch.jit.load is deprecated
    (a note for code that calls it, not for someone running a package); other warnings still show."""
    import io
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


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
                 device: str = "auto", trust_model_code: bool = False,
                 report: Callable[[str], object] | None = None) -> PackageEngine:
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
    trust_model_code : bool
        Allow weights whose Python code comes from the package (TorchScript, a pytorch_state_dict
        architecture); without it segkit runs ONNX weights (or its own packages' record) only.
    report : callable, optional
        Takes the one-line note said when the package's code runs.

    Returns
    -------
    PackageEngine
        The engine, with `geometry` and `info`.

    Raises
    ------
    PackageModelError
        One line naming the field of a package segkit cannot run.
    """
    descr, plan = plan_package(source, weights=weights, channel=channel, kind=kind, trust_model_code=trust_model_code)
    if plan.code is not None and report is not None:
        report(f"note: running the Python code of package {plan.source} ({plan.code}), with {TRUST_OPTION}")
    return PackageEngine(descr, plan, device=device, source=source)
