"""Output paths: checked once, before anything is loaded, and written so that a failure says what happened.

Every command that writes (predict, denoise, segment, convert, export, evaluate --json, demo) calls
`check_output` first. It refuses, with one line naming the fix:

- a name segkit does not write (`out.png`: TIFF outputs end in .tif/.tiff, stores in .ome.zarr/.zarr,
  exports in .onnx, scores in .json);
- an output that is one of the inputs, also under another name (a hard link, a symlink: same
  device and inode), even with overwrite;
- a folder where a file goes, or a file where an OME-Zarr store (a folder) goes;
- an existing output without overwrite;
- a folder that does not exist, cannot be written (no permission, read-only file system), or
  sits on a full disk.

Files are written under a hidden temporary name beside the output, `.NAME.PID@HOST.TOKEN.partial`,
renamed to NAME when complete (`atomic_path`). The writer's process id and host are in the name so
that a later run can tell the temporary files of killed runs (kill -9, a node that went down) from
those of a run still writing: `check_output(..., report=...)` removes the ones whose writer process
is gone on this machine, and those of an older segkit (which did not name its writer) not written
to for STALE_AFTER_S, and says so in one line; another machine's are named, never removed. A write that fails late
(disk full, permission lost) becomes an OutputError that says the temporary file was removed.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from segkit.errors import OutputError, OutputExistsError

#: The names each kind of output may have (case-insensitive).
SUFFIXES = {
    "tiff": (".tif", ".tiff"),
    "store": (".ome.zarr", ".zarr"),
    "onnx": (".onnx",),
    "json": (".json",),
}
_WHAT = {"tiff": "a TIFF file", "store": "an OME-Zarr store", "onnx": "an ONNX file", "json": "a JSON file",
         None: "a file"}

#: A temporary file of an older segkit (which did not name its writer) counts as stale once nothing
#: has written to it for this long.
STALE_AFTER_S = 3600

#: Free space below which the disk of an output counts as full before any work starts.
MIN_FREE_BYTES = 1 << 20

#: errno values that mean "the output cannot be written" (rather than a bug or an unreadable input).
WRITE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS,
                                     errno.EACCES, errno.EPERM) if e is not None)

#: This machine in temporary file names: its whole host name, letters, digits and '-' (node1.a and
#: node1.b stay apart: a writer on another machine sharing the disk is never judged by a local pid).
HOST = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:48]

_WRITER = re.compile(r"(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.)?(?P<token>[0-9a-f]{8})")


def check_suffix(path: str | Path, kind: str) -> None:
    """Refuse a name that does not end in one of SUFFIXES[kind]."""
    allowed = SUFFIXES[kind]
    name = Path(path).name.lower()
    if not name.endswith(allowed):
        shown = Path(path).suffix or "no extension"
        raise OutputError(f"output {path}: segkit does not write {shown} files here; name it with "
                          f"{' or '.join(allowed)} ({_WHAT[kind]})")


def check_output(path: str | Path, *, kind: str | None = "tiff", inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False, report: Callable[[str], object] | None = None) -> Path:
    """`path`, once it is known that it can be written; OutputError (OutputExistsError for an existing
    output without `overwrite`) naming the fix otherwise. Call it before loading anything.

    kind: 'tiff', 'store' (an OME-Zarr folder), 'onnx', 'json', or None (any name, a file).
    inputs: the files (folders, globs, stores) the output is made from; the output must be none of
    them, under any name. report: given, stale temporary files of this output are removed (see
    `remove_stale_partials`) and reported through it; None leaves them.
    """
    path = Path(path)
    if kind is not None:
        check_suffix(path, kind)
    _check_not_an_input(path, inputs)
    if kind == "store":
        if path.exists() and not path.is_dir():
            raise OutputError(f"output {path} is a file, not an OME-Zarr store (a folder); delete it or choose "
                              "another path")
    elif path.is_dir():
        raise OutputError(f"output {path} is a folder, not {_WHAT[kind]}; name a file inside it or choose "
                          "another path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass overwrite=True or choose another path")
    check_folder(path.parent)
    if report is not None:
        remove_stale_partials([path], report)
    return path


def check_folder(folder: str | Path, *, create: bool = False) -> Path:
    """`folder`, once it is known that files can be written into it; with `create`, a folder that
    does not exist yet may be created (its nearest existing parent must be writable)."""
    folder = Path(folder)
    target = folder
    if not folder.exists():
        if not create:
            raise OutputError(f"output folder {folder} does not exist; create it first")
        target = next(p for p in folder.absolute().parents if p.exists())
    if not target.is_dir():
        raise OutputError(f"output folder {folder} cannot be made: {target} is a file; choose another folder")
    probe = target / f".segkit-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {target} ({exc.strerror or exc}); choose an output folder "
                          "you can write to") from exc
    free = _free_bytes(target)
    if free is not None and free < MIN_FREE_BYTES:
        raise OutputError(f"the disk holding {target} is full ({free} bytes free); free space or choose an "
                          "output folder on another disk")
    return folder


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` are one file (or folder): same device and inode, whatever the names."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _input_paths(inputs: Iterable[str | Path | None]) -> Iterator[str]:
    """The paths an output must not be: each input, and the files of a folder or glob input."""
    for source in inputs:
        if source is None:
            continue
        text = str(source)
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            yield from glob.glob(text)
            continue
        yield text
        if Path(text).is_dir() and not text.rstrip("/\\").lower().endswith(".zarr"):
            yield from (str(p) for p in Path(text).iterdir())


def _check_not_an_input(path: Path, inputs: Iterable[str | Path | None]) -> None:
    if not (path.exists() or path.is_symlink()):
        return  # a path that does not exist is not an input
    for source in _input_paths(inputs):
        if same_file(path, source):
            other = "" if path.absolute() == Path(source).absolute() else " (the same file under another name)"
            raise OutputError(f"output {path} would replace its input {source}{other}; choose another output path")


# -- temporary files ------------------------------------------------------------------------

def temporary_path(path: str | Path) -> Path:
    """The hidden sibling `path` is written to: `.NAME.PID@HOST.TOKEN.partial`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}@{HOST}.{uuid.uuid4().hex[:8]}.partial")


def _writer_gone(pid: int | None, host: str | None, mtime: float) -> bool:
    """Whether the process that wrote a temporary file is gone: asked directly on this machine
    (os.kill(pid, 0)); another machine's never counts as gone; a name without its writer (older
    segkit) is judged by the file's age."""
    if pid is not None and host == HOST and os.name != "nt":  # on Windows os.kill would end the process
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # PermissionError: alive, another user's
            return False
        return False
    if host is not None:  # another machine's writer cannot be asked: name its file, never delete it
        return False
    return time.time() - mtime > STALE_AFTER_S  # an older segkit's name, without its writer


def stale_partials(outputs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(stale, live): the temporary files of `outputs` whose writer is gone, and those that may still
    be written (a live process on this machine, or any of another machine)."""
    wanted: dict[Path, set[str]] = {}
    for output in outputs:
        output = Path(output)
        wanted.setdefault(output.parent, set()).add(output.name)
    stale: list[Path] = []
    live: list[Path] = []
    for folder, names in wanted.items():
        try:
            entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".partial")]
        except OSError:
            continue
        for entry in entries:
            for name in names:
                prefix = f".{name}."
                if not entry.name.startswith(prefix):
                    continue
                match = _WRITER.fullmatch(entry.name[len(prefix):-len(".partial")])
                if match is None:
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                pid = int(match["pid"]) if match["pid"] else None
                (stale if _writer_gone(pid, match["host"], mtime) else live).append(Path(entry.path))
                break
    return stale, live


def remove_stale_partials(outputs: Iterable[str | Path], report: Callable[[str], object]) -> list[Path]:
    """Remove the temporary files killed runs left for `outputs`, and say so in one line; name those
    another run may still be writing. Returns the removed files."""
    stale, live = stale_partials(outputs)
    removed = []
    for path in stale:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError:
            live.append(path)
    if removed:
        report(f"removed {_count(removed)} left by runs that were killed before they finished: {_names(removed)}")
    if live:
        report(f"note: {_count(live)} of the same output may still be written by another run: {_names(live)}; "
               "delete them if no run is writing there")
    return removed


def _count(paths: list[Path]) -> str:
    return "1 temporary file" if len(paths) == 1 else f"{len(paths)} temporary files"


def _names(paths: list[Path], shown: int = 3) -> str:
    text = ", ".join(str(p) for p in paths[:shown])
    return text + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


# -- writing ------------------------------------------------------------------------------

def _discard(tmp: Path) -> str:
    """Delete a temporary file; say what became of it."""
    try:
        tmp.unlink()
    except FileNotFoundError:
        return "no temporary file was left"
    except OSError as exc:
        return f"the temporary file {tmp} could not be removed ({exc.strerror or exc}); delete it"
    return f"the temporary file {tmp} was removed"


def is_write_error(exc: OSError, *paths: Path) -> bool:
    """Whether `exc` says an output could not be written: it names one of `paths` (the files being
    written, or a folder they are in: a store's chunk), or it names no file and is a full disk, no
    permission or read-only file system error. An error naming another file (an unreadable input)
    is not the output's problem."""
    filename = getattr(exc, "filename", None)
    if filename is None:
        return exc.errno in WRITE_ERRNOS
    named = Path(filename)
    return any(named == Path(p) or Path(p) in named.parents for p in paths)


def write_failure(path: str | Path, exc: OSError, what_happened: str) -> str:
    """One line: what failed, what became of the temporary output, and the fix."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG):
        fix = "free space or choose an output folder on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose an output folder you can write to"
    else:
        fix = "check the output folder and run again"
    return f"writing {path} failed ({exc.strerror or exc}); {what_happened}; {fix}"


#: The suffix of an output built in place and resumable (the Dask path's OME-Zarr store): NAME.partial.
RESUMABLE_SUFFIX = ".partial"


def resumable_path(path: str | Path) -> Path:
    """Where a resumable output is built before its rename to `path`: the sibling `NAME.partial`.

    Every other file goes through `atomic_path` (a unique hidden name per writer). A store written
    chunk by chunk by many Dask tasks, which a later run with resume must find again, needs a fixed
    name instead; this is the one place that names it.

    Parameters
    ----------
    path : str or Path
        The final output (an OME-Zarr store).

    Returns
    -------
    Path
        `path` with `RESUMABLE_SUFFIX` appended to its name.
    """
    path = Path(path)
    return path.with_name(path.name + RESUMABLE_SUFFIX)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (`temporary_path`); rename it to `path` on success, delete
    it on failure. A write that fails for want of space or permission raises OutputError saying so."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if not is_write_error(exc, tmp, path):
            raise
        raise OutputError(write_failure(path, exc, _discard(tmp))) from exc
    finally:
        if tmp.exists():
            _discard(tmp)
