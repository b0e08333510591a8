"""The dock widget (Plugins > segkit > Segment): run a segkit model on an image layer, add the result as a layer.

The model is loaded and run in a worker thread (napari's `create_worker`), so the viewer stays responsive;
progress comes back through a Qt signal (queued into the GUI thread) and Cancel sets the `threading.Event`
that `segkit.Model.predict` checks between tile batches. A segkit error (a bad model file, an image the model
cannot take, a cancelled run) is shown as one line in a napari notification; nothing is raised into the viewer.
Loaded models are kept per (model file, device, tile setting), so a second run does not load again.

One native clash is avoided here: on Linux, Mesa's OpenGL drivers (llvmpipe under Xvfb or in a VM, and the
Intel and AMD drivers) load the system's libLLVM when napari draws, and torch imports triton (which carries its
own LLVM) whenever its compiler stack (torch._dynamo) is loaded: torch.compile, and some model builders and
exporters; triton's library then binds to the system's LLVM symbols and napari dies with a segmentation fault. The widget loads triton first, its symbols bound to itself
(RTLD_DEEPBIND), before any model is loaded (`load_triton_apart`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, create_widget
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from psygnal import Signal
from qtpy.QtCore import QObject
from qtpy.QtCore import Signal as QtSignal

from segkit.errors import Cancelled, SegkitError
from segkit.napari.layers import input_axes, result_layer

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

#: What the Output box offers, and the `Model.predict` settings of each; a model offers those its
#: `output_kind` accepts (argmax needs K classes, instances a membrane or boundary model).
OUTPUTS: dict[str, dict[str, Any]] = {
    "probabilities": {},
    "classes (argmax)": {"argmax": True},
    "mask (threshold)": {"threshold": "auto"},
    "instances": {"instances": True},
}
DEVICES = ("auto", "cpu", "cuda")
MODEL_FILES = "segkit models (*.safetensors *.onnx *.zip *.yaml)"
#: The Trust model code box's tooltip: README's "Trust model" section, in the widget's words.
TRUST_TOOLTIP = ("A model file is data, not a program: from a bioimage.io package segkit runs weights only (ONNX, or "
                 "the tensors of its own packages rebuilt by segkit's registry). Python code from a package (an "
                 "architecture file or import_from callable, TorchScript) runs only when this is ticked: it can do "
                 "anything your account can, so tick it only for a package you trust like a program you install.")
#: Settings as segkit's messages name them (Python keywords), and as the widget names them: the opt-in to a
#: package's code (segkit.bioimageio.read.TRUST_OPTION) is the Trust model code box; the widget has no tile number.
_WIDGET_WORDS = (("trust_model_code=True", "Trust model code ticked"), ("tile=N sets another", "Tile auto measures"))


def widget_message(message: str) -> str:
    """A segkit message in the widget's words (`_WIDGET_WORDS`)."""
    message = str(message)
    for python, widget in _WIDGET_WORDS:
        message = message.replace(python, widget)
    return message


class _Relay(QObject):
    """Carries the worker thread's progress and notes into the GUI thread (Qt queues signals across threads).

    It is the `progress` that `Model.predict` reports to (tqdm's `reset` / `update`) and the `report` of
    `segkit.Model` (notes such as an ONNX export or a normalisation choice).
    """

    progressed = QtSignal(int, int)  # tiles done, tiles in all
    noted = QtSignal(str)

    def __init__(self) -> None:
        super().__init__()
        self._done = 0
        self._total = 0

    def reset(self, total: int | None = None) -> None:
        self._done, self._total = 0, int(total or 0)
        self.progressed.emit(self._done, self._total)

    def update(self, n: int = 1) -> None:
        self._done += int(n)
        self.progressed.emit(self._done, self._total)

    def note(self, message: str) -> None:
        self.noted.emit(str(message))


@dataclass(frozen=True)
class Job:
    """One run, fixed when Run is pressed: what to load, what to predict and where the result goes."""

    model: Path | None
    device: str
    tile: str | None
    trust: bool
    settings: dict[str, Any]
    data: Any
    rgb: bool
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    name: str


@dataclass(frozen=True)
class Outcome:
    """What a run ended with: a layer data tuple, or a one-line message (state: 'done', 'cancelled', 'failed')."""

    state: str
    message: str = ""
    layer: tuple[Any, dict[str, Any], str] | None = None


def load_triton_apart() -> bool:
    """Import triton (when installed and not yet imported, on Linux) with its symbols bound to itself, so its LLVM
    does not mix with the system libLLVM that Mesa's OpenGL drivers load in napari (a segmentation fault at
    torch's first import of triton otherwise). Called in the GUI thread: the dlopen flags are process-wide.

    Returns
    -------
    bool
        Whether triton was imported here.
    """
    if not sys.platform.startswith("linux") or "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a triton that cannot load is torch's business (it checks again)
        return False
    finally:
        sys.setdlopenflags(flags)
    return True


def model_kind(path: Path | None) -> str:
    """'segmenter' or 'denoiser': a checkpoint's record says which (other files hold segmenters)."""
    if path is not None and path.suffix.lower() == ".safetensors":
        from segkit.checkpoint import read_info

        return str(read_info(path).kind)
    return "segmenter"


def offered_outputs(model: Any) -> list[str]:
    """The Output choices `model` (a `segkit.Model`) can give: those whose settings its `output_kind` takes."""
    offered = []
    for label, settings in OUTPUTS.items():
        try:
            kind = model.output_kind(**settings)
        except SegkitError:
            continue
        offered.append("intensities" if kind == "intensities" else label)
        if kind == "intensities":
            break  # a denoiser gives its intensities, nothing else
    return offered


class PredictWidget(Container):
    """Segment an image layer with a segkit model (a checkpoint, an ONNX file or a bioimage.io package).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari passes it when the widget is docked from the Plugins menu).

    Notes
    -----
    Controls: Model (empty: the bundled demo U-Net), Image (an image layer: a plane, a stack of planes, or
    channels where the model takes several), Device, Tile auto (measure the fastest tile on this device; off:
    the model's trained tile), Trust model code (off: a bioimage.io package's Python code never runs, as
    `trust_model_code=False`), Output (what the model offers: probabilities, classes, a mask, instances),
    Run, Cancel, and a progress bar counting tiles.
    """

    #: Emitted in the GUI thread when a run ends, with 'done', 'cancelled' or 'failed'.
    run_finished = Signal(str)
    #: Emitted in the GUI thread when the Output choices are set from a loaded model.
    outputs_ready = Signal()

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._model_file = FileEdit(label="Model", mode="r", filter=MODEL_FILES, nullable=True, value=None,
                                    tooltip="A checkpoint (.safetensors), an ONNX file, or a bioimage.io package "
                                            "(.zip or rdf.yaml); empty: the bundled demo U-Net")
        self._image = create_widget(annotation=Image, label="Image", options={"tooltip": "The image layer to segment"})
        self._device = ComboBox(label="Device", choices=DEVICES, value="auto",
                                tooltip="auto: a GPU when there is one, else the CPU")
        self._tile_auto = CheckBox(label="Tile auto", value=False,
                                   tooltip="Measure tile sizes on this device and take the fastest (off: the "
                                           "model's trained tile)")
        self._trust = CheckBox(label="Trust model code", value=False, tooltip=TRUST_TOOLTIP)
        self._output = ComboBox(label="Output", choices=list(OUTPUTS), value="probabilities",
                                tooltip="What to add: probabilities (an image layer), classes, a mask or "
                                        "instances (a labels layer)")
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="Tiles", min=0, max=1, value=0)
        self._status = Label(label="", value="")
        super().__init__(widgets=[self._model_file, self._image, self._device, self._tile_auto, self._trust,
                                  self._output, self._run, self._cancel, self._progress, self._status], labels=True)
        self._viewer = napari_viewer
        load_triton_apart()
        self._models: dict[tuple, Any] = {}
        self._lock = threading.Lock()  # guards _models: the describing and running workers both fill it
        self._cancel_event = threading.Event()
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._relay.noted.connect(self._on_note)
        self.worker: Any = None  # the running worker, if any
        self._describer: Any = None
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._model_file.changed.connect(self._describe_model)
        self._device.changed.connect(self._describe_model)
        self._tile_auto.changed.connect(self._describe_model)
        self._trust.changed.connect(self._describe_model)
        self._describe_model()

    # -- the model ------------------------------------------------------------------------
    @property
    def model_path(self) -> Path | None:
        """The chosen model file; None: the bundled demo U-Net."""
        value = self._model_file.value
        return None if value in (None, "") or str(value) in ("", ".") else Path(value)

    def _model_key(self) -> tuple[Path | None, str, str | None, bool]:
        return self.model_path, str(self._device.value), "auto" if self._tile_auto.value else None, bool(self._trust.value)

    def _load(self, model: Path | None, device: str, tile: str | None, trust: bool) -> Any:
        """The `segkit.Model` for these settings, loaded once (called in a worker thread)."""
        from segkit.inference.arrays import Model

        key = (model, device, tile, trust)
        with self._lock:
            # only the model of the current choice is held: one chosen before is dropped (a run still using
            # it keeps its own reference), so switching files or devices does not pile up engines and GPU memory
            for old in [k for k in self._models if k != key]:
                del self._models[old]
            if key not in self._models:
                settings: dict[str, Any] = {"device": device, "kind": model_kind(model), "trust_model_code": trust}
                if tile is not None:
                    settings["tile"] = tile
                self._models[key] = Model(model, report=self._relay.note, **settings)
            return self._models[key]

    def _describe_model(self, *_: Any) -> None:
        """Load the chosen model in the background and offer its outputs (a failure is shown when Run is
        pressed, or here as a notification when a file was chosen)."""
        key = self._model_key()

        def describe() -> tuple[tuple, list[str] | str]:
            try:
                return key, offered_outputs(self._load(*key))
            except SegkitError as exc:
                return key, str(exc)
            except Exception as exc:  # noqa: BLE001 - a worker must not raise into the viewer
                logger.exception("segkit: loading %s failed", key[0] or "the demo model")
                return key, f"{type(exc).__name__}: {exc}"

        self._status.value = "loading the model..."
        self._describer = create_worker(describe, _start_thread=False)
        self._describer.returned.connect(self._on_described)
        self._describer.start()

    def _on_described(self, answer: tuple[tuple, list[str] | str]) -> None:
        key, offered = answer
        if key != self._model_key():
            return  # the choice changed since: another description is on its way
        if isinstance(offered, str):
            self._status.value = "the model could not be loaded"
            show_error(f"segkit: {widget_message(offered)}")
        else:
            current = self._output.value
            self._output.choices = offered
            self._output.value = current if current in offered else offered[0]
            self._status.value = ""
        self.outputs_ready.emit()

    # -- a run ----------------------------------------------------------------------------
    def _job(self) -> Job:
        layer = self._image.value
        if layer is None:
            raise SegkitError("no image layer: open an image first (File > Open), then choose it under Image")
        model = self.model_path
        if model is not None and not model.exists():
            raise SegkitError(f"model file {model} does not exist; choose a .safetensors, .onnx, .zip or rdf.yaml "
                              "file, or leave Model empty for the demo U-Net")
        output = str(self._output.value)
        settings = {} if output == "intensities" else dict(OUTPUTS[output])
        data = layer.data[0] if layer.multiscale else layer.data  # the full-resolution level
        return Job(model=model, device=str(self._device.value), tile="auto" if self._tile_auto.value else None,
                   trust=bool(self._trust.value), settings=settings, data=data, rgb=bool(layer.rgb), scale=tuple(layer.scale),
                   translate=tuple(layer.translate), name=f"{layer.name} {output.split(' ')[0]}")

    def run(self, *_: Any) -> None:
        """Start a run on the chosen layer (Run); a problem with the choices is shown as a notification."""
        if self.worker is not None:
            return
        try:
            job = self._job()
        except SegkitError as exc:
            self._finish(Outcome("failed", str(exc)))
            return
        self._cancel_event = threading.Event()
        self._progress.max, self._progress.value = 1, 0
        self._status.value = "running..."
        self._run.enabled, self._cancel.enabled = False, True
        self.worker = create_worker(self._work, job, self._cancel_event, _start_thread=False)
        self.worker.returned.connect(self._finish)
        self.worker.start()

    def cancel(self, *_: Any) -> None:
        """Stop the running prediction after its current tile batch (Cancel)."""
        self._cancel_event.set()
        self._status.value = "cancelling..."

    def _work(self, job: Job, cancel: threading.Event) -> Outcome:
        """Load (once) and run the model; every failure becomes an Outcome (runs in the worker thread)."""
        try:
            model = self._load(job.model, job.device, job.tile, job.trust)
            if cancel.is_set():
                raise Cancelled()
            axes = input_axes(np.shape(job.data), rgb=job.rgb, channels=model.channels)
            image = np.asarray(job.data)  # a dask or zarr layer is read here, not in the GUI thread
            result = model.predict(image, axes, progress=self._relay, cancel=cancel, **job.settings)
            kind = model.output_kind(**job.settings)
            layer = result_layer(result, kind=kind, axes=model.output_axes(axes, **job.settings), source_axes=axes,
                                 scale=job.scale, translate=job.translate, name=job.name,
                                 channel_names=list(getattr(model.info, "classes", []) or []))
            return Outcome("done", layer=layer)
        except Cancelled as exc:
            return Outcome("cancelled", str(exc))
        except SegkitError as exc:
            return Outcome("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - one line in the viewer, the traceback in the log
            logger.exception("segkit: the run failed")
            return Outcome("failed", f"{type(exc).__name__}: {exc}")

    def _finish(self, outcome: Outcome) -> None:
        """Back in the GUI thread: add the layer, or say in one line why there is none."""
        self.worker = None
        self._run.enabled, self._cancel.enabled = True, False
        if outcome.state == "done" and outcome.layer is not None:
            data, kwargs, kind = outcome.layer
            adder: Callable[..., Any] = getattr(self._viewer, f"add_{kind}")
            adder(data, **kwargs)
            self._progress.value = self._progress.max
            self._status.value = "done"
        elif outcome.state == "cancelled":
            self._status.value = "cancelled"
            show_info(f"segkit: {outcome.message}")
        else:
            self._status.value = "failed"
            show_error(f"segkit: {widget_message(outcome.message)}")
        self.run_finished.emit(outcome.state)

    # -- progress -------------------------------------------------------------------------
    def _on_progress(self, done: int, total: int) -> None:
        self._progress.max = max(total, 1)
        self._progress.value = min(done, self._progress.max)

    def _on_note(self, message: str) -> None:
        message = widget_message(message)
        self._status.value = message
        show_info(f"segkit: {message}")
