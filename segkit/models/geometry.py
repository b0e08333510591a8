"""Model geometry: which tile sizes a model accepts and what it loses at the borders.

Pure Python (no torch), so the tiler, the CLI and checkpoints can reason about a model
without building it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from segkit.errors import CheckpointError, TileSizeError


@dataclass(frozen=True)
class Geometry:
    """Valid input sizes of a 2D model, the same along Y and X.

    Valid outputs are ``min_output + step * k`` (k >= 0); the input is ``output + 2 * margin``.
    A valid-conv U-Net of depth 4 has margin 92, step 16, min_output 4: inputs 188 + 16k.
    A same-padding model has margin 0 and gets ``halo`` pixels of extra context that are
    cropped or blended away.
    """

    margin: int
    step: int
    min_output: int
    halo: int = 0

    def __post_init__(self) -> None:
        if self.margin < 0 or self.step < 1 or self.min_output < 1 or self.halo < 0:
            raise ValueError(f"inconsistent geometry {self}")

    @property
    def min_input(self) -> int:
        return self.min_output + 2 * self.margin

    @property
    def default_tile(self) -> int:
        """The tile used where none is given or recorded: 572 (the U-Net paper's tile) where valid,
        else the smallest valid size of at least 512."""
        if self.is_valid_input(572):
            return 572
        below, above = self.nearest_valid(512)
        return 512 if below == 512 else above

    def output_size(self, input_size: int) -> int:
        """Output size for a valid input size."""
        self.check_tile(input_size)
        return input_size - 2 * self.margin

    def is_valid_input(self, input_size: int) -> bool:
        extra = input_size - self.min_input
        return extra >= 0 and extra % self.step == 0

    def nearest_valid(self, tile: int) -> tuple[int | None, int]:
        """The valid input sizes just below (None if there is none) and at or above `tile`."""
        if tile <= self.min_input:
            return None, self.min_input
        k = (tile - self.min_input) // self.step
        below = self.min_input + k * self.step
        if below == tile:
            return tile, tile
        return below, below + self.step

    def check_tile(self, tile: int) -> None:
        """Raise TileSizeError naming the nearest valid sizes when `tile` is not valid."""
        if self.is_valid_input(tile):
            return
        below, above = self.nearest_valid(tile)
        choices = f"{below} or {above}" if below is not None else f"{above} or larger"
        valid = (f"multiples of {self.step}" if self.min_input == self.step
                 else f"{self.min_input} + {self.step}k")
        raise TileSizeError(f"tile {tile} is not a valid input size for this model (valid: {valid}); use tile {choices}")

    def with_halo(self, halo: int) -> "Geometry":
        """The same geometry with another halo; valid-conv models need none (their tiles are exact).

        A denoiser in front of a same-padding segmenter has both a margin and a halo; its halo can change.
        """
        if self.margin > 0 and self.halo == 0:
            raise TileSizeError(f"halo={halo} applies to same-padding models (FCN, smp); valid-conv models have exact "
                                "tiles and need no halo")
        if halo < 0:
            raise TileSizeError(f"halo must be >= 0, got {halo}")
        return replace(self, halo=halo)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Geometry":
        try:
            return cls(**{k: int(data[k]) for k in ("margin", "step", "min_output")},
                       halo=int(data.get("halo", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"geometry record {data!r} is malformed: {exc}") from exc


def valid_unet_geometry(depth: int, convs_per_level: int = 2) -> Geometry:
    """Geometry of a valid-conv U-Net, derived by walking sizes through the network.

    Each level runs `convs_per_level` unpadded 3x3 convs (2 px lost each) and a 2x2 pooling
    that needs an even size; the decoder mirrors it with 2x up-convolutions.
    """
    if depth < 1:
        raise ValueError("depth must be >= 1")

    def output(size: int) -> int | None:
        for _ in range(depth):
            size -= 2 * convs_per_level
            if size <= 0 or size % 2:
                return None
            size //= 2
        size -= 2 * convs_per_level
        if size <= 0:
            return None
        for _ in range(depth):
            size = 2 * size - 2 * convs_per_level
            if size <= 0:
                return None
        return size

    smallest = next((n for n in range(1, 4096) if output(n) is not None), None)
    if smallest is None:  # depth 9 and more: tiles of thousands of px for each output pixel
        raise ValueError(f"depth {depth} is too deep: its smallest input tile exceeds 4096 px; use a depth of 1 to 8")
    out = output(smallest)
    assert out is not None
    return Geometry(margin=(smallest - out) // 2, step=2**depth, min_output=out)
