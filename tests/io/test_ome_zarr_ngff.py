"""The OME-Zarr stores of the Dask path, checked by the libraries users open them with: ome-zarr-models'
NGFF 0.4 validator and ome-zarr-py's reader (what napari-ome-zarr runs). Every kind of output
(probabilities, K-class probabilities, classes, instances, objects): an image pyramid with the input's
x / y / z scale and unit at every level, labels in labels/<name> with image-label metadata, nothing else
in the finished store; the scale of an OME-Zarr input carried; the progress bar moving per chunk; the
pyramid stage resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import segkit
from segkit.checkpoint import save_checkpoint
from segkit.errors import SegkitError
from segkit.io.calibration import Calibration, read_content, zarr_calibration
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults
from tests.helpers import assert_ids_unique_across_slices, run

pytest.importorskip("dask")
zarr = pytest.importorskip("zarr")
ome_zarr_models = pytest.importorskip("ome_zarr_models")
pytest.importorskip("ome_zarr")

from ome_zarr.format import FormatV04  # noqa: E402  (after the skips: optional packages)
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Label, Multiscales, Reader  # noqa: E402
from ome_zarr_models.v04.image import Image  # noqa: E402
from ome_zarr_models.v04.image_label import ImageLabel  # noqa: E402

from segkit.io.ngff import validate_store  # noqa: E402
from segkit.io.pyramid import halve  # noqa: E402

quiet = dict(report=lambda _: None)
#: depth-2 U-Nets (context 20 px) on 2 x 130 x 110 planes in chunks of 52 px: 3 x 2 chunks per plane, a
#: pyramid of 3 levels (130 x 110, 65 x 55, 33 x 28: the last fits in one chunk)
CHUNK = dict(tile=92, chunk=40, device="cpu")
LEVELS = [(130, 110), (65, 55), (33, 28)]
NAMES = {"semantic": ["background", "myelin", "axon"], "instances": ["background", "interior", "boundary"]}
#: the ImageJ calibration of the input: 4 nm pixels, 40 nm slices
NM = Calibration(4.0, 4.0, 40.0, "nanometer")


def _checkpoint(tmp_path, kind: str, **inference):
    import torch

    from segkit.instances import ObjectParams
    from segkit.models import create_model

    torch.manual_seed(0)
    classes = 2 if kind == "membrane" else 3
    if kind == "instances":  # seeds an untrained model's probabilities still give
        inference["watershed"] = ObjectParams(seed_threshold=0.2, seed_distance=0.0, min_seed_size=1,
                                              min_size=0).to_dict()
    model = create_model("unet", base=4, depth=2, classes=classes).eval()
    info = CheckpointInfo(kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 2, "classes": classes},
                          geometry=model.geometry, normalization=Normalization(120.0, 40.0),
                          classes=NAMES.get(kind, ["background", "membrane"]),
                          inference=InferenceDefaults(tile=92, labels_kind=kind, input_dtype="uint8", **inference))
    path = tmp_path / f"{kind}.safetensors"
    save_checkpoint(path, model, info)
    return path


@pytest.fixture
def stack(tmp_path):
    """An ImageJ hyperstack calibrated in nanometres (x, y 4 nm; z spacing 40 nm)."""
    data = np.random.default_rng(5).integers(0, 256, (2, 130, 110), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"axes": "ZYX", "unit": "nm", "spacing": 40.0})
    return path


# output name -> (checkpoint kind, predict options, channels of the image, the label image or None)
OUTPUTS = {
    "probabilities": ("membrane", {}, 1, None),
    "k-class probabilities": ("semantic", {}, 3, None),
    "classes": ("semantic", {"argmax": True}, 3, "classes"),
    "instances": ("membrane", {"instances": True}, 1, "instances"),
    "objects": ("instances", {}, 3, "objects"),
}


def _reader_nodes(store):
    return list(Reader(parse_url(str(store), fmt=FormatV04()))())


def _scales(metadata):
    return [[t for t in transforms if t["type"] == "scale"][0]["scale"] for transforms in
            metadata["coordinateTransformations"]]


@pytest.mark.parametrize("output", OUTPUTS)
def test_every_output_is_valid_ngff_and_opens_in_ome_zarr_py(tmp_path, stack, output):
    kind, options, channels, label = OUTPUTS[output]
    store = tmp_path / "out.ome.zarr"
    segkit.predict(stack, store, model=_checkpoint(tmp_path, kind), **options, **CHUNK, **quiet)

    # ome-zarr-models: the image (its arrays exist, as many dimensions as axes, ...) and its label image
    image = Image.from_zarr(zarr.open_group(str(store), mode="r"))
    assert isinstance(ome_zarr_models.open_ome_zarr(zarr.open_group(str(store), mode="r")), Image)
    assert [d.path for d in image.datasets[0]] == ["0", "1", "2"]
    if label:
        assert list(image.labels.attributes.labels) == [label]
        label_model = ImageLabel.from_zarr(zarr.open_group(str(store / "labels" / label), mode="r"))
        assert label_model.attributes.image_label.version == "0.4"
    else:
        assert image.labels is None
    assert validate_store(store) == ([label] if label else [])

    # ome-zarr-py's reader, as napari-ome-zarr calls it: the image with its pyramid and scale per level
    nodes = _reader_nodes(store)
    first = nodes[0]
    assert first.load(Multiscales) is not None and first.load(Label) is None
    lead = (channels,) if channels > 1 else ()
    assert [tuple(level.shape) for level in first.data] == [(*lead, 2, *plane) for plane in LEVELS]
    assert [axis["name"] for axis in first.metadata["axes"]] == (["c"] if channels > 1 else []) + ["z", "y", "x"]
    assert [axis.get("unit") for axis in first.metadata["axes"]][-3:] == ["nanometer"] * 3
    assert _scales(first.metadata) == [[1.0] * len(lead) + [40.0, 4.0 * 2**k, 4.0 * 2**k] for k in range(3)]
    if channels > 1:
        assert first.metadata["channel_names"] == NAMES[kind]
    labelled = [node for node in nodes if node.load(Label) is not None]
    if label:
        (node,) = labelled
        assert node.metadata["name"] == label
        assert [tuple(level.shape) for level in node.data] == [(2, *plane) for plane in LEVELS]
        assert _scales(node.metadata) == [[40.0, 4.0 * 2**k, 4.0 * 2**k] for k in range(3)]
        ids = np.asarray(node.data[0])
        assert ids.dtype == (np.uint8 if label == "classes" else np.uint32) and ids.max() > 0
        # nearest levels: every second pixel of the level before, no new values
        np.testing.assert_array_equal(np.asarray(node.data[1]), ids[:, ::2, ::2])
        np.testing.assert_array_equal(np.asarray(node.data[2]), np.asarray(node.data[1])[:, ::2, ::2])
        if label == "classes":
            assert {v: p["class"] for v, p in node.metadata["properties"].items()} == dict(enumerate(NAMES[kind]))
        else:
            assert_ids_unique_across_slices(ids)
        assert read_content(store / "labels") == ("classes" if label == "classes" else "labels")
    else:
        assert not labelled
    # mean levels: the mean of each 2 x 2 block of the level before (in float, rounded back)
    level0, level1 = np.asarray(first.data[0]), np.asarray(first.data[1])
    blocks = level0.astype(np.float32).reshape(*level0.shape[:-2], 65, 2, 55, 2).mean(axis=(-3, -1))
    expected = np.rint(blocks) if level0.dtype == np.uint8 else blocks
    np.testing.assert_allclose(level1.astype(np.float32), expected, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(first.data[2]), halve(level1, "mean"))

    # segkit's own readers: the content and the calibration
    assert read_content(store) == "probabilities"
    assert zarr_calibration(store) == NM
    # the finished store holds the output only: no float32 probabilities, slice labels, markers or manifest
    assert sorted(p.name for p in store.iterdir()) == sorted([".zattrs", ".zgroup", "0", "1", "2"]
                                                             + (["labels"] if label else []))
    mark = json.loads((store / ".zattrs").read_text())["segkit"]
    assert mark["complete"] is True and mark["run"]["tile"] == 92  # the run's manifest, as provenance
    if label:  # `segkit convert --labels` streams the label image to a TIFF
        result = run("convert", store, tmp_path / "labels.tif", "--labels")
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), ids)


def test_an_ome_zarr_input_keeps_its_scale(tmp_path, stack):
    """An OME-Zarr written by ome-zarr-py (level 0 at 's0', 0.25 um pixels, 0.5 um slices): the output carries
    its scale and units."""
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(tmp_path / "in.ome.zarr"), mode="w", zarr_format=2)
    write_image(tifffile.imread(stack), group, scale_factors=(2,), fmt=FormatV04(), axes="zyx",
                scale={"z": 0.5, "y": 0.25, "x": 0.25}, axes_units=dict.fromkeys("zyx", "micrometer"))
    store = tmp_path / "out.ome.zarr"
    segkit.predict(tmp_path / "in.ome.zarr", store, model=_checkpoint(tmp_path, "membrane"), **CHUNK, **quiet)
    assert zarr_calibration(store) == Calibration(0.25, 0.25, 0.5, "micrometer")
    (node, *_) = _reader_nodes(store)
    assert _scales(node.metadata)[:2] == [[0.5, 0.25, 0.25], [0.5, 0.5, 0.5]]
    assert [axis.get("unit") for axis in node.metadata["axes"]] == ["micrometer"] * 3


def test_an_uncalibrated_input_has_no_unit(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (1, 130, 110), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack")
    store = tmp_path / "out.ome.zarr"
    segkit.predict(tmp_path / "plain.tif", store, model=_checkpoint(tmp_path, "membrane"), **CHUNK, **quiet)
    multiscales = json.loads((store / ".zattrs").read_text())["multiscales"][0]
    assert [axis.get("unit") for axis in multiscales["axes"]] == [None, None, None]
    assert multiscales["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]
    assert zarr_calibration(store) is None


def test_a_calibrated_input_of_another_pixel_size_than_the_model_is_refused_in_one_line(tmp_path, stack):
    """The Dask path does not resample: an input at 0.004 um for a model trained at 0.008 um says so, before
    any store is made (the TIFF path resamples it)."""
    model = _checkpoint(tmp_path, "membrane", pixel_size=0.008)
    with pytest.raises(SegkitError) as error:
        segkit.predict(stack, tmp_path / "out.ome.zarr", model=model, **CHUNK, **quiet)
    message = str(error.value)
    assert "\n" not in message and "pixel size 0.004 um, the model was trained at 0.008 um" in message
    assert "the Dask path does not rescale" in message and "without workers/scheduler" in message
    assert not list(tmp_path.glob("out.ome.zarr*"))


class Bar:
    """A progress bar as predict sees one (tqdm's reset and update)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.updates: list[int] = []

    def reset(self, total: int | None = None) -> None:
        self.total, self.updates = total, []

    def update(self, n: int = 1) -> None:
        self.updates.append(n)


def _expected_tiles() -> int:
    """The tiles of every chunk (y: 52, 52, 26; x: 52, 58, the 6 px left over joining its neighbour), 2 planes."""
    from segkit.inference.tiler import plan_tiles
    from segkit.models import create_model

    geometry = create_model("unet", base=4, depth=2, classes=2).geometry
    return 2 * sum(plan_tiles((h, w), geometry, tile=92).n_tiles for h in (52, 52, 26) for w in (52, 58))


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", "distributed"])
def test_progress_moves_per_chunk(tmp_path, stack, scheduler):
    import dask

    model = _checkpoint(tmp_path, "membrane")
    bar, store = Bar(), tmp_path / "out.ome.zarr"
    if scheduler == "distributed":  # a dask.distributed cluster (in this process): futures, as_completed
        from distributed import LocalCluster

        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
            segkit.predict(stack, store, model=model, scheduler=cluster.scheduler_address, progress=bar, **CHUNK,
                           **quiet)
    else:
        with dask.config.set(scheduler=scheduler):
            segkit.predict(stack, store, model=model, progress=bar, **CHUNK, **quiet)
    assert bar.total == _expected_tiles() > 0
    assert len(bar.updates) == 12 and sum(bar.updates) == bar.total  # one update per chunk, every tile counted
    assert store.exists()


def test_an_interrupted_pyramid_resumes(tmp_path, stack, monkeypatch):
    """A run stopped while it writes level 1 keeps its chunks and level markers; resumed, it writes the same
    store as an uninterrupted run. A run stopped after it marked the store complete (before its rename)
    finishes on resume."""
    import segkit.inference.pipeline  # noqa: F401 - imported before the patch below, so it keeps the real predict_planes
    from segkit.inference import distributed, tiler

    model = _checkpoint(tmp_path, "membrane")
    options = dict(model=model, instances=True, **CHUNK, **quiet)
    segkit.predict(stack, tmp_path / "whole.ome.zarr", **options)
    original, calls = distributed.write_level_region, []

    def dies_in_level_2(image, level, *args):
        if level == 2:
            raise RuntimeError("worker killed")
        calls.append(level)
        return original(image, level, *args)

    store = tmp_path / "out.ome.zarr"
    monkeypatch.setattr(distributed, "write_level_region", dies_in_level_2)
    with pytest.raises(RuntimeError, match="worker killed"):
        segkit.predict(stack, store, **options)
    partial = tmp_path / "out.ome.zarr.partial"
    assert not store.exists() and len(list((partial / "segkit_done").iterdir())) == 12
    assert sorted(p.name for p in (partial / "segkit_levels_done").iterdir()) == ["image.1", "labels-instances.1"]
    monkeypatch.setattr(distributed, "write_level_region", lambda image, level, *args: calls.append(level) or original(
        image, level, *args))
    calls.clear()
    monkeypatch.setattr(tiler, "predict_planes", lambda *a, **k: pytest.fail("a written chunk ran again"))
    segkit.predict(stack, store, resume=True, **options)
    assert calls.count(1) == 0 and calls.count(2) == 2 * 2  # level 1 was marked done; level 2: 1 chunk x 2 planes x (image, labels)
    for name in ("0", "1", "2", "labels/instances/0", "labels/instances/1", "labels/instances/2"):
        np.testing.assert_array_equal(zarr.open_array(str(store / name), mode="r")[:],
                                      zarr.open_array(str(tmp_path / "whole.ome.zarr" / name), mode="r")[:])
    # stopped between the complete mark and the rename: the scratch is removed and the store renamed on resume
    monkeypatch.undo()
    monkeypatch.setattr(distributed, "validate_store", lambda store: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        segkit.predict(stack, tmp_path / "late.ome.zarr", **options)
    monkeypatch.undo()
    monkeypatch.setattr(tiler, "predict_planes", lambda *a, **k: pytest.fail("a written chunk ran again"))
    segkit.predict(stack, tmp_path / "late.ome.zarr", resume=True, **options)
    assert validate_store(tmp_path / "late.ome.zarr") == ["instances"]
