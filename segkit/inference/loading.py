"""Open a model file for prediction: a checkpoint or an ONNX file, as a torch or ONNX Runtime
engine, with its record, geometry and tile, after checking that the options fit together.

The denoiser composition imports torch, so it is imported by the function that loads a pair of
checkpoints; reading records and planning import no torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from segkit.bioimageio.read import is_package, load_package, plan_package
from segkit.checkpoint import load_model, read_info
from segkit.errors import SegkitError, TileSizeError
from segkit.export import export_onnx, read_onnx_metadata
from segkit.inference.engines import OnnxEngine, TorchEngine, compile_choice_for, resolve_amp, resolve_device
from segkit.inference.options import PredictOptions
from segkit.inference.tta import TTAForward
from segkit.memory import tile_problem

#: The bundled U-Net's name, taken wherever a model file is (`segkit export demo`, `predict -m demo`,
#: `segkit.predict(..., model="demo")`); a file or folder of that name in the working folder wins.
BUNDLED_MODEL = "demo"


def default_model_path() -> Path:
    """The bundled demo U-Net, the model `segkit predict` uses when none is given."""
    return Path(__file__).resolve().parents[1] / "data" / "unet_isbi_demo.safetensors"


def resolve_model(model: str | Path | None) -> Path:
    """The model file `model` names: the bundled U-Net for None or its name `demo` (when no file or folder of
    that name exists: a path always wins), else the path itself (checked where it is opened)."""
    if model is None or (str(model) == BUNDLED_MODEL and not Path(model).exists()):
        return default_model_path()
    return Path(model)


def names_bundled_model(model: str | Path | None) -> bool:
    """Whether `model` (a command's argument) is the bundled U-Net's name rather than a path."""
    return model is not None and resolve_model(model) == default_model_path() and str(model) == BUNDLED_MODEL


def model_info(model: str | Path | None, *, kind: str = "segmenter") -> Any:
    """The record (CheckpointInfo) of a checkpoint, ONNX file, bioimage.io package or the bundled U-Net
    (None or `demo`), read without loading weights: its inference defaults (threshold, watershed) for
    `segkit evaluate -m` and `segkit segment -m`."""
    return _records(EngineRequest(resolve_model(model), PredictOptions(kind=kind)))[0]


def trained_tile(info: Any, geometry: Any) -> int:
    """The tile the model was trained with, else the geometry's default tile."""
    return int(info.inference.tile or geometry.default_tile)


@dataclass(frozen=True)
class EngineRequest:
    """How to build an engine: plain data, so a Dask worker can build its own from it.

    model: checkpoint (.safetensors), ONNX file or bioimage.io package; options: the prediction's
    (engine, denoise, halo, device, amp, compile_model, tta and kind shape the engine).
    """

    model: Path
    options: PredictOptions = PredictOptions()


@dataclass(frozen=True)
class LoadedEngine:
    """What prediction needs from a model file: the engine, its record, geometry and tile."""

    engine: Any
    info: Any
    geometry: Any
    tile: int
    fixed_tile: bool = False


def load_prediction_engine(request: EngineRequest, *, tile: int | None = None,
                           report: Callable[[str], object] = print) -> LoadedEngine:
    """Open the requested checkpoint or ONNX file as a torch or ONNX Runtime engine (wrapped for
    test-time augmentation when asked), checking that the options fit together."""
    loaded = _load_engine(request, tile=tile, report=report)
    if request.options.tta != "none":
        loaded = replace(loaded, engine=TTAForward(loaded.engine, request.options.tta))
    return loaded


def _load_engine(request: EngineRequest, *, tile: int | None, report: Callable[[str], object]) -> LoadedEngine:
    options = request.options
    model_path, kind, amp, device = Path(request.model), options.kind, options.amp, options.device
    if is_package(model_path):
        return _load_package(request, tile=tile, report=report)
    is_onnx = model_path.suffix.lower() == ".onnx"
    engine = ("onnx" if is_onnx else "torch") if options.engine == "auto" else options.engine
    if is_onnx:
        if engine == "torch":
            raise SegkitError(f"{model_path} is an ONNX file: run it with the onnx engine, or pass its .safetensors "
                              "checkpoint to use the torch engine")
        if options.denoise is not None:
            raise SegkitError("a denoiser pre-stage takes .safetensors checkpoints; for ONNX, export the pair with "
                              "`segkit export SEGMENTER --with-denoiser DENOISER`")
        info, record = read_onnx_metadata(model_path)
        if info.kind != kind:
            raise SegkitError(f"{model_path} is a {info.kind} model, but a {kind} is needed here")
        if amp == "bf16" or (amp == "fp16" and record.precision != "fp16"):
            raise SegkitError(f"{model_path} is an {record.precision} graph; amp={amp!r} needs a graph exported with "
                              "`segkit export --fp16` (or use amp='none')")
        tile = _onnx_tile(model_path, record, tile)
        geometry = info.geometry if options.halo is None else info.geometry.with_halo(options.halo)
        geometry.check_tile(tile)
        check_tile_memory(info, geometry, tile, device)
        if options.compile_model == "on":
            raise SegkitError("compile applies to the torch engine; an ONNX file is already compiled by onnxruntime")
        onnx_engine = OnnxEngine(model_path, geometry, device=device, fp16=record.precision == "fp16")
        # one trial tile (the smallest the graph takes): metadata that does not match the graph fails here
        onnx_engine.check_geometry(record.tile if record.spatial == "fixed" else geometry.min_input, model_path)
        return LoadedEngine(onnx_engine, info, geometry, tile, fixed_tile=record.spatial == "fixed")
    model, info = _load_checkpoint(model_path, options.denoise, kind)
    geometry = info.geometry if options.halo is None else info.geometry.with_halo(options.halo)
    tile = tile or trained_tile(info, geometry)
    check_tile_memory(info, geometry, tile, device)
    if engine == "torch":
        channel = (1 if info.inference.labels_kind == "membrane" else "all") if kind == "segmenter" else None
        torch_engine = TorchEngine(model, device=device, amp=amp, channel=channel,
                                   compile_model=compile_choice_for(options.compile_model,
                                                                    info.model if not options.denoise else ""))
        return LoadedEngine(torch_engine, info, geometry, tile)
    resolve_amp(amp, "cpu")  # an unknown amp fails here
    if amp == "bf16":
        raise SegkitError("the onnx engine runs fp32 or fp16 graphs; use amp fp16 or none")
    if options.compile_model == "on":
        raise SegkitError("compile applies to the torch engine; use the torch engine")
    fp16 = amp == "fp16" or (amp == "auto" and resolve_device(device) != "cpu")  # auto: fp16 graphs on GPUs
    geometry.check_tile(tile)
    report(f"exporting {model_path.name} to ONNX ({'fp16' if fp16 else 'fp32'}, verified against "
           "torch) for this run; `segkit export` saves the file for reuse")
    onnx_bytes, _ = export_onnx(model, info, tile=tile, fp16=fp16)
    return LoadedEngine(OnnxEngine(onnx_bytes, geometry, device=device, fp16=fp16), info, geometry, tile)


def model_record(request: EngineRequest) -> tuple[Any, Any]:
    """The record and geometry (halo applied) of the requested model, without building an engine."""
    info, geometry, _ = _records(request)
    return info, geometry


def _records(request: EngineRequest) -> tuple[Any, Any, Any]:
    """`model_record` plus an ONNX file's export record (None for checkpoints), each file read once."""
    path, options = Path(request.model), request.options
    export_record = None
    if is_package(path):
        info = plan_package(path, kind=options.kind, trust_model_code=options.trust_model_code)[1].info
    elif path.suffix.lower() == ".onnx":
        info, export_record = read_onnx_metadata(path)
    elif options.denoise is not None:
        info = _load_checkpoint(path, options.denoise, options.kind)[1]
    else:
        info = read_info(path)
    if info.kind != options.kind:
        raise SegkitError(f"{path} is a {info.kind} model, but a {options.kind} is needed here")
    geometry = info.geometry if options.halo is None else info.geometry.with_halo(options.halo)
    return info, geometry, export_record


def planned_tile(request: EngineRequest, tile: int | None = None) -> tuple[Any, Any, int]:
    """The record, geometry and tile that `load_prediction_engine(request, tile=tile)` would run
    with (an ONNX file's export tile, else the trained tile), checked the same way, without
    building an engine (the Dask path's client, whose workers build their own)."""
    info, geometry, export_record = _records(request)
    if export_record is not None:
        tile = _onnx_tile(Path(request.model), export_record, tile)
    else:
        tile = tile or trained_tile(info, geometry)
    geometry.check_tile(tile)
    if resolve_device(request.options.device) == "cpu":  # asking a GPU here would hold a CUDA context for the
        check_tile_memory(info, geometry, tile, "cpu")  # whole run; workers check theirs as they load
    return info, geometry, tile


def check_tile_memory(info: Any, geometry: Any, tile: int, device: str) -> None:
    """Refuse (TileSizeError, with the numbers) a tile whose parameters and activations cannot fit in
    the memory of `device`, before anything is allocated (segkit.memory.tile_problem)."""
    problem = tile_problem(info, geometry, tile, device)
    if problem is not None:
        raise TileSizeError(problem)


def _onnx_tile(path: Path, record: Any, tile: int | None) -> int:
    """The tile of an ONNX graph: the asked one, else its export tile; a fixed-shape graph takes only that."""
    tile = tile or record.tile
    if record.spatial == "fixed" and tile != record.tile:
        raise SegkitError(f"{path} was exported for tiles of {record.tile} px only; use tile "
                          f"{record.tile} or export again with tile={tile}")
    return tile


def _load_package(request: EngineRequest, *, tile: int | None, report: Callable[[str], object]) -> LoadedEngine:
    """A bioimage.io package (.zip or rdf.yaml) as an engine: its own weights (ONNX, TorchScript or
    PyTorch state dict), geometry and normalisation (segkit.bioimageio.read)."""
    if not Path(request.model).exists():
        raise SegkitError(f"model file {request.model} does not exist; check the path")
    options = request.options
    for option, value, default in (("engine", options.engine, "auto"), ("tta", options.tta, "none"),
                                   ("denoise", options.denoise, None), ("halo", options.halo, None),
                                   ("compile_model", "auto" if options.compile_model == "off" else options.compile_model, "auto")):
        if value != default:
            raise SegkitError(f"{option}={value!r} does not apply to a bioimage.io package (it brings its own "
                              "weights and geometry); leave it out")
    engine = load_package(request.model, kind=options.kind, device=options.device,
                          trust_model_code=options.trust_model_code, report=report)
    if tile is None:  # the tile the package records (segkit.bioimageio.read.PackagePlan.tile_note says which)
        tile = trained_tile(engine.info, engine.geometry)
        if options.tile != "auto":  # 'auto' measures its own
            report(f"note: {engine.plan.tile_note}; tile=N sets another")
    engine.geometry.check_tile(tile)
    check_tile_memory(engine.info, engine.geometry, tile, options.device)
    return LoadedEngine(engine, engine.info, engine.geometry, tile)


def _load_checkpoint(model_path: Path, denoiser_path: Path | None, kind: str) -> tuple[Any, Any]:
    from segkit.models.compose import compose_with_denoiser

    if denoiser_path is not None:
        return compose_with_denoiser(denoiser_path, model_path)
    return load_model(model_path, expect_kind=kind)
