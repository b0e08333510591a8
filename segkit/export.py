"""ONNX export of a segkit model, checked against torch before anything is written.

The graph takes a float32 batch (N, C, H, W), normalised as the checkpoint says, and returns
float32 (N, 1, h, w): the membrane probability of a segmenter (softmax inside the graph), (N, K, h, w)
class probabilities of a model trained on semantic or instance labels, or the denoised intensities
of a denoiser. With `fp16`, the fp32 graph is converted by ONNX Runtime's
float16 tool: weights and activations become float16, input and output stay float32 (cast in
the graph), so engines feed it the same arrays. (Tracing a half-precision model instead would
run it through torch's fp16 CPU kernels, which are minutes per tile and numerically unreliable.)

Exporter: the TorchScript-based one (`dynamo=False`). It keeps the batch, height and width
axes dynamic for every segkit model; the torch.export-based exporter fails on the valid-conv
U-Net, whose crop offsets become data-dependent symbols. `fixed_tile=True` fixes H and W to
the export tile (dynamic batch only), which TensorRT prefers.

The file's metadata holds the checkpoint's record (model, geometry, normalisation, classes,
inference defaults) and an export record (tile, precision, axes, measured parity), so
`segkit predict model.onnx` needs nothing else.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segkit._optional import require
from segkit.errors import CheckpointError, SegkitError
from segkit.inference.engines import onnxruntime_distribution
from segkit.io.outputs import atomic_path
from segkit.io.tiff import check_output_path
from segkit.normalization import mean_std_normalization
from segkit.record import CheckpointInfo

EXPORT_FORMAT = "segkit-onnx/1"
INPUT_NAME = "input"
OPSETS = range(13, 21)  # what the TorchScript exporter writes reliably
#: fp32 graphs must match torch this closely (max abs difference).
FP32_TOLERANCE = 1e-4
#: fp16 graphs against the fp32 torch model: mean and max abs difference, relative to the output's scale.
FP16_MEAN_TOLERANCE = 1e-3
FP16_MAX_TOLERANCE = 2e-2


class ExportError(SegkitError):
    """An export that could not be made or did not reproduce the torch model."""


@dataclass(frozen=True)
class ExportRecord:
    """How an ONNX file was made; stored in its metadata beside the checkpoint record."""

    tile: int
    precision: str  # "fp32" or "fp16"
    spatial: str  # "dynamic" (any valid tile) or "fixed" (only `tile`)
    output: str  # "probability" (segmenter) or "intensity" (denoiser)
    opset: int
    parity: dict[str, float] = field(default_factory=dict)
    format: str = EXPORT_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str) -> "ExportRecord":
        try:
            data = json.loads(text)
            if data.get("format") != EXPORT_FORMAT:
                raise CheckpointError(f"{source}: unsupported segkit ONNX format {data.get('format')!r}, "
                                      f"expected {EXPORT_FORMAT!r}; re-export it with this segkit")
            return cls(tile=int(data["tile"]), precision=str(data["precision"]), spatial=str(data["spatial"]),
                       output=str(data["output"]), opset=int(data["opset"]),
                       parity={k: float(v) for k, v in data.get("parity", {}).items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{source}: malformed segkit export record: {exc}") from exc


def inference_head(model: Any, *, output: str, all_classes: bool = False) -> Any:
    """The module that is exported: the model with its output turned into what segkit writes.

    Parameters
    ----------
    model : torch.nn.Module
        A segkit model; it takes (N, C, H, W) float32 normalised input.
    output : {"probability", "intensity"}
        "probability": softmax over the model's classes (a segmenter); "intensity": the model's output
        as it is (a denoiser).
    all_classes : bool
        With "probability": every class's probability, (N, K, h, w), instead of class 1's, (N, 1, h, w).

    Returns
    -------
    torch.nn.Module
        The head, in eval mode: (N, C, H, W) float32 in, (N, 1 or K, h, w) float32 out.
    """
    import torch

    class InferenceHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.model(x)
            if output == "probability":
                return torch.softmax(y, dim=1) if all_classes else torch.softmax(y, dim=1)[:, 1:2]
            return y

    return InferenceHead().eval()


def _trace(head: Any, *, tile: int, opset: int, fixed_tile: bool, output: str, channels: int = 1) -> bytes:
    import torch

    axes = {0: "batch"} if fixed_tile else {0: "batch", 2: "height", 3: "width"}
    out_axes = {0: "batch"} if fixed_tile else {0: "batch", 2: "out_height", 3: "out_width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
        with torch.no_grad():
            torch.onnx.export(head, (torch.zeros(1, channels, tile, tile),), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[output],
                              dynamic_axes={INPUT_NAME: axes, output: out_axes}, do_constant_folding=True)
    return buffer.getvalue()


def parity_inputs(info: CheckpointInfo, tile: int, *, fixed_tile: bool) -> dict[str, np.ndarray]:
    """The inputs an export is checked on.

    Parameters
    ----------
    info : CheckpointInfo
        The model's record (normalisation, channels, geometry).
    tile : int
        The export tile (a valid input size).
    fixed_tile : bool
        Whether the graph takes only `tile`; otherwise a second valid size is checked too.

    Returns
    -------
    dict of str to (N, C, tile, tile) ndarray of float32
        Random noise (batch 2), a real EM crop (the bundled ISBI slice, normalised) and, when H and W
        are dynamic, noise at a second valid size.
    """
    import tifffile

    rng = np.random.default_rng(0)
    raw = tifffile.imread(Path(__file__).parent / "data" / "isbi_test_raw.tif")[0].astype(np.float32)
    norm = info.normalization
    if info.inference.input_dtype in (None, "uint8") and norm.channels is None and norm.percentiles is None:
        real = info.normalization.apply(raw)
    else:  # the model was trained on other units, channels or a percentile rule: the crop's own statistics
        real = mean_std_normalization([raw]).apply(raw)
    reps = -(-tile // min(real.shape))
    if reps > 1:
        real = np.pad(real, [(0, real.shape[0] * (reps - 1)), (0, real.shape[1] * (reps - 1))], mode="symmetric")
    channels = info.input_channels
    inputs = {
        "random": rng.standard_normal((2, channels, tile, tile), dtype=np.float32),
        "real": np.ascontiguousarray(np.repeat(real[None, None, :tile, :tile], channels, axis=1)),
    }
    if not fixed_tile:
        geometry = info.geometry
        other = tile - geometry.step if geometry.is_valid_input(tile - geometry.step) else tile + geometry.step
        inputs[f"random_{other}px"] = rng.standard_normal((1, channels, other, other), dtype=np.float32)
    return inputs


def check_parity(onnx_bytes: bytes, reference: Any, inputs: dict[str, np.ndarray], *, fp16: bool) -> dict[str, float]:
    """Run the graph on ONNX Runtime's CPU provider and compare it with `reference`.

    Parameters
    ----------
    onnx_bytes : bytes
        The graph.
    reference : torch.nn.Module
        The fp32 torch head it was exported from (`inference_head`).
    inputs : dict of str to (N, C, H, W) ndarray of float32
        The inputs to compare on (`parity_inputs`).
    fp16 : bool
        Whether the graph is fp16 (looser tolerances).

    Returns
    -------
    dict of str to float
        The max and mean absolute difference per input.

    Raises
    ------
    ExportError
        Shapes differ, or a difference exceeds the tolerance.

    fp16 graphs are compared with the fp32 model: torch has no trustworthy fp16 path on the CPU
    to compare against, so rounding is allowed (mean and max bounds) but a wrong graph is not.
    """
    import torch

    ort = require("onnxruntime", feature="ONNX export", package=onnxruntime_distribution())
    session = ort.InferenceSession(onnx_bytes, _quiet_options(ort), providers=["CPUExecutionProvider"])
    parity: dict[str, float] = {}
    for name, x in inputs.items():
        got = session.run(None, {INPUT_NAME: x})[0]
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"exported graph gives shape {got.shape} on the {name} input, torch {want.shape}")
        diff = np.abs(got.astype(np.float64) - want)
        parity[f"max_abs_diff_{name}"] = float(diff.max())
        parity[f"mean_abs_diff_{name}"] = float(diff.mean())
        scale = max(1.0, float(np.abs(want).max()))
        if not fp16 and diff.max() > FP32_TOLERANCE * scale:
            raise ExportError(f"exported graph differs from torch by {diff.max():.2e} on the {name} input "
                              f"(allowed {FP32_TOLERANCE:.0e}); try another opset=N ({OPSETS.start} to {OPSETS.stop - 1})")
        if fp16 and (diff.mean() > FP16_MEAN_TOLERANCE * scale or diff.max() > FP16_MAX_TOLERANCE * scale):
            raise ExportError(f"fp16 graph differs from the fp32 model by {diff.mean():.2e} on average, "
                              f"{diff.max():.2e} at most, on the {name} input (allowed {FP16_MEAN_TOLERANCE:.0e} and "
                              f"{FP16_MAX_TOLERANCE:.0e}); export without fp16=True")
    return parity


def to_float16(proto: Any) -> Any:
    """An fp16 copy of an fp32 graph: fp16 weights and activations, float32 input and output.

    Parameters
    ----------
    proto : onnx.ModelProto
        The fp32 graph.

    Returns
    -------
    onnx.ModelProto
        The converted graph, its nodes in topological order.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(proto, keep_io_types=True))
    converted.topological_sort()  # the converter appends the input casts at the end of the node list
    return converted.model


def _quiet_options(ort: Any) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; segkit reports providers itself
    return options


def export_onnx(model: Any, info: CheckpointInfo, /, *, tile: int, fp16: bool = False, opset: int = 17,
                fixed_tile: bool = False) -> tuple[bytes, ExportRecord]:
    """Export a model to ONNX, checked with onnx.checker and against torch on random and real input.

    Parameters
    ----------
    model : torch.nn.Module
        The model (moved to the CPU in float32 for tracing).
    info : CheckpointInfo
        Its record, stored in the graph's metadata.
    tile : int
        The tile traced (a valid input size of the model).
    fp16 : bool
        Convert the graph to fp16 (input and output stay float32).
    opset : int
        The ONNX opset, 13 to 20.
    fixed_tile : bool
        Fix H and W to `tile` (batch stays dynamic).

    Returns
    -------
    onnx_bytes : bytes
        The graph with its metadata (the record and the export record).
    record : ExportRecord
        How it was made, with the measured parity.

    Raises
    ------
    ExportError
        An unsupported opset, a graph onnx.checker rejects, or one that differs from torch.
    TileSizeError
        `tile` is not a valid input size of the model.
    """
    require("onnx", feature="ONNX export")
    import onnx

    if opset not in OPSETS:
        raise ExportError(f"opset={opset!r} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1} (17 is tested)")
    info.geometry.check_tile(tile)
    output = "intensity" if info.kind == "denoiser" else "probability"
    all_classes = info.kind == "segmenter" and info.inference.labels_kind != "membrane"
    channels = info.input_channels
    head = inference_head(model.cpu().float().eval(), output=output, all_classes=all_classes)
    proto = onnx.load_from_string(_trace(head, tile=tile, opset=opset, fixed_tile=fixed_tile, output=output,
                                         channels=channels))
    if fp16:
        proto = to_float16(proto)
    onnx_bytes = proto.SerializeToString()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the exported graph: {str(exc).splitlines()[0]}") from exc
    parity = check_parity(onnx_bytes, head, parity_inputs(info, tile, fixed_tile=fixed_tile), fp16=fp16)
    record = ExportRecord(tile=tile, precision="fp16" if fp16 else "fp32",
                          spatial="fixed" if fixed_tile else "dynamic", output=output, opset=opset, parity=parity)
    proto.producer_name = "segkit"
    proto.doc_string = (f"segkit {info.model} ({info.kind}); input {INPUT_NAME} N x {channels} x H x W float32, "
                        "normalised")
    for key, value in (("segkit", info.to_json()), ("segkit_export", record.to_json())):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString(), record


def write_onnx(onnx_bytes: bytes, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an exported graph under a temporary name and rename it, so no half-written .onnx is left.

    Parameters
    ----------
    onnx_bytes : bytes
        The graph (`export_onnx`).
    path : str or Path
        The .onnx file to write.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    OutputError
        The path is refused (see `segkit.io.outputs.check_output`) or the write failed.
    """
    path = check_output_path(path, overwrite=overwrite)
    with atomic_path(path) as tmp:
        tmp.write_bytes(onnx_bytes)
    return path


def read_onnx_metadata(path: str | Path) -> tuple[CheckpointInfo, ExportRecord]:
    """The records stored in a segkit ONNX file.

    Parameters
    ----------
    path : str or Path
        An .onnx file from `segkit export`.

    Returns
    -------
    info : CheckpointInfo
        The model's record.
    record : ExportRecord
        How the file was exported.

    Raises
    ------
    CheckpointError
        The file is missing, not ONNX, has no segkit metadata, or its graph does not take one
        (N, C, H, W) input.
    """
    require("onnx", feature="reading ONNX models")
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model {path} does not exist; pass an .onnx file from `segkit export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError family
        raise CheckpointError(f"{path} is not a valid ONNX model ({type(exc).__name__}); re-export it with "
                              "`segkit export`") from exc
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    if "segkit" not in metadata or "segkit_export" not in metadata:
        raise CheckpointError(f"{path} is an ONNX model without segkit metadata, so its geometry and normalisation "
                              "are unknown; export it from a segkit checkpoint with `segkit export`")
    weights = {tensor.name for tensor in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    rank = len(inputs[0].type.tensor_type.shape.dim) if inputs else 0
    if len(inputs) != 1 or rank != 4:
        what = f"{len(inputs)} inputs" if len(inputs) != 1 else f"input of rank {rank}"
        raise CheckpointError(f"{path} takes {what}, but segkit feeds one (N, C, H, W) batch of rank 4; its metadata "
                              "does not match its graph: export it again with `segkit export`")
    return CheckpointInfo.from_json(metadata["segkit"], str(path)), ExportRecord.from_json(metadata["segkit_export"],
                                                                                           str(path))
