"""`segkit segment`: the seeded watershed of a membrane probability stack, file to file, streaming.

The watershed itself is `segkit.instances.watershed_slice`; this module reads probability planes,
refuses label stacks passed in their place, and writes uint32 label stacks whose ids are unique
across the stack (each slice's shifted past those of the slices before it, `unique_ids`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from segkit.errors import InputError
from segkit.instances import WatershedParams, unique_ids, watershed_slice
from segkit.io.outputs import check_output
from segkit.io.tiff import open_stack, write_stack
from segkit.metrics import to_probability


def check_probability_stack(dtype: np.dtype, source: str) -> None:
    """Instance label stacks (16/32-bit integers) passed where probabilities belong get a clear error."""
    if dtype.kind in "iu" and dtype.itemsize > 1 and dtype != np.uint16:
        raise InputError(f"{source} is a {dtype} stack, which looks like instance labels, not membrane "
                         "probabilities; pass the output of `segkit predict` (score label stacks with "
                         "`segkit evaluate --instances`)")


def segment_stack(source: str, output: str | Path, params: WatershedParams, *, overwrite: bool = False,
                  on_plane: Callable[[int], object] | None = None, compression: str = "zlib") -> Path:
    """Watershed every plane of a probability stack (streaming) into a uint32 label stack, ids unique
    across the stack; `on_plane(1)` after each plane's watershed."""
    check_output(output, kind="tiff", inputs=[source], overwrite=overwrite)  # a TIFF name, not the input
    with open_stack(source, labels=True) as stack:  # admits label dtypes, to refuse them with a clear message
        check_probability_stack(stack.dtype, source)

        def planes() -> Iterator[np.ndarray]:
            for index in range(len(stack)):
                labels = watershed_slice(to_probability(stack.plane(index)), params)
                if on_plane is not None:  # counted when done, not when the writer asks for the next plane:
                    on_plane(1)           # a writer stops asking after the last one (a bar ended at 4/5)
                yield labels

        shape = stack.shape[1:] if stack.is_2d else stack.shape
        return write_stack(output, unique_ids(planes()), shape=shape, dtype=np.uint32, content="labels",
                           calibration=stack.calibration,
                           overwrite=overwrite, compression=compression)
