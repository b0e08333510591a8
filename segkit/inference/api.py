"""The one entry point for prediction: `segkit.predict(sources, output, model=..., **options)`.

The CLI, `segkit demo`, tools/ and the Dask path all come through here, so every option works
on every path:

- one stack (a TIFF, a folder or a glob of 2D TIFFs read as one stack) into one TIFF;
- many files into an output folder (one output each; a failing file is reported and skipped): an
  existing folder, a path ending in '/', or, given several inputs, any path not ending in .tif;
- a stack into an OME-Zarr store on Dask (`workers`, `scheduler`, or an output ending in .zarr).

The options are the fields of `segkit.inference.options.PredictOptions`. torch is imported by the
functions that run the model and the segkit modules imported here load none (dask and zarr wait for
the Dask path too), so `from segkit import predict` stays light.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from segkit.bioimageio.read import is_package
from segkit.checkpoint import read_info
from segkit.devices import resolve_device
from segkit.errors import Cancelled, InputError, OptionTypeError, SegkitError
from segkit.inference.device_fit import BackoffForward, choose_batch, choose_tile, with_smaller_tiles
from segkit.inference.distributed import predict_to_zarr
from segkit.inference.encodings import describe_output, model_encoding, stack_encoding
from segkit.inference.files import count_file_tiles, failure_line, plan_file_jobs, predict_files
from segkit.inference.loading import (
    BUNDLED_MODEL,
    EngineRequest,
    LoadedEngine,
    default_model_path,
    load_prediction_engine,
    planned_tile,
    resolve_model,
    trained_tile,
)
from segkit.inference.options import PredictOptions
from segkit.inference.pipeline import RescaledStack, choose_normalization, count_tiles, predict_stack
from segkit.inference.progress import Progress, check_progress, progress_to
from segkit.io.outputs import check_name_length, check_output, release_claim, remove_stale_partials
from segkit.io.tiff import list_tiff_files, open_stack
from segkit.io.zarr import open_volume
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo
from segkit.words import counted


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
    options: PredictOptions | None = None,
    report: Callable[[str], object] = print,
    progress: Progress | bool = True,
    cancel: threading.Event | None = None,
    **settings: Any,
) -> PredictResult:
    """Predict `sources` into `output` with `model` and return what was done.

    Parameters
    ----------
    sources : path, glob or sequence of them
        A TIFF stack, a folder or glob of 2D TIFFs (read as one stack), an OME-Zarr store (Dask
        path), or several files (one output each, into an output folder).
    output : path, optional
        The output TIFF (default: ``<stem>_membranes.tif`` beside the input; ``_classes``,
        ``_objects``, ``_instances`` or ``_denoised`` by what is written), an output folder (an
        existing one, a path ending in '/', or with several inputs any path not ending in .tif), or
        an OME-Zarr store (``*.zarr``: the Dask path, resumable).
    model : path or engine, optional
        A checkpoint (.safetensors), an ONNX file, a bioimage.io package (.zip or rdf.yaml), ``"demo"`` (the
        bundled U-Net; a file named demo wins), or an already built engine (the engine protocol plus
        `geometry`); default: the bundled demo U-Net.
    options : PredictOptions, optional
        Every prediction option at once (the CLI passes them so); `settings` override its fields.
    report : callable
        Receives the progress lines (the header, notes, failures); default: print.
    progress : bool or Progress
        True (default): a progress bar of the tiles on stderr (tqdm.auto: a widget in notebooks);
        False: none; or a bar of your own (tqdm fits), reset to the number of tiles, then updated per
        batch, and left open.
    cancel : threading.Event, optional
        When set (from another thread, or from `progress`), the prediction stops after the current
        tile batch and raises `segkit.errors.Cancelled`; the output being written is removed (TIFF
        outputs; the Dask path does not take it).
    **settings
        Any field of `segkit.inference.options.PredictOptions` by name (tile, batch, device, amp,
        output_type, threshold, instances, class_index, argmax, compression, workers, ...).

    Returns
    -------
    PredictResult
        The files written and failed, the tile and batch run at, the engine and model in words,
        what each output holds, the threshold used and the time taken.

    Raises
    ------
    SegkitError
        A bad option, an input that cannot be read or does not fit the model (channels, tile), an
        output that cannot be written (OutputExistsError without overwrite): one line, before the
        model loads where it can be told then.
    Cancelled
        `cancel` was set.

    Examples
    --------
    >>> import segkit
    >>> result = segkit.predict("stack.tif", "membranes.tif", tile=572)       # doctest: +SKIP
    >>> result.outputs, result.tile, result.batch, result.engine              # doctest: +SKIP
    """
    started = time.perf_counter()
    _check_call(sources, model, report, progress, cancel)
    options = PredictOptions(**settings) if options is None else replace(options, **settings)
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    if not sources:
        raise SegkitError("no input given")
    request = None
    if not _is_engine(model):
        request = EngineRequest(resolve_model(model), options)
    check_files_exist(sources, request, options)
    text_output = str(output) if output is not None else ""
    if text_output.rstrip("/").lower().endswith(".zarr") or options.on_dask:
        if cancel is not None:
            raise SegkitError("cancel applies to TIFF outputs; stop the Dask path with Ctrl-C (resume=True goes on)")
        try:
            with progress_to(progress) as bar:
                return _predict_on_dask(sources, text_output, request, options, report=report, started=started,
                                        progress=bar)
        finally:  # the store's claim ends with the run, also when it failed (a Python session or napari goes on)
            release_claim(text_output.rstrip("/"))
    if output is not None:  # before asking the file system about it: a name over its limit is one line
        check_name_length(text_output.rstrip("/\\") or text_output)
    # an output folder: an existing one, a path ending in a slash, or (several inputs) a path that is not a TIFF
    to_folder = output is not None and (text_output.endswith(("/", "\\")) or Path(text_output).is_dir() or (
        len(sources) > 1 and Path(text_output).suffix.lower() not in (".tif", ".tiff")))
    if len(sources) > 1 and not to_folder:
        raise SegkitError(f"{len(sources)} inputs given: give an output folder for one output per input file, or "
                          "quote a glob ('dir/*.tif') to read the files as one stack")
    # the output is checked before anything is loaded: a name, folder or disk it cannot go to fails at once
    if to_folder:
        jobs, _ = plan_file_jobs(sources, Path(text_output), overwrite=options.overwrite,
                                 skip_existing=options.skip_existing)
        remove_stale_partials([job.output for job in jobs], report)
        claimed = [job.output for job in jobs]
    else:
        suffix = ("denoised" if options.kind == "denoiser" else "instances" if options.instances
                  else _default_suffix(request))
        out_path = Path(output) if output is not None else default_output(sources[0], suffix)
        check_output(out_path, kind="tiff", inputs=sources, overwrite=options.overwrite, report=report)
        claimed = [out_path]
    try:
        with progress_to(progress) as bar:
            return _predict_claimed(sources, out_path if not to_folder else None, text_output if to_folder else None,
                                    model, request, options, report=report, progress=bar, cancel=cancel,
                                    started=started)
    finally:  # the outputs' claims end with the run, also when it failed (a Python session or napari goes on)
        for path in claimed:
            release_claim(path)


def _predict_claimed(sources: list[str], out_path: Path | None, folder: str | None, model: Any,
                     request: EngineRequest | None, options: PredictOptions, *, report: Callable[[str], object],
                     progress: Progress | None, cancel: threading.Event | None, started: float) -> PredictResult:
    """`predict` once its outputs are checked and claimed: `out_path` for one output, or an output `folder`."""
    to_folder = folder is not None
    with _opened_in_background(None if to_folder else sources[0]) as opened:
        loaded = _load(model, request, options, report=report)
        stack = opened()
        if stack is None:
            chosen_tile, batch = _fit_to_device(loaded, sources[0], options, report=report)
        else:
            chosen_tile, batch = fit_to_device(loaded, stack.shape[1:], options, report=report)
        writes, used_threshold = describe_output(loaded.info, options)
        result = PredictResult(tile=chosen_tile, batch=batch, engine=loaded.engine.label, writes=writes,
                               model=_model_label(request, model), threshold=used_threshold)
        run = _Runner(loaded, options, tile=chosen_tile, batch=batch, report=report, progress=progress,
                      started=started, result=result, cancel=cancel)
        if to_folder:
            result.folder = Path(folder)
            run.many(sources, result.folder)
        else:
            run.one(sources[0], out_path, header=True, stack=stack)
            result.outputs.append(out_path)
    result.seconds = time.perf_counter() - started
    return result


def _check_call(sources: Any, model: Any, report: Any, progress: Any, cancel: Any) -> None:
    """Types of `predict`'s arguments, before any work: one line naming the argument (OptionTypeError,
    a SegkitError and a TypeError), never a failure mid-run."""
    if hasattr(sources, "shape") and hasattr(sources, "dtype"):
        raise OptionTypeError("sources is an array; segkit.predict reads files: use segkit.predict_array(image, "
                              "model) or segkit.Model(model).predict(image) for arrays")
    paths = [sources] if isinstance(sources, (str, Path)) else sources
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in paths):
        raise OptionTypeError(f"sources must be a path (str or Path), a glob or a list of them, not "
                              f"{type(sources).__name__}")
    if model is not None and not isinstance(model, (str, Path)) and not (callable(model)
                                                                         and hasattr(model, "geometry")):
        raise OptionTypeError(f"model must be a path to a checkpoint, ONNX file or bioimage.io package (or an "
                              f"engine object), not {type(model).__name__}")
    if not callable(report):
        raise OptionTypeError(f"report must be a function taking one line (e.g. print), not {report!r}")
    check_progress(progress)
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise OptionTypeError(f"cancel must be a threading.Event, not {cancel!r}")


def check_files_exist(sources: Sequence[str], request: EngineRequest | None, options: PredictOptions) -> None:
    """The input of a one-stack run, the model file and the denoiser exist: checked before anything loads,
    so a wrong path is one line in a fraction of a second, not after torch's import (seconds). Each
    refusal is the one its reader would give (`list_tiff_files`, `read_info`). Inputs of a run into an
    output folder are not checked here: each one that fails is reported and skipped."""
    if len(sources) == 1:
        source = sources[0]
        if source.rstrip("/").lower().endswith(".zarr"):
            if not Path(source).exists():
                raise InputError(f"input {source} does not exist; check the path")
        else:
            list_tiff_files(source)
    checkpoints = [options.denoise]  # ONNX files and packages are refused before torch loads by their readers
    if request is not None and not is_package(request.model) and request.model.suffix.lower() != ".onnx":
        checkpoints.append(request.model)
    for path in checkpoints:
        if path is not None and not Path(path).exists():
            read_info(path)  # raises its one line: the file does not exist, the formats segkit reads


@contextmanager
def _opened_in_background(source: str | None) -> Iterator[Callable[[], Any]]:
    """Open the input stack `source` (`open_stack`: its headers, page table and memory check) on a thread
    while the caller loads the model, so torch's import, CUDA's start and the model load overlap with
    reading the input. Yields a function returning the open stack (raising the input's error, after the
    model's own: errors keep their order) or None when `source` is None; the stack is closed on the way out."""
    if source is None:
        yield lambda: None
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segkit-open-input") as pool:
        future = pool.submit(open_stack, source)
        try:
            yield future.result
        finally:
            try:
                future.result().close()  # closing twice is harmless; an input that failed has nothing open
            except BaseException:  # noqa: BLE001 - its error was raised to the caller already, or never asked for
                pass


def _default_suffix(request: EngineRequest | None) -> str:
    """The default output name's suffix: what a segmenter checkpoint writes by default ('membranes' for
    membrane models, ONNX files and packages, whose records are read later)."""
    if request is None or Path(request.model).suffix.lower() != ".safetensors" or not Path(request.model).is_file():
        return "membranes"

    kind = read_info(request.model).inference.labels_kind
    return {"semantic": "classes", "instances": "objects"}.get(kind, "membranes")


def _is_engine(model: Any) -> bool:
    return model is not None and not isinstance(model, (str, Path))


def _load(model: Any, request: EngineRequest | None, options: PredictOptions, *,
          report: Callable[[str], object]) -> LoadedEngine:
    """The LoadedEngine for a model file, or for an engine passed in directly."""
    if request is not None:
        return load_prediction_engine(request, tile=options.fixed_tile, report=report)
    info = getattr(model, "info", None) or CheckpointInfo("segmenter", "engine", {}, model.geometry,
                                                          Normalization(0.0, 1.0))
    return LoadedEngine(model, info, model.geometry, options.fixed_tile or trained_tile(info, model.geometry))


def load_for_prediction(model: Any, options: PredictOptions, *,
                        report: Callable[[str], object]) -> tuple[LoadedEngine, str]:
    """What `predict` loads for `model` (a model file, None for the bundled demo U-Net, or an engine) under
    `options`, and the model in words: for callers that hold a loaded model (`segkit.Model`)."""
    request = None
    if not _is_engine(model):
        request = EngineRequest(resolve_model(model), options)
    return _load(model, request, options, report=report), _model_label(request, model)


def _fit_to_device(loaded: Any, first_source: str, options: PredictOptions, *,
                   report: Callable[[str], object]) -> tuple[int, int]:
    """`fit_to_device` for the planes of the first source (read only with tile 'auto')."""
    plane_shape = None
    if options.tile == "auto":
        is_zarr = first_source.rstrip("/").lower().endswith(".zarr")  # the Dask path reads zarr stores too
        with open_volume(first_source if is_zarr else list_tiff_files(first_source)[0]) as first:
            plane_shape = first.shape[1:]
    return fit_to_device(loaded, plane_shape, options, report=report)


def fit_to_device(loaded: Any, plane_shape: tuple[int, int] | None, options: PredictOptions, *,
                  report: Callable[[str], object]) -> tuple[int, int]:
    """The (tile, batch) to run: measured on planes of `plane_shape` with tile 'auto', else the given
    or trained tile and the given batch or one chosen from the free device memory."""
    key = _measurement_model_key(loaded)
    if options.tile == "auto":
        return choose_tile(loaded.engine, loaded.geometry, plane_shape, batch=options.batch,
                           only=loaded.tile if loaded.fixed_tile else None, channels=loaded.info.input_channels,
                           model_key=key, report=report)
    loaded.geometry.check_tile(loaded.tile)
    return loaded.tile, options.batch or choose_batch(loaded.engine, loaded.geometry, loaded.tile,
                                                      channels=loaded.info.input_channels, model_key=key,
                                                      report=report)


def _measurement_model_key(loaded: Any) -> str | None:
    """What a device measurement of this loaded model depends on besides the device and the input: the
    registry model and its parameters, and the engine with its precision and compilation (its label).
    None for engines given as objects (no record of what they run): they are measured every time."""
    info = getattr(loaded, "info", None)
    if info is None or not getattr(info, "model", None):
        return None
    return f"{info.model}|{json.dumps(info.model_kwargs, sort_keys=True, default=str)}|{loaded.engine.label}"


def _model_label(request: EngineRequest | None, model: Any = None) -> str:
    """The model file in words (the bundled demo U-Net by name), after the denoiser run in front of it."""
    if request is None:
        return f"an engine passed in ({getattr(model, 'label', type(model).__name__)})"
    name = (f"the bundled U-Net '{BUNDLED_MODEL}' ({request.model.name})" if request.model == default_model_path()
            else str(request.model))
    denoiser = request.options.denoise
    return f"{denoiser} then {name}" if denoiser is not None else name


@dataclass
class _Runner:
    """Streams stacks through one loaded engine with the run's options, at the chosen tile and batch."""

    loaded: Any
    options: PredictOptions
    tile: int
    batch: int
    report: Callable[[str], object]
    progress: Progress | None
    started: float
    result: PredictResult
    cancel: threading.Event | None = None

    def __post_init__(self) -> None:
        engine = self.loaded.engine
        self.forward = BackoffForward(engine, report=self.report, release=getattr(engine, "release_memory", None))

    def on_tiles(self, count: int) -> None:
        if self.result.first_tiles_seconds is None:
            self.result.first_tiles_seconds = time.perf_counter() - self.started
        if self.progress is not None:
            self.progress.update(count)
        check_cancel(self.cancel)

    def one(self, source: str, output: Path, *, header: bool, stack: Any = None) -> Path:
        """Predict `source` (or its `stack`, already open) into `output`."""
        check_cancel(self.cancel)
        geometry = self.loaded.geometry
        with stack if stack is not None else open_stack(source) as stack:
            check_channels_fit_model(stack, self.loaded.info, source)
            normalization, note = choose_normalization(stack, self.loaded.info, mode=self.options.normalize)
            if note:
                self.report(f"{source}: {note}")
            rescale = rescale_factor(stack, self.loaded.info)
            seen = model_view(stack, self.loaded.info)  # the planes as the model sees them, for tile counts
            resampled = describe_rescale(stack, self.loaded.info)
            if header:
                z, h, w = stack.shape
                channels = getattr(stack, "channels", 1)
                what = f"{stack.dtype}" + (f", {channels} channels" if channels > 1 else "")
                self.report(f"{source} -> {output}: {z} x {h} x {w} {what}, {counted(count_tiles(seen, geometry, self.tile), 'tile')}"
                            f" of {self.tile} px, batch {self.batch}, model {self.result.model}, on "
                            f"{self.loaded.engine.label}; writes {self.result.writes}"
                            + (f"; {resampled}" if resampled else ""))
            elif resampled:
                self.report(f"{source}: {resampled}")
            spec = stack_encoding(self.loaded.info, self.options, stack, rescale)

            def run(size: int) -> Path:
                if header and self.progress is not None:
                    self.progress.reset(total=count_tiles(seen, geometry, size))
                self.tile = self.result.tile = size
                return predict_stack(stack, self.forward, geometry, output, normalization=normalization, tile=size,
                                     batch=self.batch, blend=self.options.blend, spec=spec,
                                     overwrite=self.options.overwrite, compression=self.options.compression,
                                     on_tiles=self.on_tiles, rescale=rescale)

            written = with_smaller_tiles(run, self.tile, geometry, report=self.report)
        self.result.batch = self.forward.max_batch or self.batch
        return written

    def many(self, sources: Sequence[str], output_dir: Path) -> None:
        jobs, skipped = plan_file_jobs(sources, output_dir, overwrite=self.options.overwrite,
                                       skip_existing=self.options.skip_existing)
        output_dir.mkdir(exist_ok=True)
        if skipped:
            self.report(f"skipping {counted(len(skipped), 'file')} whose output exists")
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


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise `Cancelled` when `cancel` is set: called between tile batches (from the tiler's `on_tiles`)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def check_channels_fit_model(stack: Any, info: Any, source: str) -> None:
    """Refuse (one line) a stack whose channel count is not the one the model was trained on."""
    have, want = getattr(stack, "channels", 1), info.input_channels
    if have != want:
        what = {1: "single-channel (grayscale)", 3: "3-channel (e.g. RGB)"}.get(want, f"{want}-channel")
        kind = {1: "a single-channel image", 3: "a multi-channel image (3 channels, e.g. RGB)"}.get(
            have, f"a multi-channel image ({have} channels)")
        fix = ("convert it to grayscale or save the channel to segment as its own image" if want == 1
               else f"give it {want} channels in the training data's order")
        raise InputError(f"{source} is {kind} but the model was trained on {what} images; {fix}")


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

    return RescaledStack(stack, factor)


def _predict_on_dask(sources: list[str], output: str, request: EngineRequest | None, options: PredictOptions, *,
                     report: Callable[[str], object], started: float,
                     progress: Progress | None = None) -> PredictResult:
    """One stack into an OME-Zarr store on Dask, chunk by chunk, resumable. Tile 'auto' and the
    batch are decided here, once, on this machine's device; each worker builds its own engine.
    `progress` is reset to the tiles of every chunk and advances as each chunk finishes."""
    if not output.rstrip("/").lower().endswith(".zarr"):
        raise SegkitError("the Dask path (scheduler/workers) writes OME-Zarr: name the output NAME.ome.zarr "
                          "(then `segkit convert NAME.ome.zarr NAME.tif` for a TIFF)")
    if len(sources) > 1:
        raise SegkitError("the Dask path predicts one stack; quote a glob to read 2D files as one stack")
    if request is None:
        raise SegkitError("the Dask path builds its engines on the workers: pass a model file, not an engine")
    if options.kind != "segmenter":
        raise SegkitError("the Dask path predicts segmenters; denoise into a TIFF instead")

    check_output(output.rstrip("/"), kind="store", inputs=sources, overwrite=options.overwrite)
    batch = options.batch
    if options.tile != "auto" and batch is None and resolve_device(options.device) == "cpu":
        batch = 4  # what choose_batch says on the CPU, without loading (or exporting) the model here
    if options.tile == "auto" or batch is None:
        loaded = _load(None, request, options, report=report)
        chosen_tile, batch = _fit_to_device(loaded, sources[0], replace(options, batch=batch), report=report)
        info, geometry = loaded.info, loaded.geometry
        del loaded
        _release_device_memory()
    else:  # the model's record and tile, checked as the workers will, without building an engine here
        info, geometry, chosen_tile = planned_tile(request, options.fixed_tile)
    spec = model_encoding(info, options)  # every class (a CZYX store), one class, argmax or objects: all on Dask

    with open_volume(sources[0]) as volume:
        check_channels_fit_model(volume, info, sources[0])
        if getattr(volume, "channels", 1) > 1:
            raise SegkitError(f"{sources[0]} has {volume.channels} channels; the Dask path reads single-channel "
                              "stacks: write a TIFF instead (segkit predict without workers/scheduler)")
        why = _rescale_causes(volume, info)
        if why:
            raise SegkitError(f"{sources[0]}: {why}; the Dask path does not rescale: write a TIFF (segkit predict "
                              "without workers/scheduler), which resizes the planes for the model and back")
    where = options.scheduler or (f"a local Dask cluster of {options.workers} workers" if options.workers
                                  else "local Dask threads")
    writes, used_threshold = describe_output(info, options)
    report(f"{sources[0]} -> {output} on {where}, device {options.device}, tile {chosen_tile}, batch {batch}, "
           f"model {_model_label(request)}; writes {writes}")
    written = predict_to_zarr(sources[0], output.rstrip("/"), request, tile=chosen_tile, batch=batch, spec=spec,
                              record=(info, geometry), report=report, progress=progress)
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
