"""Bad input gets one line and exit code 2, never a traceback or a silent wrong output: TIFFs of mixed
pages, damaged or claiming impossible sizes; damaged or lying checkpoints and ONNX files; an input
changed under a resumed run (issue 13, items 2, 3, 4, 6, 7, 8 and 17)."""

import json
import os
import struct

import numpy as np
import pytest
import tifffile

from segkit.checkpoint import load_model, read_info
from segkit.errors import CheckpointError, InputError, SegkitError, TileSizeError
from segkit.io.tiff import open_stack
from tests.helpers import assert_user_error, run

GB = 1000**3


@pytest.fixture
def little_memory(monkeypatch):
    """8 GB of memory available, whatever the machine has."""
    import segkit.memory

    monkeypatch.setattr(segkit.memory, "available_memory", lambda: 8 * GB)


# -- TIFF files ------------------------------------------------------------------------------------

def _pages(path, *planes):
    with tifffile.TiffWriter(path) as writer:
        for plane in planes:
            writer.write(plane, photometric="minisblack", metadata=None)
    return path


def test_pages_of_different_shapes_or_dtypes_are_refused_by_name(tmp_path, tiny_checkpoint):
    mixed = _pages(tmp_path / "mixed.tif", *[np.zeros((64, 64), np.uint8)] * 3, np.zeros((32, 32), np.uint8),
                   np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match=r"different shapes.*pages 0-2, 4 \(64x64 uint8\), page 3 \(32x32 uint8\).*split"):
        open_stack(mixed)
    dtypes = _pages(tmp_path / "dtypes.tif", np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint16))
    with pytest.raises(InputError, match=r"page 0 \(16x16 uint8\), page 1 \(16x16 uint16\)"):
        open_stack(dtypes)
    with tifffile.TiffWriter(tmp_path / "two.tif") as writer:  # two stacks written one after the other
        writer.write(np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
        writer.write(np.ones((3, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match=r"2 separate images: pages 0-1 \(16x16 uint8\), pages 2-4"):
        open_stack(tmp_path / "two.tif")
    out = tmp_path / "out.tif"
    assert_user_error(run("predict", mixed, "-o", out, "-m", tiny_checkpoint, "-q"), "page 3 (32x32 uint8)")
    assert not out.exists()


def test_equal_pages_written_one_by_one_are_one_stack(tmp_path, tiny_checkpoint):
    """One TiffWriter.write per plane (or ImageJ's append) gives one tifffile series per page: equal
    2D pages are read as one ZYX stack, as Fiji shows them, not refused and not cut to page 0."""
    planes = [np.full((40, 50), 10 * i, np.uint8) for i in range(3)]
    path = tmp_path / "appended.tif"
    with tifffile.TiffWriter(path) as writer:  # tifffile's default: each write its own (shaped) image
        for plane in planes:
            writer.write(plane, photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 3
    with open_stack(path) as stack:
        assert stack.shape == (3, 40, 50) and not stack.is_2d
        for index, plane in enumerate(planes):
            np.testing.assert_array_equal(stack.plane(index), plane)
    result = run("predict", path, "-o", tmp_path / "out.tif", "-m", tiny_checkpoint, "-q")
    assert result.exit_code == 0, result.output
    assert tifffile.imread(tmp_path / "out.tif").shape == (3, 40, 50)


def test_reduced_resolution_pages_are_not_images_of_their_own(tmp_path):
    data = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as writer:
        writer.write(data, photometric="minisblack", subifds=1)
        writer.write(data[::2, ::2], photometric="minisblack", subfiletype=1)
    with open_stack(tmp_path / "pyramid.tif") as stack:
        assert stack.shape == (1, 64, 64)
        np.testing.assert_array_equal(stack.plane(0), data)


def _ifd_chain(path):
    """Offsets of the first IFD pointer and of the first IFD's next-IFD pointer of a little-endian TIFF."""
    data = path.read_bytes()
    first = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[first : first + 2])[0]
    return 4, first + 2 + 12 * count


@pytest.mark.parametrize("damage, message", [
    ("next page far away", "a page offset points outside the file"),
    ("first page far away", "the offset of its first page points outside the file"),
    ("next page inside the header", "a page directory (IFD) is cut short or corrupt"),
])
def test_damaged_tiffs_are_named_in_plain_words(tmp_path, damage, message):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), photometric="minisblack", metadata=None)
    first, nxt = _ifd_chain(path)
    data = bytearray(path.read_bytes())
    where, value = {"next page far away": (nxt, 10**8), "first page far away": (first, 10**8),
                    "next page inside the header": (nxt, 3)}[damage]
    data[where : where + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as caught:
        open_stack(path)
    assert str(caught.value) == f"{path} is damaged or truncated: {message}; re-export the file or copy it again"
    assert "tifffile" not in str(caught.value) and "<" not in str(caught.value)


def test_empty_and_foreign_files_say_what_they_are(tmp_path):
    (tmp_path / "zero.tif").write_bytes(b"")
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(InputError, match="not a readable TIFF file: it is empty"):
        open_stack(tmp_path / "zero.tif")
    with pytest.raises(InputError, match="not a readable TIFF file: it does not start with a TIFF header"):
        open_stack(tmp_path / "text.tif")


def _claiming(path, width, height, compression="zlib"):
    """A tiny TIFF whose header claims `width` x `height` px (a few hundred bytes on disk)."""
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), photometric="minisblack", metadata=None,
                     compression=compression)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for code, value in ((256, width), (257, height), (278, height)):
            assert tags[code].dtype == 4  # LONG
            data[tags[code].valueoffset : tags[code].valueoffset + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))
    return path


def test_a_plane_larger_than_memory_is_refused_before_any_work(tmp_path, tiny_checkpoint, little_memory):
    huge = _claiming(tmp_path / "huge.tif", 200_000, 200_000)
    assert huge.stat().st_size < 400
    with pytest.raises(InputError, match=r"200000 x 200000 px .* about 520.0 GB .* 8.0 GB of memory is available"):
        open_stack(huge)
    result = run("predict", huge, "-o", tmp_path / "out.tif", "-m", tiny_checkpoint, "--device", "cpu", "-q")
    assert_user_error(result, "200000 x 200000 px", "crop or split")
    assert "tiles" not in result.stderr
    # uncompressed, the same claim is a truncated file
    with pytest.raises(InputError, match="is truncated: its pixel data needs 40000000"):
        open_stack(_claiming(tmp_path / "raw.tif", 200_000, 200_000, compression=None))


def test_plane_estimate():
    from segkit.memory import format_bytes, plane_bytes, plane_problem

    assert plane_bytes((1000, 1000), 1) == 13_000_000  # uint8 + normalised, padded and output float32
    assert plane_problem((1000, 1000), 1, available=13_000_000) is None
    assert "13.0 MB" in plane_problem((1000, 1000), 1, available=12_999_999)
    assert format_bytes(303e12) == "303.0 TB" and format_bytes(12) == "12 bytes"


# -- checkpoints -----------------------------------------------------------------------------------

def _split(path):
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _write(path, header, body):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)
    return path


def _with_record(tmp_path, checkpoint, name, edit):
    """A copy of `checkpoint` whose record is `edit(record)` (a dict, or any JSON value)."""
    header, body = _split(checkpoint)
    record = edit(json.loads(header["__metadata__"]["segkit"]))
    header["__metadata__"] = {"segkit": json.dumps(record)}
    return _write(tmp_path / name, header, body)


def _set(*keys_and_value):
    *keys, last, value = keys_and_value

    def edit(record):
        entry = record
        for key in keys:
            entry = entry[key]
        entry[last] = value
        return record

    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("normalization", "std", 0.0), "mean 120.0 and std 0.0; segkit needs a finite mean and a finite std above 0"),
    (_set("normalization", "mean", float("nan")), "mean nan and std 40.0"),
    (_set("normalization", "std", -3), "std -3.0"),
    (_set("model", "unetx"), "unknown model 'unetx'"),
    (_set("kind", "classifier"), "unknown kind 'classifier'"),
    (_set("model_kwargs", "depth", 40), "depth=40 is out of range (1 to 8 for unet)"),
    (_set("model_kwargs", "base", 0), "base=0 is out of range (1 or more"),
    (_set("model_kwargs", "base", "wide"), "base='wide' is out of range"),
    (_set("inference", "tile", "abc"), "inference tile 'abc' is not a valid tile"),
    (_set("inference", "tile", 237), "inference tile 237 is not a valid tile of this model (nearest valid: 236 or 252)"),
    (_set("inference", "threshold", 7), "threshold 7 is not a number between 0 and 1"),
    (_set("geometry", "step", 0), "geometry"),
    (lambda record: [1, 2], "its segkit record is a JSON list"),
    (lambda record: {k: v for k, v in record.items() if k != "normalization"}, "missing entry 'normalization'"),
])
def test_bad_records_are_refused_when_they_load(tmp_path, tiny_checkpoint, edit, message):
    path = _with_record(tmp_path, tiny_checkpoint, "bad.safetensors", edit)
    with pytest.raises(CheckpointError) as caught:
        read_info(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text
    assert "use another one" in text


def test_std_zero_checkpoint_is_one_line_in_the_cli(tmp_path, tiny_checkpoint, uint8_stack):
    path = _with_record(tmp_path, tiny_checkpoint, "std0.safetensors", _set("normalization", "std", 0))
    out = tmp_path / "out.tif"
    assert_user_error(run("predict", uint8_stack, "-o", out, "-m", path, "-q"), "std 0.0", "all-zero")
    assert not out.exists()


def test_truncated_and_damaged_safetensors(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or damaged: tensor .* ends at byte .* but the file holds"):
        load_model(truncated)
    header, body = _split(tiny_checkpoint)
    name = next(k for k in header if k != "__metadata__")
    moved = json.loads(json.dumps(header))
    moved[name]["data_offsets"] = [v + 10**6 for v in moved[name]["data_offsets"]]
    with pytest.raises(CheckpointError, match=f"tensor '{name}' ends at byte"):
        read_info(_write(tmp_path / "moved.safetensors", moved, body))
    stretched = json.loads(json.dumps(header))
    stretched[name]["data_offsets"][1] += 10**9
    with pytest.raises(CheckpointError, match="but its shape and dtype need"):
        read_info(_write(tmp_path / "stretched.safetensors", stretched, body))
    with pytest.raises(CheckpointError, match="its header is a JSON list"):
        read_info(_write(tmp_path / "list.safetensors", [1, 2], b""))
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="is not a segkit checkpoint"):
        read_info(tmp_path / "short.safetensors")


def test_record_that_does_not_fit_its_weights_or_memory(tmp_path, tiny_checkpoint):
    huge = _with_record(tmp_path, tiny_checkpoint, "huge.safetensors", _set("model_kwargs", "base", 100_000))
    with pytest.raises(CheckpointError, match=r"base=100000, depth=4\) of 3\d\d\.\d TB of parameters, but .* "
                                              r"available \(and the file holds only 121,658 values"):
        load_model(huge)
    wider = _with_record(tmp_path, tiny_checkpoint, "wider.safetensors", _set("model_kwargs", "base", 8))
    with pytest.raises(CheckpointError, match="weights do not match its record: .* 485,682 values, but the file holds "
                                              "121,658"):
        load_model(wider)


def test_depth_beyond_the_geometry_is_an_error_not_stopiteration():
    from segkit.errors import ConfigError
    from segkit.models import create_model
    from segkit.models.geometry import valid_unet_geometry

    with pytest.raises(ValueError, match="depth 9 is too deep"):
        valid_unet_geometry(9)
    with pytest.raises(ConfigError, match="too deep"):
        create_model("unet", base=1, depth=12)


def test_tile_that_cannot_fit_in_memory_is_refused_before_loading(tmp_path, tiny_checkpoint, uint8_stack, little_memory):
    from segkit.inference.loading import EngineRequest, load_prediction_engine
    from segkit.inference.options import PredictOptions

    path = _with_record(tmp_path, tiny_checkpoint, "bigtile.safetensors", _set("inference", "tile", 160012))
    with pytest.raises(TileSizeError, match=r"tile 160012 needs at least .* GB .* but 8.0 GB of memory is available "
                                            r"on this machine; use tile 572"):
        load_prediction_engine(EngineRequest(path, PredictOptions(device="cpu")), report=lambda _: None)
    out = tmp_path / "out.tif"
    assert_user_error(run("predict", uint8_stack, "-o", out, "-m", path, "--device", "cpu", "-q"),
                      "tile 160012 needs at least", "use --tile 572")
    assert_user_error(run("predict", uint8_stack, "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--tile",
                          100012, "-q"), "tile 100012 needs at least")
    assert not out.exists()
    # the tile the run asks for fits: the record's tile is only the default
    assert run("predict", uint8_stack, "-o", out, "-m", path, "--device", "cpu", "--tile", 236, "-q").exit_code == 0


def test_missing_model_file_names_both_formats(tmp_path, uint8_stack):
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tmp_path / "nope.safetensors"),
                      "does not exist", ".safetensors", ".onnx")


# -- ONNX files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    from segkit.export import export_onnx, write_onnx

    model, info = load_model(tiny_checkpoint)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return write_onnx(export_onnx(model, info, tile=220)[0], path)


def _onnx_with(path, target, *, record=None, graph=None):
    import onnx

    proto = onnx.load(str(path))
    if graph is not None:
        proto.graph.CopyFrom(graph)
    for entry in proto.metadata_props:
        if entry.key == "segkit" and record is not None:
            entry.value = json.dumps(record(json.loads(entry.value)))
    onnx.save(proto, str(target))
    return target


def test_onnx_metadata_that_lies_about_the_margin(tmp_path, tiny_onnx, uint8_stack):
    from segkit.inference.loading import EngineRequest, load_prediction_engine
    from segkit.inference.options import PredictOptions

    # margin 76 instead of 92: tiles of 156 + 16k px are valid by the metadata, 236 and 220 among them
    liar = _onnx_with(tiny_onnx, tmp_path / "liar.onnx", record=_set("geometry", "margin", 76))
    with pytest.raises(SegkitError, match=r"turns a 156 px tile into output of shape \(1, 1, 0, 0\)|fails on a 156 px"):
        load_prediction_engine(EngineRequest(liar, PredictOptions(device="cpu")), report=lambda _: None)
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", liar, "--device", "cpu", "-q"),
                      "its metadata does not match its graph", "segkit export")


def test_onnx_graph_of_rank_3_input(tmp_path, tiny_onnx, uint8_stack):
    from onnx import TensorProto, helper

    from segkit.export import read_onnx_metadata
    from segkit.inference.engines import OnnxEngine

    tensor = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["probability"])], "flat",
                              [tensor("input", TensorProto.FLOAT, ["n", "h", "w"])],
                              [tensor("probability", TensorProto.FLOAT, ["n", "h", "w"])])
    flat = _onnx_with(tiny_onnx, tmp_path / "flat.onnx", graph=graph)
    with pytest.raises(CheckpointError, match="takes input of rank 3, but segkit feeds one"):
        read_onnx_metadata(flat)
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", flat, "-q"), "input of rank 3")
    info, _ = read_onnx_metadata(tiny_onnx)
    with pytest.raises(SegkitError, match="takes input of rank 3"):
        OnnxEngine(flat.read_bytes(), info.geometry, device="cpu").check_geometry(156, flat)
    OnnxEngine(tiny_onnx.read_bytes(), info.geometry, device="cpu").check_geometry(188, tiny_onnx)  # the truth passes


# -- resume ----------------------------------------------------------------------------------------

def test_input_fingerprint_sees_content_size_and_time(tmp_path, monkeypatch):
    from segkit.inference import distributed
    from segkit.inference.distributed import input_fingerprint

    path = tmp_path / "s.tif"
    data = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    tifffile.imwrite(path, data, photometric="minisblack")
    stat = path.stat()
    first = input_fingerprint(path)
    assert input_fingerprint(path) == first and "all bytes" in first
    data[2, 10, 10] ^= 1  # same size, same time: only the hash differs
    tifffile.imwrite(path, data, photometric="minisblack")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert input_fingerprint(path) != first
    monkeypatch.setattr(distributed, "FINGERPRINT_FULL_BYTES", 1024)  # sampled: a large file
    monkeypatch.setattr(distributed, "FINGERPRINT_BLOCK", 128)
    sampled = input_fingerprint(path)
    assert "64 sampled blocks" in sampled and input_fingerprint(path) == sampled
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert input_fingerprint(path) != sampled


def test_resume_refuses_an_input_that_changed(tmp_path, tiny_checkpoint, monkeypatch):
    pytest.importorskip("dask")
    pytest.importorskip("zarr")
    import segkit.inference.pipeline  # noqa: F401 - imported before the patch below, so it keeps the real predict_planes
    from segkit.inference import tiler

    source = tmp_path / "stack.tif"
    data = np.random.default_rng(4).integers(0, 256, (2, 120, 120), dtype=np.uint8)
    tifffile.imwrite(source, data, photometric="minisblack")
    stamp = source.stat()
    store = tmp_path / "out.ome.zarr"
    args = ["predict", source, "-o", store, "-m", tiny_checkpoint, "--tile", 236, "--chunk", 64, "-q"]

    def interrupted(*args, **kwargs):
        raise RuntimeError("stop")

    monkeypatch.setattr(tiler, "predict_planes", interrupted)
    assert run(*args).exit_code != 0
    monkeypatch.undo()
    assert (tmp_path / "out.ome.zarr.partial").exists()
    tifffile.imwrite(source, 255 - data, photometric="minisblack")  # same path, shape and dtype; new content
    assert_user_error(run(*args, "--resume"), "the input", "changed since", "delete")
    assert not store.exists()
    tifffile.imwrite(source, data, photometric="minisblack")  # the old file back (content and time): resume finishes
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert run(*args, "--resume").exit_code == 0 and store.exists()


def test_a_cgroup_memory_limit_caps_the_memory_segkit_counts_on(tmp_path, monkeypatch):
    """SLURM's --mem or a container's limit: the checks use it when it is below the machine's memory."""
    from segkit import memory

    (tmp_path / "memory.max").write_text("2147483648\n")
    limit = memory._cgroup_memory_left(str(tmp_path))
    (tmp_path / "memory.max").write_text("max\n")
    unlimited = memory._cgroup_memory_left(str(tmp_path))
    monkeypatch.setattr(memory, "_cgroup_memory_left", lambda: limit)
    monkeypatch.setattr(memory, "_machine_memory", lambda: 64 << 30)
    assert limit == 2 << 30 and unlimited is None and memory.available_memory() == 2 << 30


def test_a_fifo_or_a_device_as_input_is_one_line_not_a_hang(tmp_path):
    """Issue 25, finding 13: a FIFO named x.tif (alone or in an input folder) blocked forever; /dev/zero read
    as an empty file."""
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    fifo = folder / "x.tif"
    os.mkfifo(fifo)
    assert_user_error(run("predict", fifo, "-o", tmp_path / "a.tif"), "is a named pipe (FIFO)")
    assert_user_error(run("predict", folder, "-o", tmp_path / "b.tif"), "is a named pipe (FIFO)")
    assert_user_error(run("predict", "/dev/zero", "-o", tmp_path / "c.tif"), "/dev/zero is a device")
