"""bioimage.io model packages (model spec 0.5) of segkit checkpoints.

A package is a zip holding `rdf.yaml` and the files it names; Fiji (deepImageJ), ilastik, napari,
QuPath, BiaPy and bioimageio.core run it without segkit. What a segkit package holds:

- one input `raw` with axes (batch, channel, y, x) in the units the model was trained on, declared
  with reflect padding (as segkit mirrors plane borders); its y and x sizes are `2 * halo + step + n *
  step` (`package_geometry`), and its preprocessing is the checkpoint's normalisation: fixed mean and std
  (`fixed_zero_mean_unit_variance`), or for percentile models `scale_range` over y and x (each
  image's own percentiles) followed by `clip` to [0, 1] where the checkpoint clips;
- one output the size of the input: one class's probability (`<class>_probability`, membrane
  models), every class's (`probabilities`, a channel axis named by the classes, for semantic and
  instance models) or the denoised image (`denoised`, back in raw units). The packaged model
  mirrors its input first and crops the model's output back (`segkit.bioimageio.head.PackagedModel`,
  `package_padding`), so a valid-conv U-Net also returns its input's size; the output's `halo`
  (margin + the model's halo) is what a consumer crops from each tile, which is how
  bioimageio.core's tiled prediction works, and its blocks then see segkit's pooling grid;
- weights: `pytorch_state_dict` (the checkpoint's tensors, with the architecture as a source file
  inside the package, `arch.py`, which needs torch only: `segkit.bioimageio.source`), `torchscript`
  (the traced model) and `onnx` (dynamic batch, height and width), each checked against torch before
  it is packaged. A model whose code needs another library (smp models need
  segmentation-models-pytorch) gets TorchScript and ONNX only;
- test input and output tensors (.npy, and as TIFF sample tensors): one tile of the bundled ISBI 2012
  crop and what the model gives for it; a cover (the test tile beside the prediction), a README with a
  Validation section, license, authors, maintainers (GitHub user names) and citations;
- `config.segkit`: the checkpoint's record, which segkit runs its own packages from
  (`segkit.bioimageio.read`), never the package's architecture file.

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
from segkit.errors import OutputError, SegkitError
from segkit.export import inference_head
from segkit.io.outputs import atomic_path, check_output
from segkit.models import COMPOSED, create_model
from segkit.models.geometry import Geometry
from segkit.normalization import mean_std_normalization
from segkit.record import MODEL_KINDS, CheckpointInfo
from segkit.version import __version__

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
#: GitHub user names: letters, digits and single hyphens, at most 39 characters.
_GITHUB_USER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
#: bioimageio.core's scale_range and fixed_zero_mean_unit_variance add this to the divisor.
_EPS = 1e-6
#: The package's pytorch_state_dict architecture file.
ARCH_FILE = "arch.py"


class PackageError(SegkitError):
    """A package that could not be built, or that bioimageio.spec or bioimageio.core rejects."""


@dataclass(frozen=True)
class PackageRecord:
    """What was written: the zip, its test tile, the valid input sizes, the halo, the padding inside the
    model, the weight formats with their max abs difference from torch, the checks the package passed
    and notes on what it leaves out."""

    path: Path
    tile: int
    input_sizes: tuple[int, int]  # (min, step): valid y and x sizes are min + n * step
    halo: int  # px a consumer crops from each side of an output tile
    pad: tuple[int, int]  # px the packaged model mirrors onto its input before and after (package_padding)
    weights: dict[str, float] = field(default_factory=dict)
    checks: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the package leaves out, and why


# -- the model ---------------------------------------------------------------------------------

def inference_model(model: str, model_kwargs: dict[str, Any] | None = None, output: str = "probability") -> Any:
    """The architecture that packages written by earlier segkit versions name (`segkit.bioimageio.inference_model`).

    Packages written now ship their architecture as `arch.py` instead (`segkit.bioimageio.source`).

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
    """The class whose probability a membrane model's package gives (the last one: membrane for EM)."""
    return _identifier((info.classes or ["membrane"])[-1], "foreground")


def output_kind(info: CheckpointInfo) -> str:
    """What the packaged model returns (`PackagedModel.output`): one class's probability (membrane
    models), every class's (semantic and instance models) or intensities (denoisers)."""
    if info.kind == "denoiser":
        return "intensity"
    return "probability" if info.inference.labels_kind == "membrane" else "probabilities"


def class_names(info: CheckpointInfo, classes: int) -> list[str]:
    """The output channels' names of a K-class package: the record's classes as bioimage.io identifiers."""
    names = [_identifier(c, f"class_{i}") for i, c in enumerate(info.classes)] if len(info.classes) == classes else []
    if len(set(names)) != classes:
        names = [f"class_{i}" for i in range(classes)]
    return names


def output_id(info: CheckpointInfo) -> str:
    kind = output_kind(info)
    return {"probability": f"{_class_name(info)}_probability"[:32], "probabilities": "probabilities",
            "intensity": "denoised"}[kind]


def default_name(info: CheckpointInfo) -> str:
    kind = output_kind(info)
    what = {"probability": f"{_class_name(info).replace('_', ' ')} segmentation",
            "probabilities": f"{info.inference.labels_kind} segmentation", "intensity": "denoiser"}[kind]
    return f"segkit {re.sub(r'[^A-Za-z0-9_()-]+', ' ', info.model)} {what}"


def default_description(info: CheckpointInfo) -> str:
    kind = output_kind(info)
    if kind == "probability":
        return (f"{_class_name(info).replace('_', ' ').capitalize()} probability of 2D grey-value images, from a "
                f"segkit {info.model} checkpoint")
    if kind == "probabilities":
        return (f"Class probabilities ({', '.join(map(str, info.classes))}) of 2D grey-value images, from a segkit "
                f"{info.model} checkpoint")
    return f"Denoised 2D grey-value images, from a segkit {info.model} checkpoint"


def _check_license(license: str) -> str:
    from bioimageio.spec.model.v0_5 import LicenseId
    from pydantic import TypeAdapter, ValidationError

    try:
        return str(TypeAdapter(LicenseId).validate_python(license))
    except ValidationError as exc:
        raise PackageError(f"license {license!r} is not an SPDX license id that bioimage.io accepts; pass e.g. "
                           "license='MIT' or license='CC-BY-4.0'") from exc


def _maintainers(maintainer: str | Sequence[str] | None) -> list[str]:
    names = [maintainer] if isinstance(maintainer, str) else list(maintainer or [])
    names = [str(n).strip().lstrip("@") for n in names if str(n).strip()]
    for name in names:
        if not _GITHUB_USER.fullmatch(name):
            raise PackageError(f"maintainer {name!r} is not a GitHub user name (letters, digits and single hyphens, "
                               "at most 39); pass maintainer=GITHUB_USER")
    return list(dict.fromkeys(names))


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


def package_geometry(info: CheckpointInfo) -> Geometry:
    """The packaged model's geometry: output the input's size, and a halo of the model's margin plus its halo.

    The packaged model mirrors its input by the model's margin (`PackagedModel.pad`), so its valid
    inputs are the model's valid outputs; the smallest is the first that keeps at least one output
    pixel once the halo is cropped (bioimage.io requires it).

    Parameters
    ----------
    info : CheckpointInfo
        The checkpoint's record.

    Returns
    -------
    Geometry
        margin 0, the model's step, the smallest package input as `min_output`, and the halo.
    """
    geometry = info.geometry
    halo = geometry.margin + geometry.halo
    # 2 * halo + n * step: a block's inner part (input minus both halos) is a multiple of the step
    return Geometry(margin=0, step=geometry.step, min_output=2 * halo + geometry.step, halo=halo)


def package_padding(info: CheckpointInfo) -> tuple[int, int]:
    """(before, after): what the packaged model mirrors onto its input's top/left and bottom/right.

    bioimageio.core cuts blocks whose inner parts start at multiples of the step (the package's input
    sizes make them so) and adds the halo on each side. Mirroring `before` px (a multiple of the step,
    at least the margin) puts the model's first input pixel where segkit's tiler puts it (margin plus
    halo before a step-aligned output tile), so pooling models see the same grid in every block and
    in segkit's tiles; `after` makes the input a valid size for the model. The output is cropped back
    to the input's size.

    Parameters
    ----------
    info : CheckpointInfo
        The checkpoint's record.

    Returns
    -------
    (int, int)
        Pixels before and after, each at least the model's margin.
    """
    geometry = info.geometry
    margin, step = geometry.margin, geometry.step
    before = -(-margin // step) * step
    after = (geometry.min_input - package_geometry(info).min_input - before) % step
    while after < margin:
        after += step
    return before, after


def input_sizes(info: CheckpointInfo) -> tuple[int, int]:
    """(min, step) of the package's y and x input sizes (`package_geometry`)."""
    geometry = package_geometry(info)
    return geometry.min_input, geometry.step


def package_tile(info: CheckpointInfo, tile: int | None) -> int:
    """The test tensors' tile, a valid package input: `tile`, else the checkpoint's tile's output size
    or 256 px, whichever is larger, rounded up to a valid size."""
    geometry = package_geometry(info)
    if tile is None:
        trained = info.inference.tile
        wanted = max(256, int(trained) - 2 * info.geometry.margin if trained else 0)
        return geometry.nearest_valid(wanted)[1]
    geometry.check_tile(tile)
    return tile


def sample_tile(info: CheckpointInfo, tile: int) -> np.ndarray:
    """One (1, 1, tile, tile) float32 tile of the bundled ISBI crop (its middle slice and centre, mirrored
    when the tile is larger), in the units the model was trained on: the crop itself for uint8 and
    percentile models, else the crop rescaled to the checkpoint's mean and std."""
    import tifffile

    raw = tifffile.imread(SAMPLE)
    plane = raw[len(raw) // 2].astype(np.float32)
    if info.normalization.percentiles is None and info.inference.input_dtype not in (None, "uint8"):
        plane = info.normalization.invert(mean_std_normalization([plane]).apply(plane))
    while min(plane.shape) < tile:
        plane = np.pad(plane, [(0, plane.shape[0]), (0, plane.shape[1])], mode="symmetric")
    top, left = (plane.shape[0] - tile) // 2, (plane.shape[1] - tile) // 2
    return np.ascontiguousarray(plane[None, None, top:top + tile, left:left + tile])


def _normalize(info: CheckpointInfo, raw: np.ndarray) -> np.ndarray:
    """The package's preprocessing as bioimageio.core computes it on (N, 1, H, W): (x - mean) / (std + 1e-6),
    or (x - p_low) / (p_high - p_low + 1e-6) with each image's percentiles (linear interpolation, as
    numpy's default); then clipped to [0, 1] where the checkpoint clips."""
    norm = info.normalization
    if norm.percentiles is None:
        low, spread = np.float32(norm.mean), np.float32(norm.std)
    else:
        low, high = np.percentile(raw.astype(np.float64), norm.percentiles, axis=(2, 3), keepdims=True)
        low, spread = low.astype(np.float32), (high - low).astype(np.float32)
    x = ((raw - low) / (spread + np.float32(_EPS))).astype(np.float32)
    return np.clip(x, 0.0, 1.0) if norm.clip else x


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


def _cover(raw: np.ndarray, out: np.ndarray, *, halo: int, kind: str) -> bytes:
    """PNG, 2:1: the test tile | the prediction on it (membrane or foreground probability in red over the
    tile, or the denoised tile), both without the halo. `out` is (C, H, W)."""
    import cv2

    crop = (slice(halo, raw.shape[0] - halo), slice(halo, raw.shape[1] - halo)) if halo else (slice(None),) * 2
    view = raw[crop]
    out = (out[0] if len(out) == 1 else 1.0 - out[0])[crop]  # K classes: 1 - background
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


def _documentation(info: CheckpointInfo, *, name: str, description: str, tile: int, sizes: tuple[int, int],
                   halo: int, output_id: str, channels: list[str], weights: list[str], notes: list[str]) -> str:
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
    kind = output_kind(info)
    if kind == "probability":
        output_text = (f"`{output_id}`: the probability (0 to 1) of class `{_class_name(info)}` "
                       f"(softmax over the classes {info.classes}, inside the model).")
    elif kind == "probabilities":
        output_text = (f"`{output_id}`: the probability (0 to 1) of each of the {len(channels)} classes, one channel "
                       f"per class ({', '.join(channels)}; softmax inside the model).")
    else:
        output_text = f"`{output_id}`: the denoised image in the input's units (postprocessing undoes the normalisation)."
    norm = info.normalization
    if norm.percentiles is None:
        preprocessing = (f"(x - {norm.mean:.6g}) / {norm.std:.6g}, fixed (the training data's mean and standard "
                         "deviation), never computed per tile")
    else:
        preprocessing = (f"each image's {norm.percentiles[0]:g}th and {norm.percentiles[1]:g}th percentiles mapped to 0 "
                         "and 1 (`scale_range` over y and x)")
    if norm.clip:
        preprocessing += ", then clipped to [0, 1]"
    border = ""
    if geometry.margin:
        before, after = package_padding(info)
        border = (f"The model uses unpadded convolutions (a margin of {geometry.margin} px per side); the packaged model "
                  f"mirrors its input by {before} px before and {after} px after and crops the result back, so its "
                  "output has the input's size. ")
    border += (f"Crop a halo of {halo} px from every side of each output tile (the `halo` in rdf.yaml) and tile with "
               f"that overlap for seamless results: bioimageio.core does this with `blocksize_parameter`. The input "
               "is declared with reflect padding (segkit mirrors plane borders alike).")
    formats = {"pytorch_state_dict": f"PyTorch state dict (architecture in `{ARCH_FILE}`, which needs torch only)",
               "torchscript": "TorchScript", "onnx": "ONNX (opset in rdf.yaml)"}
    weights_text = ", ".join(formats[w] for w in weights)
    notes_text = "".join(f"\n{note}" for note in notes)
    cites = "\n".join(f"- {text} doi:{doi}" for text, doi in _cites(info))
    return f"""# {name}

{description}

Made with segkit {__version__} (`segkit package`) from a `{info.model}` checkpoint
(parameters `{json.dumps(info.model_kwargs)}`).

## Inputs and outputs

- Input `{INPUT_ID}`: one grey-value channel, axes (batch, channel, y, x), in the units the model was trained
  on ({info.inference.input_dtype or 'uint8'} images). Y and x sizes: {sizes[0]} + {sizes[1]}n (the
  model's geometry: margin {geometry.margin}, step {geometry.step}, halo {geometry.halo}).
- Preprocessing: {preprocessing}.
- Output {output_text}
- Output size: the input's. {border}

Weights: {weights_text}; each was checked against the PyTorch model before packaging.{notes_text}

Open it with bioimageio.core (`pip install bioimageio.core torch onnxruntime`): `bioimageio test package.zip`
runs every weight format; in Python, `bioimageio.core.predict(model="package.zip", inputs=image,
blocksize_parameter=2)` predicts an image of any size tile by tile.

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


@contextmanager
def _known_maintainers(names: Sequence[str]) -> Iterator[None]:
    """Let bioimageio.spec take these GitHub user names as checked while the block runs.

    With file checks on, bioimageio.spec 0.5.12 asks GitHub's API whether each maintainer exists and
    catches only timeouts, so offline (no DNS) every package with maintainers fails with a connection
    error. segkit checks the names' form itself (`_maintainers`) and never goes online, so it adds
    them to bioimageio.spec's set of known users for its own checks and removes them afterwards.
    """
    try:
        from bioimageio.spec._internal.constants import KNOWN_GITHUB_USERS
    except ImportError:  # another layout: bioimageio.spec checks the names as it likes
        yield
        return
    added = {n.lower() for n in names} - KNOWN_GITHUB_USERS
    KNOWN_GITHUB_USERS.update(added)
    try:
        yield
    finally:
        KNOWN_GITHUB_USERS.difference_update(added)


def _package_maintainers(path: str | Path) -> list[str]:
    """The GitHub user names a package's rdf.yaml lists under `maintainers` (of a well-formed name)."""
    import zipfile

    import yaml

    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n in ("rdf.yaml", "bioimageio.yaml")), None)
            content = yaml.safe_load(zf.read(name)) if name else {}
    except (OSError, zipfile.BadZipFile, yaml.YAMLError):
        return []
    users = [m.get("github_user") for m in (content or {}).get("maintainers") or [] if isinstance(m, dict)]
    return [str(u) for u in users if isinstance(u, str) and _GITHUB_USER.fullmatch(u.lstrip("@"))]


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
    with _quiet_bioimageio(), _known_maintainers(_package_maintainers(path)), \
            ValidationContext(perform_io_checks=True, log_warnings=False):
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


def _refuse_unsupported(info: CheckpointInfo) -> None:
    if info.kind not in MODEL_KINDS:
        raise PackageError(f"a {info.kind} checkpoint cannot be packaged; package a segmenter or a denoiser")
    scale = info.inference.scale
    if scale is not None and abs(scale - 1.0) > 1e-3:
        raise PackageError(f"this checkpoint was trained on images resized by {scale:g} (data.scale), and a bioimage.io "
                           "package cannot resize its input for the model and the output back; export it to ONNX with "
                           "`segkit export` instead (segkit predict resizes for it), or train without data.scale")
    unsupported = [what for what, present in (
        ("several input channels", info.normalization.channels is not None or info.input_channels > 1),
        ("a percentile-normalised denoiser (its output cannot be put back into each image's units)",
         info.kind == "denoiser" and info.normalization.percentiles is not None),
    ) if present]
    if unsupported:
        raise PackageError(f"this checkpoint uses {' and '.join(unsupported)}, which `segkit package` does not write; "
                           "export it to ONNX with `segkit export` instead")


def _onnx(head: Any, tile: int, opset: int, checks: dict[str, np.ndarray]) -> tuple[bytes, float]:
    """The head as ONNX (dynamic batch, height and width), checked with ONNX Runtime against torch on `checks`."""
    import onnxruntime as ort
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
        with torch.no_grad():
            torch.onnx.export(head, (torch.zeros(1, 1, tile, tile),), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_ID], output_names=["output"],
                              dynamic_axes={INPUT_ID: {0: "batch", 2: "height", 3: "width"},
                                            "output": {0: "batch", 2: "height", 3: "width"}})
    data = buffer.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = max(_check_same("onnx", session.run(None, {INPUT_ID: x})[0], _run(head, x), where)
                for where, x in checks.items())
    return data, worst


def _architecture(info: CheckpointInfo) -> tuple[str | None, str | None]:
    """(arch.py's text, None), or (None, why the pytorch_state_dict weights are left out)."""
    from segkit.bioimageio.source import NotSelfContained, architecture_source

    try:
        return architecture_source(info.model, info.model_kwargs, version=__version__), None
    except NotSelfContained as exc:
        return None, (f"The PyTorch state dict is left out: {exc}. TorchScript and ONNX hold the same model "
                      "and run without it.")


def build_package(model: Any, info: CheckpointInfo, output: str | Path, /, *, author: str | Sequence[str],
                  maintainer: str | Sequence[str] | None = None, name: str | None = None,
                  description: str | None = None, license: str = "MIT", tile: int | None = None, opset: int = 17,
                  test: bool = True, overwrite: bool = False, inputs: Sequence[str | Path | None] = (),
                  report: Any = None) -> PackageRecord:
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
    maintainer : str or sequence of str, optional
        GitHub user names of the people who answer for the package (bioimage.io `maintainers`).
    name, description : str, optional
        Default: from the model.
    license : str
        An SPDX license id.
    tile : int, optional
        The test tensors' tile, a valid package input size (default: from the checkpoint's tile).
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
        What was written, the checks it passed and what it leaves out.

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
    maintainers = _maintainers(maintainer)
    name = _check_name(name or default_name(info))
    license = _check_license(license)
    _refuse_unsupported(info)
    tile = package_tile(info, tile)
    geometry = package_geometry(info)
    sizes, halo, pad = (geometry.min_input, geometry.step), geometry.halo, package_padding(info)
    out_id = output_id(info)
    description = " ".join(str(description or default_description(info)).split())

    from segkit.bioimageio.head import PackagedModel

    model = model.cpu().float().eval()
    kind = output_kind(info)
    head = PackagedModel(model, output=kind, pad=pad, margin=info.geometry.margin).eval()
    channels = (class_names(info, int(model.out_channels)) if kind == "probabilities"
                else [_class_name(info)] if kind == "probability" else ["denoised"])
    raw = sample_tile(info, tile)
    x = _normalize(info, raw)
    expected = _run(head, x)
    if info.kind == "denoiser":
        expected = (expected * np.float32(info.normalization.std) + np.float32(info.normalization.mean))
    other = tile + geometry.step
    checks = {f"the {tile} px test tile": x,
              f"noise of {other} px at batch 2": np.random.default_rng(0).standard_normal((2, 1, other, other),
                                                                                       dtype=np.float32)}
    arch, left_out = _architecture(info)
    torchscript, torchscript_diff = _torchscript(head, tile, checks)
    onnx_bytes, onnx_diff = _onnx(head, tile, opset, checks)
    weights_diff = {"torchscript": torchscript_diff, "onnx": onnx_diff}
    if arch is not None:
        weights_diff = {"pytorch_state_dict": 0.0, **weights_diff}
    notes = [left_out] if left_out else []

    with tempfile.TemporaryDirectory(prefix="segkit-bioimageio-") as folder:
        work = Path(folder)
        files = {
            "weights_torchscript.pt": torchscript,
            "weights.onnx": onnx_bytes,
            "cover.png": _cover(raw[0, 0], expected[0], halo=halo, kind=info.kind),
            "README.md": _documentation(info, name=name, description=description, tile=tile, sizes=sizes, halo=halo,
                                        output_id=out_id, channels=channels, weights=list(weights_diff),
                                        notes=notes).encode(),
        }
        if arch is not None:
            files.update({"weights.pt": _state_dict_bytes(model), ARCH_FILE: arch.encode(),
                          "environment.yaml": _environment().encode()})
        for file_name, data in files.items():
            (work / file_name).write_bytes(data)
        np.save(work / "test_input.npy", raw)
        np.save(work / "test_output.npy", expected.astype(np.float32))
        import tifffile

        tifffile.imwrite(work / "sample_input.tif", raw[0, 0])  # the same, as images for people (FAIR)
        tifffile.imwrite(work / "sample_output.tif", expected[0].astype(np.float32))
        descr = _describe(info, work, name=name, description=description, authors=authors, maintainers=maintainers,
                          license=license, sizes=sizes, halo=halo, pad=pad, output_id=out_id, channels=channels,
                          opset=opset, tile=tile, state_dict=arch is not None)
        from bioimageio.spec import save_bioimageio_package

        package = work / "package.zip"
        with _quiet_bioimageio(), _known_maintainers(maintainers):
            save_bioimageio_package(descr, output_path=package)
        passed = validate_package(package, test=test)

        with atomic_path(output) as tmp:
            shutil.copyfile(package, tmp)
    return PackageRecord(path=output, tile=tile, input_sizes=sizes, halo=halo, pad=pad, weights=weights_diff,
                         checks=passed, notes=tuple(notes))


def _environment() -> str:
    """The pytorch_state_dict weights' conda environment: PyTorch alone (the architecture is arch.py)."""
    import torch

    version = torch.__version__.split("+")[0]
    return (f"name: segkit-package\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n  - python>=3.10\n"
            f"  - pytorch>={version}\n  - numpy\n")


def _preprocessing(info: CheckpointInfo) -> list[Any]:
    """The checkpoint's normalisation as bioimage.io preprocessing steps."""
    from bioimageio.spec.model import v0_5 as spec

    norm = info.normalization
    if norm.percentiles is None:
        steps: list[Any] = [spec.FixedZeroMeanUnitVarianceDescr(kwargs=spec.FixedZeroMeanUnitVarianceKwargs(
            mean=float(norm.mean), std=float(norm.std)))]
    else:
        low, high = norm.percentiles
        steps = [spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
            axes=[spec.AxisId("y"), spec.AxisId("x")], min_percentile=low, max_percentile=high, eps=_EPS))]
    if norm.clip:
        steps.append(spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)))
    return steps


def _describe(info: CheckpointInfo, work: Path, *, name: str, description: str, authors: list[str],
              maintainers: list[str], license: str, sizes: tuple[int, int], halo: int, pad: tuple[int, int], output_id: str,
              channels: list[str], opset: int, tile: int, state_dict: bool) -> Any:
    """The ModelDescr, validated with the package's files in `work` (hashes, test tensor shapes); no remote check."""
    import torch
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as spec
    from pydantic import ValidationError

    from segkit.bioimageio.source import CALLABLE

    space = ("y", "x")
    input_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("raw")])]
    input_axes += [spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=sizes[0], step=sizes[1]))
                   for a in space]
    reference = {a: spec.SizeReference(tensor_id=spec.TensorId(INPUT_ID), axis_id=spec.AxisId(a)) for a in space}
    output_axes: list[Any] = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in channels])]
    output_axes += [spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), size=reference[a], halo=halo) if halo
                    else spec.SpaceOutputAxis(id=spec.AxisId(a), size=reference[a]) for a in space]
    kind = output_kind(info)
    postprocessing = []
    if kind == "intensity":
        output_data = spec.IntervalOrRatioDataDescr(type="float32")
        postprocessing = [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(
            gain=float(info.normalization.std), offset=float(info.normalization.mean)))]
    else:
        output_data = spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0))
    output_text = {"probability": f"{_class_name(info)} probability",
                   "probabilities": f"the probability of each class ({', '.join(channels)})",
                   "intensity": "denoised grey values, in the input's units"}[kind]
    pytorch_version = spec.Version(torch.__version__.split("+")[0])
    record = json.loads(info.to_json())
    weights: dict[str, Any] = {}
    if state_dict:
        weights["pytorch_state_dict"] = spec.PytorchStateDictWeightsDescr(
            source=work / "weights.pt",
            architecture=spec.ArchitectureFromFileDescr(
                source=work / ARCH_FILE, callable=spec.Identifier(CALLABLE),
                kwargs={"model": info.model, "model_kwargs": info.model_kwargs, "output": kind, "pad": list(pad),
                        "margin": info.geometry.margin}),
            pytorch_version=pytorch_version,
            dependencies=spec.FileDescr(source=work / "environment.yaml"),
            comment=f"the segkit checkpoint's tensors; the architecture is {ARCH_FILE} (torch only, no segkit)",
        )
    original = "pytorch_state_dict" if state_dict else None
    weights["torchscript"] = spec.TorchscriptWeightsDescr(
        source=work / "weights_torchscript.pt", pytorch_version=pytorch_version, parent=original,
        comment="torch.jit.trace of the packaged model")
    weights["onnx"] = spec.OnnxWeightsDescr(
        source=work / "weights.onnx", opset_version=opset, parent=original or "torchscript",
        comment="dynamic batch, height and width")
    try:
        with _known_maintainers(maintainers), ValidationContext(root=work, perform_io_checks=True, log_warnings=False,
                                                                raise_errors=False):
            return spec.ModelDescr(
                name=name,
                description=description[:1024],
                authors=[spec.Author(name=a) for a in authors],
                maintainers=[spec.Maintainer(github_user=m) for m in maintainers],
                cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi)) for text, doi in _cites(info)],
                license=spec.LicenseId(license),
                documentation=spec.FileDescr(source=work / "README.md"),
                covers=[spec.FileDescr(source=work / "cover.png")],
                tags=["segkit", "2d", "pytorch", "onnx", "torchscript",
                      *(["segmentation", _class_name(info).replace("_", "-") if kind == "probability"
                         else info.inference.labels_kind] if info.kind == "segmenter" else ["denoising"]),
                      re.sub(r"[^a-z0-9-]+", "-", info.model.lower()).strip("-")],
                inputs=[spec.InputTensorDescr(
                    id=spec.TensorId(INPUT_ID),
                    description="grey values in the units the model was trained on",
                    axes=input_axes,
                    data=spec.IntervalOrRatioDataDescr(type="float32"),
                    test_tensor=spec.FileDescr(source=work / "test_input.npy"),
                    sample_tensor=spec.FileDescr(source=work / "sample_input.tif"),
                    pad=spec.ReflectPadding(mode="reflect"),  # mode given: a default-only entry is written as {}
                    preprocessing=_preprocessing(info),
                )],
                outputs=[spec.OutputTensorDescr(
                    id=spec.TensorId(output_id),
                    description=output_text,
                    axes=output_axes,
                    data=output_data,
                    test_tensor=spec.FileDescr(source=work / "test_output.npy"),
                    sample_tensor=spec.FileDescr(source=work / "sample_output.tif"),
                    postprocessing=postprocessing,
                )],
                weights=spec.WeightsDescr(**weights),
                config=spec.Config(segkit={"checkpoint": record, "test_tile": tile, "pad": list(pad)}),
            )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        raise PackageError(f"bioimageio.spec rejects the package description: {where}: "
                           f"{str(error.get('msg', exc)).splitlines()[0]}") from exc


def package_checkpoint(checkpoint: str | Path, output: str | Path | None = None, /, *, author: str | Sequence[str],
                       maintainer: str | Sequence[str] | None = None, denoiser: str | Path | None = None,
                       name: str | None = None, description: str | None = None, license: str = "MIT",
                       tile: int | None = None, opset: int = 17, test: bool = True, overwrite: bool = False,
                       report: Any = None) -> PackageRecord:
    """Write the bioimage.io package of a segkit checkpoint (`segkit package`).

    Parameters
    ----------
    checkpoint : str or Path
        A segmenter or denoiser checkpoint.
    output : str or Path, optional
        The package; default: the checkpoint's name with .bioimageio.zip.
    author : str or sequence of str
        One name or several.
    maintainer : str or sequence of str, optional
        GitHub user names (bioimage.io `maintainers`; without them bioimageio.spec warns).
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
    _maintainers(maintainer)
    if denoiser is not None:
        model, info = compose_with_denoiser(denoiser, checkpoint)
    else:
        model, info = load_model(checkpoint, expect_kind=read_info(checkpoint).kind)
    return build_package(model, info, output, author=author, maintainer=maintainer, name=name,
                         description=description, license=license, tile=tile, opset=opset, test=test,
                         overwrite=overwrite, inputs=[checkpoint, denoiser])
