"""Checks of a zarr / OME-Zarr input, made before any work and while reading, so that a damaged or
crafted store is one InputError naming the store, the field or chunk, the problem and the fix, never a
traceback, a hang or a MemoryError.

Before any work (`open_checked_array`, then `check_before_work`):
- its metadata files (.zarray, .zgroup, .zattrs, zarr.json) are regular files of at most METADATA_BYTES;
- each field of an array's metadata that segkit relies on is checked by name (shape and chunks whole
  numbers, a data type zarr parses and that is numeric, codecs zarr knows and never pickle), then zarr
  parses the whole (its errors wrapped);
- one plane and one chunk fit in memory (the TIFF path's plane check, `segkit.memory.plane_problem`), the
  number of planes is one segkit can plan (predict) or write as TIFF pages (convert);
- every chunk file is a regular file (a symbolic link to one is followed) of at most `chunk_file_limit` bytes.
While reading (`read_checked`), through `CheckedStore`: each chunk file is checked again as it is opened
(its read capped at that size, a device or FIFO never read), and a chunk that cannot be decoded is named.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np

from segkit import memory
from segkit.errors import InputError

#: The metadata files of a zarr node (format 2 and 3).
METADATA_FILES = (".zarray", ".zgroup", ".zattrs", "zarr.json")
#: The largest metadata file read (OME-Zarr metadata is a few kB; attributes of many channels stay far below).
METADATA_BYTES = 16 << 20
#: The largest size of an axis (zarr and numpy count in signed 64-bit integers).
MAX_SIZE = 2**63 - 1
#: Bytes of memory the Dask path holds per plane while it plans and tracks the run (its tasks: about 12 kB
#: measured for one chunk per plane); a lower bound, so a shape of absurdly many planes fails at once.
PLAN_BYTES_PER_PLANE = 10_000
#: Bytes one TIFF page takes at least (its directory: about 150 bytes); `convert` writes one per plane.
TIFF_PAGE_BYTES = 100
#: The fix for metadata that zarr (or segkit) cannot take.
DAMAGED_FIX = ("the store's metadata is damaged or was edited: write the array again (e.g. with zarr.save_array) or "
               "use the original store")
#: The fix for a file in a store that is not what zarr wrote.
FILE_FIX = "replace it with the file zarr wrote (copy the store again from its source), or use the original store"
#: Codec ids segkit never decodes: unpickling data can run any code.
UNSAFE_CODECS = frozenset({"pickle", "numcodecs.pickle"})


def _where(folder: Path, name: str, store: Path) -> str:
    """A metadata file in words: its path relative to the store the user named ('.zarray', '0/.zarray')."""
    try:
        relative = (folder / name).relative_to(store)
    except ValueError:
        relative = folder / name
    return str(relative)


def _file_problem(path: Path, limit: int, what: str) -> str | None:
    """Why the file at `path` may not be read as part of a store (not a regular file, larger than `limit`
    bytes, the most `what` can be, a dangling link), or None; the path need not exist (a chunk never written)."""
    link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"is a symbolic link to {os.readlink(path)}, which does not exist" if link else None
    except OSError as exc:
        return f"cannot be read{link} ({exc.strerror or type(exc).__name__})"
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        return f"is {_kind(info.st_mode)}{link}, not a regular file"
    if info.st_size > limit:
        return f"is {info.st_size:,} bytes{link}, larger than {what} can be ({limit:,} bytes at most)"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_metadata_files(folder: str | Path, source: str | Path) -> None:
    """Refuse metadata files of the zarr node at `folder` that are not regular files of at most
    METADATA_BYTES (a .zattrs linked to /dev/zero would be read for ever), before anything reads them.

    Parameters
    ----------
    folder : str or Path
        The node (a store, or an array or group in it).
    source : str or Path
        The store the user named (messages name files relative to it).

    Raises
    ------
    InputError
        Naming the file and the fix.
    """
    folder, store = Path(folder), Path(source)
    for name in METADATA_FILES:
        problem = _file_problem(folder / name, METADATA_BYTES, "a metadata file")
        if problem is not None:
            raise InputError(f"{source}: its metadata file {_where(folder, name, store)} {problem}; {FILE_FIX}")


def node_kind(folder: str | Path) -> str | None:
    """What the zarr node at `folder` says it is, from its metadata files: 'array', 'group', or None
    (no metadata, or a zarr.json that is not a JSON object naming one)."""
    folder = Path(folder)
    if (folder / ".zarray").is_file():
        return "array"
    if (folder / ".zgroup").is_file():
        return "group"
    if (folder / "zarr.json").is_file():
        try:
            kind = json.loads((folder / "zarr.json").read_bytes()).get("node_type")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if kind in ("array", "group") else None
    return None


def check_inside(store: str | Path, relative: str, what: str = "its level-0 array") -> None:
    """Refuse a path named in a store's metadata (a multiscales dataset, a label image) that leads out of it."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise InputError(f"{store}: its metadata names {what} {relative!r}, a path outside the store; {DAMAGED_FIX}")


# -- metadata fields -----------------------------------------------------------------------------

def _array_metadata(folder: Path, store: Path) -> tuple[dict[str, Any], str]:
    """The JSON object of an array's metadata (.zarray or zarr.json) and the file's name in messages."""
    name = ".zarray" if (folder / ".zarray").is_file() else "zarr.json"
    where = _where(folder, name, store)
    try:
        meta = json.loads((folder / name).read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{store}: its metadata file {where} is not JSON ({type(exc).__name__}); {DAMAGED_FIX}") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{store}: its metadata file {where} is not a JSON object; {DAMAGED_FIX}")
    return meta, where


def _whole_numbers(value: Any, field: str, where: str, store: Path, *, minimum: int) -> tuple[int, ...]:
    """`value` as whole numbers of at least `minimum`, or an InputError naming the field."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{store}: {field} {_shown(value)} in its {where} is not a list of whole numbers; {DAMAGED_FIX}")
    wrong = [v for v in value if not minimum <= v <= MAX_SIZE]
    if wrong:
        raise InputError(f"{store}: {field} {_shown(value)} in its {where} holds {_shown(wrong[0])}, but each of its sizes "
                         f"must be {minimum} or more and fit in 64 bits; {DAMAGED_FIX}")
    return tuple(value)


def _shown(value: Any) -> str:
    """A metadata value in a message: its JSON, cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _codec_names(codecs: Any) -> list[str]:
    """The names of zarr format 3 codecs, those inside a sharding codec included."""
    names = []
    for codec in codecs if isinstance(codecs, list) else []:
        name = codec if isinstance(codec, str) else codec.get("name") if isinstance(codec, dict) else None
        names.append(str(name))
        configuration = codec.get("configuration") if isinstance(codec, dict) else None
        if isinstance(configuration, dict):
            names += _codec_names(configuration.get("codecs")) + _codec_names(configuration.get("index_codecs"))
    return names


def _check_codecs(meta: dict[str, Any], version: int, where: str, store: Path) -> None:
    """Refuse a pickle codec (by name, before zarr sees it) and codecs zarr does not know."""
    if version == 2:
        import numcodecs.registry

        known = set(numcodecs.registry.codec_registry)
        filters = meta.get("filters") or []
        entries = [("compressor", meta.get("compressor"))] + [("filter", f) for f in
                                                               (filters if isinstance(filters, list) else [filters])]
        named = [(field, entry.get("id") if isinstance(entry, dict) else entry) for field, entry in entries
                 if entry is not None]
    else:
        named = [("codec", name) for name in _codec_names(meta.get("codecs"))]
        known = {name for _, name in named if _is_v3_codec(name)}
    for field, name in named:
        if str(name) in UNSAFE_CODECS:
            raise InputError(f"{store}: {field} {name!r} in its {where} stores pickled Python objects, which segkit never "
                             "reads (unpickling can run any code); write the array again with a standard compressor "
                             "(e.g. zarr's default, zstd)")
        if not isinstance(name, str) or name not in known:
            raise InputError(f"{store}: {field} {name!r} in its {where} is not a codec zarr knows; write the array again "
                             "with a standard compressor (zstd, blosc, zlib), or install the package that provides it")


def _is_v3_codec(name: str) -> bool:
    """Whether zarr knows the format 3 codec `name`."""
    from zarr.registry import get_codec_class

    try:
        get_codec_class(name)
    except KeyError:
        return False
    return True


def _check_dtype(meta: dict[str, Any], version: int, where: str, store: Path) -> np.dtype:
    """The array's data type, parsed by zarr; refused unless numeric (no objects, strings, records)."""
    from zarr.dtype import parse_data_type

    field = "dtype" if version == 2 else "data_type"
    value = meta.get(field)
    try:
        dtype = np.dtype(parse_data_type(value, zarr_format=version).to_native_dtype())
    except Exception as exc:  # zarr and numpy raise TypeError, ValueError, KeyError for a type they do not know
        try:  # a type numpy knows and zarr does not take (Python objects)
            dtype = np.dtype(value) if isinstance(value, str) else None
        except TypeError:
            dtype = None
        if dtype is None:
            raise InputError(f"{store}: {field} {_shown(value)} in its {where} is not a data type zarr can "
                             f"read ({type(exc).__name__}); {DAMAGED_FIX}") from exc
    if dtype.kind not in "biuf" or dtype.fields is not None:
        kind = {"O": "Python objects", "U": "text", "S": "bytes", "T": "text", "V": "records", "M": "dates",
                "m": "durations", "c": "complex numbers"}.get(dtype.kind, "not numbers")
        raise InputError(f"{store}: {field} {_shown(value)} in its {where} holds {kind}, not image values; "
                         "segkit reads images of numbers (uint8, uint16, float32, ...): write the image as one of them")
    return dtype


def _check_fields(meta: dict[str, Any], where: str, store: Path) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
    """Shape, chunks (the chunk grid of zarr format 3), data type and codecs of an array's metadata, each
    checked by name. Returns (shape, chunks, dtype); chunks are a shard's where the array is sharded."""
    version = meta.get("zarr_format")
    if version not in (2, 3):
        raise InputError(f"{store}: zarr_format {_shown(version)} in its {where} is not 2 or 3; {DAMAGED_FIX}")
    shape = _whole_numbers(meta.get("shape"), "shape", where, store, minimum=0)
    if version == 2:
        chunks_field, chunks = "chunks", meta.get("chunks")
    else:
        grid = meta.get("chunk_grid")
        configuration = grid.get("configuration") if isinstance(grid, dict) else None
        chunks_field = "chunk_grid chunk_shape"
        chunks = configuration.get("chunk_shape") if isinstance(configuration, dict) else None
    chunks = _whole_numbers(chunks, chunks_field, where, store, minimum=1)
    if len(chunks) != len(shape):
        raise InputError(f"{store}: {chunks_field} {list(chunks)} in its {where} has {len(chunks)} sizes for the "
                         f"{len(shape)} axes of shape {list(shape)}; {DAMAGED_FIX}")
    dtype = _check_dtype(meta, version, where, store)
    _check_codecs(meta, version, where, store)
    return shape, chunks, dtype


def chunk_file_limit(chunk_elements: int) -> int:
    """The most bytes a stored chunk (or shard) of `chunk_elements` values may take: 16 per value (8-byte
    values, doubled for any compressor's worst case and a shard's index) plus 1 MiB."""
    return 16 * chunk_elements + (1 << 20)


# -- reading ---------------------------------------------------------------------------------------

def _is_metadata_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA_FILES


#: A chunk's key: chunk indices joined by '.' or '/' (zarr format 2), after 'c' (format 3's default encoding).
CHUNK_KEY = re.compile(r"(c[./])?\d+([./]\d+)*|c")


def _file_check(key: str, chunk_limit: int) -> tuple[str, int, str]:
    """(the file in words, its size limit, what it is) for the store key `key`."""
    if _is_metadata_key(key):
        return "metadata file", METADATA_BYTES, "a metadata file"
    return "chunk", chunk_limit, "a chunk of this array"


@functools.cache
def _store_class() -> type:
    """`CheckedStore`, made on first use: zarr is optional (the `dask` extra)."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.buffer import default_buffer_prototype
    from zarr.storage import LocalStore

    class CheckedStore(LocalStore):
        """A read-only LocalStore that opens each file as it is read: a device, FIFO or socket (also behind
        a symbolic link) is refused without being read, a dangling link is refused instead of read as
        missing, and a chunk file larger than `limit` bytes (metadata: METADATA_BYTES) is refused."""

        def __init__(self, root: str | Path, *, limit: int, source: str, prefix: str = "",
                     read_only: bool = True) -> None:
            super().__init__(root, read_only=True)
            self.limit, self.source, self.prefix = limit, source, prefix

        def with_read_only(self, read_only: bool = False) -> "CheckedStore":
            return type(self)(self.root, limit=self.limit, source=self.source, prefix=self.prefix)

        def read_bytes(self, key: str, byte_range: Any = None) -> bytes | None:
            """The bytes of `key` (of `byte_range`), None when it is not there; InputError for a file that
            may not be read."""
            path = self.root / key
            noun, limit, kind = _file_check(key, self.limit)
            what = f"{noun} {self.prefix}{key} of {self.source}"
            problem = _file_problem(path, limit, kind)
            if problem is not None:
                raise InputError(f"{what} {problem}; {FILE_FIX}")
            try:  # O_NONBLOCK: a FIFO swapped in since the check never blocks the open
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if stat.S_ISDIR(info.st_mode):
                    return None
                if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                    raise InputError(f"{what} changed while it was read; use a copy of the store no one writes to")
                size = info.st_size
                if byte_range is None:
                    start, end = 0, size
                elif isinstance(byte_range, RangeByteRequest):
                    start, end = byte_range.start, min(byte_range.end, size)
                elif isinstance(byte_range, OffsetByteRequest):
                    start, end = byte_range.offset, size
                elif isinstance(byte_range, SuffixByteRequest):
                    start, end = max(0, size - byte_range.suffix), size
                else:
                    raise TypeError(f"unexpected byte range {byte_range!r}")
                handle.seek(start)
                return handle.read(max(0, end - start))

        def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
            data = self.read_bytes(key, byte_range)
            return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            data = await asyncio.to_thread(self.read_bytes, key, byte_range)
            return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    return CheckedStore


def open_checked_array(folder: str | Path, source: str | Path) -> Any:
    """Open the zarr array at `folder` for reading once its metadata passed every check: its metadata files
    (`check_metadata_files`), shape, chunks, data type and codecs by name, then zarr's own parsing.

    The array reads through `CheckedStore`: every file is checked as it is opened (regular, of at most
    `chunk_file_limit` bytes), so a chunk linked to /dev/zero is refused, never read.

    Parameters
    ----------
    folder : str or Path
        The array (a bare array store, or a group's level 0).
    source : str or Path
        The store the user named (messages name it, and files relative to it).

    Returns
    -------
    zarr.Array

    Raises
    ------
    InputError
        One line naming the store, the metadata file and field, the problem and the fix.
    """
    import zarr

    folder, store = Path(folder), Path(source)
    check_metadata_files(folder, store)
    meta, where = _array_metadata(folder, store)
    _, chunks, _ = _check_fields(meta, where, store)
    try:
        prefix = folder.relative_to(store).as_posix()
    except ValueError:
        prefix = "."
    checked = _store_class()(folder, limit=chunk_file_limit(math.prod(chunks)), source=str(source),
                             prefix="" if prefix == "." else f"{prefix}/")
    try:
        array = zarr.open_array(store=checked, mode="r")
    except InputError:
        raise
    except Exception as exc:  # zarr raises several types for metadata it cannot take
        message = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise InputError(f"{store}: its {where} is not metadata zarr can read ({type(exc).__name__}: {message}); "
                         f"{DAMAGED_FIX}") from exc
    return array


def _grid(array: Any) -> tuple[int, ...]:
    """The shape of the stored pieces of `array` (its shards where it is sharded, else its chunks)."""
    return tuple(getattr(array, "shards", None) or array.chunks)


def check_chunk_files(array: Any, source: str | Path) -> None:
    """Refuse, before any work, any file among an array's chunks that is not a regular file (a device,
    FIFO, socket, or a symbolic link to one or to nothing) or is larger than a chunk can be. One lstat
    per file, as the Dask path's input fingerprint does; links to regular files are followed."""
    root = Path(array.store.root)
    limit = chunk_file_limit(math.prod(_grid(array)))
    prefix = getattr(array.store, "prefix", "")
    for folder, folders, files in os.walk(root):
        for name in files + [f for f in folders if os.path.islink(os.path.join(folder, f))]:
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if not (_is_metadata_key(key) or CHUNK_KEY.fullmatch(key)):
                continue  # not read by zarr (a note, a .DS_Store)
            noun, file_limit, kind = _file_check(key, limit)
            problem = _file_problem(path, file_limit, kind)
            if problem is not None:
                raise InputError(f"{noun} {prefix}{key} of {source} {problem}; {FILE_FIX}")


def check_before_work(array: Any, source: str | Path, *, purpose: str, output: str | Path | None = None) -> None:
    """Refuse, before any work, an array whose reading cannot succeed: a plane or a chunk larger than the
    memory available, more planes than segkit can plan (predict) or write as TIFF pages (convert), or a
    chunk file that is not a regular file of a chunk's size (`check_chunk_files`).

    Parameters
    ----------
    array : zarr.Array
        From `open_checked_array`: YX, ZYX, or (convert) CZYX.
    source : str or Path
        The store the user named.
    purpose : str
        'predict' (the TIFF path's plane check, `segkit.memory.plane_problem`, and the Dask path's planning)
        or 'convert' (one plane of every channel held; a TIFF page per plane on the disk of `output`).
    output : str or Path, optional
        The TIFF `convert` writes.

    Raises
    ------
    InputError
        One line with the numbers and the fix.
    """
    if purpose not in ("predict", "convert"):
        raise ValueError(f"purpose must be 'predict' or 'convert', not {purpose!r}")
    shape, itemsize = tuple(array.shape), np.dtype(array.dtype).itemsize
    metadata = getattr(array.store, "prefix", "") + (".zarray" if array.metadata.zarr_format == 2 else "zarr.json")
    if 0 in shape:
        raise InputError(f"{source} holds no pixels (shape {list(shape)} in its {metadata}); pass a store with data")
    plane = shape[-2:]
    planes = math.prod(shape[:-2])
    available = memory.available_memory()
    if purpose == "predict":
        problem = memory.plane_problem(plane, itemsize, available=available)
        if problem is not None:
            raise InputError(f"{source}: {problem}")
    elif available is not None:
        channels = shape[0] if len(shape) == 4 else 1
        need = channels * plane[0] * plane[1] * itemsize
        if need > available:
            size = f"{channels} channels of " if channels > 1 else ""
            raise InputError(f"{source}: one plane is {size}{plane[0]} x {plane[1]} px and converting it holds "
                             f"{memory.format_bytes(need)}, but {memory.format_bytes(available)} of memory is "
                             "available; crop the store into smaller planes, or use a machine with more memory")
    chunk = math.prod(array.chunks) * itemsize
    if available is not None and chunk > available:
        raise InputError(f"{source}: one chunk is {' x '.join(map(str, array.chunks))} px ({memory.format_bytes(chunk)}) "
                         f"and is decoded whole, but {memory.format_bytes(available)} of memory is available; write the "
                         "array again with smaller chunks (e.g. 1 x 512 x 512)")
    if purpose == "predict" and available is not None and planes * PLAN_BYTES_PER_PLANE > available:
        raise InputError(f"{source} claims {planes:,} planes (shape {list(shape)} in its {metadata}); planning them needs "
                         f"about {memory.format_bytes(planes * PLAN_BYTES_PER_PLANE)} ({PLAN_BYTES_PER_PLANE // 1000} kB "
                         f"a plane), but {memory.format_bytes(available)} of memory is available; if the shape is wrong, "
                         f"{DAMAGED_FIX}, else split the stack into stores of fewer planes")
    if purpose == "convert" and output is not None:
        try:
            free = shutil.disk_usage(Path(output).parent).free
        except OSError:
            free = None
        if free is not None and planes * TIFF_PAGE_BYTES > free:
            raise InputError(f"{source} claims {planes:,} planes (shape {list(shape)} in its {metadata}); their TIFF pages "
                             f"need at least {memory.format_bytes(planes * TIFF_PAGE_BYTES)}, but the disk holding "
                             f"{output} has {memory.format_bytes(free)} free; if the shape is wrong, {DAMAGED_FIX}")
    check_chunk_files(array, source)


def read_checked(array: Any, selection: Any, source: str | Path) -> np.ndarray:
    """`array[selection]` as an ndarray; a chunk that cannot be decoded is named.

    Parameters
    ----------
    array : zarr.Array
        From `open_checked_array`.
    selection : int, tuple or Ellipsis
        Integers and full slices (a plane, a plane of every channel, everything).
    source : str or Path
        The store the user named.

    Raises
    ------
    InputError
        A file the store may not read (`CheckedStore`), or "chunk KEY of STORE is damaged (...)" for the
        first chunk of the selection that zarr cannot decode.
    """
    try:
        return np.asarray(array[selection])
    except InputError:
        raise
    except Exception as exc:  # a codec's own error (RuntimeError from blosc or zstd, ValueError, ...)
        bad = _damaged_chunk(array, selection)
        if bad is None:
            raise InputError(f"{source} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); copy the store "
                             "again from its source, or write the array again") from exc
        key, why = bad
        raise InputError(f"chunk {getattr(array.store, 'prefix', '')}{key} of {source} is damaged ({why}); copy the "
                         "store again from its source, or write the array again") from exc


def _damaged_chunk(array: Any, selection: Any) -> tuple[str, str] | None:
    """The key of the first stored piece (chunk or shard) of `selection` that zarr cannot read, and why."""
    grid = _grid(array)
    picks = selection if isinstance(selection, tuple) else (selection,)
    if picks == (Ellipsis,):
        picks = ()
    ranges = []
    for axis, size in enumerate(array.shape):
        pick = picks[axis] if axis < len(picks) else slice(None)
        step = grid[axis]
        ranges.append([pick // step] if isinstance(pick, (int, np.integer)) else range(math.ceil(size / step)))
    for coords in np.ndindex(*map(len, ranges)):
        index = tuple(int(r[i]) for r, i in zip(ranges, coords))
        region = tuple(slice(i * g, min((i + 1) * g, s)) for i, g, s in zip(index, grid, array.shape))
        try:
            array[region]
        except InputError:
            raise
        except Exception as exc:
            return array.metadata.encode_chunk_key(index), f"{type(exc).__name__}: {str(exc)[:100]}"
    return None
