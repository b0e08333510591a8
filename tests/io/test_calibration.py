"""Calibration read from every dialect an input may use, and what a segkit output holds."""

import json

import numpy as np
import pytest
import tifffile

from segkit.io.calibration import (
    Calibration,
    calibration_from_resolution,
    read_calibration,
    read_content,
    unit_name,
    zarr_calibration,
)
from segkit.io.tiff import open_stack, pixel_size_um


@pytest.mark.parametrize("text, name", [("um", "micrometer"), ("micron", "micrometer"), ("\u00b5m", "micrometer"),
                                        ("\\u00B5m", "micrometer"), ("nm", "nanometer"), ("\u00c5", "angstrom"),
                                        ("micrometer", "micrometer"), ("pixel", None), (None, None), ("", None)])
def test_unit_names_in_every_spelling(text, name):
    assert unit_name(text) == name


def test_imagej_hyperstack_gives_x_y_z_and_unit(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"axes": "ZYX", "spacing": 0.05, "unit": "nm"})
    calibration = read_calibration(path)
    assert calibration == Calibration(0.004, 0.004, 0.05, "nanometer")
    assert calibration.pixel_size_um == pytest.approx(4e-6)
    assert calibration.scale("ZCYX") == (0.05, 1.0, 0.004, 0.004)
    with open_stack(str(path)) as stack:
        assert stack.calibration == calibration and stack.pixel_size == pytest.approx(4e-6)


def test_ome_tiff_physical_sizes_in_their_units(tmp_path):
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 16, 16), np.uint16), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250.0,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 1.0, "PhysicalSizeZUnit": "\u00b5m"})
    assert read_calibration(path) == Calibration(250.0, 250.0, 1000.0, "nanometer")
    assert pixel_size_um(path) == pytest.approx(0.25)


@pytest.mark.parametrize("unit, per_unit, size", [(3, 1e4 / 0.5, 0.5), (2, 25400 / 2.0, 2.0), (5, 4.0, 0.25)])
def test_resolution_units_without_a_named_unit_are_micrometres(tmp_path, unit, per_unit, size):
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), resolution=(per_unit, per_unit), resolutionunit=unit)
    calibration = read_calibration(path)
    assert calibration.unit == "micrometer" and calibration.x == pytest.approx(size) and calibration.z is None


@pytest.mark.parametrize("x, unit", [(72.0, 2), (1.0, 1), (1.0, 3), (5.0, 1)])
def test_tiff_defaults_are_no_calibration(x, unit):
    assert calibration_from_resolution(x, x, unit) is None


def test_files_without_calibration_and_unreadable_ones_give_none(tmp_path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8))
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff")
    assert read_calibration(plain) is None and read_calibration(junk) is None
    assert read_content(plain) is None and read_content(junk) is None


def _group(path, attributes, *, v3=False):
    path.mkdir()
    if v3:
        (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}))
    else:
        (path / ".zgroup").write_text('{"zarr_format": 2}')
        (path / ".zattrs").write_text(json.dumps(attributes))
    return path


def test_ome_zarr_scale_and_units_in_0_4_and_0_5(tmp_path):
    axes = [{"name": "z", "type": "space", "unit": "micrometer"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    multiscales = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 2.0]}]}]
    assert zarr_calibration(_group(tmp_path / "a.zarr", {"multiscales": multiscales})) == Calibration(
        1.0, 1.0, 2.0, "micrometer")
    assert zarr_calibration(_group(tmp_path / "b.zarr", {"ome": {"version": "0.5", "multiscales": multiscales}},
                                   v3=True)) == Calibration(1.0, 1.0, 2.0, "micrometer")
    no_units = [{**multiscales[0], "axes": [{"name": name} for name in "zyx"]}]
    assert zarr_calibration(_group(tmp_path / "c.zarr", {"multiscales": no_units})) is None


def test_content_is_read_from_imagej_ome_and_zarr_metadata(tmp_path):
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, np.zeros((2, 8, 8), np.uint8), imagej=True,
                     metadata={"axes": "ZYX", "segkit_content": "labels"})
    ome = tmp_path / "o.ome.tif"
    tifffile.imwrite(ome, np.zeros((2, 8, 8), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "Description": "segkit_content=probabilities"})
    store = _group(tmp_path / "s.zarr", {"segkit": {"content": "classes"}})
    bogus = tmp_path / "bogus.tif"
    tifffile.imwrite(bogus, np.zeros((8, 8), np.uint8), imagej=True, metadata={"segkit_content": "anything"})
    assert (read_content(ij), read_content(ome), read_content(store), read_content(bogus)) == (
        "labels", "probabilities", "classes", None)


def test_calibration_in_another_unit():
    nm = Calibration(5.0, 6.0, 40.0, "nanometer")
    assert nm.in_unit("um") == Calibration(0.005, 0.006, 0.04, "micrometer")
    assert nm.in_unit("micrometer").in_unit("nm") == nm
    assert Calibration(0.5, 0.5, None, "micrometer").in_unit("nanometer") == Calibration(500.0, 500.0, None, "nanometer")
    with pytest.raises(ValueError, match="not a length unit"):
        nm.in_unit("pixel")
