"""Intensity normalisation: the one implementation that training, prediction, ONNX export and
bioimage.io packages use.

Normalisation is global, never per tile, so a tiled prediction equals a whole-image one:
(x - mean) / std with the mean and std of the training data (or of a stack), one pair per channel,
or a percentile rule (CSBDeep/StarDist style, for fluorescence) that maps each image's low and high
percentiles to 0 and 1. Numpy arrays and torch tensors (on any device) are normalised alike; torch
is imported only when a tensor is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Normalization:
    """Global intensity normalisation: (x - mean) / std per channel, never computed per tile.

    `mean` and `std` are numbers (one channel) or one per channel. With `percentiles` (low, high)
    the normalisation is a rule instead (CSBDeep/StarDist style, for fluorescence): each image or
    stack gets mean = its low percentile and std = high - low percentile (`for_image`), so its
    intensities map to about [0, 1]; `mean`/`std` then hold typical training values, for display.
    `clip` clamps normalised values to [0, 1] (percentile rules clip: the augmentation clips training
    patches to [0, 1], so prediction input must be clipped alike).
    """

    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    percentiles: tuple[float, float] | None = None
    clip: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # one channel: a plain number, so planes keep their (H, W) shape
            value = getattr(self, name)
            if isinstance(value, (list, tuple, np.ndarray)):
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value[0] if len(value) == 1 else value)
        if self.percentiles is not None:
            object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))

    @property
    def channels(self) -> int | None:
        """Channels this normalisation is for (None: any, one number for all)."""
        return len(self.mean) if isinstance(self.mean, tuple) else None

    def apply(self, raw: Any) -> Any:
        """(raw - mean) / std as float32 (clipped to [0, 1] with `clip`): the one place segkit normalises.

        Parameters
        ----------
        raw : (H, W) or (C, H, W) ndarray or torch.Tensor of uint8, uint16 or float32
            Raw intensities; a tensor stays on its device. (C, H, W) with one (mean, std) pair per channel.

        Returns
        -------
        (H, W) or (C, H, W) ndarray or torch.Tensor of float32
            The normalised values (a new array or tensor; `raw` is not changed).
        """
        if not _is_tensor(raw):
            mean, scale = self._per_channel()
            normalized = (np.asarray(raw, np.float32) - mean) * scale
            return np.clip(normalized, 0.0, 1.0, out=normalized) if self.clip else normalized
        if self.channels is None:
            # the same float32 arithmetic as for numpy, so every dtype and device gives the same values
            normalized = _as_float32(raw).sub_(self.mean).mul_(1.0 / self.std)
        else:
            import torch

            mean, scale = (torch.as_tensor(v, device=raw.device) for v in self._per_channel())
            normalized = _as_float32(raw).sub_(mean).mul_(scale)
        return normalized.clamp_(0.0, 1.0) if self.clip else normalized

    def _per_channel(self) -> tuple[Any, Any]:
        """(mean, 1 / std) as float32 scalars or (C, 1, 1) arrays that broadcast over (C, H, W)."""
        if self.channels is None:
            return np.float32(self.mean), np.float32(1.0 / self.std)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        return mean, (1.0 / np.asarray(self.std, np.float64)).astype(np.float32).reshape(-1, 1, 1)

    def invert(self, normalized: Any) -> Any:
        """raw = normalized * std + mean: a denoiser's output back in raw units.

        Parameters
        ----------
        normalized : (..., H, W) or (..., C, H, W) ndarray or torch.Tensor of float32
            Normalised values.

        Returns
        -------
        ndarray or torch.Tensor of float32
            The values in raw units, of the same shape.
        """
        if self.channels is None:
            return normalized * self.std + self.mean
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        if _is_tensor(normalized):
            import torch

            std, mean = torch.as_tensor(std, device=normalized.device), torch.as_tensor(mean, device=normalized.device)
        return normalized * std + mean

    def for_image(self, image: np.ndarray, *, max_pixels: int = 4_000_000) -> "Normalization":
        """The normalisation of one image or stack sample: itself, or, for a percentile rule, that image's.

        Parameters
        ----------
        image : (H, W), (C, H, W) or (N, C, H, W) ndarray of any dtype
            The image, or samples of a stack; C must match the rule's channels.
        max_pixels : int
            Percentiles are computed from about this many values per channel.

        Returns
        -------
        Normalization
            `self` for a mean/std normalisation; else mean = low percentile and std = high - low
            percentile per channel, clipping as the rule does.
        """
        if self.percentiles is None:
            return self
        return percentile_normalization(image, self.percentiles, channels=self.channels, max_pixels=max_pixels,
                                        clip=self.clip)

    def to_dict(self) -> dict[str, Any]:
        """The record's `normalization` entry (plain JSON data)."""
        as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        data: dict[str, Any] = {"mean": as_json(self.mean), "std": as_json(self.std)}
        if self.percentiles is not None:
            data["percentiles"] = list(self.percentiles)
        if self.clip:
            data["clip"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalization":
        """From a record's `normalization` entry (`to_dict`)."""
        value = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
        percentiles = data.get("percentiles")
        return cls(mean=value(data["mean"]), std=value(data["std"]),
                   percentiles=tuple(float(v) for v in percentiles) if percentiles is not None else None,
                   clip=bool(data.get("clip", False)))


def percentile_normalization(image: np.ndarray, percentiles: tuple[float, float], *, channels: int | None = None,
                             max_pixels: int = 4_000_000, clip: bool = False) -> Normalization:
    """The normalisation that maps `image`'s low and high percentiles to 0 and 1, per channel.

    Parameters
    ----------
    image : (H, W) ndarray, or (C, H, W) or (N, C, H, W) ndarray when `channels` is set, any dtype
        The image, or samples of a stack.
    percentiles : (float, float)
        The low and high percentiles, 0 to 100.
    channels : int, optional
        Channels of `image`; None for one channel (all values pooled).
    max_pixels : int
        The percentiles are computed from about this many values per channel (a regular subsample).
    clip : bool
        Whether the result clips normalised values to [0, 1].

    Returns
    -------
    Normalization
        mean = low percentile, std = high - low percentile (at least 1e-6), per channel.
    """
    values = np.asarray(image)
    if channels is None:
        flat = values.reshape(1, -1)
    else:
        flat = np.moveaxis(values.reshape(-1, channels, *values.shape[-2:]), 1, 0).reshape(channels, -1)
    stride = max(1, flat.shape[1] // max_pixels)
    low, high = np.percentile(flat[:, ::stride].astype(np.float64), percentiles, axis=1)
    spread = np.maximum(high - low, 1e-6)
    return Normalization(mean=tuple(low.tolist()), std=tuple(spread.tolist()), clip=clip)


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _as_float32(raw: Any) -> Any:
    """A float32 copy of a tensor; uint16 goes through int32, which every device can convert."""
    import torch

    if raw.dtype == torch.uint16:
        return raw.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).float()
    return raw.float() if raw.dtype != torch.float32 else raw.clone()


def mean_std_normalization(planes: Sequence[np.ndarray], *, channels: int | None = None) -> Normalization:
    """Global mean and std of `planes` in raw units, per channel when `channels` is set.

    Parameters
    ----------
    planes : sequence of (H, W) ndarrays, or of (C, H, W) ndarrays when `channels` is set, any dtype
        The images (or samples of them) the statistics are computed from, all pixels at once.
    channels : int, optional
        Channels per plane; None for one channel (planes of any shape, all values pooled).

    Returns
    -------
    Normalization
        One (mean, std) pair, or one per channel; std is at least 1e-6 (a constant image would
        otherwise divide by 0).
    """
    if channels is None:
        values = np.concatenate([p.astype(np.float64).ravel() for p in planes])
        return Normalization(mean=float(values.mean()), std=float(max(values.std(), 1e-6)))
    per_channel = [np.concatenate([p[c].astype(np.float64).ravel() for p in planes]) for c in range(channels)]
    return Normalization(mean=tuple(float(v.mean()) for v in per_channel),
                         std=tuple(float(max(v.std(), 1e-6)) for v in per_channel))


def typical_percentile_normalization(images: Sequence[np.ndarray], percentiles: tuple[float, float], *,
                                     channels: int | None = None) -> Normalization:
    """The percentile rule for a set of images, with their median percentiles as its typical values.

    Each image is normalised by its own percentiles when the rule is applied (`Normalization.for_image`);
    the typical mean and std kept in the rule are what a caller without an image shows or uses.

    Parameters
    ----------
    images : sequence of (H, W) ndarrays, or of (C, H, W) ndarrays when `channels` is set, any dtype
        The training images.
    percentiles : (float, float)
        The low and high percentiles (0 to 100) that map to 0 and 1.
    channels : int, optional
        Channels per image; None for one channel.

    Returns
    -------
    Normalization
        A clipping percentile rule whose mean and std are the median over `images` of each image's
        low percentile and spread, per channel.
    """
    count = channels or 1
    rule = Normalization((0.0,) * count, (1.0,) * count, percentiles=tuple(percentiles), clip=True)
    per_image = [rule.for_image(image) for image in images]
    typical = lambda values: tuple(np.median(np.array(values), axis=0).reshape(-1).tolist())  # noqa: E731
    return Normalization(typical([n.mean for n in per_image]), typical([n.std for n in per_image]),
                         percentiles=tuple(percentiles), clip=True)


def stack_sample(stack: Any, *, max_planes: int = 16, max_pixels: int = 4_000_000) -> np.ndarray:
    """Evenly spaced planes of a stack, subsampled: what stack statistics are computed from (one pass).

    Parameters
    ----------
    stack : TiffStack or any object with ``len()`` and ``plane(index)``
        The stack; its planes are (H, W) or (C, H, W) arrays.
    max_planes : int
        At most this many planes are read.
    max_pixels : int
        About this many pixels are kept in all (each plane is strided alike along Y and X).

    Returns
    -------
    (N, C, h, w) ndarray of float64
        The sampled planes, C = 1 for grayscale, cropped to the smallest sampled size.
    """
    indices = np.unique(np.linspace(0, len(stack) - 1, min(len(stack), max_planes)).astype(int))
    per_plane = max(1, max_pixels // len(indices))
    samples = []
    for index in indices:
        plane = stack.plane(int(index))
        plane = plane[None] if plane.ndim == 2 else plane
        stride = max(1, int(np.sqrt(plane[0].size / per_plane)))
        samples.append(plane[:, ::stride, ::stride].astype(np.float64))
    shape = min(s.shape[-2] for s in samples), min(s.shape[-1] for s in samples)
    return np.stack([s[:, : shape[0], : shape[1]] for s in samples])


def stack_normalization(stack: Any, *, max_planes: int = 16, max_pixels: int = 4_000_000) -> Normalization:
    """Mean and std of a stack, per channel for multi-channel stacks, from `stack_sample` (one pass).

    Parameters
    ----------
    stack : TiffStack or any object with ``len()`` and ``plane(index)``
        The stack; its planes are (H, W) or (C, H, W) arrays.
    max_planes, max_pixels : int
        How much of the stack is sampled (see `stack_sample`).

    Returns
    -------
    Normalization
        One (mean, std) pair for grayscale stacks, one per channel otherwise.
    """
    values = stack_sample(stack, max_planes=max_planes, max_pixels=max_pixels)
    channels = values.shape[1]
    return mean_std_normalization(list(values), channels=channels if channels > 1 else None)


def intensity_scale(dtype: np.dtype | str) -> float:
    """The largest value of an integer dtype (255 for uint8), which maps raw data into [0, 1]; 1 for floats.

    Parameters
    ----------
    dtype : numpy dtype or its name
        The stored dtype of the data.

    Returns
    -------
    float
        The scale that raw values are divided by to lie in [0, 1] (augmentation works in those units).
    """
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def normalize_unit(image: np.ndarray, normalization: Normalization, scale: float) -> np.ndarray:
    """Map an image in [0, 1] units back to raw units (times `scale`) and normalise it.

    Parameters
    ----------
    image : (H, W) or (C, H, W) ndarray of float32
        An image in [0, 1] units (raw / `intensity_scale`).
    normalization : Normalization
        The global normalisation of the raw data.
    scale : float
        The `intensity_scale` the image was divided by.

    Returns
    -------
    (H, W) or (C, H, W) ndarray of float32
        The normalised image.
    """
    return normalization.apply(image * scale)
