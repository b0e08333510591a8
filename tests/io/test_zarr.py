"""segkit.io.zarr: zarr / OME-Zarr inputs with the TiffStack plane interface, the OME-Zarr store the
Dask path writes into, and its conversion to a BigTIFF."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from segkit.errors import InputError, OutputExistsError
from segkit.io.calibration import Calibration
from segkit.io.tiff import TiffStack

zarr = pytest.importorskip("zarr")

from segkit.io.zarr import (  # noqa: E402  (after the skip: zarr is optional)
    LabelImage,
    ZarrStack,
    check_complete,
    convert_zarr_to_tiff,
    create_array,
    create_ome_zarr,
    mark_complete,
    ome_zarr_attributes,
    open_array,
    open_level0,
    open_volume,
    plane_reader,
)


@pytest.fixture
def volume():
    return np.random.default_rng(3).integers(0, 256, (3, 30, 40), dtype=np.uint8)


def test_zarr_array_ome_group_and_2d_read_like_a_tiff_stack(tmp_path, volume):
    zarr.save_array(str(tmp_path / "raw.zarr"), volume, zarr_format=2)
    group = zarr.open_group(str(tmp_path / "raw.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=volume.shape, chunks=(1, 16, 16), dtype=volume.dtype)[:] = volume
    for name in ("raw.zarr", "raw.ome.zarr"):
        with open_volume(tmp_path / name) as stack:
            assert isinstance(stack, ZarrStack) and stack.shape == (3, 30, 40) and stack.dtype == np.uint8
            assert len(stack) == 3 and stack.resolution is None and not stack.is_2d
            np.testing.assert_array_equal(stack.plane(2), volume[2])
            with pytest.raises(IndexError):
                stack.plane(3)
    np.testing.assert_array_equal(plane_reader(str(tmp_path / "raw.zarr"))(1), volume[1])
    zarr.save_array(str(tmp_path / "flat.zarr"), volume[0].astype(np.float32), zarr_format=2)
    with ZarrStack(tmp_path / "flat.zarr") as flat:
        assert flat.is_2d and flat.shape == (1, 30, 40)
        np.testing.assert_array_equal(flat.plane(0), volume[0])


def test_open_volume_opens_tiffs_as_tiff_stacks(tmp_path, uint8_stack):
    with open_volume(uint8_stack) as stack:
        assert isinstance(stack, TiffStack) and stack.shape == (3, 70, 91)


def test_zarr_inputs_refused_with_the_reason(tmp_path):
    zarr.save_array(str(tmp_path / "rgb.zarr"), np.zeros((2, 8, 8, 3), np.uint8), zarr_format=2)
    zarr.save_array(str(tmp_path / "int.zarr"), np.zeros((2, 8, 8), np.int64), zarr_format=2)
    zarr.open_group(str(tmp_path / "empty.ome.zarr"), mode="w", zarr_format=2)
    (tmp_path / "plain.zarr").mkdir()
    with_nan = np.ones((1, 40, 40), np.float32)
    with_nan[0, 3, 3] = np.nan
    zarr.save_array(str(tmp_path / "nan.zarr"), with_nan, zarr_format=2)
    for name, message in [("rgb.zarr", "YX or ZYX array"), ("int.zarr", "not 3D int64"),
                          ("empty.ome.zarr", "without its level-0 array"), ("plain.zarr", "not a zarr store"),
                          ("missing.zarr", "does not exist")]:
        with pytest.raises(InputError, match=message):
            ZarrStack(tmp_path / name)
    with pytest.raises(InputError, match="plane 0 contains NaN or inf"):
        ZarrStack(tmp_path / "nan.zarr").plane(0)


def test_ome_zarr_attributes():
    """Built with ome-zarr-models: the calibration's sizes and unit (none on an axis of unknown size), one
    dataset per pyramid level (2x in y and x per level), what the image holds."""
    attrs = ome_zarr_attributes((3, 30, 40), Calibration(x=4.0, y=5.0), levels=3)
    multiscales = attrs["multiscales"][0]
    assert multiscales["version"] == "0.4" and [a["name"] for a in multiscales["axes"]] == ["z", "y", "x"]
    assert [a.get("unit") for a in multiscales["axes"]] == [None, "micrometer", "micrometer"]
    assert [d["path"] for d in multiscales["datasets"]] == ["0", "1", "2"]
    # the mean of 2 x 2 pixels sits between them: levels 1 and 2 start half a pixel and 1.5 pixels of level 0 in
    assert [d["coordinateTransformations"] for d in multiscales["datasets"]] == [
        [{"type": "scale", "scale": [1.0, 5.0, 4.0]}],
        [{"type": "scale", "scale": [1.0, 10.0, 8.0]}, {"type": "translation", "translation": [0.0, 2.5, 2.0]}],
        [{"type": "scale", "scale": [1.0, 20.0, 16.0]}, {"type": "translation", "translation": [0.0, 7.5, 6.0]}]]
    labels = ome_zarr_attributes((3, 30, 40), None, levels=2, content="labels")["multiscales"][0]
    assert labels["type"] == "nearest" and len(labels["datasets"][1]["coordinateTransformations"]) == 1  # no shift
    assert attrs["segkit"] == {"content": "probabilities"} and "omero" not in attrs
    plain = ome_zarr_attributes((3, 30, 40), None)["multiscales"][0]
    assert "unit" not in plain["axes"][1] and plain["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0] * 3
    nm = ome_zarr_attributes((2, 3, 30, 40), Calibration(4.0, 4.0, 40.0, "nanometer"), ("a", "b"),
                             content="classes")
    assert [a.get("unit") for a in nm["multiscales"][0]["axes"]] == [None, "nanometer", "nanometer", "nanometer"]
    assert nm["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 40.0, 4.0, 4.0]
    assert [c["label"] for c in nm["omero"]["channels"]] == ["a", "b"] and nm["segkit"]["content"] == "classes"


@pytest.mark.parametrize("calibration, scale", [(Calibration(4.0, 5.0), [1.0, 5.0, 4.0]),
                                                (Calibration(8.0, 8.0, 50.0, "nanometer"), [50.0, 8.0, 8.0]),
                                                (None, [1.0] * 3)])
def test_create_ome_zarr(tmp_path, calibration, scale):
    store = tmp_path / "out.ome.zarr"
    shapes = create_ome_zarr(store, (3, 30, 40), (1, 16, 16), "float16", calibration)
    assert shapes == [(30, 40), (15, 20), (8, 10)]  # down to one chunk
    array = zarr.open_array(str(store / "0"), mode="r")
    assert array.shape == (3, 30, 40) and array.chunks == (1, 16, 16) and array.dtype == np.float16
    assert not array[:].any()  # filled with 0
    assert zarr.open_array(str(store / "2"), mode="r").chunks == (1, 8, 10)
    attrs = json.loads((store / ".zattrs").read_text())["multiscales"][0]
    assert attrs["datasets"][0]["coordinateTransformations"][0]["scale"] == scale
    assert attrs["datasets"][2]["coordinateTransformations"][0]["scale"] == [scale[0], scale[1] * 4, scale[2] * 4]
    assert json.loads((store / "0" / ".zarray").read_text())["dimension_separator"] == "/"  # NGFF's chunk keys


def test_create_ome_zarr_with_a_label_image(tmp_path):
    store = tmp_path / "classes.ome.zarr"
    create_ome_zarr(store, (3, 2, 30, 40), (1, 1, 16, 16), np.uint8, Calibration(4.0, 4.0, None, "nanometer"),
                    ("bg", "myelin", "axon"), label=LabelImage("classes", np.dtype(np.uint8), "classes",
                                                               ("bg", "myelin", "axon")))
    labels = json.loads((store / "labels" / ".zattrs").read_text())
    assert labels == {"labels": ["classes"], "segkit": {"content": "classes"}}
    image = json.loads((store / "labels" / "classes" / ".zattrs").read_text())
    assert image["image-label"]["version"] == "0.4" and image["image-label"]["source"] == {"image": "../../"}
    assert [p["class"] for p in image["image-label"]["properties"]] == ["bg", "myelin", "axon"]
    assert image["image-label"]["colors"][0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}  # the background: clear
    assert [a["name"] for a in image["multiscales"][0]["axes"]] == ["z", "y", "x"]
    assert image["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 8.0, 8.0]
    level1 = zarr.open_array(str(store / "labels" / "classes" / "1"), mode="r")
    assert level1.shape == (2, 15, 20) and level1.dtype == np.uint8


def test_store_marked_incomplete_is_refused(tmp_path, volume):
    store = tmp_path / "out.ome.zarr"
    create_ome_zarr(store, volume.shape, (1, 16, 16), volume.dtype, None)
    check_complete(store)  # a store nobody marked: taken as it is
    mark_complete(store, complete=False)
    with pytest.raises(InputError, match="not marked complete"):
        ZarrStack(store)
    mark_complete(store, run={"tile": 92})
    assert json.loads((store / ".zattrs").read_text())["segkit"] == {"content": "probabilities", "complete": True,
                                                                       "run": {"tile": 92}}
    assert ZarrStack(store).shape == volume.shape


def test_extra_array_and_chunk_writes(tmp_path):
    store = tmp_path / "out.ome.zarr"
    create_ome_zarr(store, (2, 20, 20), (1, 10, 10), np.uint32, None)
    create_array(store, "probability", (2, 20, 20), (1, 10, 10), np.float16)
    open_array(store, "probability", mode="r+")[1, 10:20, 0:10] = 0.5
    open_level0(store, mode="r+")[0, 0:10, 10:20] = 7
    assert open_array(store, "probability").dtype == np.float16 and open_array(store).dtype == np.uint32
    assert open_array(store, "probability")[:].sum() == 50 and open_level0(store)[:].sum() == 700
    assert "multiscales" in json.loads((store / ".zattrs").read_text())  # adding an array keeps the attributes


@pytest.mark.parametrize("compression, tag", [("zlib", 8), ("zstd", 50000)])
def test_convert_to_tiff(tmp_path, volume, compression, tag):
    if compression == "zstd":
        pytest.importorskip("imagecodecs")
    store = tmp_path / "out.ome.zarr"
    create_ome_zarr(store, volume.shape, (1, 16, 16), volume.dtype, None)
    zarr.open_array(str(store / "0"), mode="r+")[:] = volume
    out = convert_zarr_to_tiff(store, tmp_path / "back.tif", compression=compression)
    with tifffile.TiffFile(out) as tif:
        assert (tif.is_ome, tif.is_imagej) == ((True, False) if compression == "zstd" else (False, True))  # ImageJ: no zstd
        assert tif.is_bigtiff == tif.is_ome and tif.pages[0].compression == tag
        np.testing.assert_array_equal(tif.asarray(), volume)
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        convert_zarr_to_tiff(store, out)
    with pytest.raises(InputError, match="not a segkit OME-Zarr"):
        convert_zarr_to_tiff(tmp_path / "missing.ome.zarr", tmp_path / "x.tif")
    with pytest.raises(InputError, match="has no label image .it has none"):
        convert_zarr_to_tiff(store, tmp_path / "labels.tif", labels=True)


def test_convert_labels_to_tiff(tmp_path, volume):
    store = tmp_path / "out.ome.zarr"
    create_ome_zarr(store, volume.shape, (1, 16, 16), np.uint8, None, label=LabelImage("instances", np.dtype(np.uint32)))
    ids = volume.astype(np.uint32) * 1000
    zarr.open_array(str(store / "labels" / "instances" / "0"), mode="r+")[:] = ids
    for labels in (True, "instances"):
        out = convert_zarr_to_tiff(store, tmp_path / f"{labels}.tif", labels=labels)
        np.testing.assert_array_equal(tifffile.imread(out), ids)
    with pytest.raises(InputError, match="no label image objects .it has instances"):
        convert_zarr_to_tiff(store, tmp_path / "x.tif", labels="objects")


def test_io_imports_no_torch_and_distributed_keeps_the_names():
    code = ("import sys, segkit.io.zarr, segkit.io.tiff, segkit.inference.distributed; "
            "print(sorted(m for m in ('torch', 'dask', 'zarr') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    from segkit.inference import distributed
    from segkit.io import zarr as io_zarr

    for name in ("ZarrStack", "open_volume", "convert_zarr_to_tiff", "ome_zarr_attributes"):
        assert getattr(distributed, name) is getattr(io_zarr, name)


def test_cli_convert_and_segment_take_compression(tmp_path, volume):
    """`segkit convert` and `segkit segment` write with --compression like predict (the TIFF tag says which)."""
    from tests.helpers import run

    store = tmp_path / "out.ome.zarr"
    create_ome_zarr(store, volume.shape, (1, 16, 16), volume.dtype, None)
    zarr.open_array(str(store / "0"), mode="r+")[:] = volume
    result = run("convert", str(store), str(tmp_path / "plain.tif"), "--compression", "none")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(tmp_path / "plain.tif") as tif:
        assert tif.pages[0].compression == 1
    probability = (np.random.default_rng(0).random((2, 40, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "prob.tif", probability, photometric="minisblack")
    result = run("segment", str(tmp_path / "prob.tif"), "-o", str(tmp_path / "labels.tif"), "--compression", "lzw", "-q")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.pages[0].compression == 5 and tif.pages[0].dtype == np.uint32
    assert run("convert", str(store), str(tmp_path / "x.tif"), "--compression", "gzip").exit_code == 2
