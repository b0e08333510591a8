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

import atexit
import errno
import glob
import hashlib
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
from segkit.words import counted

try:  # POSIX (Linux, macOS): claims are flock locks, released by the kernel with their process
    import fcntl
except ImportError:  # Windows: O_EXCL lock files judged by their pid
    fcntl = None  # type: ignore[assignment]

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

#: The longest file name most file systems allow (ext4, XFS, APFS, NTFS: 255 bytes).
NAME_MAX = 255

#: The longest writer part of a temporary name: PID (10 digits) @ HOST (48) . TOKEN (8).
_WRITER_MAX = 10 + 1 + 48 + 1 + 8

#: The lock file of an output: `.NAME` + this suffix.
CLAIM_SUFFIX = ".segkit-lock"

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
    check_name_length(path)
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
    claim(path, report)
    if report is not None:
        remove_stale_partials([path], report)
    return path


def check_name_length(path: str | Path) -> None:
    """Refuse an output whose name is longer than the file system allows (NAME_MAX bytes), before any
    work rather than with "File name too long" when the result is written.

    Raises
    ------
    OutputError
        The name is too long; the message says how long and what the limit is.
    """
    name = Path(path).name
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise OutputError(f"output name {name[:40]}... is {size} bytes long, but file names may have at most "
                          f"{NAME_MAX}; choose a shorter output name")


def sibling_name(path: str | Path, prefix: str, suffix: str, *, reserve: int = 0) -> Path:
    """The sibling `prefix + NAME + suffix` of `path`, within the file-name limit: when it would be longer
    than NAME_MAX - `reserve` bytes, NAME is cut and followed by `~` and 12 hex digits of its SHA-256, so
    that long names still get distinct, stable siblings.

    Parameters
    ----------
    path : str or Path
        The output.
    prefix, suffix : str
        What goes before and after its name.
    reserve : int
        Bytes to keep free for text added to the name later (a temporary file's writer).

    Returns
    -------
    Path
        The sibling, in the folder of `path`.
    """
    path = Path(path)
    name = path.name
    room = NAME_MAX - reserve - len(prefix.encode()) - len(suffix.encode())
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > room:
        digest = hashlib.sha256(encoded).hexdigest()[:12]
        name = encoded[: max(room - len(digest) - 1, 0)].decode("utf-8", "ignore") + "~" + digest
    return path.with_name(f"{prefix}{name}{suffix}")


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
    """The hidden sibling `path` is written to: `.NAME.PID@HOST.TOKEN.partial` (NAME shortened by
    `sibling_name` where the whole would pass the file-name limit)."""
    base = _partial_base(path)
    return base.with_name(f"{base.name}.{os.getpid()}@{HOST}.{uuid.uuid4().hex[:8]}.partial")


def _partial_base(path: str | Path) -> Path:
    """`.NAME` of the temporary files of `path`, shortened so that any writer and `.partial` fit."""
    return sibling_name(path, ".", "", reserve=1 + _WRITER_MAX + len(".partial"))


def create_temporary(path: str | Path) -> Path:
    """Create an empty temporary file for `path` (`temporary_path`) exclusively: O_CREAT | O_EXCL (and
    O_NOFOLLOW), so a file or symlink planted at the name is never written through; another random
    name is drawn instead.

    Raises
    ------
    OutputError
        The folder cannot be written (full disk, no permission), in one line.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = temporary_path(path)
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(write_failure(path, exc, "nothing was written")) from exc
        return tmp
    raise OutputError(f"could not create a temporary file beside {path}: 100 random names were taken; "
                      "clean up the folder and run again")


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
        base = _partial_base(output)
        wanted.setdefault(base.parent, set()).add(base.name)
    stale: list[Path] = []
    live: list[Path] = []
    for folder, names in wanted.items():
        try:
            entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".partial")]
        except OSError:
            continue
        for entry in entries:
            for name in names:
                prefix = f"{name}."
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
    return counted(len(paths), "temporary file")


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
        `path` with `RESUMABLE_SUFFIX` appended to its name (a long name shortened by `sibling_name`,
        the same every run).

    Raises
    ------
    OutputError
        NAME.partial is a symbolic link (dangling or not): segkit never builds a store through one.
    """
    partial = sibling_name(path, "", RESUMABLE_SUFFIX)
    if partial.is_symlink():
        raise OutputError(f"{partial} is a symbolic link (to {os.readlink(partial)}), not a store segkit began; "
                          "segkit does not write through it: delete it and run again")
    return partial


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`, created empty and exclusively (`create_temporary`); rename it
    to `path` on success, delete it on failure. The output's claim (`claim`, taken here unless this
    process holds it already) is held throughout and released at the end. A write that fails for want
    of space or permission raises OutputError saying so; another live run writing `path` raises
    OutputError before anything is written."""
    path = Path(path)
    check_name_length(path)
    claim(path)
    tmp: Path | None = None
    try:
        tmp = create_temporary(path)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is None or not is_write_error(exc, tmp, path):
            raise
        raise OutputError(write_failure(path, exc, _discard(tmp))) from exc
    finally:
        if tmp is not None and (tmp.exists() or tmp.is_symlink()):
            _discard(tmp)
        release_claim(path)


# -- claims -------------------------------------------------------------------------------

#: This process's claims: output (absolute) -> (lock file, its open descriptor). Process state by
#: nature: a claim belongs to the process that holds it.
_CLAIMS: dict[Path, tuple[Path, int]] = {}


def claim_path(path: str | Path) -> Path:
    """The lock file of `path`: `.NAME.segkit-lock` beside it (shortened by `sibling_name`)."""
    return sibling_name(path, ".", CLAIM_SUFFIX)


def _holder(lock: Path) -> tuple[int | None, str | None]:
    """(pid, host) written in a lock file, (None, None) when unreadable."""
    try:
        with open(lock, encoding="utf-8", errors="replace") as handle:
            text = handle.read(200).split()
        return int(text[0]), text[1] if len(text) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None, None


def _refusal(path: Path, lock: Path, pid: int | None, host: str | None) -> OutputError:
    who = f"pid {pid} on {host or 'an unknown host'}" if pid is not None else "an unknown process"
    return OutputError(f"another segkit run ({who}) is writing {path}; wait for it or choose another output "
                       f"(if no run is writing there, delete {lock})")


def claim(path: str | Path, report: Callable[[str], object] | None = None) -> Path:
    """Claim `path` for this process until `release_claim` (or the end of the process): no other segkit
    run may write it meanwhile. Taking a claim this process holds already does nothing.

    Parameters
    ----------
    path : str or Path
        The output.
    report : callable taking a str, optional
        Hears the note when the lock file of a run that ended without releasing it is taken over.

    Returns
    -------
    Path
        The lock file.

    Raises
    ------
    OutputError
        Another live process (on this machine, or any process of another machine on a shared disk
        without flock) holds the claim; the line names it and the lock file.
    """
    path = Path(path)
    key = _claim_key(path)
    if key in _CLAIMS:
        return _CLAIMS[key][0]
    lock = claim_path(path)
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(20):
        taken_over = None
        try:
            fd = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if lock.is_symlink():  # never ours: remove the link, not what it points at
                lock.unlink(missing_ok=True)
                continue
            if fcntl is None:
                pid, host = _holder(lock)
                if not _writer_gone(pid, host, _mtime(lock)):
                    raise _refusal(path, lock, pid, host) from None
                lock.unlink(missing_ok=True)
                taken_over = (pid, host)
                continue
            try:
                fd = os.open(lock, flags)
            except FileNotFoundError:
                continue  # released meanwhile
        except OSError as exc:
            raise OutputError(write_failure(path, exc, "nothing was written")) from exc
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid, host = _holder(lock)
                os.close(fd)
                raise _refusal(path, lock, pid, host) from None
            try:  # the lock file may have been released (unlinked) between our open and flock
                current = os.stat(lock, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            if (current.st_ino, current.st_dev) != (os.fstat(fd).st_ino, os.fstat(fd).st_dev):
                os.close(fd)
                continue
            if os.fstat(fd).st_size:
                taken_over = _holder(lock)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {HOST}\n".encode())
        _CLAIMS[key] = (lock, fd)
        if taken_over is not None and report is not None:
            pid, host = taken_over
            report(f"note: took over the claim on {path} of a segkit run that ended without releasing it "
                   f"(pid {pid} on {host})")
        return lock
    raise _refusal(path, lock, *_holder(lock))


def _claim_key(path: Path) -> Path:
    """One key per lock file, whatever the spelling of the output's folder (relative, `..`, a link)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _mtime(path: Path) -> float:
    try:
        return path.stat(follow_symlinks=False).st_mtime
    except OSError:
        return time.time()


def release_claim(path: str | Path) -> None:
    """Release this process's claim on `path` (remove its lock file); nothing when it holds none."""
    held = _CLAIMS.pop(_claim_key(Path(path)), None)
    if held is None:
        return
    lock, fd = held
    try:
        if os.path.exists(lock) and os.path.samestat(os.stat(lock, follow_symlinks=False), os.fstat(fd)):
            os.unlink(lock)  # still holding the lock: whoever opens the old file next sees it unlinked
    except OSError:
        pass
    finally:
        os.close(fd)


def release_claims() -> None:
    """Release every claim this process holds (at exit, and after a run that failed part-way)."""
    for path in list(_CLAIMS):
        release_claim(path)


atexit.register(release_claims)  # a run that ends (also by Ctrl-C or SIGTERM) leaves no lock file
