import sys

import numpy as np
import pytest
import tifffile

from segkit.errors import InputError, MissingDependencyError, OutputExistsError, SegkitError
from segkit.io.calibration import Calibration, read_calibration, read_content
from segkit.io.tiff import COMPRESSIONS, _rows_per_strip, open_stack, output_format, write_stack


def test_read_compressed_stack_page_by_page(tmp_path):
    data = np.random.default_rng(0).integers(0, 65535, (4, 33, 47), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, compression="zlib", photometric="minisblack")
    with open_stack(tmp_path / "a.tif") as stack:
        assert stack.shape == (4, 33, 47) and stack.dtype == np.uint16 and stack._contiguous is None
        np.testing.assert_array_equal(stack.plane(2), data[2])


def test_compressed_tiled_stack_decodes_its_blocks_on_several_threads(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 255, (3, 100, 90), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", data, compression="zlib", tile=(32, 32), photometric="minisblack")
    asked = []
    original = tifffile.TiffPage.asarray
    monkeypatch.setattr(tifffile.TiffPage, "asarray",
                        lambda self, *a, **k: asked.append(k.get("maxworkers")) or original(self, *a, **k))
    with open_stack(tmp_path / "t.tif", workers=3) as stack:
        assert stack._contiguous is None and stack._pages[0].is_tiled and len(stack._pages[0].dataoffsets) == 12
        np.testing.assert_array_equal(np.stack(list(stack)), data)
    assert asked == [3, 3, 3]


def test_uncompressed_stack_reads_planes_at_offsets(uint8_stack):
    with open_stack(uint8_stack) as stack:
        assert stack._contiguous is not None
        np.testing.assert_array_equal(np.stack(list(stack)), tifffile.imread(uint8_stack))
        assert stack.resolution is not None and stack.resolution.x == pytest.approx(250.0)


def test_big_endian_contiguous(tmp_path):
    data = np.arange(2 * 5 * 7, dtype=">u2").reshape(2, 5, 7)
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">", photometric="minisblack")
    with open_stack(tmp_path / "be.tif") as stack:
        assert stack._contiguous is not None
        np.testing.assert_array_equal(stack.plane(1), data[1].astype(np.uint16))


def test_2d_image_and_folder_and_glob(tmp_path):
    planes = [np.full((20, 30), i, np.float32) for i in range(3)]
    (tmp_path / "dir").mkdir()
    for i, plane in enumerate(planes):
        tifffile.imwrite(tmp_path / "dir" / f"s{i:02d}.tif", plane)
    with open_stack(tmp_path / "dir" / "s01.tif") as single:
        assert single.shape == (1, 20, 30)
    for source in (tmp_path / "dir", str(tmp_path / "dir" / "s*.tif")):
        with open_stack(source) as stack:
            assert stack.shape == (3, 20, 30)
            assert stack.plane(2)[0, 0] == 2


def test_write_roundtrip_keeps_calibration_as_an_imagej_hyperstack(tmp_path, uint8_stack):
    with open_stack(uint8_stack) as stack:
        assert stack.calibration == Calibration(40.0, 40.0, None, "micrometer")  # 250 px/cm
        out = write_stack(tmp_path / "o.tif", iter(stack), shape=stack.shape, dtype=np.uint8,
                          calibration=stack.calibration, content="probabilities")
    assert out.read_bytes()[:4] == b"II*\x00"  # classic TIFF: ImageJ's opener reads no BigTIFF
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and not tif.is_bigtiff and not tif.pages[0].is_tiled
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["unit"] == "micron"
        assert tif.pages[0].resolution == pytest.approx((1 / 40.0, 1 / 40.0)) and tif.pages[0].resolutionunit == 1
        np.testing.assert_array_equal(tif.asarray(), tifffile.imread(uint8_stack))
    assert read_calibration(out) == Calibration(40.0, 40.0, None, "micrometer")
    assert read_content(out) == "probabilities"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.uint32, np.float32, np.uint16])
@pytest.mark.parametrize("compression, tag", [("zlib", 8), ("zstd", 50000), ("lzw", 5), ("none", 1)])
def test_write_every_compression_and_dtype(tmp_path, dtype, compression, tag):
    if compression in ("zstd", "lzw"):
        pytest.importorskip("imagecodecs")
    data = (np.random.default_rng(2).random((2, 40, 50)) * 200).astype(dtype)
    out = write_stack(tmp_path / "o.tif", iter(data), shape=data.shape, dtype=dtype, block=16,
                      compression=compression, workers=2)
    stored = np.float32 if dtype == np.float16 else dtype  # neither ImageJ nor OME-XML has float16
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tag and tif.series[0].axes == "ZYX" and tif.series[0].dtype == stored
        # zstd: OME-TIFF (ImageJ's reader has no zstd); the others: an ImageJ hyperstack
        assert (tif.is_ome, tif.is_imagej, tif.pages[0].is_tiled) == ((True, False, True) if compression == "zstd"
                                                                        else (False, True, False))
        np.testing.assert_array_equal(tif.asarray(), data.astype(stored))


@pytest.mark.parametrize("shape, dtype, compression, expected", [
    ((3, 1024, 1024), np.uint8, "zlib", "imagej"),
    ((1100, 1024, 1024), np.float32, "zlib", "ome"),  # 4.3 GiB
    ((1023, 1024, 1024), np.float32, "none", "imagej"),  # 3.996 GiB uncompressed: exactly what is written
    ((1023, 1024, 1024), np.float32, "zlib", "ome"),  # the same: deflate may grow incompressible data
    ((2000, 1024, 1024), np.float16, "zlib", "ome"),  # stored as float32: 7.8 GiB
    ((700, 1024, 1024), np.float32, "lzw", "ome"),  # 2.7 GiB, but LZW may grow it by half
    ((3, 8, 8), np.uint8, "zstd", "ome"),  # ImageJ cannot decode zstd
])
def test_output_format_by_size_and_compression(shape, dtype, compression, expected):
    assert output_format(shape, dtype, compression) == expected
    assert output_format(shape, dtype, compression, limit=100) == "ome"


def test_write_passes_workers_and_a_bounded_buffer_to_tifffile(tmp_path, monkeypatch):
    seen = {}
    original = tifffile.TiffWriter.write
    monkeypatch.setattr(tifffile.TiffWriter, "write", lambda self, *a, **k: seen.update(k) or original(self, *a, **k))
    planes = np.zeros((3, 512, 256), np.uint16)  # 256 KiB planes
    write_stack(tmp_path / "a.tif", iter(planes), shape=planes.shape, dtype=np.uint16, workers=3)
    # ImageJ: strips, at least one per thread, one plane's strips a batch
    assert seen["rowsperstrip"] == 171 and seen["maxworkers"] == 3 and seen["buffersize"] == 3 * 171 * 512
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert len(tif.pages[0].dataoffsets) == 3
    seen.clear()
    write_stack(tmp_path / "b.tif", iter(planes), shape=planes.shape, dtype=np.uint16, workers=3, imagej_limit=0,
                block=128)
    # OME-TIFF: tiles, one plane's tiles a batch
    assert seen["tile"] == (128, 128) and "rowsperstrip" not in seen and seen["maxworkers"] == 3 and seen["buffersize"] == 8 * 128 * 128 * 2
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), planes)
    seen.clear()
    write_stack(tmp_path / "c.tif", iter(planes), shape=planes.shape, dtype=np.uint16, compression="none")
    assert "compression" not in seen and "maxworkers" not in seen  # nothing to encode


def test_strips_are_at_least_one_per_thread_and_16_kib():
    assert _rows_per_strip(1024, 2048, 8) == 128  # 256 KiB strips: 8 a plane
    assert _rows_per_strip(512, 512, 8) == 64  # a 256 KiB plane: 8 strips of 32 KiB, one per thread
    assert _rows_per_strip(512, 512, 64) == 32  # no smaller than 16 KiB
    assert _rows_per_strip(10, 100, 1) == 10  # never more rows than the plane has


@pytest.mark.parametrize("shape, axes", [((2, 3, 40, 50), None), ((2, 3, 40, 50), "ZCYX"), ((3, 40, 50), "CYX"),
                                         ((40, 50), None)])
def test_write_channel_axis_in_imagej_order(tmp_path, shape, axes):
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    out = write_stack(tmp_path / "o.tif", iter(data.reshape(-1, *shape[-2:])), shape=shape, dtype=np.uint16,
                      axes=axes, block=16)
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.axes == (axes or {4: "ZCYX", 2: "YX"}[len(shape)]) and series.shape == shape
        np.testing.assert_array_equal(series.asarray(), data)
        if len(shape) == 4:  # one page per plane, channel fastest: page 1 is z0 c1
            assert len(tif.pages) == 6
            np.testing.assert_array_equal(tif.pages[1].asarray(), data[0, 1])


@pytest.mark.parametrize("shape, axes", [((2, 3, 8, 8), "CZYX"), ((3, 8, 8), "ZCYX"), ((1, 2, 3, 8, 8), None)])
def test_write_refuses_other_axes(tmp_path, shape, axes):
    with pytest.raises(ValueError, match="ZCYX"):
        write_stack(tmp_path / "o.tif", [], shape=shape, dtype=np.uint8, axes=axes)
    assert list(tmp_path.iterdir()) == []


def test_write_compression_errors(tmp_path, monkeypatch):
    assert COMPRESSIONS == ("zlib", "zstd", "lzw", "none")
    with pytest.raises(SegkitError, match="'zstandard'.*'zstd'.*zlib, zstd, lzw, none"):
        write_stack(tmp_path / "o.tif", [np.zeros((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8,
                    compression="zstandard")
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # as if it were not installed
    for name in ("zstd", "lzw"):
        with pytest.raises(MissingDependencyError, match="pip install imagecodecs"):
            write_stack(tmp_path / "o.tif", [np.zeros((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8,
                        compression=name)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
    def planes():
        yield np.zeros((8, 8), np.uint8)
        raise RuntimeError("engine crashed")

    with pytest.raises(RuntimeError):
        write_stack(tmp_path / "o.tif", planes(), shape=(2, 8, 8), dtype=np.uint8)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "o.tif").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        write_stack(tmp_path / "o.tif", [np.zeros((2, 2), np.uint8)], shape=(1, 2, 2), dtype=np.uint8)
    assert (tmp_path / "o.tif").read_bytes() == b"keep me"


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff(tmp_path, compression):
    data = np.random.default_rng(0).integers(0, 255, (6, 64, 64), dtype=np.uint8)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, data, compression=compression, photometric="minisblack")
    _truncate(path, 0.5)
    with pytest.raises(InputError, match="truncated|corrupt|not a readable"):
        with open_stack(path) as stack:
            for _ in stack:
                pass


@pytest.mark.parametrize(
    "make, message, labels",
    [
        (lambda p: p.write_text("hello"), "not a readable TIFF", False),
        # images may have channels (RGB, CYX, ZCYX: tests/io/test_tiff_channels.py); labels may not
        (lambda p: tifffile.imwrite(p, np.zeros((20, 20, 3), np.uint8), photometric="rgb"), "RGB", True),
        (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 20, 20), np.uint8), imagej=True,
                                    metadata={"axes": "ZCYX"}), "multi-channel", True),
        (lambda p: tifffile.imwrite(p, np.zeros((0, 10, 10), np.uint8)), "empty", False),
        (lambda p: tifffile.imwrite(p, np.zeros((5, 5), np.int32)), "dtype int32", False),
    ],
)
def test_bad_inputs(tmp_path, make, message, labels):
    path = tmp_path / "bad.tif"
    with pytest.warns() if "empty" in message else _nothing():
        make(path)
    with pytest.raises(InputError, match=message):
        open_stack(path, labels=labels)


def test_missing_and_nan(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_stack(tmp_path / "nope.tif")
    data = np.ones((3, 8, 8), np.float32)
    data[1, 2, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", data, photometric="minisblack")
    with open_stack(tmp_path / "nan.tif") as stack:
        stack.plane(0)
        with pytest.raises(InputError, match="plane 1 contains NaN"):
            stack.plane(1)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
