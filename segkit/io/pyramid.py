"""The resolution pyramid of an OME-Zarr image: each level halves the one before in y and x (never
in z), chunk by chunk, so a level is written by independent tasks (the Dask path runs one per chunk).

Two ways to halve (`METHODS`): 'mean' (probabilities, intensities: the mean of each 2 x 2 block in
float32, then rounded back to the dtype) and 'nearest' (classes and labels: every second pixel, so
no new values appear, as labels must not mix). The last row or column of an odd-sized level is
averaged over the pixels it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from segkit._optional import require

METHODS = ("mean", "nearest")


def halve(block: np.ndarray, method: str) -> np.ndarray:
    """Halve the last two axes of `block` (rounding their sizes up), keeping its dtype.

    Parameters
    ----------
    block : ndarray
        (..., H, W).
    method : str
        'mean': the mean of each 2 x 2 block in float32 (integers rounded to nearest and clipped to
        the dtype's range); 'nearest': every second pixel from the first.

    Returns
    -------
    ndarray
        (..., ceil(H / 2), ceil(W / 2)), of block's dtype.

    Raises
    ------
    ValueError
        For another method.
    """
    if method == "nearest":
        return np.ascontiguousarray(block[..., ::2, ::2])
    if method != "mean":
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    height, width = block.shape[-2:]
    # an odd last row / column is repeated: its mean is then that of the pixels the block has
    pad = [(0, 0)] * (block.ndim - 2) + [(0, height % 2), (0, width % 2)]
    values = np.pad(block, pad, mode="edge").astype(np.float32)
    values = values.reshape(*values.shape[:-2], values.shape[-2] // 2, 2, values.shape[-1] // 2, 2).mean(axis=(-3, -1))
    dtype = np.dtype(block.dtype)
    if dtype.kind in "ui":
        limits = np.iinfo(dtype)
        values = np.clip(np.rint(values), limits.min, limits.max)
    return values.astype(dtype)


def level_regions(height: int, width: int, chunk_y: int, chunk_x: int) -> Iterator[tuple[int, int, int, int]]:
    """The chunks of a level's plane: (y0, y1, x0, x1) of each, row by row."""
    for y0 in range(0, height, chunk_y):
        for x0 in range(0, width, chunk_x):
            yield y0, min(y0 + chunk_y, height), x0, min(x0 + chunk_x, width)


def write_level_region(image: str | Path, level: int, z: int, region: tuple[int, int, int, int], method: str) -> None:
    """Write one chunk of pyramid level `level` (>= 1) of the image group `image` from level - 1.

    Parameters
    ----------
    image : str or Path
        The image group (the store, or a label image labels/<name>), holding arrays "0", "1", ...
        of axes [c,] z, y, x.
    level : int
        The level written; level - 1 must be complete.
    z : int
        The plane.
    region : (y0, y1, x0, x1)
        The chunk of the level written (`level_regions`); every channel of it is written.
    method : str
        'mean' or 'nearest' (`halve`).
    """
    require("zarr", feature="OME-Zarr output", package="zarr")
    import zarr

    y0, y1, x0, x1 = region
    source = zarr.open_array(str(Path(image) / str(level - 1)), mode="r")
    target = zarr.open_array(str(Path(image) / str(level)), mode="r+")
    channels = (slice(None),) * (target.ndim - 3)
    block = np.asarray(source[(*channels, z, slice(2 * y0, 2 * y1), slice(2 * x0, 2 * x1))])
    target[(*channels, z, slice(y0, y1), slice(x0, x1))] = halve(block, method)[..., : y1 - y0, : x1 - x0]
