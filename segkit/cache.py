"""Where segkit keeps what it can reuse between runs (compiled kernels, measurements): the user's
cache directory, never the repository or the working directory.

    SEGKIT_CACHE_DIR            if set, used as it is
    $XDG_CACHE_HOME/segkit      on Linux and other Unix systems (default ~/.cache/segkit)
    ~/Library/Caches/segkit     on macOS
    %LOCALAPPDATA%/segkit/Cache on Windows

The layout follows platformdirs' `user_cache_dir` without depending on it. Everything in it can be
deleted at any time; segkit then recomputes it. This module imports no torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: The environment variable that moves segkit's cache (e.g. to a shared file system on a cluster,
#: so every node reuses the kernels compiled once).
CACHE_ENV = "SEGKIT_CACHE_DIR"


def user_cache_dir(environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """segkit's cache directory (not created here).

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (default: `os.environ`); SEGKIT_CACHE_DIR wins, then the platform's
        convention.
    platform : str, optional
        `sys.platform` to follow (default: this machine's).

    Returns
    -------
    Path
        An absolute path, ~ expanded.
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser().absolute()
    if platform == "darwin":
        return Path("~/Library/Caches/segkit").expanduser()
    if platform.startswith("win"):
        base = environ.get("LOCALAPPDATA") or str(Path("~/AppData/Local").expanduser())
        return Path(base) / "segkit" / "Cache"
    base = environ.get("XDG_CACHE_HOME") or ""
    # the XDG spec ignores relative paths
    return (Path(base) if Path(base).is_absolute() else Path("~/.cache").expanduser()) / "segkit"


def cache_subdir(name: str, environ: Mapping[str, str] | None = None) -> Path:
    """`user_cache_dir() / name`, created (with its parents) if missing.

    Parameters
    ----------
    name : str
        The consumer's folder, e.g. 'torchinductor'.
    environ : mapping, optional
        As for `user_cache_dir`.

    Returns
    -------
    Path
        The existing directory.
    """
    path = user_cache_dir(environ) / name
    path.mkdir(parents=True, exist_ok=True)
    return path
