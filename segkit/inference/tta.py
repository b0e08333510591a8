"""Test-time augmentation: average the model over flips and 90-degree rotations of each tile.

Each transform is one batched forward of the whole tile batch; outputs are transformed back and
averaged. The dihedral group maps a valid tile onto a valid tile with its output window in the
same place, so tiled TTA stays seam-free (tests/test_instances.py checks tiled == whole plane).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from segkit.errors import SegkitError

TTA_MODES = ("none", "flips", "d4")
Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _dihedral(rotations: int, flip: bool) -> Transform:
    def forward(x: np.ndarray) -> np.ndarray:
        x = np.flip(x, axis=-1) if flip else x
        return np.rot90(x, rotations, axes=(-2, -1))

    def inverse(y: np.ndarray) -> np.ndarray:
        y = np.rot90(y, -rotations, axes=(-2, -1))
        return np.flip(y, axis=-1) if flip else y

    return forward, inverse


def _flip_axes(axes: tuple[int, ...]) -> Transform:
    def both_ways(x: np.ndarray) -> np.ndarray:
        return np.flip(x, axis=axes) if axes else x

    return both_ways, both_ways


def tta_transforms(mode: str) -> list[Transform]:
    """(transform, inverse) pairs on (..., H, W) arrays: 1 for none, 4 for flips, 8 for d4."""
    if mode == "none":
        return [_flip_axes(())]
    if mode == "flips":
        return [_flip_axes(axes) for axes in ((), (-1,), (-2,), (-2, -1))]
    if mode == "d4":
        return [_dihedral(k, flip) for k in range(4) for flip in (False, True)]
    raise SegkitError(f"unknown --tta {mode!r}; choose one of {', '.join(TTA_MODES)}")


class TTAForward:
    """An engine wrapper that averages the engine's output over the transforms of `mode`."""

    def __init__(self, engine: Any, mode: str) -> None:
        self.engine = engine
        self.transforms = tta_transforms(mode)
        self.mode = mode
        self.device = f"{getattr(engine, 'device', 'engine')}, TTA {mode} ({len(self.transforms)} passes)"
        self.uses_gpu = getattr(engine, "uses_gpu", False)

    def release_memory(self) -> None:
        release = getattr(self.engine, "release_memory", None)
        if release is not None:
            release()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for transform, inverse in self.transforms:
            out = inverse(self.engine(np.ascontiguousarray(transform(batch))))
            total = out.astype(np.float32, copy=True) if total is None else total + out
        assert total is not None
        return total / len(self.transforms)
