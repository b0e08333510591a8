"""The reader of segkit's outputs: it claims only files segkit wrote, opens probabilities as image layers and
classes / objects as labels layers (an OME-Zarr store's labels/<name> too) with the file's calibration as scale,
and a pyramid as multiscale data; then the same through napari itself (viewer.open with the plugin).

The files are written as segkit's writers record them (segkit.io.calibration: `segkit_content` in the ImageJ
description, `segkit.content` in an OME-Zarr group's attributes; NGFF 0.4 multiscales and image-label)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segkit.napari.reader import get_reader, read_segkit_outputs
from tests.napari.conftest import PLUGIN, needs_viewer


def imagej_tiff(path: Path, data: np.ndarray, *, axes: str, content: str | None, pixel: float = 0.5,
                spacing: float | None = 2.0) -> Path:
    metadata = {"axes": axes, "unit": "um"}
    if spacing is not None:
        metadata["spacing"] = spacing
    if content is not None:
        metadata["segkit_content"] = content
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / pixel, 1 / pixel), metadata=metadata)
    return path


def ngff_store(path: Path, levels: list[np.ndarray], *, content: str, labels: dict[str, list[np.ndarray]]) -> Path:
    """An OME-Zarr store as segkit writes it: an image pyramid (z, y, x in micrometres, 2x in y and x per level)
    and label pyramids under labels/<name>."""
    zarr = pytest.importorskip("zarr", reason="OME-Zarr outputs need zarr (the dask extra)")

    def write(group_path: Path, arrays: list[np.ndarray], attributes: dict) -> None:
        group = zarr.open_group(str(group_path), mode="w", zarr_format=2)
        for index, array in enumerate(arrays):
            group.create_array(str(index), data=array, chunks=array.shape)
        axes = [{"name": name, "type": "space", "unit": "micrometer"} for name in "zyx"]
        datasets = [{"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.5 * 2 ** i, 0.5 * 2 ** i]}]} for i in range(len(arrays))]
        group.attrs.update({"multiscales": [{"version": "0.4", "name": group_path.name, "axes": axes,
                                             "datasets": datasets}], **attributes})

    write(path, levels, {"segkit": {"content": content}})
    if labels:
        group = zarr.open_group(str(path / "labels"), mode="w", zarr_format=2)
        group.attrs.update({"labels": list(labels)})
        for name, arrays in labels.items():
            write(path / "labels" / name, arrays, {"image-label": {"version": "0.4"},
                                                   "segkit": {"content": "labels"}})
    return path


@pytest.fixture
def labels_tiff(tmp_path) -> Path:
    data = np.zeros((3, 64, 64), np.uint16)
    data[:, 10:20, 10:20] = [[[1]], [[2]], [[3]]]
    return imagej_tiff(tmp_path / "stack_instances.tif", data, axes="ZYX", content="labels")


@pytest.fixture
def zarr_output(tmp_path) -> Path:
    probabilities = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    instances = np.zeros((3, 64, 64), np.uint32)
    instances[:, 5:25, 5:25] = 7
    return ngff_store(tmp_path / "stack.ome.zarr", [probabilities, probabilities[:, ::2, ::2]],
                      content="probabilities", labels={"instances": [instances, instances[:, ::2, ::2]]})


def test_a_labels_tiff_opens_as_a_labels_layer_with_its_calibration(labels_tiff):
    reader = get_reader(str(labels_tiff))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(labels_tiff))
    assert kind == "labels" and data.shape == (3, 64, 64) and data.max() == 3
    assert kwargs["scale"] == [2.0, 0.5, 0.5] and kwargs["name"] == "stack_instances"


def test_probabilities_of_k_classes_open_as_one_image_layer_per_class(tmp_path):
    data = np.zeros((2, 3, 32, 32), np.uint8)  # ZCYX, an ImageJ hyperstack of 2 slices x 3 channels
    path = imagej_tiff(tmp_path / "p.tif", data, axes="ZCYX", content="probabilities")
    [(array, kwargs, kind)] = read_segkit_outputs(str(path))
    assert kind == "image" and array.shape == (2, 3, 32, 32) and kwargs["channel_axis"] == 1
    assert kwargs["name"] == ["p 0", "p 1", "p 2"] and kwargs["scale"] == [2.0, 0.5, 0.5]
    assert kwargs["contrast_limits"] == [0, 255]


def test_a_2d_mask_opens_as_labels(tmp_path):
    path = imagej_tiff(tmp_path / "m.tif", np.zeros((32, 32), np.uint8), axes="YX", content="classes", spacing=None)
    [(array, kwargs, kind)] = read_segkit_outputs(str(path))
    assert kind == "labels" and array.shape == (32, 32) and kwargs["scale"] == [0.5, 0.5]


def test_files_segkit_did_not_write_are_left_to_other_readers(tmp_path, labels_tiff):
    plain = imagej_tiff(tmp_path / "raw.tif", np.zeros((32, 32), np.uint8), axes="YX", content=None)
    assert get_reader(str(plain)) is None
    assert get_reader([str(labels_tiff), str(plain)]) is None
    assert get_reader(str(tmp_path / "missing.tif")) is None
    assert get_reader(str(tmp_path / "notes.txt")) is None
    folder = tmp_path / "other.zarr"
    folder.mkdir()
    (folder / ".zattrs").write_text(json.dumps({"multiscales": []}))
    assert get_reader(str(folder)) is None


def test_an_ome_zarr_output_opens_as_a_multiscale_image_and_its_labels(zarr_output):
    reader = get_reader(str(zarr_output))
    assert reader is not None
    (image, image_kwargs, image_kind), (labels, labels_kwargs, labels_kind) = reader(str(zarr_output))
    assert image_kind == "image" and image_kwargs["multiscale"] and [level.shape for level in image] == [
        (3, 64, 64), (3, 32, 32)]
    assert image_kwargs["scale"] == [2.0, 0.5, 0.5] and image_kwargs["name"] == "stack"
    assert labels_kind == "labels" and labels_kwargs["multiscale"] and labels_kwargs["name"] == "stack instances"
    assert labels_kwargs["scale"] == [2.0, 0.5, 0.5] and int(np.asarray(labels[0]).max()) == 7


@needs_viewer
def test_napari_opens_segkit_outputs_through_the_plugin(make_napari_viewer, segkit_plugin, labels_tiff, zarr_output):
    viewer = make_napari_viewer()
    viewer.open(str(labels_tiff), plugin=PLUGIN)
    layer = viewer.layers["stack_instances"]
    assert layer._type_string == "labels"
    np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))
    viewer.open(str(zarr_output), plugin=PLUGIN)
    assert viewer.layers["stack"]._type_string == "image" and viewer.layers["stack"].multiscale
    labels = viewer.layers["stack instances"]
    assert labels._type_string == "labels" and labels.multiscale
    np.testing.assert_allclose(labels.scale, (2.0, 0.5, 0.5))
