"""Multi-channel TIFF input (CYX, ZCYX, RGB, folders of them) and pixel size from the resolution tags."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile

from segkit.errors import InputError
from segkit.io.tiff import Resolution, open_stack, pixel_size_um, write_stack
from tests.helpers import data_root


def _data(shape, dtype=np.uint16):
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def _planes(stack):
    return np.stack([stack.plane(i) for i in range(len(stack))])


# -- layouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("imagej, compression", [(True, None), (False, None), (False, "zlib")])
def test_cyx_is_one_plane_of_channels(tmp_path, imagej, compression):
    data = _data((3, 6, 7))
    kwargs = {"imagej": True} if imagej else {"photometric": "minisblack", "compression": compression}
    tifffile.imwrite(tmp_path / "c.tif", data, metadata={"axes": "CYX"}, **kwargs)
    with open_stack(tmp_path / "c.tif") as stack:
        assert stack.shape == (1, 6, 7) and stack.channels == 3 and stack.is_2d
        assert (stack._contiguous is not None) == (compression is None)
        plane = stack.plane(0)
        assert plane.shape == (3, 6, 7) and plane.flags.c_contiguous and plane.dtype == np.uint16
        np.testing.assert_array_equal(plane, data)


@pytest.mark.parametrize("make", [
    lambda p, d: tifffile.imwrite(p, d, imagej=True, metadata={"axes": "ZCYX"}),
    lambda p, d: tifffile.imwrite(p, d[None], imagej=True, metadata={"axes": "TZCYX"}),  # T = 1
    lambda p, d: tifffile.imwrite(p, d, photometric="minisblack", metadata={"axes": "ZCYX"}),
    lambda p, d: tifffile.imwrite(p, d, photometric="minisblack", metadata={"axes": "ZCYX"}, compression="zlib"),
    lambda p, d: tifffile.imwrite(p, d.transpose(1, 0, 2, 3), photometric="minisblack", metadata={"axes": "CZYX"}),
], ids=["imagej", "imagej-tzcyx", "shaped", "shaped-zlib", "czyx"])
def test_zcyx_planes_hold_their_channels(tmp_path, make):
    data = _data((4, 2, 5, 6))
    make(tmp_path / "z.tif", data)
    with open_stack(tmp_path / "z.tif") as stack:
        assert stack.shape == (4, 5, 6) and stack.channels == 2 and not stack.is_2d and len(stack) == 4
        assert stack.plane(3).shape == (2, 5, 6)
        np.testing.assert_array_equal(_planes(stack), data)
        np.testing.assert_array_equal(np.stack(list(stack)), data)


def test_zcyx_written_by_write_stack_reads_back(tmp_path):
    data = _data((3, 2, 20, 24))
    out = write_stack(tmp_path / "o.tif", iter(data.reshape(-1, 20, 24)), shape=data.shape, dtype=np.uint16,
                      axes="ZCYX", block=16)
    with open_stack(out) as stack:
        assert stack.shape == (3, 20, 24) and stack.channels == 2 and stack._contiguous is None
        np.testing.assert_array_equal(_planes(stack), data)


@pytest.mark.parametrize("samples, planar, compression", [(3, False, None), (3, True, None), (4, False, None),
                                                         (3, False, "zlib"), (3, True, "zlib")])
def test_rgb_and_rgba_planes_are_channel_first(tmp_path, samples, planar, compression):
    data = np.random.default_rng(0).integers(0, 255, (9, 11, samples), dtype=np.uint8)
    if planar:
        tifffile.imwrite(tmp_path / "rgb.tif", data.transpose(2, 0, 1), photometric="rgb", planarconfig="separate",
                         compression=compression)
    else:
        tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb", compression=compression,
                         extrasamples=["unassalpha"] if samples == 4 else None)
    with open_stack(tmp_path / "rgb.tif") as stack:
        assert stack.shape == (1, 9, 11) and stack.channels == samples and stack.is_2d
        plane = stack.plane(0)
        assert plane.shape == (samples, 9, 11) and plane.flags.c_contiguous
        np.testing.assert_array_equal(plane, data.transpose(2, 0, 1))


def test_stack_of_rgb_planes(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (3, 5, 6, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "zrgb.tif", data, photometric="rgb", metadata={"axes": "ZYXS"})
    with open_stack(tmp_path / "zrgb.tif") as stack:
        assert stack.shape == (3, 5, 6) and stack.channels == 3
        np.testing.assert_array_equal(_planes(stack), data.transpose(0, 3, 1, 2))


def test_grayscale_stacks_keep_2d_planes_and_the_offset_path(tmp_path, uint8_stack):
    with open_stack(uint8_stack) as stack:
        assert stack.channels == 1 and stack._contiguous is not None and stack.plane(1).shape == (70, 91)
    tifffile.imwrite(tmp_path / "one.tif", _data((1, 1, 5, 6)), imagej=True, metadata={"axes": "ZCYX"})
    with open_stack(tmp_path / "one.tif") as stack:  # singleton channel axis: grayscale
        assert stack.channels == 1 and stack.shape == (1, 5, 6) and stack.plane(0).shape == (5, 6)


def test_folder_of_multichannel_files(tmp_path):
    data = _data((3, 2, 5, 6))
    (tmp_path / "dir").mkdir()
    for i, image in enumerate(data):
        tifffile.imwrite(tmp_path / "dir" / f"s{i}.tif", image, photometric="minisblack", metadata={"axes": "CYX"},
                         compression="zlib" if i == 1 else None)
    for source in (tmp_path / "dir", str(tmp_path / "dir" / "s*.tif")):
        with open_stack(source) as stack:
            assert stack.shape == (3, 5, 6) and stack.channels == 2 and not stack.is_2d
            np.testing.assert_array_equal(_planes(stack), data)


def test_folder_of_rgb_files(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (2, 5, 6, 3), dtype=np.uint8)
    for i, image in enumerate(data):
        tifffile.imwrite(tmp_path / f"s{i}.tif", image, photometric="rgb")
    with open_stack(tmp_path) as stack:
        assert stack.shape == (2, 5, 6) and stack.channels == 3
        np.testing.assert_array_equal(_planes(stack), data.transpose(0, 3, 1, 2))


def test_folder_files_must_have_the_same_channels(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _data((2, 5, 6)), photometric="minisblack", metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "b.tif", _data((3, 5, 6)), photometric="minisblack", metadata={"axes": "CYX"})
    with open_stack(tmp_path) as stack:
        stack.plane(0)
        with pytest.raises(InputError, match=r"b.tif: .*/ 3 channels /.* first file's .*/ 2 channels /.*must match"):
            stack.plane(1)


# -- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda p: tifffile.imwrite(p, np.zeros((4, 5, 3), np.uint8), photometric="rgb"), "RGB/multi-sample labels"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 4, 5), np.uint8), imagej=True, metadata={"axes": "CYX"}),
     "multi-channel labels"),
    (lambda p: tifffile.imwrite(p, np.zeros((3, 2, 4, 5), np.uint16), photometric="minisblack",
                                metadata={"axes": "ZCYX"}), "multi-channel labels"),
])
def test_labels_must_be_single_channel(tmp_path, make, message):
    make(tmp_path / "l.tif")
    with pytest.raises(InputError, match=message) as info:
        open_stack(tmp_path / "l.tif", labels=True)
    assert "save the labels as a single-channel image" in str(info.value) and "\n" not in str(info.value)
    with open_stack(tmp_path / "l.tif") as stack:  # the same file is fine as an image
        assert stack.channels > 1


def test_label_folder_of_multichannel_files_is_refused(tmp_path):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"s{i}.tif", np.zeros((2, 4, 5), np.uint8), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(InputError, match="single-channel image"):
        open_stack(tmp_path, labels=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 4, 5), np.uint8), imagej=True, metadata={"axes": "TZYX"}),
     r"4D image \(axes TZYX.*split it into one stack per T"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 2, 4, 5), np.uint8), imagej=True, metadata={"axes": "TZCYX"}),
     r"5D image \(axes TZCYX.*per T"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 2, 4, 5, 3), np.uint8), photometric="rgb",
                                metadata={"axes": "ZCYXS"}), r"2 channels of 3 samples.*axes ZCYXS"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 4, 5, 3), np.uint8), photometric="rgb",
                                metadata={"axes": "CYXS"}), r"2 channels of 3 samples"),
])
def test_other_layouts_are_refused_in_one_line(tmp_path, make, message):
    make(tmp_path / "bad.tif")
    with pytest.raises(InputError, match=message) as info:
        open_stack(tmp_path / "bad.tif")
    assert "\n" not in str(info.value)


def test_memory_check_counts_the_channels(tmp_path, monkeypatch):
    import segkit.memory

    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 100, 100), np.uint8), photometric="minisblack",
                     metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((100, 100), np.uint8))
    one = segkit.memory.plane_bytes((100, 100), 1)  # a grayscale plane: fits, four channels do not
    monkeypatch.setattr(segkit.memory, "available_memory", lambda: one + 1)
    with open_stack(tmp_path / "g.tif") as stack:
        assert stack.channels == 1
    with pytest.raises(InputError, match=r"4 channels of 100 x 100 px .* memory is available"):
        open_stack(tmp_path / "c.tif")
    with open_stack(tmp_path / "c.tif", check_memory=False) as stack:
        assert stack.channels == 4


# -- pixel size --------------------------------------------------------------------------------

@pytest.mark.parametrize("unit, per_unit, expected", [("um", 10.0, 0.1), ("micron", 4.0, 0.25), ("µm", 2.0, 0.5),
                                                      ("\\u00B5m", 2.0, 0.5), ("nm", 0.2, 0.005), ("mm", 0.5, 2000.0),
                                                      ("pixel", 2.0, None)])
def test_pixel_size_from_imagej_unit(tmp_path, unit, per_unit, expected):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((2, 4, 5), np.uint8), imagej=True, resolution=(per_unit, per_unit))
    resolution = Resolution(per_unit, per_unit, 1, unit)  # tifffile writes ImageJ descriptions in ASCII only
    assert resolution.pixel_size_um == (pytest.approx(expected) if expected else None)
    if unit.isascii():
        tifffile.imwrite(path, np.zeros((2, 4, 5), np.uint8), imagej=True, resolution=(per_unit, per_unit),
                         metadata={"unit": unit})
        assert pixel_size_um(path) == (pytest.approx(expected) if expected else None)
        with open_stack(path) as stack:
            assert stack.pixel_size == (pytest.approx(expected) if expected else None)
            assert stack.resolution.unit_name == unit


@pytest.mark.parametrize("kwargs, expected", [
    ({"resolution": (5000.0, 5000.0), "resolutionunit": "CENTIMETER"}, 2.0),
    ({"resolution": (25400.0, 25400.0), "resolutionunit": "INCH"}, 1.0),
    ({"resolution": (10000.0, 5000.0), "resolutionunit": "CENTIMETER"}, 1.5),  # x and y differ: their mean
    ({"resolution": (10000.0, 10050.0), "resolutionunit": "CENTIMETER"}, 1.0),  # within 1 %: x
    ({"resolution": (72.0, 72.0), "resolutionunit": "INCH"}, None),  # a screen default
    ({"resolution": (1.0, 1.0), "resolutionunit": "CENTIMETER"}, None),  # TIFF default
    ({"resolution": (300.0, 300.0), "resolutionunit": "NONE"}, None),  # no unit
    ({}, None),  # tifffile's default: 1 pixel per (no) unit
])
def test_pixel_size_from_resolution_unit(tmp_path, kwargs, expected):
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, np.zeros((4, 5), np.uint8), **kwargs)
    assert pixel_size_um(path) == (pytest.approx(expected) if expected else None)
    with open_stack(path) as stack:
        assert stack.pixel_size == (pytest.approx(expected) if expected else None)


def _tiff_without_resolution(path, data):
    """A baseline uint8 TIFF without resolution tags (tifffile always writes them)."""
    height, width = data.shape
    entries = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
               (277, 3, 1), (278, 3, height), (279, 4, data.size)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                     for tag, kind, value in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + data.tobytes())


def test_pixel_size_without_resolution_tags(tmp_path):
    path = tmp_path / "n.tif"
    data = _data((4, 5), np.uint8)
    _tiff_without_resolution(path, data)
    with tifffile.TiffFile(path) as tif:
        assert "XResolution" not in tif.pages[0].tags
    assert pixel_size_um(path) is None
    with open_stack(path) as stack:
        assert stack.resolution is None and stack.pixel_size is None
        np.testing.assert_array_equal(stack.plane(0), data)
    (tmp_path / "bad.tif").write_text("hello")
    with pytest.raises(InputError, match="not a readable TIFF"):
        pixel_size_um(tmp_path / "bad.tif")


def test_pixel_size_of_a_folder_is_its_first_files(tmp_path):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"s{i}.tif", np.zeros((2, 4, 5), np.uint8), imagej=True,
                         resolution=(4.0, 4.0), metadata={"axes": "CYX", "unit": "um"})
    with open_stack(tmp_path) as stack:
        assert stack.channels == 2 and stack.pixel_size == pytest.approx(0.25)


def test_axondeepseg_pixel_sizes():
    images = data_root() / "axondeepseg_sem" / "images"
    if not images.is_dir():
        pytest.skip(f"AxonDeepSeg SEM data not found in {images.parent} (set SEGKIT_DATA)")
    sizes = {path.stem: pixel_size_um(path) for path in sorted(images.glob("*.tif"))}
    expected = {"sub-rat1_sample-data1": 0.18, "sub-rat2_sample-data5": 0.093, "sub-rat3_sample-data9": 0.1,
                "sub-rat3_sample-data10": 0.1, "sub-rat3_sample-data11": 0.1, "sub-rat4_sample-data12": 0.1,
                "sub-rat5_sample-data14": 0.13, "sub-rat6_sample-data15": 0.13, "sub-rat7_sample-Maxo03img60": 0.07,
                "sub-rat8_sample-V915": 0.07}
    assert sizes == {name: pytest.approx(size) for name, size in expected.items() if name in sizes}
    assert all(0.07 <= size <= 0.18 for size in sizes.values())
    with open_stack(next(iter(sorted(images.glob("*.tif"))))) as stack:
        assert stack.pixel_size == pytest.approx(0.18) and stack.resolution.unit_name == "um"


# -- writing keeps the unit ----------------------------------------------------------------------

@pytest.mark.parametrize("axes, shape", [("YX", (12, 16)), ("CYX", (2, 12, 16)), ("ZCYX", (2, 2, 12, 16))])
def test_write_stack_keeps_the_imagej_calibration(tmp_path, axes, shape):
    data = _data(shape)
    tifffile.imwrite(tmp_path / "in.tif", data, imagej=True, resolution=(1 / 0.093, 1 / 0.093),
                     metadata={"axes": axes, "unit": "um", "spacing": 0.5})
    with open_stack(tmp_path / "in.tif") as stack:
        assert stack.resolution.unit_name == "um" and stack.pixel_size == pytest.approx(0.093)
        out = write_stack(tmp_path / "out.tif", iter(data.reshape(-1, 12, 16)), shape=shape, dtype=np.uint16,
                          axes=axes, calibration=stack.calibration)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "micron" and tif.series[0].axes == axes
        assert tif.imagej_metadata.get("spacing") == (0.5 if "Z" in axes else None)  # no z spacing without Z
        assert tif.pages[0].resolution == pytest.approx((1 / 0.093, 1 / 0.093))
    assert pixel_size_um(out) == pytest.approx(0.093)
    with open_stack(out) as back:
        assert back.pixel_size == pytest.approx(0.093) and back.channels == (2 if "C" in axes else 1)


@pytest.mark.parametrize("imagej_limit", [2**32, 0])
def test_write_stack_calibration_in_centimetres_and_none(tmp_path, imagej_limit):
    tifffile.imwrite(tmp_path / "cm.tif", np.zeros((8, 8), np.uint8), resolution=(250.0, 250.0),
                     resolutionunit="CENTIMETER")
    with open_stack(tmp_path / "cm.tif") as stack:
        out = write_stack(tmp_path / "o.tif", [stack.plane(0)], shape=(8, 8), dtype=np.uint8,
                          calibration=stack.calibration, imagej_limit=imagej_limit)
    assert pixel_size_um(out) == pytest.approx(40.0)
    plain = write_stack(tmp_path / "n.tif", [np.zeros((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8,
                        imagej_limit=imagej_limit)
    assert pixel_size_um(plain) is None
    with tifffile.TiffFile(plain) as tif:
        assert tif.is_imagej != (imagej_limit == 0) and tif.pages[0].resolution == (1.0, 1.0)
