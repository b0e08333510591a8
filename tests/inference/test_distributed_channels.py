"""The Dask / OME-Zarr path with a channel axis: a K-class model's probabilities as a CZYX store (the
TIFF path's ZCYX values), resumable, converted back to a ZCYX TIFF; an object model's watershed on
whole planes; a CZYX store refused as prediction input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import segkit
from segkit.checkpoint import save_checkpoint
from segkit.errors import InputError, OutputExistsError
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults

pytest.importorskip("dask")
zarr = pytest.importorskip("zarr")

from segkit.io.zarr import convert_zarr_to_tiff, ome_zarr_attributes  # noqa: E402  (after the skip)

quiet = dict(report=lambda _: None)
#: a depth-2 U-Net (context 20 px) on 130 x 110 planes in chunks of 52 px: 3 x 2 chunks per plane, borders
#: that are not tile borders, a short last chunk kept (26 px) and one merged into its neighbour (6 px)
CHUNK = dict(tile=92, chunk=40, device="cpu")
NAMES = {"semantic": ["background", "myelin", "axon"], "instances": ["background", "interior", "boundary"]}


def _checkpoint(tmp_path, kind: str, watershed: dict | None = None):
    import torch

    from segkit.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", base=4, depth=2, classes=3).eval()
    info = CheckpointInfo(kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 2, "classes": 3},
                          geometry=model.geometry, normalization=Normalization(120.0, 40.0), classes=NAMES[kind],
                          inference=InferenceDefaults(tile=92, labels_kind=kind, input_dtype="uint8",
                                                      watershed=watershed))
    path = tmp_path / f"{kind}.safetensors"
    save_checkpoint(path, model, info)
    return path


@pytest.fixture
def stack(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, (2, 130, 110), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data, photometric="minisblack", resolution=(2000.0, 2000.0),
                     resolutionunit="CENTIMETER")
    return tmp_path / "stack.tif"


@pytest.fixture
def semantic(tmp_path):
    return _checkpoint(tmp_path, "semantic")


def _tiff_path(tmp_path, stack, checkpoint, name="single.tif"):
    segkit.predict(stack, tmp_path / name, model=checkpoint, tile=92, device="cpu", **quiet)
    with tifffile.TiffFile(tmp_path / name) as tif:
        return tif.series[0].axes, tif.asarray()


def test_k_class_model_writes_a_czyx_store_equal_to_the_tiff_path(tmp_path, stack, semantic):
    axes, expected = _tiff_path(tmp_path, stack, semantic)
    assert axes == "ZCYX" and expected.shape == (2, 3, 130, 110)
    store = tmp_path / "out.ome.zarr"
    result = segkit.predict(stack, store, model=semantic, **CHUNK, **quiet)
    assert result.outputs == [store] and "Dask" in result.engine
    array = zarr.open_array(str(store / "0"), mode="r")
    assert array.shape == (3, 2, 130, 110) and array.chunks == (1, 1, 52, 52) and array.dtype == np.uint8
    written = array[:]
    assert np.ptp(written) > 0
    # the last chunks' tiles reach past the volume's end: their extra is the plane's mirror, as on the TIFF
    # path (it used to mirror the window's mirrored context back: up to 9 levels off in the last 2 px)
    assert np.abs(written.astype(int) - expected.transpose(1, 0, 2, 3).astype(int)).max() <= 1
    attrs = json.loads((store / ".zattrs").read_text())
    multiscales = attrs["multiscales"][0]
    assert [(a["name"], a["type"]) for a in multiscales["axes"]] == [("c", "channel"), ("z", "space"),
                                                                     ("y", "space"), ("x", "space")]
    assert multiscales["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 5.0, 5.0]
    assert [c["label"] for c in attrs["omero"]["channels"]] == NAMES["semantic"]
    # back to a TIFF: ZCYX, channel fastest, the TIFF path's layout
    back = convert_zarr_to_tiff(store, tmp_path / "back.tif")
    with tifffile.TiffFile(back) as tif:
        assert tif.series[0].axes == "ZCYX" and len(tif.pages) == 6
        np.testing.assert_array_equal(tif.asarray(), written.transpose(1, 0, 2, 3))
        np.testing.assert_array_equal(tif.pages[1].asarray(), written[1, 0])  # z0 c1: channel fastest


def test_one_class_and_argmax_specs(tmp_path, stack, semantic):
    """One class's probability keeps a ZYX store; argmax writes the class map as the label image
    labels/classes (ZYX uint8), under an image of every class's uint8 probability (predict_to_zarr given
    the spec directly)."""
    from segkit.inference.distributed import predict_to_zarr
    from segkit.inference.encodings import ClassMapEncoding, ProbabilityEncoding
    from segkit.inference.loading import EngineRequest
    from segkit.inference.options import PredictOptions

    _, probabilities = _tiff_path(tmp_path, stack, semantic)
    request = EngineRequest(semantic, PredictOptions(device="cpu", chunk=40))
    for name, spec, expected in (("argmax", ClassMapEncoding(), probabilities.argmax(1)),
                                 ("axon", ProbabilityEncoding(channel=2), probabilities[:, 2])):
        store = predict_to_zarr(str(stack), tmp_path / f"{name}.ome.zarr", request, tile=92, spec=spec,
                                report=lambda _: None)
        axes = json.loads((store / ".zattrs").read_text())["multiscales"][0]["axes"]
        if name == "argmax":
            classes = zarr.open_array(str(store / "labels" / "classes" / "0"), mode="r")
            assert classes.shape == (2, 130, 110) and classes.chunks == (1, 52, 52) and classes.dtype == np.uint8
            # the class map is the argmax of float probabilities, the TIFF's of uint8 ones, which tie more often
            assert (classes[:] == expected).mean() > 0.99
            image = zarr.open_array(str(store / "0"), mode="r")
            assert image.shape == (3, 2, 130, 110) and image.dtype == np.uint8
            assert np.abs(image[:].astype(int) - probabilities.transpose(1, 0, 2, 3).astype(int)).max() <= 1
            assert [a["name"] for a in axes] == ["c", "z", "y", "x"]
            label = json.loads((store / "labels" / "classes" / ".zattrs").read_text())
            assert [p["class"] for p in label["image-label"]["properties"]] == NAMES["semantic"]
        else:
            written = zarr.open_array(str(store / "0"), mode="r")
            assert written.shape == (2, 130, 110) and written.chunks == (1, 52, 52)
            assert np.abs(written[:].astype(int) - expected.astype(int)).max() <= 1
            assert [a["name"] for a in axes] == ["z", "y", "x"] and not (store / "labels").exists()


def test_float16_channels_and_an_interrupted_run_resumes(tmp_path, stack, semantic, monkeypatch):
    import segkit.inference.pipeline  # noqa: F401 - imported before the patch below, so it keeps the real predict_planes
    from segkit.inference import tiler

    segkit.predict(stack, tmp_path / "single.tif", model=semantic, tile=92, device="cpu", output_type="float16",
                   **quiet)
    expected = tifffile.imread(tmp_path / "single.tif").transpose(1, 0, 2, 3).astype(np.float32)
    original, calls = tiler.predict_planes, []

    def dies_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("worker killed")
        return original(*args, **kwargs)

    store = tmp_path / "out.ome.zarr"
    options = dict(model=semantic, output_type="float16", **CHUNK)
    monkeypatch.setattr(tiler, "predict_planes", dies_after_five)
    with pytest.raises(RuntimeError, match="worker killed"):
        segkit.predict(stack, store, **options, **quiet)
    monkeypatch.setattr(tiler, "predict_planes", original)
    partial = tmp_path / "out.ome.zarr.partial"
    assert partial.exists() and not store.exists()
    written = len(list((partial / "segkit_done").iterdir()))
    assert 0 < written < 12  # 2 planes x 3 x 2 chunks
    with pytest.raises(OutputExistsError, match="interrupted run"):
        segkit.predict(stack, store, **options, **quiet)
    heard: list[str] = []
    calls.clear()
    monkeypatch.setattr(tiler, "predict_planes", lambda *a, **k: calls.append(1) or original(*a, **k))
    segkit.predict(stack, store, **options, resume=True, report=heard.append)
    assert any(f"{written} chunks already written" in line for line in heard)
    assert len(calls) == 12 - written  # chunks already written are skipped
    array = zarr.open_array(str(store / "0"), mode="r")
    assert array.shape == (3, 2, 130, 110) and array.dtype == np.float16
    assert np.abs(array[:].astype(np.float32) - expected).max() <= 1e-3


def test_object_model_labels_whole_planes_on_dask(tmp_path, stack):
    from segkit.instances import ObjectParams

    params = ObjectParams(seed_threshold=0.2, seed_distance=0.0, min_seed_size=1, min_size=0)
    checkpoint = _checkpoint(tmp_path, "instances", watershed=params.to_dict())
    _, expected = _tiff_path(tmp_path, stack, checkpoint)
    assert expected.dtype == np.uint32 and expected.shape == (2, 130, 110) and expected.max() > 1  # real objects
    store = tmp_path / "objects.ome.zarr"
    segkit.predict(stack, store, model=checkpoint, **CHUNK, **quiet)
    labels = zarr.open_array(str(store / "labels" / "objects" / "0"), mode="r")
    assert labels.shape == (2, 130, 110) and labels.dtype == np.uint32
    np.testing.assert_array_equal(labels[:], expected)
    # the image: the background / interior / boundary probabilities the watershed read, as uint8
    image = zarr.open_array(str(store / "0"), mode="r")
    assert image.shape == (3, 2, 130, 110) and image.chunks == (1, 1, 52, 52) and image.dtype == np.uint8
    attrs = json.loads((store / ".zattrs").read_text())
    assert [c["label"] for c in attrs["omero"]["channels"]] == NAMES["instances"]
    assert attrs["segkit"]["content"] == "probabilities"
    assert json.loads((store / "labels" / ".zattrs").read_text())["labels"] == ["objects"]
    # the float32 probabilities and the markers of the watershed stage are gone from the finished store
    assert sorted(p.name for p in store.iterdir()) == [".zattrs", ".zgroup", "0", "1", "2", "labels"]


def test_channel_store_refused_as_input_and_attributes(tmp_path, stack, semantic):
    store = tmp_path / "probs.ome.zarr"
    segkit.predict(stack, store, model=semantic, **CHUNK, **quiet)
    with pytest.raises(InputError, match="has a channel axis .* pass a YX or ZYX array"):
        segkit.predict(store, tmp_path / "again.ome.zarr", model=semantic, **CHUNK, **quiet)
    attrs = ome_zarr_attributes((3, 2, 30, 40), None)
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["channel 0", "channel 1", "channel 2"]  # unnamed
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0, 1.0]
    assert [a["name"] for a in ome_zarr_attributes((2, 30, 40), None)["multiscales"][0]["axes"]] == ["z", "y", "x"]


def test_a_same_padding_model_without_a_halo_runs_on_the_dask_path(tmp_path, stack):
    """--halo 0 gives chunks no context: each chunk is predicted from its own pixels (it was an empty slice)."""
    import torch

    from segkit.models import create_model

    torch.manual_seed(0)
    kwargs = {"width": 4, "fc": 16, "halo": 16, "classes": 2}
    model = create_model("fcn8s", **kwargs).eval()
    info = CheckpointInfo(kind="segmenter", model="fcn8s", model_kwargs=kwargs, geometry=model.geometry,
                          normalization=Normalization(120.0, 40.0), classes=["background", "membrane"],
                          inference=InferenceDefaults(tile=64, labels_kind="membrane", input_dtype="uint8"))
    checkpoint = tmp_path / "fcn.safetensors"
    save_checkpoint(checkpoint, model, info)
    store = tmp_path / "out.ome.zarr"
    segkit.predict(stack, store, model=checkpoint, halo=0, tile=64, chunk=64, device="cpu", report=lambda _: None)
    written = zarr.open_array(str(store / "0"), mode="r")[:]
    assert written.shape == (2, 130, 110) and written.dtype == np.uint8
