"""Device measurements kept between runs: what `--tile auto` chose and what one tile needs in GPU
memory, so a second run on the same machine skips the trials (seconds of start-up on a GPU).

Each measurement is a small JSON file in the user cache (`segkit.cache`, folder 'measurements'),
named by a hash of everything it depends on: the model (registry name and parameters, or the engine's
label), the device (GPU name, or the CPU's thread count), the precision and the input (tile, plane
size, channels; the free memory rounded to whole GiB for tile choices). A missing, unreadable or
malformed file is simply measured again; nothing here can make a run fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from segkit.cache import cache_subdir
from segkit.errors import SegkitError
from segkit.io.outputs import atomic_path

#: The cache folder's name and the format of its files (a change of format starts afresh).
FOLDER = "measurements"
VERSION = 1


def measurement_key(**parts: Any) -> str:
    """A stable name for a measurement: the hash of its parts (JSON-able values), with the version."""
    text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def recall(key: str) -> dict[str, Any] | None:
    """The stored measurement `key`, or None when there is none (or it cannot be read)."""
    try:
        path = cache_subdir(FOLDER) / f"{key}.json"
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def remember(key: str, value: dict[str, Any]) -> None:
    """Store a measurement under `key` (atomically; a cache that cannot be written is skipped)."""
    try:
        path = cache_subdir(FOLDER) / f"{key}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(value))
    except (OSError, SegkitError):  # atomic_path reports write failures as OutputError
        pass


def device_identity(device: Any) -> str:
    """The device a measurement holds for: the GPU's name (and index) or the CPU with its thread count."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return f"cuda:{torch.cuda.get_device_name(device)}"
    import torch

    return f"cpu:{torch.get_num_threads()}threads:{os.cpu_count()}cores"
