"""The one entry point for prediction: `segkit.predict(sources, output, model=..., **options)`.

The CLI, `segkit demo`, tools/ and the Dask path all come through here, so every option works
on every path:

- one stack (a TIFF, a folder or a glob of 2D TIFFs read as one stack) into one TIFF;
- many files into an output folder (one output each; a failing file is reported and skipped): an
  existing folder, a path ending in '/', or, given several inputs, any path not ending in .tif;
- a stack into an OME-Zarr store on Dask (`workers`, `scheduler`, or an output ending in .zarr).

Example:
    >>> import segkit
    >>> result = segkit.predict("stack.tif", "membranes.tif", tile=572)       # doctest: +SKIP
    >>> result.outputs, result.tile, result.batch, result.engine              # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segkit.errors import SegkitError

if TYPE_CHECKING:
    from segkit.checkpoint import InferenceDefaults

OUTPUT_TYPES = ("uint8", "float16")
DENOISED_TYPES = ("same", "float32")


class Progress(Protocol):
    """What predict reports progress to (a tqdm bar fits): the total number of tiles, then each batch."""

    def reset(self, total: int | None = None) -> Any: ...

    def update(self, n: int = 1) -> Any: ...


@dataclass
class PredictResult:
    """What a prediction did: files written, files that failed (path, reason), the tile and batch
    it ran at, the engine and the model in words, what each output holds (`writes`) and the threshold
    used (a mask's or the watershed's, None for probabilities), seconds in all and until the first
    tile batch finished."""

    outputs: list[Path] = field(default_factory=list)
    folder: Path | None = None  # the output folder, when many files were predicted into one
    failed: list[tuple[str, str]] = field(default_factory=list)
    tile: int = 0
    batch: int = 0
    engine: str = ""
    model: str = ""
    writes: str = ""
    threshold: float | None = None
    seconds: float = 0.0
    first_tiles_seconds: float | None = None


def default_output(source: str, suffix: str = "membranes") -> Path:
    """<stem>_<suffix>.tif beside a file or folder; a glob needs an explicit output."""
    if any(ch in source for ch in "*?["):
        raise SegkitError(f"input {source!r} is a pattern; name the output file")
    base = Path(source.rstrip("/"))
    return base.with_name(f"{base.stem}_{suffix}.tif")


def predict(
    sources: str | Path | Sequence[str | Path],
    output: str | Path | None = None,
    *,
    model: str | Path | Any | None = None,
    engine: str = "auto",
    denoise: str | Path | None = None,
    tile: int | str | None = None,
    batch: int | None = None,
    device: str = "auto",
    amp: str = "auto",
    compile_model: bool = False,
    blend: str = "cosine",
    halo: int | None = None,
    output_type: str | None = None,
    threshold: float | str | None = None,
    normalize: str = "auto",
    tta: str = "none",
    instances: bool = False,
    class_index: int | None = None,
    argmax: bool = False,
    compression: str = "zlib",
    kind: str = "segmenter",
    workers: int | None = None,
    scheduler: str | None = None,
    chunk: int = 1024,
    resume: bool = False,
    overwrite: bool = False,
    skip_existing: bool = False,
    report: Callable[[str], object] = print,
    progress: Progress | None = None,
) -> PredictResult:
    """Predict `sources` into `output` with `model` and return what was done.

    model: a checkpoint (.safetensors), an ONNX file, a bioimage.io package (.zip or rdf.yaml), or an
      already built engine (anything with
      the engine protocol plus `geometry`, e.g. a benchmark's); default: the bundled demo U-Net.
    tile: a valid input size, 'auto' (measure sizes and batches on this device), or None (the
      model's trained tile). batch: tiles per forward; None: 4 on the CPU, from the free memory
      on a GPU (or measured with tile 'auto').
    amp: auto (bf16 on GPUs that support it, else fp16; none on the CPU), none, fp16, bf16.
    output_type: uint8 (default) or float16 probabilities; threshold: a 0/255 mask at a number or 'auto'
      (the checkpoint's); instances: uint32 labels by seeded watershed. Models of K classes (semantic or
      instance labels) write every class's probability (a C axis) by default, `class_index` one class,
      `argmax` the most probable class; models trained on instance labels write instances by default.
      kind 'denoiser' with
      output_type same (default: the input's dtype) or float32 writes denoised intensities instead.
    compression: zlib (default; Fiji opens it), zstd, lzw or none.
    workers / scheduler / an output ending in .zarr: the Dask path into OME-Zarr (resumable).
    """
    from segkit.inference.loading import EngineRequest, default_model_path

    started = time.perf_counter()
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    if not sources:
        raise SegkitError("no input given")
    if output_type is None:
        output_type = DENOISED_TYPES[0] if kind == "denoiser" else OUTPUT_TYPES[0]
    _check_choices(output_type=output_type, kind=kind, instances=instances, compression=compression)
    request = None
    if not _is_engine(model):
        request = EngineRequest(Path(model) if model is not None else default_model_path(), engine=engine,
                                denoiser=Path(denoise) if denoise is not None else None, halo=halo, device=device,
                                amp=amp, compile_model=compile_model, tta=tta, kind=kind)
    text_output = str(output) if output is not None else ""
    if text_output.rstrip("/").lower().endswith(".zarr") or scheduler or workers:
        choice = OutputChoice(output_type=output_type, threshold=threshold, instances=instances,
                              class_index=class_index, argmax=argmax)
        return _predict_on_dask(sources, text_output, request, tile=tile, batch=batch, choice=choice,
                                normalize=normalize, blend=blend,
                                chunk=chunk, scheduler=scheduler, workers=workers, resume=resume,
                                overwrite=overwrite, report=report, started=started)
    # an output folder: an existing one, a path ending in a slash, or (several inputs) a path that is not a TIFF
    to_folder = output is not None and (text_output.endswith(("/", "\\")) or Path(text_output).is_dir() or (
        len(sources) > 1 and Path(text_output).suffix.lower() not in (".tif", ".tiff")))
    if len(sources) > 1 and not to_folder:
        raise SegkitError(f"{len(sources)} inputs given: give an output folder for one output per input file, or "
                          "quote a glob ('dir/*.tif') to read the files as one stack")
    # the output is checked before anything is loaded: a name, folder or disk it cannot go to fails at once
    if to_folder:
        from segkit.inference.files import plan_file_jobs
        from segkit.io.outputs import remove_stale_partials

        jobs, _ = plan_file_jobs(sources, Path(text_output), overwrite=overwrite, skip_existing=skip_existing)
        remove_stale_partials([job.output for job in jobs], report)
    else:
        from segkit.io.outputs import check_output

        suffix = "denoised" if kind == "denoiser" else "instances" if instances else _default_suffix(request)
        out_path = Path(output) if output is not None else default_output(sources[0], suffix)
        check_output(out_path, kind="tiff", inputs=sources, overwrite=overwrite, report=report)
    loaded = _load(model, request, tile=tile, report=report)
    chosen_tile, batch = _fit_to_device(loaded, sources[0], tile=tile, batch=batch, report=report)
    choice = OutputChoice(output_type=output_type, threshold=threshold, instances=instances, class_index=class_index,
                          argmax=argmax)
    writes, used_threshold = describe_output(loaded.info, kind=kind, choice=choice)
    result = PredictResult(tile=chosen_tile, batch=batch, engine=loaded.engine.label, writes=writes,
                           model=_model_label(request, model), threshold=used_threshold)
    run = _Runner(loaded, tile=chosen_tile, batch=batch, blend=blend, normalize=normalize, compression=compression,
                  overwrite=overwrite, spec_for=_spec_factory(loaded.info, kind=kind, choice=choice),
                  report=report, progress=progress, started=started, result=result)
    if to_folder:
        result.folder = Path(text_output)
        run.many(sources, result.folder, skip_existing=skip_existing)
    else:
        run.one(sources[0], out_path, header=True)
        result.outputs.append(out_path)
    result.seconds = time.perf_counter() - started
    return result


def _default_suffix(request: Any) -> str:
    """The default output name's suffix: what a segmenter checkpoint writes by default ('membranes' for
    membrane models, ONNX files and packages, whose records are read later)."""
    if request is None or Path(request.model).suffix.lower() != ".safetensors" or not Path(request.model).is_file():
        return "membranes"
    from segkit.checkpoint import read_info

    kind = read_info(request.model).inference.labels_kind
    return {"semantic": "classes", "instances": "objects"}.get(kind, "membranes")


def _check_choices(*, output_type: str, kind: str, instances: bool, compression: str) -> None:
    from segkit.io.tiff import COMPRESSIONS

    if kind not in ("segmenter", "denoiser"):
        raise SegkitError(f"unknown model kind {kind!r}; choose segmenter or denoiser")
    allowed = DENOISED_TYPES if kind == "denoiser" else OUTPUT_TYPES
    if output_type not in allowed:
        raise SegkitError(f"unknown output type {output_type!r}; choose one of {', '.join(allowed)}")
    if instances and kind == "denoiser":
        raise SegkitError("instances come from a segmenter's probabilities, not from a denoiser")
    if compression not in COMPRESSIONS:
        raise SegkitError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


def _is_engine(model: Any) -> bool:
    return model is not None and not isinstance(model, (str, Path))


def _load(model: Any, request: Any, *, tile: int | str | None, report: Callable[[str], object]) -> Any:
    """The LoadedEngine for a model file, or for an engine passed in directly."""
    from segkit.checkpoint import CheckpointInfo, Normalization
    from segkit.inference.loading import LoadedEngine, default_tile, load_prediction_engine

    if request is not None:
        return load_prediction_engine(request, tile=_fixed_tile(tile), report=report)
    info = getattr(model, "info", None) or CheckpointInfo("segmenter", "engine", {}, model.geometry,
                                                          Normalization(0.0, 1.0))
    return LoadedEngine(model, info, model.geometry, _fixed_tile(tile) or default_tile(model.geometry))


def _fixed_tile(tile: int | str | None) -> int | None:
    if tile is None or tile == "auto":
        return None
    try:
        return int(tile)
    except (TypeError, ValueError):
        raise SegkitError(f"tile {tile!r} must be a whole number of pixels or 'auto'") from None


def _fit_to_device(loaded: Any, first_source: str, *, tile: int | str | None, batch: int | None,
                   report: Callable[[str], object]) -> tuple[int, int]:
    """The (tile, batch) to run: measured with tile 'auto', else the given or trained tile and the
    given batch or one chosen from the free device memory."""
    from segkit.inference.adapt import choose_batch, choose_tile

    if tile == "auto":
        from segkit.io.tiff import list_tiff_files
        from segkit.io.zarr import open_volume

        is_zarr = first_source.rstrip("/").lower().endswith(".zarr")  # the Dask path reads zarr stores too
        with open_volume(first_source if is_zarr else list_tiff_files(first_source)[0]) as first:
            plane_shape = first.shape[1:]
        return choose_tile(loaded.engine, loaded.geometry, plane_shape, batch=batch,
                           only=loaded.tile if loaded.fixed_tile else None, report=report)
    loaded.geometry.check_tile(loaded.tile)
    return loaded.tile, batch or choose_batch(loaded.engine, loaded.geometry, loaded.tile, report=report)


@dataclass(frozen=True)
class OutputChoice:
    """What the caller asked to write: probabilities as `output_type`, a mask at `threshold`, instances,
    one class (`class_index`) or the most probable class (`argmax`)."""

    output_type: str = "uint8"
    threshold: float | str | None = None
    instances: bool = False
    class_index: int | None = None
    argmax: bool = False


def _spec_factory(info: Any, *, kind: str, choice: OutputChoice) -> Callable[[Any], Any]:
    """How planes of a given stack are encoded (denoised intensities depend on the stack's dtype)."""
    from segkit.inference.pipeline import IntensityOutput

    if kind == "denoiser":
        return lambda stack: IntensityOutput(info.normalization, stack.dtype if choice.output_type == "same"
                                             else np.dtype(np.float32))
    spec = spec_for_model(info, choice)
    from segkit.instances import ObjectOutput

    if not isinstance(spec, ObjectOutput):
        return lambda stack: spec

    def objects_at_input_size(stack: Any) -> Any:
        # the watershed runs on probabilities resized back to the input: its sizes follow the resize
        factor = rescale_factor(stack, info)
        return spec if factor is None else ObjectOutput(spec.params.resized(1.0 / factor), spec.channels)

    return objects_at_input_size


def spec_for_model(info: Any, choice: OutputChoice) -> Any:
    """The output spec for a segmenter: membrane models as `output_spec`; models of K classes by label kind."""
    from segkit.inference.pipeline import ClassMapOutput, OutputSpec
    from segkit.instances import ObjectOutput, ObjectParams

    kind = info.inference.labels_kind
    classes = info.output_classes
    if choice.class_index is not None and not 0 <= choice.class_index < classes:
        names = ", ".join(f"{k} {name}" for k, name in enumerate(info.classes)) or f"0-{classes - 1}"
        raise SegkitError(f"class_index={choice.class_index} is not a class of this model ({names})")
    if kind == "membrane":
        if choice.argmax or choice.class_index not in (None, 1):
            raise SegkitError("this model writes the membrane probability (class 1); argmax and class_index are "
                              "for models trained on semantic or instance labels")
        return output_spec(info.inference, output_type=choice.output_type, threshold=choice.threshold,
                           instances=choice.instances)
    if sum((choice.argmax, choice.class_index is not None, choice.instances)) > 1:
        raise SegkitError("choose one of argmax, class_index and instances")
    if choice.argmax:
        return ClassMapOutput()
    if choice.class_index is not None:
        if choice.threshold is not None:
            return OutputSpec("mask", parse_threshold(choice.threshold, 0.5), channel=choice.class_index)
        return OutputSpec(choice.output_type, channel=choice.class_index)
    if choice.threshold is not None and kind == "semantic":
        raise SegkitError("threshold makes a mask of one class: give class_index too (or argmax for class labels)")
    if kind == "instances" or choice.instances:
        if kind != "instances":
            raise SegkitError("instances need a model trained on instance labels (data.labels_kind: instances); "
                              "this one was trained on semantic classes: use argmax")
        stored = dict(info.inference.watershed or {})
        if choice.threshold is not None:
            stored["seed_threshold"] = parse_threshold(choice.threshold, stored.get("seed_threshold", 0.5))
        return ObjectOutput(ObjectParams.from_dict(stored))
    return OutputSpec(choice.output_type, channel=None, channels=classes)


def output_spec(inference: InferenceDefaults, *, output_type: str = "uint8", threshold: float | str | None = None,
                instances: bool = False, watershed: dict[str, Any] | None = None) -> Any:
    """Probabilities as `output_type`, a 0/255 mask at `threshold` (a number, or 'auto' for the
    checkpoint's), or instance labels with the checkpoint's watershed settings (`threshold` and
    `watershed` override them)."""
    from segkit.inference.pipeline import OutputSpec
    from segkit.instances import InstanceOutput, WatershedParams

    if instances:
        stored = dict(inference.watershed or {})
        if threshold is not None:
            stored["threshold"] = parse_threshold(threshold, stored.get("threshold", _stored_threshold(inference)))
        stored.update({k: v for k, v in (watershed or {}).items() if v is not None})
        return InstanceOutput(WatershedParams.from_dict(stored))
    if threshold is None:
        return OutputSpec(output_type)
    return OutputSpec("mask", parse_threshold(threshold, _stored_threshold(inference)))


def _stored_threshold(inference: InferenceDefaults) -> float:
    """The checkpoint's membrane threshold, else 0.5."""
    return inference.threshold if inference.threshold is not None else 0.5


def describe_output(info: Any, *, kind: str = "segmenter", choice: OutputChoice = OutputChoice()
                    ) -> tuple[str, float | None]:
    """What each output holds, in words (for the header line), and the threshold it uses: a mask's
    or the watershed's, as 'auto' resolved it (None for probabilities and denoised intensities)."""
    output_type, threshold, instances = choice.output_type, choice.threshold, choice.instances
    if kind == "denoiser":
        return ("denoised intensities in the input's dtype" if output_type == "same"
                else f"denoised {output_type} intensities"), None
    if info.inference.labels_kind != "membrane":
        return _describe_classes(info, spec_for_model(info, choice))
    spec = output_spec(info.inference, output_type=output_type, threshold=threshold, instances=instances)
    stored = info.inference.threshold is not None or (
        instances and (info.inference.watershed or {}).get("threshold") is not None)
    origin = "" if threshold != "auto" else (" (auto: the checkpoint's)" if stored
                                              else " (auto: the checkpoint stores none, so the default)")
    if instances:
        params = spec.params
        return (f"uint32 instances: seeded watershed at threshold {params.threshold:g}{origin}, seed distance "
                f"{params.seed_distance:g}, min seed size {params.min_seed_size}, min size {params.min_size}",
                params.threshold)
    if threshold is not None:
        return f"a 0/255 membrane mask at threshold {spec.threshold:g}{origin}", spec.threshold
    return f"{output_type} membrane probabilities", None


def _describe_classes(info: Any, spec: Any) -> tuple[str, float | None]:
    """describe_output for models of K classes."""
    from segkit.inference.pipeline import ClassMapOutput
    from segkit.instances import ObjectOutput

    names = info.classes or [str(k) for k in range(info.output_classes)]
    if isinstance(spec, ClassMapOutput):
        return "uint8 classes (argmax): " + ", ".join(f"{k} {n}" for k, n in enumerate(names)), None
    if isinstance(spec, ObjectOutput):
        p = spec.params
        return (f"uint32 objects: seeded watershed on the interior probability (seed threshold {p.seed_threshold:g}, "
                f"seed distance {p.seed_distance:g}, foreground below background probability "
                f"{p.foreground_threshold:g}, min size {p.min_size})", p.seed_threshold)
    if spec.channel is None:
        return f"{spec.kind} probabilities of {len(names)} classes (channel axis: {', '.join(names)})", None
    name = names[spec.channel] if spec.channel < len(names) else str(spec.channel)
    if spec.kind == "mask":
        return f"a 0/255 mask of class {spec.channel} ({name}) at threshold {spec.threshold:g}", spec.threshold
    return f"{spec.kind} probability of class {spec.channel} ({name})", None


def _model_label(request: Any, model: Any = None) -> str:
    """The model file in words (the bundled demo U-Net by name), after the denoiser run in front of it."""
    from segkit.inference.loading import default_model_path

    if request is None:
        return f"an engine passed in ({getattr(model, 'label', type(model).__name__)})"
    name = f"the bundled demo U-Net ({request.model.name})" if request.model == default_model_path() else str(request.model)
    return f"{request.denoiser} then {name}" if request.denoiser is not None else name


def parse_threshold(value: float | str, auto: float) -> float:
    """A threshold given as a number or 'auto' (then `auto`, the checkpoint's)."""
    if value == "auto":
        return float(auto)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SegkitError(f"threshold {value!r} must be a number between 0 and 1 or 'auto'") from None


@dataclass
class _Runner:
    """Streams stacks through one loaded engine with the run's settings."""

    loaded: Any
    tile: int
    batch: int
    blend: str
    normalize: str
    compression: str
    overwrite: bool
    spec_for: Callable[[Any], Any]
    report: Callable[[str], object]
    progress: Progress | None
    started: float
    result: PredictResult

    def __post_init__(self) -> None:
        from segkit.inference.adapt import BackoffForward

        engine = self.loaded.engine
        self.forward = BackoffForward(engine, report=self.report, release=getattr(engine, "release_memory", None))

    def on_tiles(self, count: int) -> None:
        if self.result.first_tiles_seconds is None:
            self.result.first_tiles_seconds = time.perf_counter() - self.started
        if self.progress is not None:
            self.progress.update(count)

    def one(self, source: str, output: Path, *, header: bool) -> Path:
        from segkit.inference.adapt import with_smaller_tiles
        from segkit.inference.pipeline import choose_normalization, count_tiles, predict_stack
        from segkit.io.tiff import open_stack

        geometry = self.loaded.geometry
        with open_stack(source) as stack:
            check_channels(stack, self.loaded.info, source)
            normalization, note = choose_normalization(stack, self.loaded.info, mode=self.normalize)
            if note:
                self.report(f"{source}: {note}")
            rescale = rescale_factor(stack, self.loaded.info)
            seen = model_view(stack, self.loaded.info)  # the planes as the model sees them, for tile counts
            resampled = describe_rescale(stack, self.loaded.info)
            if header:
                z, h, w = stack.shape
                channels = getattr(stack, "channels", 1)
                what = f"{stack.dtype}" + (f", {channels} channels" if channels > 1 else "")
                self.report(f"{source} -> {output}: {z} x {h} x {w} {what}, {count_tiles(seen, geometry, self.tile)}"
                            f" tiles of {self.tile} px, batch {self.batch}, model {self.result.model}, on "
                            f"{self.loaded.engine.label}; writes {self.result.writes}"
                            + (f"; {resampled}" if resampled else ""))
            elif resampled:
                self.report(f"{source}: {resampled}")
            spec = self.spec_for(stack)

            def run(size: int) -> Path:
                if header and self.progress is not None:
                    self.progress.reset(total=count_tiles(seen, geometry, size))
                self.tile = self.result.tile = size
                return predict_stack(stack, self.forward, geometry, output, normalization=normalization, tile=size,
                                     batch=self.batch, blend=self.blend, spec=spec, overwrite=self.overwrite,
                                     compression=self.compression, on_tiles=self.on_tiles, rescale=rescale)

            written = with_smaller_tiles(run, self.tile, geometry, report=self.report)
        self.result.batch = self.forward.max_batch or self.batch
        return written

    def many(self, sources: Sequence[str], output_dir: Path, *, skip_existing: bool) -> None:
        from segkit.inference.files import count_file_tiles, failure_line, plan_file_jobs, predict_files

        jobs, skipped = plan_file_jobs(sources, output_dir, overwrite=self.overwrite, skip_existing=skip_existing)
        output_dir.mkdir(exist_ok=True)
        if skipped:
            self.report(f"skipping {len(skipped)} files whose output exists")
        counts, failed = count_file_tiles(jobs, self.loaded.geometry, self.tile,
                                          view=lambda stack: model_view(stack, self.loaded.info))
        for outcome in failed:
            self.report(failure_line(outcome.job.source, outcome.error or ""))
        runnable = [job for job in jobs if job in counts]
        self.report(f"{len(runnable)} files -> {output_dir}: {sum(counts.values())} tiles of {self.tile} px, batch "
                    f"{self.batch}, model {self.result.model}, on {self.loaded.engine.label}; writes {self.result.writes}")
        if self.progress is not None:
            self.progress.reset(total=sum(counts.values()))
        outcomes = failed + predict_files(runnable, lambda job: self.one(job.source, job.output, header=False),
                                          echo=self.report)
        self.result.outputs.extend(o.job.output for o in outcomes if o.ok)
        self.result.failed.extend((o.job.source, o.error or "") for o in outcomes if not o.ok)


def check_channels(stack: Any, info: Any, source: str) -> None:
    """Refuse (one line) input whose channel count is not the model's."""
    have, want = getattr(stack, "channels", 1), info.input_channels
    if have != want:
        what = {1: "single-channel (grayscale)", 3: "3-channel (e.g. RGB)"}.get(want, f"{want}-channel")
        kind = {1: "a single-channel image", 3: "a multi-channel image (3 channels, e.g. RGB)"}.get(
            have, f"a multi-channel image ({have} channels)")
        fix = ("convert it to grayscale or save the channel to segment as its own image" if want == 1
               else f"give it {want} channels in the training data's order")
        raise SegkitError(f"{source} is {kind} but the model was trained on {what} images; {fix}")


#: Pixel sizes within this relative difference count as equal (no rescaling).
PIXEL_SIZE_TOLERANCE = 0.01
#: Resize factors within this of 1 leave planes as they are (as `data.scale` does in training).
SCALE_TOLERANCE = 1e-3


def rescale_factor(stack: Any, info: Any) -> float | None:
    """How much to resample a stack's planes for the model (None: as they are): the stack's pixel size over
    the training data's (when both are known and differ), times the checkpoint's training scale (the
    factor its training images were resized by). The one place prediction and scoring decide it."""
    return _rescale_parts(stack, info)[0]


def _rescale_parts(stack: Any, info: Any) -> tuple[float | None, float, float]:
    """(combined factor or None, the pixel-size part, the training-scale part)."""
    trained, own = info.inference.pixel_size, getattr(stack, "pixel_size", None)
    by_size = own / trained if trained and own and abs(own / trained - 1.0) > PIXEL_SIZE_TOLERANCE else 1.0
    by_scale = float(info.inference.scale) if info.inference.scale is not None else 1.0
    combined = by_size * by_scale
    return (None if abs(combined - 1.0) <= SCALE_TOLERANCE else combined), by_size, by_scale


def _rescale_causes(stack: Any, info: Any) -> str:
    """Why a stack's planes would be resampled for the model, in words ('' when they are not)."""
    factor, by_size, by_scale = _rescale_parts(stack, info)
    if factor is None:
        return ""
    causes = []
    if by_size != 1.0:
        causes.append(f"pixel size {stack.pixel_size:.4g} um, the model was trained at "
                      f"{info.inference.pixel_size:.4g} um")
    if by_scale != 1.0:
        causes.append(f"training scale {by_scale:.4g} (its training images were resized by {by_scale:.4g})")
    return " and ".join(causes)


def describe_rescale(stack: Any, info: Any) -> str:
    """Why and how much a stack's planes are resampled for the model, in words ('' when they are not)."""
    why = _rescale_causes(stack, info)
    if not why:
        return ""
    return (f"{why}: planes are rescaled by {rescale_factor(stack, info):.4g} for the model and its output back to "
            "the input's size")


def model_view(stack: Any, info: Any) -> Any:
    """The stack as the model sees it: resampled by `rescale_factor` as its planes are read, or itself."""
    factor = rescale_factor(stack, info)
    if factor is None:
        return stack
    from segkit.inference.pipeline import RescaledStack

    return RescaledStack(stack, factor)


def _predict_on_dask(sources: list[str], output: str, request: Any, *, tile: int | str | None, batch: int | None,
                     choice: OutputChoice, normalize: str, blend: str,
                     chunk: int, scheduler: str | None, workers: int | None, resume: bool, overwrite: bool,
                     report: Callable[[str], object], started: float) -> PredictResult:
    """One stack into an OME-Zarr store on Dask, chunk by chunk, resumable. Tile 'auto' and the
    batch are decided here, once, on this machine's device; each worker builds its own engine."""
    from segkit.devices import resolve_device
    from segkit.inference.distributed import predict_to_zarr
    from segkit.inference.loading import planned_tile

    if not output.rstrip("/").lower().endswith(".zarr"):
        raise SegkitError("the Dask path (scheduler/workers) writes OME-Zarr: name the output NAME.ome.zarr "
                          "(then `segkit convert NAME.ome.zarr NAME.tif` for a BigTIFF)")
    if len(sources) > 1:
        raise SegkitError("the Dask path predicts one stack; quote a glob to read 2D files as one stack")
    if request is None:
        raise SegkitError("the Dask path builds its engines on the workers: pass a model file, not an engine")
    if request.kind != "segmenter":
        raise SegkitError("the Dask path predicts segmenters; denoise into a TIFF instead")
    from segkit.io.outputs import check_output

    check_output(output.rstrip("/"), kind="store", inputs=sources, overwrite=overwrite)
    if tile != "auto" and batch is None and resolve_device(request.device) == "cpu":
        batch = 4  # what choose_batch says on the CPU, without loading (or exporting) the model here
    if tile == "auto" or batch is None:
        loaded = _load(None, request, tile=tile, report=report)
        chosen_tile, batch = _fit_to_device(loaded, sources[0], tile=tile, batch=batch, report=report)
        info, geometry = loaded.info, loaded.geometry
        del loaded
        _release_device_memory()
    else:  # the model's record and tile, checked as the workers will, without building an engine here
        info, geometry, chosen_tile = planned_tile(request, _fixed_tile(tile))
    spec = spec_for_model(info, choice)  # every class (a CZYX store), one class, argmax or objects: all on Dask
    from segkit.io.zarr import open_volume

    with open_volume(sources[0]) as volume:
        check_channels(volume, info, sources[0])
        if getattr(volume, "channels", 1) > 1:
            raise SegkitError(f"{sources[0]} has {volume.channels} channels; the Dask path reads single-channel "
                              "stacks: write a TIFF instead (segkit predict without workers/scheduler)")
        why = _rescale_causes(volume, info)
        if why:
            raise SegkitError(f"{sources[0]}: {why}; the Dask path does not rescale: write a TIFF (segkit predict "
                              "without workers/scheduler), which resizes the planes for the model and back")
    where = scheduler or (f"a local Dask cluster of {workers} workers" if workers else "local Dask threads")
    writes, used_threshold = describe_output(info, choice=choice)
    report(f"{sources[0]} -> {output} on {where}, device {request.device}, tile {chosen_tile}, batch {batch}, "
           f"model {_model_label(request)}; writes {writes}")
    written = predict_to_zarr(sources[0], output.rstrip("/"), request, tile=chosen_tile, batch=batch, chunk=chunk,
                              spec=spec, blend=blend, normalize=normalize, scheduler=scheduler, workers=workers,
                              resume=resume, overwrite=overwrite, record=(info, geometry), report=report)
    return PredictResult(outputs=[written], tile=chosen_tile, batch=batch, engine=f"Dask ({where})",
                         model=_model_label(request), writes=writes, threshold=used_threshold,
                         seconds=time.perf_counter() - started)


def _release_device_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
