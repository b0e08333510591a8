"""Every output encoding of a prediction, which one a model and its options get, and the words
the header prints for it.

An encoding turns a plane of engine outputs (K, H, W) into what is written, in two halves:
`encode` on the engine's device (returns the small tensor copied back), `finish` on the host in
the writer thread (identity, or a watershed). The five:

- `ProbabilityEncoding`: probabilities as uint8 0-255, float16, or a 0/255 mask (one class, or
  every class as a channel axis);
- `ClassMapEncoding`: the most probable class, uint8 0..K-1;
- `IntensityEncoding`: a denoiser's output back in raw units;
- `InstanceEncoding`: uint32 neuron instances of a membrane probability (seeded watershed);
- `ObjectEncoding`: uint32 objects of background / interior / boundary probabilities.

The two label encodings write ids unique across the stack: `finish_planes` shifts each plane's ids
1..n past those of the planes before it (`segkit.instances.unique_ids`; the Dask path offsets by the
same cumulative sum, `segkit.instances.id_offsets`).

The watershed algorithms themselves are in `segkit.instances`. torch is imported only inside
`encode`, so this module stays light.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segkit.errors import SegkitError
from segkit.inference.options import PredictOptions
from segkit.instances import ObjectParams, WatershedParams, object_watershed, unique_ids, watershed_slice

if TYPE_CHECKING:
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo, InferenceDefaults

#: What a `ProbabilityEncoding` stores: probabilities as uint8 0-255 or float16, or a 0/255 mask.
PROBABILITY_KINDS = ("uint8", "float16", "mask")


class PlaneEncoding(Protocol):
    """How a plane of engine outputs (K, H, W) becomes what is written.

    `encode` runs on the device and returns the (small) tensor to copy back; it may overwrite
    `values` (the tiler's accumulator, which nothing reads afterwards). `finish` runs on the host
    in the writer thread (identity, or work that needs the CPU such as a watershed).
    """

    @property
    def dtype(self) -> np.dtype: ...

    def encode(self, values: Any) -> Any: ...

    def finish(self, plane: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ProbabilityEncoding:
    """Probabilities stored as uint8 0-255, float16, or a 0/255 mask at `threshold`."""

    kind: str = "uint8"
    threshold: float = 0.5
    channel: int | None = 0  # the class written; None: every class, `channels` of them (a C axis)
    channels: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROBABILITY_KINDS:
            raise SegkitError(f"unknown output type {self.kind!r}; choose one of {', '.join(PROBABILITY_KINDS)}")
        if not 0.0 < self.threshold < 1.0:
            raise SegkitError(f"threshold {self.threshold} must be between 0 and 1 (exclusive)")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.kind == "float16" else np.uint8)

    def encode(self, values: Any) -> Any:
        import torch

        probability = values if self.channel is None else values[self.channel]
        if self.kind == "float16":
            return probability.to(torch.float16)
        if self.kind == "mask":
            return (probability >= self.threshold).to(torch.uint8).mul_(255)
        # 255 p + 0.5, clipped and truncated: round half up, in three passes, the first two in place
        half = probability.new_full((), 0.5)  # filled on the device: no host copy, no synchronisation
        return torch.add(half, probability, alpha=255.0, out=probability).clamp_(0.0, 255.0).to(torch.uint8)

    def finish(self, plane: np.ndarray) -> np.ndarray:
        return plane


@dataclass(frozen=True)
class ClassMapEncoding:
    """The most probable class of every pixel (argmax), as uint8 class numbers 0..K-1."""

    channels: int = 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def encode(self, values: Any) -> Any:
        import torch

        return values.argmax(0).to(torch.uint8)

    def finish(self, plane: np.ndarray) -> np.ndarray:
        return plane


@dataclass(frozen=True)
class IntensityEncoding:
    """How a denoiser's output (normalised units) is stored: back in raw units, as `dtype`.

    Integer dtypes are rounded and clipped to their range, so a denoised uint8 stack stays uint8.
    """

    normalization: Normalization
    dtype: np.dtype

    def encode(self, values: Any) -> Any:
        import torch

        raw = self.normalization.invert(values[0])
        if self.dtype == np.uint8:
            return raw.round_().clamp_(0, 255).to(torch.uint8)
        if self.dtype.kind in "ui":
            limits = np.iinfo(self.dtype)
            return raw.round_().clamp_(float(limits.min), float(limits.max))  # the host casts: torch lacks uint16 math
        return raw.float()

    def finish(self, plane: np.ndarray) -> np.ndarray:
        return plane.astype(self.dtype, copy=False)


@dataclass(frozen=True)
class InstanceEncoding:
    """Neuron instances of a membrane model (`instances=True`): each plane's probability (channel
    `channel`) comes back to the host as float32 and becomes uint32 labels there (`watershed_slice`)."""

    params: WatershedParams = WatershedParams()
    channel: int = 0

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32)

    def encode(self, values: Any) -> Any:
        return values[self.channel].float()

    def finish(self, probability: np.ndarray) -> np.ndarray:
        return watershed_slice(probability, self.params)


@dataclass(frozen=True)
class ObjectEncoding:
    """Objects of a model trained on instance labels: the (3, H, W) probabilities come back to the
    host as float32 and become uint32 object labels there (`object_watershed`)."""

    params: ObjectParams = ObjectParams()
    channels: int = 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32)

    def encode(self, values: Any) -> Any:
        return values.float()

    def finish(self, probabilities: np.ndarray) -> np.ndarray:
        return object_watershed(probabilities, self.params)


#: The encodings that write labels (ids 1..n per plane before `finish_planes` makes them unique across the stack).
LABEL_ENCODINGS = (InstanceEncoding, ObjectEncoding)


def finish_planes(spec: PlaneEncoding, planes: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The host half of a stack's planes, in stack order: `spec.finish` of each, and for label encodings
    ids unique across the stack (each plane's shifted past the largest id of the planes before it)."""
    finished = (spec.finish(plane) for plane in planes)
    return unique_ids(finished) if isinstance(spec, LABEL_ENCODINGS) else finished


def output_content(spec: PlaneEncoding) -> str:
    """What an encoding's output holds, as its file records it (`segkit.io.calibration.CONTENTS`):
    'labels' (instances, objects), 'intensities' (a denoiser's), 'classes' (a class map, a 0/255
    mask), else 'probabilities'."""
    if isinstance(spec, LABEL_ENCODINGS):
        return "labels"
    if isinstance(spec, IntensityEncoding):
        return "intensities"
    if isinstance(spec, ClassMapEncoding) or getattr(spec, "kind", None) == "mask":
        return "classes"
    return "probabilities"


# -- which encoding ----------------------------------------------------------------------------

def parse_threshold(value: float | str, auto: float) -> float:
    """A threshold given as a number or 'auto' (then `auto`, the checkpoint's)."""
    if value == "auto":
        return float(auto)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SegkitError(f"threshold {value!r} must be a number between 0 and 1 or 'auto'") from None


def stack_encoding(info: CheckpointInfo, options: PredictOptions, stack: Any, factor: float | None) -> PlaneEncoding:
    """The encoding of one stack's planes: denoised intensities follow the stack's dtype (output type
    'same'); objects' watershed runs on probabilities resized back to the input by 1 / `factor` (the
    factor its planes were resampled by for the model, None: not resampled), so its sizes follow."""
    if options.kind == "denoiser":
        return IntensityEncoding(info.normalization, stack.dtype if options.output_type == "same"
                                 else np.dtype(np.float32))
    encoding = model_encoding(info, options)
    if isinstance(encoding, ObjectEncoding) and factor is not None:
        return ObjectEncoding(encoding.params.resized(1.0 / factor), encoding.channels)
    return encoding


def model_encoding(info: CheckpointInfo, options: PredictOptions) -> PlaneEncoding:
    """The encoding of a segmenter's output: membrane models as `membrane_encoding`; models of K
    classes by label kind (every class, one class, argmax, or objects)."""
    kind = info.inference.labels_kind
    classes = info.output_classes
    if options.class_index is not None and not 0 <= options.class_index < classes:
        names = ", ".join(f"{k} {name}" for k, name in enumerate(info.classes)) or f"0-{classes - 1}"
        raise SegkitError(f"class_index={options.class_index} is not a class of this model ({names})")
    if kind == "membrane":
        if options.argmax or options.class_index not in (None, 1):
            raise SegkitError("this model writes the membrane probability (class 1); argmax and class_index are "
                              "for models trained on semantic or instance labels")
        return membrane_encoding(info.inference, output_type=str(options.output_type), threshold=options.threshold,
                                 instances=options.instances)
    if sum((options.argmax, options.class_index is not None, options.instances)) > 1:
        raise SegkitError("choose one of argmax, class_index and instances")
    if options.argmax:
        return ClassMapEncoding()
    if options.class_index is not None:
        if options.threshold is not None:
            return ProbabilityEncoding("mask", parse_threshold(options.threshold, 0.5), channel=options.class_index)
        return ProbabilityEncoding(str(options.output_type), channel=options.class_index)
    if options.threshold is not None and kind == "semantic":
        raise SegkitError("threshold makes a mask of one class: give class_index too (or argmax for class labels)")
    if kind == "instances" or options.instances:
        if kind != "instances":
            raise SegkitError("instances need a model trained on instance labels (data.labels_kind: instances); "
                              "this one was trained on semantic classes: use argmax")
        stored = dict(info.inference.watershed or {})
        if options.threshold is not None:
            stored["seed_threshold"] = parse_threshold(options.threshold, stored.get("seed_threshold", 0.5))
        return ObjectEncoding(ObjectParams.from_dict(stored))
    return ProbabilityEncoding(str(options.output_type), channel=None, channels=classes)


def membrane_encoding(inference: InferenceDefaults, *, output_type: str = "uint8", threshold: float | str | None = None,
                      instances: bool = False, watershed: dict[str, Any] | None = None) -> PlaneEncoding:
    """Membrane probabilities as `output_type`, a 0/255 mask at `threshold` (a number, or 'auto' for
    the checkpoint's), or instance labels with the checkpoint's watershed settings (`threshold` and
    `watershed` override them)."""
    if instances:
        stored = dict(inference.watershed or {})
        if threshold is not None:
            stored["threshold"] = parse_threshold(threshold, stored.get("threshold", _stored_threshold(inference)))
        stored.update({k: v for k, v in (watershed or {}).items() if v is not None})
        return InstanceEncoding(WatershedParams.from_dict(stored))
    if threshold is None:
        return ProbabilityEncoding(output_type)
    return ProbabilityEncoding("mask", parse_threshold(threshold, _stored_threshold(inference)))


def _stored_threshold(inference: InferenceDefaults) -> float:
    """The checkpoint's membrane threshold, else 0.5."""
    return inference.threshold if inference.threshold is not None else 0.5


# -- in words ----------------------------------------------------------------------------------

def describe_output(info: CheckpointInfo, options: PredictOptions) -> tuple[str, float | None]:
    """What each output holds, in words (for the header line), and the threshold it uses: a mask's
    or the watershed's, as 'auto' resolved it (None for probabilities and denoised intensities)."""
    output_type, threshold, instances = options.output_type, options.threshold, options.instances
    if options.kind == "denoiser":
        return ("denoised intensities in the input's dtype" if output_type == "same"
                else f"denoised {output_type} intensities"), None
    if info.inference.labels_kind != "membrane":
        return _describe_classes(info, model_encoding(info, options))
    encoding: Any = membrane_encoding(info.inference, output_type=str(output_type), threshold=threshold,
                                      instances=instances)
    stored = info.inference.threshold is not None or (
        instances and (info.inference.watershed or {}).get("threshold") is not None)
    origin = "" if threshold != "auto" else (" (auto: the checkpoint's)" if stored
                                              else " (auto: the checkpoint stores none, so the default)")
    if instances:
        params = encoding.params
        return (f"uint32 instances, ids unique across the stack: seeded watershed at threshold {params.threshold:g}"
                f"{origin}, seed distance {params.seed_distance:g}, min seed size {params.min_seed_size}, min size "
                f"{params.min_size}", params.threshold)
    if threshold is not None:
        return f"a 0/255 membrane mask at threshold {encoding.threshold:g}{origin}", encoding.threshold
    return f"{output_type} membrane probabilities", None


def _describe_classes(info: CheckpointInfo, encoding: Any) -> tuple[str, float | None]:
    """describe_output for models of K classes."""
    names = info.classes or [str(k) for k in range(info.output_classes)]
    if isinstance(encoding, ClassMapEncoding):
        return "uint8 classes (argmax): " + ", ".join(f"{k} {n}" for k, n in enumerate(names)), None
    if isinstance(encoding, ObjectEncoding):
        p = encoding.params
        return (f"uint32 objects, ids unique across the stack: seeded watershed on the interior probability (seed threshold {p.seed_threshold:g}, "
                f"seed distance {p.seed_distance:g}, foreground below background probability "
                f"{p.foreground_threshold:g}, min size {p.min_size})", p.seed_threshold)
    if encoding.channel is None:
        return f"{encoding.kind} probabilities of {len(names)} classes (channel axis: {', '.join(names)})", None
    name = names[encoding.channel] if encoding.channel < len(names) else str(encoding.channel)
    if encoding.kind == "mask":
        return (f"a 0/255 mask of class {encoding.channel} ({name}) at threshold {encoding.threshold:g}",
                encoding.threshold)
    return f"{encoding.kind} probability of class {encoding.channel} ({name})", None
