"""Every prediction option, in one frozen dataclass: `PredictOptions`.

The CLI builds it from its flags, `segkit.predict(sources, output, model=..., **options)` from its
keywords; the single-machine runner, the Dask path and the engine loader read it. Choices are
string enums, checked once when the options are built, so a wrong value fails before any file is
read or any model is loaded. Messages name the parameters (`tile`, `output_type`); the CLI turns
them into its flags.

This module imports no torch: `segkit --help` and `import segkit` stay light.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segkit.devices import AMP_CHOICES
from segkit.errors import OptionTypeError, OptionValueError, SegkitError
from segkit.io.tiff import COMPRESSIONS
from segkit.record import MODEL_KINDS


class Choice(str, enum.Enum):
    """A string option with a fixed set of values: compares, formats and prints as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:
        return repr(str(self.value))

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(member.value) for member in cls)


class EngineChoice(Choice):
    """Which runtime runs the model."""

    AUTO = "auto"  # onnx for .onnx files, else torch
    TORCH = "torch"
    ONNX = "onnx"  # ONNX Runtime; a checkpoint is exported (and verified) for the run


#: Autocast precision of the forward pass: auto is bf16 on GPUs that have it, else fp16, and none on
#: the CPU. Its values are `segkit.devices.AMP_CHOICES`, the one list that training shares.
Amp = Choice("Amp", [(value.upper(), value) for value in AMP_CHOICES], module=__name__)


class Compile(Choice):
    """Whether the torch engine runs the model through torch.compile."""

    AUTO = "auto"  # on a CUDA device only (measured: it loses on the CPU, see TorchEngine)
    ON = "on"
    OFF = "off"


class Blend(Choice):
    """The window blending overlapping tiles of same-padding models."""

    COSINE = "cosine"
    GAUSSIAN = "gaussian"


class Normalize(Choice):
    """Where the intensity statistics come from."""

    AUTO = "auto"  # the checkpoint's, unless the input's dtype differs from the training data's
    CHECKPOINT = "checkpoint"
    STACK = "stack"


class TTA(Choice):
    """Test-time augmentation: the transforms the model's output is averaged over."""

    NONE = "none"
    FLIPS = "flips"  # 4 flips
    D4 = "d4"  # the 8 flips and rotations


class OutputType(Choice):
    """How values are stored: probabilities of a segmenter, intensities of a denoiser."""

    UINT8 = "uint8"  # probabilities as 0-255
    FLOAT16 = "float16"
    SAME = "same"  # denoised intensities in the input's dtype (rounded, clipped)
    FLOAT32 = "float32"  # denoised intensities as float32


#: The output types of each model kind; the first is the default.
SEGMENTER_OUTPUT_TYPES = (OutputType.UINT8, OutputType.FLOAT16)
DENOISER_OUTPUT_TYPES = (OutputType.SAME, OutputType.FLOAT32)


@dataclass(frozen=True)
class PredictOptions:
    """Every option of a prediction, checked once when built.

    Parameters
    ----------
    engine : {'auto', 'torch', 'onnx'}
        The runtime: auto takes onnx for .onnx files, else torch; onnx with a checkpoint exports
        it (verified against torch) for this run.
    denoise : path, optional
        A denoiser checkpoint run in front of the segmenter.
    tile : int, 'auto' or None
        The input tile (a valid input size of the model); 'auto' measures sizes and batches on this
        device and takes the fastest that fits; None: the model's trained tile (else 572).
    batch : int, optional
        Tiles per forward pass; None: 4 on the CPU, from the free memory on a GPU (or measured with
        tile 'auto'). Halved automatically when the GPU runs out of memory.
    device : str
        auto, cpu, cuda or cuda:N.
    amp : {'auto', 'none', 'fp16', 'bf16'}
        Autocast precision: auto is bf16 on GPUs that have it, else fp16, and none on the CPU.
    compile_model : {'auto', 'on', 'off'} or bool
        torch.compile the model (torch engine): auto on CUDA devices only, on always, off never;
        True and False mean on and off. Compiled kernels are cached in the user cache dir.
    blend : {'cosine', 'gaussian'}
        The window blending overlapping tiles of same-padding models.
    halo : int, optional
        Context (px) around tiles of same-padding models, instead of the model's.
    output_type : {'uint8', 'float16'} or {'same', 'float32'}, optional
        Segmenters: probabilities as uint8 (0-255, the default) or float16. Denoisers: intensities
        in the input's dtype ('same', the default) or float32.
    threshold : float, 'auto' or None
        A 0/255 mask at this probability ('auto': the checkpoint's); with `instances`, the
        watershed's threshold; with `class_index`, that class's mask.
    normalize : {'auto', 'checkpoint', 'stack'}
        Intensity statistics: the checkpoint's (training data), this stack's (computed once), or
        auto: the checkpoint's unless the input's dtype differs from the training data's.
    tta : {'none', 'flips', 'd4'}
        Test-time augmentation: average over 4 flips or the 8 flips and rotations.
    instances : bool
        Membrane models: uint32 neuron instances (seeded watershed per plane).
    class_index : int, optional
        Models of K classes: only this class's probability (or mask, with `threshold`).
    argmax : bool
        Models of K classes: the most probable class, uint8 0..K-1.
    compression : {'zlib', 'zstd', 'lzw', 'none'}
        TIFF compression of the output (segkit.io.tiff.COMPRESSIONS).
    kind : {'segmenter', 'denoiser'}
        What the model must be; denoisers write intensities instead of probabilities.
    workers : int, optional
        The Dask path on a local cluster of this many worker processes (OME-Zarr output).
    scheduler : str, optional
        The Dask path on this cluster (tcp://host:8786; OME-Zarr output).
    chunk : int
        OME-Zarr chunk side (px, rounded up to the model step); one Dask task per chunk.
    resume : bool
        OME-Zarr: finish an interrupted run, skipping the chunks already written.
    overwrite : bool
        Replace existing outputs.
    skip_existing : bool
        With an output folder: leave inputs whose output exists.
    trust_model_code : bool
        Let a bioimage.io package run its own Python code (TorchScript, a pytorch_state_dict
        architecture); without it segkit runs only its weights (ONNX, or segkit's own record).

    Raises
    ------
    SegkitError
        An unknown choice, a tile that is not a number or 'auto', an output type the model kind
        does not write, instances asked of a denoiser.
    """

    engine: EngineChoice = EngineChoice.AUTO
    denoise: Path | None = None
    tile: int | str | None = None
    batch: int | None = None
    device: str = "auto"
    amp: Amp = Amp.AUTO
    compile_model: Compile | str | bool = Compile.AUTO
    blend: Blend = Blend.COSINE
    halo: int | None = None
    output_type: OutputType | None = None  # None: the kind's default (uint8, or same for denoisers)
    threshold: float | str | None = None
    normalize: Normalize = Normalize.AUTO
    tta: TTA = TTA.NONE
    instances: bool = False
    class_index: int | None = None
    argmax: bool = False
    compression: str = "zlib"
    kind: str = "segmenter"  # or "denoiser"
    workers: int | None = None
    scheduler: str | None = None
    chunk: int = 1024
    resume: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    trust_model_code: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise OptionValueError(f"unknown model kind {self.kind!r}; choose segmenter or denoiser")
        allowed = DENOISER_OUTPUT_TYPES if self.kind == "denoiser" else SEGMENTER_OUTPUT_TYPES
        output_type = allowed[0] if self.output_type is None else str(self.output_type)
        if output_type not in allowed:
            raise OptionValueError(f"unknown output type {output_type!r}; choose one of {', '.join(allowed)}")
        if self.instances and self.kind == "denoiser":
            raise SegkitError("instances come from a segmenter's probabilities, not from a denoiser")
        if self.compression not in COMPRESSIONS:
            raise OptionValueError(f"unknown compression {self.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        checked = {
            "output_type": OutputType(output_type),
            "engine": _choice(EngineChoice, self.engine, "unknown engine {value}; choose one of {choices}"),
            "amp": _choice(Amp, self.amp, "unknown amp {value}; choose one of {choices}"),
            "blend": _choice(Blend, self.blend, "unknown blend window {value}; choose one of {choices}"),
            "normalize": _choice(Normalize, self.normalize, "unknown normalisation {value}; choose auto, checkpoint "
                                                            "or stack"),
            "compile_model": _choice(Compile, _on_off(self.compile_model),
                                     "unknown compile choice {value}; choose one of {choices}"),
            "tta": _choice(TTA, self.tta, "unknown test-time augmentation {value}; choose one of {choices}"),
            "tile": _tile(self.tile),
            "denoise": Path(self.denoise) if self.denoise is not None else None,
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        self._check_numbers_and_flags()

    def _check_numbers_and_flags(self) -> None:
        """Types and ranges of the numeric and boolean options: a value segkit would otherwise change
        silently (batch 0, tile 380.7, the string 'false') is refused, naming the option."""
        for name in ("instances", "argmax", "resume", "overwrite", "skip_existing", "trust_model_code"):
            if not isinstance(getattr(self, name), bool):
                raise OptionTypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name, lowest in (("batch", 1), ("halo", 0), ("class_index", 0), ("workers", 1), ("chunk", 16)):
            value = getattr(self, name)
            if value is None and name != "chunk":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise OptionTypeError(f"{name} must be a whole number, not {value!r}")
            if value < lowest:
                raise OptionValueError(f"{name} must be at least {lowest}, not {value}")
        threshold = self.threshold
        if isinstance(threshold, str) and threshold != "auto":  # the CLI passes its text
            try:
                threshold = float(threshold)
            except ValueError:
                raise OptionTypeError(f"threshold {threshold!r} must be a number between 0 and 1 or 'auto'") from None
            object.__setattr__(self, "threshold", threshold)
        if threshold is not None and threshold != "auto":
            if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
                raise OptionTypeError(f"threshold {threshold!r} must be a number between 0 and 1 or 'auto'")
            if not 0.0 <= float(threshold) <= 1.0:
                raise OptionValueError(f"threshold {threshold} must be between 0 and 1 (a probability) or 'auto'")

    @property
    def fixed_tile(self) -> int | None:
        """The tile asked for as a number (None: the model's, or measured with 'auto')."""
        return None if self.tile is None or self.tile == "auto" else int(self.tile)

    @property
    def on_dask(self) -> bool:
        """Whether a cluster was asked for (the output must then be an OME-Zarr store)."""
        return bool(self.scheduler or self.workers)


def _choice(enum_type: type[Choice], value: Any, message: str) -> Any:
    """`value` as a member of `enum_type`, else OptionValueError (a SegkitError and a ValueError: `message`)
    naming the value and the choices."""
    try:
        return enum_type(value)
    except ValueError:
        raise OptionValueError(message.format(value=repr(value), choices=", ".join(enum_type.values()))) from None


def _on_off(value: Any) -> Any:
    """True and False (the old boolean `compile_model`) as 'on' and 'off'; anything else as it is."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


def _tile(tile: Any) -> int | str | None:
    """A tile: None, 'auto', or a whole number (also as digits in a string, as the CLI passes it); a
    fraction such as 380.7 is refused, not cut to 380."""
    if tile is None or tile == "auto":
        return tile
    if isinstance(tile, str) and tile.strip().isdigit():
        return int(tile)
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral):
        raise OptionTypeError(f"tile {tile!r} must be a whole number of pixels or 'auto'")
    return int(tile)
