"""Synthetic corruptions for training and measuring denoisers; images are float arrays in [0, 1].

Each function is pure given its random generator, so a validation set corrupted with a fixed
seed is the same in every epoch and every run.
"""

from __future__ import annotations

import numpy as np

NOISES = ("none", "gaussian", "poisson_gaussian", "masking", "salt_pepper")


def gaussian(image: np.ndarray, rng: np.random.Generator, *, sigma: float) -> np.ndarray:
    """Additive white Gaussian noise of standard deviation `sigma`."""
    return (image + rng.normal(0.0, sigma, image.shape)).astype(np.float32)


def poisson_gaussian(image: np.ndarray, rng: np.random.Generator, *, gain: float, sigma: float) -> np.ndarray:
    """Shot noise (Poisson with `gain` photons per unit intensity) plus Gaussian read noise."""
    photons = rng.poisson(np.clip(image, 0.0, None) * gain) / gain
    return (photons + rng.normal(0.0, sigma, image.shape)).astype(np.float32)


def masking(image: np.ndarray, rng: np.random.Generator, *, fraction: float) -> np.ndarray:
    """Vincent et al. 2008 masking noise: a random `fraction` of pixels set to 0."""
    return np.where(rng.random(image.shape) < fraction, 0.0, image).astype(np.float32)


def salt_pepper(image: np.ndarray, rng: np.random.Generator, *, fraction: float) -> np.ndarray:
    """A random `fraction` of pixels set to 0 or 1 with equal chance."""
    hit = rng.random(image.shape) < fraction
    return np.where(hit, (rng.random(image.shape) < 0.5).astype(np.float32), image).astype(np.float32)


def corrupt(image: np.ndarray, rng: np.random.Generator, settings: dict) -> np.ndarray:
    """Apply the recipe's `noise` with its parameters (sigma, gain, fraction)."""
    noise = settings["noise"]
    if noise == "none":
        return image.astype(np.float32, copy=True)
    if noise == "gaussian":
        return gaussian(image, rng, sigma=settings["sigma"])
    if noise == "poisson_gaussian":
        return poisson_gaussian(image, rng, gain=settings["gain"], sigma=settings["sigma"])
    if noise == "masking":
        return masking(image, rng, fraction=settings["fraction"])
    if noise == "salt_pepper":
        return salt_pepper(image, rng, fraction=settings["fraction"])
    raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")


def blind_spot(image: np.ndarray, rng: np.random.Generator, *, fraction: float, radius: int = 2,
               region: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Noise2Void masking (Krull et al. 2019): a `fraction` of pixels (inside `region`) take the
    value of a random other pixel within `radius`; returns (masked image, boolean mask of them).

    Trained to predict the original values at the masked pixels only, a network cannot copy its
    input there and learns the signal, not the pixel-wise independent noise.
    """
    height, width = image.shape
    mask = np.zeros(image.shape, bool)
    window = mask[region] if region is not None else mask
    window[...] = rng.random(window.shape) < fraction
    ys, xs = np.nonzero(mask)
    dy = rng.integers(-radius, radius + 1, ys.size)
    dx = rng.integers(-radius, radius + 1, xs.size)
    same = (dy == 0) & (dx == 0)
    dx[same] = rng.choice([-1, 1], int(same.sum()))  # never the pixel itself
    source_y = np.clip(ys + dy, 0, height - 1)
    source_x = np.clip(xs + dx, 0, width - 1)
    masked = image.astype(np.float32, copy=True)
    masked[ys, xs] = image[source_y, source_x]
    return masked, mask


def psnr(estimate: np.ndarray, clean: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (skimage.metrics)."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(clean.astype(np.float64), estimate.astype(np.float64), data_range=data_range))


def ssim(estimate: np.ndarray, clean: np.ndarray, *, data_range: float = 1.0) -> float:
    """Structural similarity (skimage.metrics)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(clean.astype(np.float64), estimate.astype(np.float64), data_range=data_range))
