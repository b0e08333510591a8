"""Damaged and crafted zarr / OME-Zarr inputs (issue 25, findings 12, 16, 17): each is one InputError naming
the store, the field or chunk, the problem and the fix, before any work (no output, no .partial), for
`segkit predict` (the Dask path reads zarr) and `segkit convert`; never a traceback, a hang or a MemoryError.
Stores are written by hand (zarr format 2 `.zarray`, format 3 `zarr.json`) or with zarr and then damaged."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from segkit.errors import InputError
from tests.helpers import assert_user_error, run

zarr = pytest.importorskip("zarr")

from segkit.io.zarr import ZarrStack, convert_zarr_to_tiff, create_ome_zarr  # noqa: E402  (zarr is optional)

GB = 1000**3


@pytest.fixture(autouse=True)
def little_memory(monkeypatch):
    """8 GB of memory available, whatever the machine has."""
    import segkit.memory

    monkeypatch.setattr(segkit.memory, "available_memory", lambda: 8 * GB)


def v2(path, **fields):
    """A zarr format 2 array (.zarray only: no chunks written, all read as 0), `fields` replacing the defaults."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"zarr_format": 2, "shape": [2, 32, 32], "chunks": [1, 16, 16], "dtype": "|u1", "compressor": None,
            "fill_value": 0, "order": "C", "filters": None}
    (path / ".zarray").write_text(json.dumps({**meta, **fields}))
    return path


def v3(path, **fields):
    """A zarr format 3 array (zarr.json only), `fields` replacing the defaults."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"zarr_format": 3, "node_type": "array", "shape": [2, 32, 32], "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 16, 16]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}], "attributes": {}}
    (path / "zarr.json").write_text(json.dumps({**meta, **fields}))
    return path


def grid(*chunk_shape):
    return {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}}}


def ome(path, level0):
    """A segkit OME-Zarr store (what convert takes) whose level 0 is replaced by `level0(path / '0')`."""
    create_ome_zarr(path, (2, 32, 32), (1, 16, 16), np.uint8)
    for child in (path / "0").iterdir():
        child.unlink()
    (path / "0").rmdir()
    level0(path / "0")
    return path


HUGE = [10**12, 256, 256]
WIDE = [3, 10**7, 10**7]

# (name, writer of the array, fragments of the message: predict, convert)
METADATA = [
    ("v2 chunk 0", lambda p: v2(p, chunks=[1, 0, 16]), ["chunks [1, 0, 16] in its {meta} holds 0", "1 or more",
                                                        "write the array again"], None),
    ("v3 chunk 0", lambda p: v3(p, **grid(1, 0, 16)), ["chunk_grid chunk_shape [1, 0, 16] in its {meta} holds 0"], None),
    ("v2 negative chunks", lambda p: v2(p, chunks=[1, -16, 16]), ["chunks [1, -16, 16] in its {meta} holds -16"], None),
    ("v3 negative chunks", lambda p: v3(p, **grid(1, 16, -16)), ["chunk_shape [1, 16, -16] in its {meta} holds -16"],
     None),
    ("v2 negative shape", lambda p: v2(p, shape=[2, -32, 32]), ["shape [2, -32, 32] in its {meta} holds -32",
                                                                "0 or more"], None),
    ("v3 negative shape", lambda p: v3(p, shape=[-2, 32, 32]), ["shape [-2, 32, 32] in its {meta} holds -2"], None),
    ("v2 shape abc", lambda p: v2(p, shape="abc"), ['shape "abc" in its {meta} is not a list of whole numbers'], None),
    ("v3 shape abc", lambda p: v3(p, shape="abc"), ['shape "abc" in its {meta} is not a list of whole numbers'], None),
    ("v2 chunks of other axes", lambda p: v2(p, chunks=[16, 16]), ["chunks [16, 16] in its {meta} has 2 sizes for the "
                                                                   "3 axes"], None),
    ("v2 dtype <q99", lambda p: v2(p, dtype="<q99"), ['dtype "<q99" in its {meta} is not a data type zarr can read'],
     None),
    ("v3 data_type q99", lambda p: v3(p, data_type="q99"), ['data_type "q99" in its {meta} is not a data type'], None),
    ("v2 dtype |O", lambda p: v2(p, dtype="|O"), ['dtype "|O" in its {meta} holds Python objects', "images of numbers"],
     None),
    ("v2 structured dtype", lambda p: v2(p, dtype=[["a", "<u1"], ["b", "<f4"]]), ["in its {meta} holds records"], None),
    ("v2 dtype <U10", lambda p: v2(p, dtype="<U10"), ['dtype "<U10" in its {meta} holds text'], None),
    ("v3 data_type string", lambda p: v3(p, data_type="string"), ['data_type "string" in its {meta} holds text'], None),
    ("v2 pickle compressor", lambda p: v2(p, compressor={"id": "pickle"}),
     ["compressor 'pickle' in its {meta} stores pickled Python objects", "never reads"], None),
    ("v2 pickle filter", lambda p: v2(p, filters=[{"id": "pickle"}]), ["filter 'pickle' in its {meta}"], None),
    ("v2 unknown compressor", lambda p: v2(p, compressor={"id": "nope"}),
     ["compressor 'nope' in its {meta} is not a codec zarr knows", "standard compressor"], None),
    ("v3 unknown codec", lambda p: v3(p, codecs=[{"name": "bytes"}, {"name": "nope"}]),
     ["codec 'nope' in its {meta} is not a codec zarr knows"], None),
    ("v3 pickle in a shard", lambda p: v3(p, codecs=[{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [1, 8, 8], "codecs": [{"name": "bytes"}, {"name": "numcodecs.pickle"}],
        "index_codecs": [{"name": "bytes"}]}}]), ["codec 'numcodecs.pickle' in its {meta} stores pickled"], None),
    ("v2 zarr_format 7", lambda p: v2(p, zarr_format=7), ["zarr_format 7 in its {meta} is not 2 or 3"], None),
    ("v2 fill value zarr refuses", lambda p: v2(p, fill_value="abc"),
     ["its {meta} is not metadata zarr can read", "write the array again"], None),
    ("v2 empty", lambda p: v2(p, shape=[0, 32, 32]), ["holds no pixels (shape [0, 32, 32] in its {meta})"], None),
    ("v2 1e12 planes", lambda p: v2(p, shape=HUGE, chunks=[1, 256, 256]),
     ["claims 1,000,000,000,000 planes (shape [1000000000000, 256, 256] in its {meta})", "8.0 GB of memory"],
     ["claims 1,000,000,000,000 planes", "TIFF pages need at least 100.0 TB"]),
    ("v3 1e12 planes", lambda p: v3(p, shape=HUGE, **grid(1, 256, 256)), ["claims 1,000,000,000,000 planes"],
     ["TIFF pages need at least 100.0 TB"]),
    ("v2 plane of 1e7 x 1e7", lambda p: v2(p, shape=WIDE, chunks=[1, 256, 256]),
     ["one plane is 10000000 x 10000000 px", "8.0 GB of memory is available", "crop or split"],
     ["one plane is 10000000 x 10000000 px and converting it holds 100.0 TB"]),
    ("v3 plane of 1e7 x 1e7", lambda p: v3(p, shape=WIDE, **grid(1, 256, 256)), ["one plane is 10000000 x 10000000 px"],
     None),
    ("v2 chunk larger than memory", lambda p: v2(p, shape=[1, 100, 100], chunks=[1, 10**5, 10**5]),
     ["one chunk is 1 x 100000 x 100000 px (10.0 GB)", "smaller chunks"], None),
]


@pytest.mark.parametrize("name, write, fragments, convert_fragments", METADATA, ids=[case[0] for case in METADATA])
def test_crafted_metadata_is_one_line_for_predict_and_convert(tmp_path, name, write, fragments, convert_fragments):
    meta = ".zarray" if name.startswith("v2") else "zarr.json"
    store = write(tmp_path / "in.zarr")
    with pytest.raises(InputError) as caught:
        ZarrStack(store)
    message = str(caught.value)
    assert str(store) in message and "\n" not in message
    for fragment in fragments:
        assert fragment.format(meta=meta) in message, message
    group = ome(tmp_path / "in.ome.zarr", write)
    output = tmp_path / "out.tif"
    with pytest.raises(InputError) as caught:
        convert_zarr_to_tiff(group, output)
    for fragment in convert_fragments or fragments:
        assert fragment.format(meta=f"0/{meta}") in str(caught.value), str(caught.value)
    assert not list(tmp_path.glob("*.tif*")) and not list(tmp_path.glob(".out*"))


def test_a_level_zero_path_outside_the_store_is_refused(tmp_path):
    group = zarr.open_group(str(tmp_path / "in.ome.zarr"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": [{"path": "../other"}]}]
    v2(tmp_path / "other")
    for call in (lambda: ZarrStack(tmp_path / "in.ome.zarr"), lambda: convert_zarr_to_tiff(tmp_path / "in.ome.zarr",
                                                                                          tmp_path / "out.tif")):
        with pytest.raises(InputError, match=r"names its level-0 array '\.\./other', a path outside the store"):
            call()


# -- chunk files -----------------------------------------------------------------------------------

def written(path, fmt):
    """A 3 x 64 x 64 uint8 array (chunks 1 x 32 x 32, zstd) and the path of its chunk (1, 0, 1)."""
    array = zarr.create_array(str(path), shape=(3, 64, 64), chunks=(1, 32, 32), dtype="uint8", zarr_format=fmt)
    array[:] = np.arange(3 * 64 * 64, dtype=np.uint32).reshape(3, 64, 64).astype(np.uint8)
    chunk = path / ("1.0.1" if fmt == 2 else "c/1/0/1")
    assert chunk.is_file()
    return array, chunk


def _replace(chunk, how, tmp_path):
    chunk.unlink()
    if how == "dev/zero":
        chunk.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(chunk)
    elif how == "dangling":
        chunk.symlink_to(tmp_path / "nowhere")
    elif how == "too big":
        with open(chunk, "wb") as handle:
            handle.truncate(40 << 20)  # sparse: 40 MB where a chunk can take 1 MiB + 16 per value
    elif how == "junk":
        chunk.write_bytes(os.urandom(300))


CHUNKS = [("dev/zero", "is a device (a symbolic link to /dev/zero), not a regular file"),
          ("fifo", "is a named pipe (FIFO), not a regular file"),
          ("dangling", "is a symbolic link to {tmp}/nowhere, which does not exist"),
          ("too big", "is 41,943,040 bytes, larger than a chunk of this array can be (1,064,960 bytes at most)")]


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("how, problem", CHUNKS, ids=[case[0] for case in CHUNKS])
def test_a_chunk_file_that_is_no_chunk_is_refused_before_work_and_never_read(tmp_path, fmt, how, problem):
    store = tmp_path / "in.zarr"
    _, chunk = written(store, fmt)
    _replace(chunk, how, tmp_path)
    key = "1.0.1" if fmt == 2 else "c/1/0/1"
    expected = f"chunk {key} of {store} {problem.format(tmp=tmp_path)}; replace it with the file zarr wrote"
    with pytest.raises(InputError) as caught:
        ZarrStack(store)
    assert str(caught.value).startswith(expected), str(caught.value)
    # a Dask task re-opens the store without the walk over its files: the read itself refuses it
    stack = ZarrStack(store, check_memory=False)
    np.testing.assert_array_equal(stack.plane(0), zarr.open_array(str(store), mode="r")[0])
    with pytest.raises(InputError) as caught:
        stack.plane(1)
    assert str(caught.value).startswith(expected), str(caught.value)


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_damaged_chunk_is_named(tmp_path, fmt):
    store = tmp_path / "in.zarr"
    _, chunk = written(store, fmt)
    _replace(chunk, "junk", tmp_path)
    stack = ZarrStack(store)  # a chunk's content is only known when it is decoded
    stack.plane(0)
    key = "1.0.1" if fmt == 2 else "c/1/0/1"
    with pytest.raises(InputError, match=f"^chunk {key} of {store} is damaged \\(RuntimeError: .*\\); copy the store "
                                         "again"):
        stack.plane(1)


def test_a_symlink_to_a_regular_chunk_file_is_read(tmp_path):
    store = tmp_path / "in.zarr"
    array, chunk = written(store, 2)
    chunk.rename(tmp_path / "kept")
    chunk.symlink_to(tmp_path / "kept")
    np.testing.assert_array_equal(ZarrStack(store).plane(1), array[1])


def test_a_sharded_store_reads(tmp_path):
    data = np.arange(2 * 64 * 64, dtype=np.uint16).reshape(2, 64, 64)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=data.shape, chunks=(1, 16, 16), shards=(1, 32, 32),
                      dtype="uint16", zarr_format=3)[:] = data
    with ZarrStack(tmp_path / "in.zarr") as stack:
        np.testing.assert_array_equal(stack.plane(1), data[1])


def test_a_group_metadata_file_linked_to_dev_zero_is_never_read(tmp_path):
    store = ome(tmp_path / "in.ome.zarr", lambda p: written(p, 2))
    (store / ".zattrs").unlink()
    (store / ".zattrs").symlink_to("/dev/zero")
    message = r"^{}: its metadata file .zattrs is a device \(a symbolic link to /dev/zero\), not a regular file"
    for call in (lambda: ZarrStack(store), lambda: convert_zarr_to_tiff(store, tmp_path / "out.tif")):
        with pytest.raises(InputError, match=message.format(store)):
            call()


# -- through the CLI -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, write, fragment", [
    ("chunk 0", lambda p, tmp: v2(p, chunks=[1, 0, 16]), "chunks [1, 0, 16] in its .zarray holds 0"),
    ("1e12 planes", lambda p, tmp: v3(p, shape=HUGE, **grid(1, 256, 256)), "claims 1,000,000,000,000 planes"),
    ("/dev/zero chunk", lambda p, tmp: _replace(written(p, 3)[1], "dev/zero", tmp), "chunk c/1/0/1 of"),
    ("pickle", lambda p, tmp: v2(p, compressor={"id": "pickle"}), "compressor 'pickle'"),
])
def test_cli_predict_refuses_before_any_work(tmp_path, tiny_checkpoint, name, write, fragment):
    store = tmp_path / "in.zarr"
    write(store, tmp_path)
    out = tmp_path / "out.ome.zarr"
    result = run("predict", store, "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "-q")
    assert_user_error(result, str(store), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]  # no store, no .partial, no claim left


def test_cli_predict_of_a_damaged_chunk_leaves_no_partial_store_or_claim(tmp_path, tiny_checkpoint):
    """The damage is found only when the chunk is decoded, mid-run: the .partial this run began goes (fixing the
    input changes it, so a resume would be refused anyway) and the output's claim is released."""
    store = tmp_path / "in.zarr"
    _replace(written(store, 3)[1], "junk", tmp_path)
    result = run("predict", store, "-o", tmp_path / "out.ome.zarr", "-m", tiny_checkpoint, "--device", "cpu", "-q",
                 "--workers", "1")
    assert_user_error(result, f"of {store} is damaged", "copy the store again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_a_zarr_store_to_a_tiff_output_points_to_ome_zarr(tmp_path, tiny_checkpoint):
    store = tmp_path / "in.zarr"
    written(store, 2)
    result = run("predict", store, "-o", tmp_path / "out.tif", "-m", tiny_checkpoint, "--device", "cpu", "-q")
    assert_user_error(result, f"{store} is a zarr store", "name the output NAME.ome.zarr")


def test_cli_convert_names_a_damaged_chunk_and_leaves_no_tiff(tmp_path):
    def damaged(path):
        _replace(written(path, 2)[1], "junk", tmp_path)

    store = ome(tmp_path / "in.ome.zarr", damaged)
    result = run("convert", store, tmp_path / "out.tif")
    assert_user_error(result, f"chunk 0/1.0.1 of {store} is damaged", "copy the store again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ome.zarr"]
    result = run("convert", ome(tmp_path / "wide.ome.zarr", lambda p: v3(p, shape=WIDE, **grid(1, 256, 256))),
                 tmp_path / "out.tif")
    assert_user_error(result, "one plane is 10000000 x 10000000 px and converting it holds 100.0 TB")


# -- finding 17: a symlink at the store's predictable .partial name ------------------------------------

@pytest.mark.parametrize("target", ["nowhere", "folder"])
@pytest.mark.parametrize("flag", [(), ("--overwrite",), ("--resume",)])
def test_a_symlink_at_the_partial_name_is_one_line_and_not_followed(tmp_path, tiny_checkpoint, target, flag):
    zarr.save_array(str(tmp_path / "in.zarr"), np.zeros((1, 40, 40), np.uint8), zarr_format=2)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep").write_text("precious")
    partial = tmp_path / "out.ome.zarr.partial"
    partial.symlink_to(tmp_path / target)
    result = run("predict", tmp_path / "in.zarr", "-o", tmp_path / "out.ome.zarr", "-m", tiny_checkpoint,
                 "--device", "cpu", "-q", *flag)
    assert_user_error(result, f"{partial} is a symbolic link (to {tmp_path / target})", "delete it")
    assert partial.is_symlink() and (tmp_path / "folder" / "keep").read_text() == "precious"
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "out.ome.zarr").exists()
