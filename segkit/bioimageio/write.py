"""bioimage.io model packages (model spec 0.5) of segkit checkpoints.

A package is a zip holding `rdf.yaml` and the files it names; Fiji (deepImageJ), ilastik, napari,
QuPath, BiaPy and bioimageio.core run it without segkit. What a segkit package holds:

- one input `raw` with axes (batch, channel, y, x) in the units the model was trained on; its y and
  x sizes are `min + n * step` from the model's geometry (188 + 16n for the valid-conv U-Net,
  multiples of 32 for FCN and smp models), and its preprocessing is the checkpoint's fixed mean and
  std (`fixed_zero_mean_unit_variance`);
- one output (`membrane_probability` of a segmenter, `denoised` of a denoiser, in raw units) whose
  y and x sizes refer to the input's: `offset = -2 * margin` for valid-conv models (the model crops
  its border itself), and `halo` for same-padding models (pixels of context a consumer crops away);
- weights: `pytorch_state_dict` (the checkpoint's tensors; the architecture is imported from
  segkit), `torchscript` (the traced inference head) and `onnx` (`segkit.export.export_onnx`,
  checked against torch); each is checked against torch before it is packaged;
- test input and output tensors (.npy, and as TIFF sample tensors): one tile of the bundled ISBI 2012
  crop and what the model gives for it; a cover (the test tile beside the prediction), a README with a Validation
  section, license, authors and citations (the architecture's paper and the ISBI 2012 data);
- `config.segkit`: the checkpoint's record, so segkit can read its geometry back.

The description is validated by bioimageio.spec and the written zip is tested with
bioimageio.core (every weight format reproduces the test output and runs at other sizes and batch
sizes) before it is moved into place. Nothing is downloaded: the package refers to local files and
DOIs only, and validation runs without remote checks.

Needs the optional extra: pip install 'segkit-bio[bioimageio]'. bioimageio, torch and the torch-backed
models.compose are imported by the functions that write a package, so `from segkit import predict`
(which reaches this module through the package reader) loads none of them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.checkpoint import load_model, read_info
from segkit.errors import OutputError, SegkitError, TileSizeError
from segkit.export import export_onnx, inference_head
from segkit.io.outputs import atomic_path, check_output
from segkit.models import COMPOSED, create_model
from segkit.normalization import mean_std_normalization
from segkit.record import MODEL_KINDS, CheckpointInfo
from segkit.version import DISTRIBUTION, __version__

#: bioimage.io packages are zip files.
PACKAGE_SUFFIX = ".zip"
#: The weight formats a segkit package holds; the first is the original (the others' parent).
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
#: Converted weights (torchscript, ONNX) must match the torch model this closely (max abs difference).
TOLERANCE = 1e-4
#: The input tensor's id in rdf.yaml (the output's is `<class>_probability` or `denoised`).
INPUT_ID = "raw"
#: Pixels of the ISBI 2012 crop (segkit/data/isbi_test_raw.tif) the test tile is cut from.
SAMPLE = Path(__file__).parents[1] / "data" / "isbi_test_raw.tif"
#: A cover's short side is scaled up to at least this many pixels (test tiles of tiny models are small).
COVER_MIN_SIDE = 256

#: What to cite, by model family; the ISBI 2012 data (the test tensors' source) is cited for every package.
UNET_CITE = ("Ronneberger O, Fischer P, Brox T (2015). U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI 2015, LNCS 9351, 234-241.", "10.1007/978-3-319-24574-4_28")
FCN_CITE = ("Long J, Shelhamer E, Darrell T (2015). Fully Convolutional Networks for Semantic Segmentation. "
            "CVPR 2015, 3431-3440.", "10.1109/CVPR.2015.7298965")
RESNET_CITE = ("He K, Zhang X, Ren S, Sun J (2016). Deep Residual Learning for Image Recognition. CVPR 2016, "
               "770-778.", "10.1109/CVPR.2016.90")
DAE_CITE = ("Vincent P, Larochelle H, Bengio Y, Manzagol P-A (2008). Extracting and Composing Robust Features with "
            "Denoising Autoencoders. ICML 2008, 1096-1103.", "10.1145/1390156.1390294")
NOISE2VOID_CITE = ("Krull A, Buchholz T-O, Jug F (2019). Noise2Void - Learning Denoising From Single Noisy Images. "
                   "CVPR 2019, 2129-2137.", "10.1109/CVPR.2019.00223")
DATA_CITES = (
    ("Cardona A, Saalfeld S, Preibisch S, Schmid B, Cheng A, Pulokas J, Tomancak P, Hartenstein V (2010). An "
     "Integrated Micro- and Macroarchitectural Analysis of the Drosophila Brain by Computer-Assisted Serial Section "
     "Electron Microscopy. PLoS Biology 8(10): e1000502 (the ISBI 2012 EM data).", "10.1371/journal.pbio.1000502"),
    ("Arganda-Carreras I, Turaga SC, Berger DR, et al. (2015). Crowdsourcing the creation of image segmentation "
     "algorithms for connectomics. Frontiers in Neuroanatomy 9: 142 (the ISBI 2012 challenge).",
     "10.3389/fnana.2015.00142"),
)
#: The characters bioimage.io allows in a model name.
_NAME = re.compile(r"[\w\-() ]+")


class PackageError(SegkitError):
    """A package that could not be built, or that bioimageio.spec or bioimageio.core rejects."""


@dataclass(frozen=True)
class PackageRecord:
    """What was written: the zip, its test tile, the valid input sizes, the weight formats with their
    max abs difference from torch on the test tile, and the checks the package passed."""

    path: Path
    tile: int
    input_sizes: tuple[int, int]  # (min, step): valid y and x sizes are min + n * step
    output_offset: int
    halo: int
    weights: dict[str, float] = field(default_factory=dict)
    checks: tuple[str, ...] = ()


# -- the model ---------------------------------------------------------------------------------

def inference_model(model: str, model_kwargs: dict[str, Any] | None = None, output: str = "probability") -> Any:
    """The architecture of a package's pytorch_state_dict weights (bioimageio.core builds it by name).

    Parameters
    ----------
    model : str
        A segkit registry name.
    model_kwargs : dict, optional
        Its parameters.
    output : {"probability", "intensity"}
        What it returns (see `segkit.export.inference_head`).

    Returns
    -------
    torch.nn.Module
        float32 (N, 1, H, W) in, the membrane probability (softmax inside) or the denoised intensity
        out; its state dict is the checkpoint's, each key prefixed with `model.`.
    """
    return inference_head(create_model(model, **(model_kwargs or {})), output=output)


# -- the package --------------------------------------------------------------------------------

def _authors(author: str | Sequence[str] | None) -> list[str]:
    names = [author] if isinstance(author, str) else list(author or [])
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise PackageError("a bioimage.io package needs at least one author; pass author=NAME (repeat it for "
                           "several authors)")
    for name in names:
        if "/" in name:
            raise PackageError(f"author {name!r}: bioimage.io author names may not contain '/'; pass author=NAME "
                               "without it")
    return names


def _identifier(text: str, fallback: str) -> str:
    """`text` as a bioimage.io id: lower case letters, digits and '_', starting with a letter."""
    ident = re.sub(r"[^a-z0-9_]+", "_", str(text).lower()).strip("_")
    return ident[:32] if ident[:1].isalpha() else fallback


def _class_name(info: CheckpointInfo) -> str:
    """The class whose probability a segmenter's package gives (the last one: membrane for EM)."""
    return _identifier((info.classes or ["membrane"])[-1], "foreground")


def output_id(info: CheckpointInfo) -> str:
    return f"{_class_name(info)}_probability"[:32] if info.kind == "segmenter" else "denoised"


def default_name(info: CheckpointInfo) -> str:
    what = f"{_class_name(info).replace('_', ' ')} segmentation" if info.kind == "segmenter" else "denoiser"
    return f"segkit {re.sub(r'[^A-Za-z0-9_()-]+', ' ', info.model)} {what}"


def default_description(info: CheckpointInfo) -> str:
    if info.kind == "segmenter":
        return (f"{_class_name(info).replace('_', ' ').capitalize()} probability of 2D grey-value images, from a "
                f"segkit {info.model} checkpoint")
    return f"Denoised 2D grey-value images, from a segkit {info.model} checkpoint"


def _check_license(license: str) -> str:
    from bioimageio.spec.model.v0_5 import LicenseId
    from pydantic import TypeAdapter, ValidationError

    try:
        return str(TypeAdapter(LicenseId).validate_python(license))
    except ValidationError as exc:
        raise PackageError(f"license {license!r} is not an SPDX license id that bioimage.io accepts; pass e.g. "
                           "license='MIT' or license='CC-BY-4.0'") from exc


def _check_name(name: str) -> str:
    name = " ".join(str(name).split())
    if not (5 <= len(name) <= 128) or not _NAME.fullmatch(name):
        raise PackageError(f"name {name!r}: a bioimage.io model name has 5 to 128 letters, digits, spaces, '_', '-', "
                           "'(' or ')'; pass another name=NAME")
    return name


def check_package_path(path: str | Path, *, inputs: Sequence[str | Path | None] = (), overwrite: bool = False,
                       report: Any = None) -> Path:
    """`path`, once it is known that a package can be written there (a .zip name; see check_output)."""
    if not Path(path).name.lower().endswith(PACKAGE_SUFFIX):
        shown = Path(path).suffix or "no extension"
        raise OutputError(f"output {path}: segkit does not write {shown} files here; name it with {PACKAGE_SUFFIX} "
                          "(a bioimage.io package)")
    return check_output(path, kind=None, inputs=inputs, overwrite=overwrite, report=report)


def input_sizes(info: CheckpointInfo) -> tuple[int, int]:
    """(min, step) of the package's y and x input sizes: the model's valid inputs whose output keeps
    at least one pixel once the halo is cropped (bioimage.io requires it)."""
    geometry = info.geometry
    smallest = geometry.min_input
    while geometry.output_size(smallest) - 2 * geometry.halo < 1:
        smallest += geometry.step
    return smallest, geometry.step


def package_tile(info: CheckpointInfo, tile: int | None) -> int:
    """The test tensors' tile: `tile`, else the checkpoint's, else the smallest valid one of 256 px or more."""
    geometry = info.geometry
    smallest, _ = input_sizes(info)
    if tile is None:
        tile = int(info.inference.tile or geometry.nearest_valid(max(256, smallest))[1])
    geometry.check_tile(tile)
    if tile < smallest:
        raise TileSizeError(f"tile {tile} leaves no output pixel once the halo of {geometry.halo} px is cropped; "
                            f"use tile {smallest} or larger")
    return tile


def sample_tile(info: CheckpointInfo, tile: int) -> np.ndarray:
    """One (1, 1, tile, tile) float32 tile of the bundled ISBI crop (its middle slice and centre, mirrored
    when the tile is larger), in the units the model was trained on: the crop itself for uint8 models,
    else the crop rescaled to the checkpoint's mean and std."""
    import tifffile

    raw = tifffile.imread(SAMPLE)
    plane = raw[len(raw) // 2].astype(np.float32)
    if info.inference.input_dtype not in (None, "uint8"):
        plane = info.normalization.invert(mean_std_normalization([plane]).apply(plane))
    while min(plane.shape) < tile:
        plane = np.pad(plane, [(0, plane.shape[0]), (0, plane.shape[1])], mode="symmetric")
    top, left = (plane.shape[0] - tile) // 2, (plane.shape[1] - tile) // 2
    return np.ascontiguousarray(plane[None, None, top:top + tile, left:left + tile])


def _normalize(info: CheckpointInfo, raw: np.ndarray) -> np.ndarray:
    """The package's preprocessing as bioimageio.core computes it: (x - mean) / (std + 1e-6)."""
    mean, std = np.float32(info.normalization.mean), np.float32(info.normalization.std)
    return ((raw - mean) / (std + np.float32(1e-6))).astype(np.float32)


def _run(module: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _check_same(name: str, got: np.ndarray, want: np.ndarray, where: str) -> float:
    if got.shape != want.shape:
        raise PackageError(f"{name} weights give shape {got.shape} on {where}, torch {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    if diff > TOLERANCE * scale:
        raise PackageError(f"{name} weights differ from torch by {diff:.2e} on {where} (allowed {TOLERANCE:.0e})")
    return diff


def _torchscript(head: Any, tile: int, checks: dict[str, np.ndarray]) -> tuple[bytes, float]:
    """The traced head (any batch and valid tile, as the ONNX graph), checked on `checks` against torch."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces the deprecation of jit.trace on every call
        with torch.no_grad():
            traced = torch.jit.trace(head, torch.zeros(1, 1, tile, tile), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu")
    worst = max(_check_same("torchscript", _run(loaded, x), _run(head, x), where) for where, x in checks.items())
    return buffer.getvalue(), worst


def _state_dict_bytes(model: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({f"model.{k}": v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _cover(raw: np.ndarray, out: np.ndarray, *, margin: int, kind: str) -> bytes:
    """PNG, 2:1: the test tile (cropped to the output's field of view) | the prediction on it (membrane
    probability in red over the tile, or the denoised tile)."""
    import cv2

    view = raw[margin:raw.shape[0] - margin, margin:raw.shape[1] - margin] if margin else raw
    lo, hi = float(view.min()), float(view.max())
    gray = ((view - lo) / max(hi - lo, 1e-6) * 255).astype(np.float32)
    if kind == "segmenter":
        p = np.clip(out, 0, 1)[..., None]
        right = np.stack([gray] * 3, axis=-1) * (1 - 0.6 * p) + 0.6 * p * np.array([0, 0, 255], np.float32)
    else:
        right = np.stack([((out - lo) / max(hi - lo, 1e-6) * 255).clip(0, 255)] * 3, axis=-1)
    panel = np.concatenate([np.stack([gray] * 3, axis=-1), right], axis=1).clip(0, 255).astype(np.uint8)
    scale = max(1, -(-COVER_MIN_SIDE // panel.shape[0]))
    if scale > 1:
        panel = cv2.resize(panel, (panel.shape[1] * scale, panel.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", panel)
    if not ok:
        raise PackageError("could not encode the cover image")
    return png.tobytes()


def _cites(info: CheckpointInfo) -> list[tuple[str, str]]:
    names = [info.model]
    if info.model == COMPOSED and isinstance(info.model_kwargs.get("denoiser"), dict):
        names = [str(info.model_kwargs[part].get("name", "")) for part in ("denoiser", "segmenter")]
    cites: list[tuple[str, str]] = []
    for name in names:
        if name.startswith("fcn"):
            cites.append(FCN_CITE)
        elif name.startswith("smp:"):
            cites += [UNET_CITE] if name.split(":")[1].lower().startswith("unet") else []
            cites += [RESNET_CITE] if "resnet" in name.lower() else []
        elif name == "denoiser":
            blind_spot = (info.recipe.get("train") or {}).get("mode") == "blind_spot"
            cites += [DAE_CITE, *([NOISE2VOID_CITE] if blind_spot else [])]
        else:
            cites.append(UNET_CITE)
    return list(dict.fromkeys([*cites, *DATA_CITES]))


def _documentation(info: CheckpointInfo, *, name: str, description: str, tile: int, out_size: int,
                   sizes: tuple[int, int], offset: int, halo: int, output_id: str) -> str:
    geometry = info.geometry
    validation = info.training.get("validation") or {}
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in validation.items() if isinstance(v, (int, float)))
    if scores:
        validation_text = ("Scores of the checkpoint on its recipe's validation slices (recorded by `segkit train`), "
                           f"at epoch {info.training.get('epoch', '?')}:\n\n| metric | value |\n|---|---|\n{scores}\n")
    else:
        validation_text = "The checkpoint records no validation scores.\n"
    data = info.recipe.get("data", {})
    training = (f"Trained by segkit on `{data.get('raw', '?')}` (labels `{data.get('labels', '?')}`), slices "
                f"{data.get('train_slices', '?')}; validation slices {data.get('val_slices', '?')}.\n"
                if data else "The checkpoint records no training recipe.\n")
    if info.kind == "segmenter":
        output_text = (f"`{output_id}`: the probability (0 to 1) of class `{_class_name(info)}` "
                       f"(softmax over the classes {info.classes}, inside the model).")
    else:
        output_text = f"`{output_id}`: the denoised image in the input's units (postprocessing undoes the normalisation)."
    border = (f"The model uses unpadded convolutions: the output is the input's centre, {-offset // 2} px in from "
              "every side (`size.offset` in rdf.yaml). Tile with that overlap (overlap-tile) for seamless results."
              if offset else "")
    if halo:
        border += (f" Crop a halo of {halo} px from every side of each output tile (the `halo` in rdf.yaml): "
                   "padded convolutions are unreliable there.")
    cites = "\n".join(f"- {text} doi:{doi}" for text, doi in _cites(info))
    return f"""# {name}

{description}

Made with segkit {__version__} (`segkit package`) from a `{info.model}` checkpoint
(parameters `{json.dumps(info.model_kwargs)}`).

## Inputs and outputs

- Input `{INPUT_ID}`: one grey-value channel, axes (batch, channel, y, x), in the units the model was trained
  on ({info.inference.input_dtype or 'uint8'} images). Y and x sizes: {sizes[0]} + {sizes[1]}n (the
  model's geometry: margin {geometry.margin}, step {geometry.step}, halo {geometry.halo}).
- Preprocessing: (x - {info.normalization.mean:.6g}) / {info.normalization.std:.6g}, fixed (the training data's
  mean and standard deviation), never computed per tile.
- Output {output_text}
- Output size: {f"input size {offset:+d}" if offset else "the input's size"} (a {tile} px tile gives {out_size} px).
  {border}

Weights: PyTorch state dict (architecture `segkit.bioimageio.inference_model`, needs segkit), TorchScript
and ONNX (opset in rdf.yaml); all three were checked against the PyTorch model before packaging.

## Training

{training}
## Validation

{validation_text}
To validate on your own data, predict a labelled stack with this package (or with segkit and the
original checkpoint) and score the result against the labels, e.g. with
`segkit evaluate pred.tif labels.tif` (pixel error, adapted Rand error, variation of information).

The test tensors are the central {tile} x {tile} px of ISBI 2012 training slice 27 (segkit's bundled
crop, mirrored where the tile is larger) and this model's output for it.

## Citations

{cites}
"""


@contextmanager
def _quiet_bioimageio() -> Iterator[None]:
    """bioimageio.core and .spec log through loguru to stderr; segkit reports itself."""
    from loguru import logger

    logger.disable("bioimageio")
    try:
        yield
    finally:
        logger.enable("bioimageio")


def _first_error(summary: Any) -> str:
    for detail in summary.details:
        if detail.status == "failed":
            message = detail.errors[0].msg if detail.errors else detail.name
            where = ".".join(str(part) for part in detail.errors[0].loc) if detail.errors and detail.errors[0].loc else ""
            first = str(message).strip().splitlines()[0] if str(message).strip() else detail.name
            return f"{detail.name}: {where + ': ' if where else ''}{first}"[:400]
    return f"status {summary.status}"


def validate_package(path: str | Path, *, test: bool = True) -> tuple[str, ...]:
    """Validate a package with bioimageio.spec and, with `test`, bioimageio.core's model test.

    The model test runs each weight format on the CPU, offline: it must reproduce the test output
    and run at other sizes and batch sizes.

    Parameters
    ----------
    path : str or Path
        The package (.zip).
    test : bool
        Run bioimageio.core's model test too.

    Returns
    -------
    tuple of str
        The checks passed.

    Raises
    ------
    PackageError
        The first failure.
    """
    require("bioimageio.spec", feature="bioimage.io packages", package="segkit-bio[bioimageio]")
    from bioimageio.spec import InvalidDescr, ValidationContext, load_description

    checks = []
    with _quiet_bioimageio(), ValidationContext(perform_io_checks=True, log_warnings=False):
        try:
            descr = load_description(str(path))
        except Exception as exc:  # bioimageio.spec raises ValueError, OSError, BadZipFile, ... for foreign files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise PackageError(f"{path} is not a valid bioimage.io package: {first}") from exc
        if isinstance(descr, InvalidDescr) or descr.validation_summary.status != "valid-format":
            raise PackageError(f"{path} is not a valid bioimage.io package: {_first_error(descr.validation_summary)}")
        checks.append(f"bioimageio.spec {descr.format_version}: valid")
        if not test:
            return tuple(checks)
        require("bioimageio.core", feature="testing bioimage.io packages", package="segkit-bio[bioimageio]")
        from bioimageio.core import test_description

        present = [w for w, entry in descr.weights if entry is not None]
        # the original weights first, then the conversions
        for weight_format in sorted(present, key=lambda w: WEIGHT_FORMATS.index(w) if w in WEIGHT_FORMATS else 99):
            # ONNX Runtime names devices by provider; the CPU one alone, so no GPU provider is tried
            devices = ["CPUExecutionProvider"] if weight_format == "onnx" else ["cpu"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation notes for torch.jit.load and the like
                summary = test_description(str(path), weight_format=weight_format, devices=devices)
            if summary.status != "passed":
                raise PackageError(f"{path} fails bioimageio.core's model test with its {weight_format} weights: "
                                   f"{_first_error(summary)}")
            checks.append(f"bioimageio.core test ({weight_format}): passed")
    return tuple(checks)


def build_package(model: Any, info: CheckpointInfo, output: str | Path, /, *, author: str | Sequence[str],
                  name: str | None = None, description: str | None = None, license: str = "MIT",
                  tile: int | None = None, opset: int = 17, test: bool = True, overwrite: bool = False,
                  inputs: Sequence[str | Path | None] = (), report: Any = None) -> PackageRecord:
    """Write a bioimage.io package (spec 0.5) of a model.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    info : CheckpointInfo
        Its record (a segmenter or a denoiser).
    output : str or Path
        The package to write (.zip).
    author : str or sequence of str
        One name or several.
    name, description : str, optional
        Default: from the model.
    license : str
        An SPDX license id.
    tile : int, optional
        The test tensors' tile (default: the checkpoint's).
    opset : int
        The ONNX opset of the onnx weights.
    test : bool
        Run bioimageio.core's model test before the package is moved into place.
    overwrite : bool
        Replace an existing package.
    inputs : sequence of paths
        The files the package is made from (the output must be none of them).
    report : callable, optional
        Receives one-line notes (stale temporary files removed).

    Returns
    -------
    PackageRecord
        What was written and the checks it passed.

    Raises
    ------
    PackageError
        The model cannot be packaged, a weight format does not reproduce torch, or bioimageio.spec or
        bioimageio.core rejects the package.
    OutputError
        The output path is refused or the write failed.
    """
    output = check_package_path(output, inputs=inputs, overwrite=overwrite, report=report)
    require("bioimageio.spec", feature="bioimage.io packages", package="segkit-bio[bioimageio]")
    if test:
        require("bioimageio.core", feature="testing bioimage.io packages", package="segkit-bio[bioimageio]")
    authors = _authors(author)
    name = _check_name(name or default_name(info))
    license = _check_license(license)
    if info.kind not in MODEL_KINDS:
        raise PackageError(f"a {info.kind} checkpoint cannot be packaged; package a segmenter or a denoiser")
    scale = info.inference.scale
    if scale is not None and abs(scale - 1.0) > 1e-3:
        raise PackageError(f"this checkpoint was trained on images resized by {scale:g} (data.scale), and a bioimage.io "
                           "package cannot resize its input for the model and the output back; export it to ONNX with "
                           "`segkit export` instead (segkit predict resizes for it), or train without data.scale")
    unsupported = [what for what, present in (
        ("percentile normalisation", info.normalization.percentiles is not None),
        ("several input channels", info.normalization.channels is not None or info.input_channels > 1),
        (f"{info.inference.labels_kind} labels (K class outputs)", info.inference.labels_kind != "membrane"),
    ) if present]
    if unsupported:
        raise PackageError(f"this checkpoint uses {' and '.join(unsupported)}, which `segkit package` does not write "
                           "yet (it packages single-channel membrane models and denoisers); export it to ONNX with "
                           "`segkit export` instead")
    tile = package_tile(info, tile)
    sizes = input_sizes(info)
    geometry = info.geometry
    offset, halo = -2 * geometry.margin, geometry.halo
    out_size = geometry.output_size(tile)
    out_id = output_id(info)
    description = " ".join(str(description or default_description(info)).split())


    model = model.cpu().float().eval()
    head = inference_head(model, output="intensity" if info.kind == "denoiser" else "probability")
    raw = sample_tile(info, tile)
    x = _normalize(info, raw)
    expected = _run(head, x)
    if info.kind == "denoiser":
        expected = (expected * np.float32(info.normalization.std) + np.float32(info.normalization.mean))
    other = tile + geometry.step
    checks = {f"the {tile} px test tile": x,
              f"noise of {other} px at batch 2": np.random.default_rng(0).standard_normal((2, 1, other, other),
                                                                                       dtype=np.float32)}
    torchscript, torchscript_diff = _torchscript(head, tile, checks)
    onnx_bytes, record = export_onnx(model, info, tile=tile, opset=opset)
    weights_diff = {"pytorch_state_dict": 0.0, "torchscript": torchscript_diff,
                    "onnx": max(v for k, v in record.parity.items() if k.startswith("max_abs_diff"))}

    with tempfile.TemporaryDirectory(prefix="segkit-bioimageio-") as folder:
        work = Path(folder)
        files = {
            "weights.pt": _state_dict_bytes(model),
            "weights_torchscript.pt": torchscript,
            "weights.onnx": onnx_bytes,
            "cover.png": _cover(raw[0, 0], expected[0, 0], margin=geometry.margin, kind=info.kind),
            "README.md": _documentation(info, name=name, description=description, tile=tile, out_size=out_size,
                                        sizes=sizes, offset=offset, halo=halo, output_id=out_id).encode(),
            "environment.yaml": _environment().encode(),
        }
        for file_name, data in files.items():
            (work / file_name).write_bytes(data)
        np.save(work / "test_input.npy", raw)
        np.save(work / "test_output.npy", expected.astype(np.float32))
        import tifffile

        tifffile.imwrite(work / "sample_input.tif", raw[0, 0])  # the same, as images for people (FAIR)
        tifffile.imwrite(work / "sample_output.tif", expected[0, 0].astype(np.float32))
        descr = _describe(info, work, name=name, description=description, authors=authors, license=license,
                          sizes=sizes, offset=offset, halo=halo, output_id=out_id, opset=opset, tile=tile)
        from bioimageio.spec import save_bioimageio_package

        package = work / "package.zip"
        with _quiet_bioimageio():
            save_bioimageio_package(descr, output_path=package)
        passed = validate_package(package, test=test)

        with atomic_path(output) as tmp:
            shutil.copyfile(package, tmp)
    return PackageRecord(path=output, tile=tile, input_sizes=sizes, output_offset=offset, halo=halo,
                         weights=weights_diff, checks=passed)


def _environment() -> str:
    """The pytorch_state_dict weights' conda environment: PyTorch and segkit (their architecture), by its
    distribution name (`segkit` on PyPI is another project)."""
    import torch

    version = torch.__version__.split("+")[0]
    return (f"name: segkit\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n  - python>=3.10\n"
            f"  - pytorch>={version}\n  - pip\n  - pip:\n    - {DISTRIBUTION}>={__version__}\n")


def _describe(info: CheckpointInfo, work: Path, *, name: str, description: str, authors: list[str], license: str,
              sizes: tuple[int, int], offset: int, halo: int, output_id: str, opset: int, tile: int) -> Any:
    """The ModelDescr, validated with the package's files in `work` (hashes, test tensor shapes); no remote check."""
    import torch
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as spec
    from pydantic import ValidationError

    space = {"y": None, "x": None}
    input_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("raw")])]
    input_axes += [spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=sizes[0], step=sizes[1]))
                   for a in space]
    reference = {a: spec.SizeReference(tensor_id=spec.TensorId(INPUT_ID), axis_id=spec.AxisId(a), offset=offset)
                 for a in space}
    output_axes: list[Any] = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(
        _class_name(info) if info.kind == "segmenter" else "denoised")])]
    output_axes += [spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), size=reference[a], halo=halo) if halo
                    else spec.SpaceOutputAxis(id=spec.AxisId(a), size=reference[a]) for a in space]
    mean, std = float(info.normalization.mean), float(info.normalization.std)
    postprocessing = []
    if info.kind == "segmenter":
        output_data = spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0))
    else:
        output_data = spec.IntervalOrRatioDataDescr(type="float32")
        postprocessing = [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=std, offset=mean))]
    pytorch_version = spec.Version(torch.__version__.split("+")[0])
    output_kind = "intensity" if info.kind == "denoiser" else "probability"
    record = json.loads(info.to_json())
    try:
        with ValidationContext(root=work, perform_io_checks=True, log_warnings=False, raise_errors=False):
            return spec.ModelDescr(
                name=name,
                description=description[:1024],
                authors=[spec.Author(name=a) for a in authors],
                cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi)) for text, doi in _cites(info)],
                license=spec.LicenseId(license),
                documentation=spec.FileDescr(source=work / "README.md"),
                covers=[spec.FileDescr(source=work / "cover.png")],
                tags=["segkit", "2d", "pytorch", "onnx", "torchscript",
                      *(["segmentation", _class_name(info).replace("_", "-")] if info.kind == "segmenter"
                        else ["denoising"]), re.sub(r"[^a-z0-9-]+", "-", info.model.lower()).strip("-")],
                inputs=[spec.InputTensorDescr(
                    id=spec.TensorId(INPUT_ID),
                    description="grey values in the units the model was trained on",
                    axes=input_axes,
                    data=spec.IntervalOrRatioDataDescr(type="float32"),
                    test_tensor=spec.FileDescr(source=work / "test_input.npy"),
                    sample_tensor=spec.FileDescr(source=work / "sample_input.tif"),
                    preprocessing=[spec.FixedZeroMeanUnitVarianceDescr(
                        kwargs=spec.FixedZeroMeanUnitVarianceKwargs(mean=mean, std=std))],
                )],
                outputs=[spec.OutputTensorDescr(
                    id=spec.TensorId(output_id),
                    description=(f"{_class_name(info)} probability" if info.kind == "segmenter"
                                 else "denoised grey values, in the input's units"),
                    axes=output_axes,
                    data=output_data,
                    test_tensor=spec.FileDescr(source=work / "test_output.npy"),
                    sample_tensor=spec.FileDescr(source=work / "sample_output.tif"),
                    postprocessing=postprocessing,
                )],
                weights=spec.WeightsDescr(
                    pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                        source=work / "weights.pt",
                        architecture=spec.ArchitectureFromLibraryDescr(
                            import_from="segkit.bioimageio", callable=spec.Identifier("inference_model"),
                            kwargs={"model": info.model, "model_kwargs": info.model_kwargs, "output": output_kind}),
                        pytorch_version=pytorch_version,
                        dependencies=spec.FileDescr(source=work / "environment.yaml"),
                        comment="the segkit checkpoint's tensors; the architecture needs segkit",
                    ),
                    torchscript=spec.TorchscriptWeightsDescr(
                        source=work / "weights_torchscript.pt", pytorch_version=pytorch_version,
                        parent="pytorch_state_dict", comment="torch.jit.trace of the inference head"),
                    onnx=spec.OnnxWeightsDescr(
                        source=work / "weights.onnx", opset_version=opset, parent="pytorch_state_dict",
                        comment="segkit export (dynamic batch, height and width; segkit metadata inside)"),
                ),
                config=spec.Config(segkit={"checkpoint": record, "test_tile": tile}),
            )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        raise PackageError(f"bioimageio.spec rejects the package description: {where}: "
                           f"{str(error.get('msg', exc)).splitlines()[0]}") from exc


def package_checkpoint(checkpoint: str | Path, output: str | Path | None = None, /, *, author: str | Sequence[str],
                       denoiser: str | Path | None = None, name: str | None = None, description: str | None = None,
                       license: str = "MIT", tile: int | None = None, opset: int = 17, test: bool = True,
                       overwrite: bool = False, report: Any = None) -> PackageRecord:
    """Write the bioimage.io package of a segkit checkpoint (`segkit package`).

    Parameters
    ----------
    checkpoint : str or Path
        A segmenter or denoiser checkpoint.
    output : str or Path, optional
        The package; default: the checkpoint's name with .bioimageio.zip.
    author : str or sequence of str
        One name or several.
    denoiser : str or Path, optional
        A denoiser checkpoint packaged in front of the segmenter.
    name, description, license, tile, opset, test, overwrite, report
        As for `build_package`.

    Returns
    -------
    PackageRecord
        What was written and the checks it passed.

    Raises
    ------
    PackageError, OutputError, CheckpointError
        As for `build_package`, and for a checkpoint that cannot be read.
    """
    from segkit.models.compose import compose_with_denoiser

    checkpoint = Path(checkpoint)
    output = Path(output) if output is not None else checkpoint.with_name(checkpoint.stem + ".bioimageio.zip")
    check_package_path(output, inputs=[checkpoint, denoiser], overwrite=overwrite, report=report)
    _authors(author)
    if denoiser is not None:
        model, info = compose_with_denoiser(denoiser, checkpoint)
    else:
        model, info = load_model(checkpoint, expect_kind=read_info(checkpoint).kind)
    return build_package(model, info, output, author=author, name=name, description=description, license=license,
                         tile=tile, opset=opset, test=test, overwrite=overwrite, inputs=[checkpoint, denoiser])
