"""Test-time augmentation: average the model over flips and 90-degree rotations of each tile.

Each transform is one batched forward of the whole tile batch, on the engine's device; outputs
are transformed back and averaged there. The dihedral group maps a valid tile onto a valid tile
with its output window in the same place, so tiled TTA stays seam-free (tests check tiled ==
whole plane).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segkit.errors import SegkitError
from segkit.inference.options import TTA

TTA_MODES = TTA.values()  # the choices of PredictOptions.tta
Transform = tuple[Callable[[Any], Any], Callable[[Any], Any]]


def _dihedral(rotations: int, flip: bool) -> Transform:
    def forward(x: Any) -> Any:
        x = x.flip(-1) if flip else x
        return x.rot90(rotations, (-2, -1)) if rotations else x

    def inverse(y: Any) -> Any:
        y = y.rot90(-rotations, (-2, -1)) if rotations else y
        return y.flip(-1) if flip else y

    return forward, inverse


def _flip_axes(axes: tuple[int, ...]) -> Transform:
    def both_ways(x: Any) -> Any:
        return x.flip(axes) if axes else x

    return both_ways, both_ways


def tta_transforms(mode: str) -> list[Transform]:
    """(transform, inverse) pairs on (..., H, W) tensors: 1 for none, 4 for flips, 8 for d4."""
    if mode == "none":
        return [_flip_axes(())]
    if mode == "flips":
        return [_flip_axes(axes) for axes in ((), (-1,), (-2,), (-2, -1))]
    if mode == "d4":
        return [_dihedral(k, flip) for k in range(4) for flip in (False, True)]
    raise SegkitError(f"unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}")


class TTAForward:
    """An engine wrapper that averages the engine's output over the transforms of `mode`."""

    def __init__(self, engine: Any, mode: str) -> None:
        self.engine = engine
        self.transforms = tta_transforms(mode)
        self.mode = mode
        self.device = engine.device
        self.label = f"{getattr(engine, 'label', 'engine')}, TTA {mode} ({len(self.transforms)} passes)"
        self.uses_gpu = getattr(engine, "uses_gpu", False)
        self.geometry = getattr(engine, "geometry", None)

    def release_memory(self) -> None:
        release = getattr(self.engine, "release_memory", None)
        if release is not None:
            release()

    def __call__(self, batch: Any) -> Any:
        total = None
        for transform, inverse in self.transforms:
            out = inverse(self.engine(transform(batch)))
            total = out.float().clone() if total is None else total.add_(out)
        return total.div_(len(self.transforms))
