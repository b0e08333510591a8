import numpy as np
import pytest
import tifffile

from segkit.errors import InputError, OutputExistsError
from segkit.io.tiff import open_stack, write_stack


def test_read_compressed_stack_page_by_page(tmp_path):
    data = np.random.default_rng(0).integers(0, 65535, (4, 33, 47), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, compression="zlib", photometric="minisblack")
    with open_stack(tmp_path / "a.tif") as stack:
        assert stack.shape == (4, 33, 47) and stack.dtype == np.uint16 and stack._contiguous is None
        np.testing.assert_array_equal(stack.plane(2), data[2])


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


def test_write_roundtrip_keeps_resolution_and_is_tiled_bigtiff(tmp_path, uint8_stack):
    with open_stack(uint8_stack) as stack:
        out = write_stack(tmp_path / "o.tif", iter(stack), shape=stack.shape, dtype=np.uint8,
                          resolution=stack.resolution, tile=32)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled
        assert tif.pages[0].resolution == pytest.approx((250.0, 250.0))
        np.testing.assert_array_equal(tif.asarray(), tifffile.imread(uint8_stack))
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_failed_write_leaves_nothing(tmp_path):
    def planes():
        yield np.zeros((8, 8), np.uint8)
        raise RuntimeError("engine crashed")

    with pytest.raises(RuntimeError):
        write_stack(tmp_path / "o.tif", planes(), shape=(2, 8, 8), dtype=np.uint8)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "o.tif").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
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
    "make, message",
    [
        (lambda p: p.write_text("hello"), "not a readable TIFF"),
        (lambda p: tifffile.imwrite(p, np.zeros((20, 20, 3), np.uint8), photometric="rgb"), "RGB"),
        (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 20, 20), np.uint8), imagej=True,
                                    metadata={"axes": "ZCYX"}), "multi-channel"),
        (lambda p: tifffile.imwrite(p, np.zeros((0, 10, 10), np.uint8)), "empty"),
        (lambda p: tifffile.imwrite(p, np.zeros((5, 5), np.int32)), "dtype int32"),
    ],
)
def test_bad_inputs(tmp_path, make, message):
    path = tmp_path / "bad.tif"
    with pytest.warns() if "empty" in message else _nothing():
        make(path)
    with pytest.raises(InputError, match=message):
        open_stack(path)


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
