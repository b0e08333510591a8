"""Resampling of planes to another pixel size (training data to one pixel size; prediction input to
the model's and its output back)."""

from __future__ import annotations

import numpy as np


def rescale(array: np.ndarray, factor: float, *, labels: bool = False, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) or (C, H, W) resampled by `factor` (or to `shape`): nearest neighbour for labels, area
    averaging when shrinking and linear when enlarging images. Keeps the dtype."""
    import cv2

    height, width = array.shape[-2:]
    size = shape or (max(1, round(height * factor)), max(1, round(width * factor)))
    if labels:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if size[0] < height else cv2.INTER_LINEAR
    work = array.astype(np.int32) if labels and array.dtype.itemsize > 2 else array  # cv2 lacks uint32
    if work.dtype == np.int64:
        work = work.astype(np.int32)
    if array.ndim == 2:
        out = cv2.resize(work, (size[1], size[0]), interpolation=interpolation)
    else:
        out = np.stack([cv2.resize(c, (size[1], size[0]), interpolation=interpolation) for c in work])
    return out.astype(array.dtype, copy=False)
