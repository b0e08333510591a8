"""Open a model file for prediction: a checkpoint or an ONNX file, as a torch or ONNX Runtime
engine, with its record, geometry and tile, after checking that the options fit together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segkit.errors import SegkitError


def default_model_path() -> Path:
    """The bundled demo U-Net, the model `segkit predict` uses when none is given."""
    return Path(__file__).resolve().parents[1] / "data" / "unet_isbi_demo.safetensors"


def default_tile(geometry: Any) -> int:
    """572 (the U-Net paper's tile) where valid, else the smallest valid size of at least 512."""
    if geometry.is_valid_input(572):
        return 572
    below, above = geometry.nearest_valid(512)
    return 512 if below == 512 else above


def trained_tile(info: Any, geometry: Any) -> int:
    """The tile the model was trained with, else `default_tile`."""
    return int(info.inference.get("tile") or default_tile(geometry))


@dataclass(frozen=True)
class LoadedEngine:
    """What prediction needs from a model file: the engine, its record, geometry and tile."""

    engine: Any
    info: Any
    geometry: Any
    tile: int
    fixed_tile: bool = False


def load_prediction_engine(model_path: Path, engine: str, *, denoiser_path: Path | None = None, tile: int | None,
                           halo: int | None = None, device: str, amp: str, kind: str = "segmenter",
                           compile_model: bool = False, report: Callable[[str], object] = print) -> LoadedEngine:
    """Open a checkpoint or ONNX file of a `kind` model (segmenter or denoiser) as a torch or ONNX
    Runtime engine, checking that the options fit."""
    from segkit.inference.engines import OnnxEngine, TorchEngine

    is_onnx = model_path.suffix.lower() == ".onnx"
    engine = ("onnx" if is_onnx else "torch") if engine == "auto" else engine
    if is_onnx:
        from segkit.export import read_onnx_metadata

        if engine == "torch":
            raise SegkitError(f"{model_path} is an ONNX file: run it with --engine onnx, or pass its .safetensors "
                              "checkpoint to use --engine torch")
        if denoiser_path is not None:
            raise SegkitError("--denoise takes .safetensors checkpoints; for ONNX, export the pair with "
                              "`segkit export SEGMENTER --with-denoiser DENOISER`")
        info, record = read_onnx_metadata(model_path)
        if info.kind != kind:
            raise SegkitError(f"{model_path} is a {info.kind} model, but a {kind} is needed here")
        if amp == "bf16" or (amp == "fp16" and record.precision != "fp16"):
            raise SegkitError(f"{model_path} is an {record.precision} graph; --amp {amp} needs a graph exported with "
                              "`segkit export --fp16` (or use --amp none)")
        tile = tile or record.tile
        if record.spatial == "fixed" and tile != record.tile:
            raise SegkitError(f"{model_path} was exported for tiles of {record.tile} px only; use --tile "
                              f"{record.tile} or export again with --tile {tile}")
        geometry = info.geometry if halo is None else info.geometry.with_halo(halo)
        geometry.check_tile(tile)
        if compile_model:
            raise SegkitError("--compile applies to the torch engine; an ONNX file is already compiled by onnxruntime")
        onnx_engine = OnnxEngine(model_path, geometry, device=device, fp16=record.precision == "fp16")
        return LoadedEngine(onnx_engine, info, geometry, tile, fixed_tile=record.spatial == "fixed")
    model, info = _load_checkpoint(model_path, denoiser_path, kind)
    geometry = info.geometry if halo is None else info.geometry.with_halo(halo)
    tile = tile or trained_tile(info, geometry)
    if engine == "torch":
        channel = 1 if kind == "segmenter" else None
        torch_engine = TorchEngine(model, device=device, amp=amp, channel=channel, compile_model=compile_model)
        return LoadedEngine(torch_engine, info, geometry, tile)
    from segkit.export import export_onnx

    if amp == "bf16":
        raise SegkitError("--engine onnx runs fp32 or fp16 graphs; use --amp fp16 or --amp none")
    if compile_model:
        raise SegkitError("--compile applies to the torch engine; use --engine torch")
    geometry.check_tile(tile)
    report(f"exporting {model_path.name} to ONNX ({'fp16' if amp == 'fp16' else 'fp32'}, verified against "
           "torch) for this run; `segkit export` saves the file for reuse")
    onnx_bytes, _ = export_onnx(model, info, tile=tile, fp16=amp == "fp16")
    return LoadedEngine(OnnxEngine(onnx_bytes, geometry, device=device, fp16=amp == "fp16"), info, geometry, tile)


def _load_checkpoint(model_path: Path, denoiser_path: Path | None, kind: str) -> tuple[Any, Any]:
    from segkit.checkpoint import compose_with_denoiser, load_model

    if denoiser_path is not None:
        return compose_with_denoiser(denoiser_path, model_path)
    return load_model(model_path, expect_kind=kind)
