"""The Dask/OME-Zarr path: same output as the single-process path with every option, resumable,
refuses mixed runs. (Reading zarr inputs, the store's layout and convert on their own: tests/io/test_zarr.py.)"""

import json

import numpy as np
import pytest
import tifffile

from tests.helpers import assert_ids_unique_across_slices, assert_user_error, run

pytest.importorskip("dask")
zarr = pytest.importorskip("zarr")


@pytest.fixture
def chunky_stack(tmp_path):
    # 300 x 260 planes in chunks of 112 (100 rounded to the step; tiles of 236 -> 52 px): chunk borders are not
    # tile borders
    data = np.random.default_rng(4).integers(0, 256, (3, 300, 260), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data, photometric="minisblack", resolution=(2000.0, 2000.0),
                     resolutionunit="CENTIMETER")
    return tmp_path / "stack.tif"


def single_process(tmp_path, stack, checkpoint, name="single.tif"):
    out = tmp_path / name
    result = run("predict", stack, "-o", out, "-m", checkpoint, "--tile", 236, "--output-type", "float16", "-q")
    assert result.exit_code == 0, result.output
    return tifffile.imread(out).astype(np.float32)


def test_two_local_workers_match_the_single_process_path(tmp_path, chunky_stack, tiny_checkpoint):
    store = tmp_path / "out.ome.zarr"
    result = run("predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, "--tile", 236, "--output-type",
                 "float16", "--chunk", 100, "--workers", 2)
    assert result.exit_code == 0, result.output
    array = zarr.open_array(str(store / "0"), mode="r")
    assert array.shape == (3, 300, 260) and array.chunks == (1, 112, 112)
    assert np.abs(array[:].astype(np.float32) - single_process(tmp_path, chunky_stack, tiny_checkpoint)).max() <= 1e-3
    attrs = json.loads((store / ".zattrs").read_text())["multiscales"][0]
    assert [axis["name"] for axis in attrs["axes"]] == ["z", "y", "x"] and attrs["datasets"][0]["path"] == "0"
    assert attrs["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 5.0, 5.0]  # 2000 px/cm = 5 um
    # back to a BigTIFF
    assert run("convert", store, tmp_path / "back.tif").exit_code == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "back.tif"), array[:])
    assert_user_error(run("predict", chunky_stack, "-o", store, "-m", tiny_checkpoint), "already exists")


def test_planes_smaller_than_the_model_context(tmp_path, uint8_stack, tiny_checkpoint):
    """70 x 91 planes against 96 px of context: one chunk per axis, mirrored like the TIFF path
    (dask's map_overlap refuses a depth larger than the array: it used to end in its traceback)."""
    store = tmp_path / "small.ome.zarr"
    result = run("predict", uint8_stack, "-o", store, "-m", tiny_checkpoint, "--tile", 236, "--output-type",
                 "float16", "-q")
    assert result.exit_code == 0, result.output
    array = zarr.open_array(str(store / "0"), mode="r")[:].astype(np.float32)
    assert np.abs(array - single_process(tmp_path, uint8_stack, tiny_checkpoint)).max() <= 1e-3


@pytest.mark.parametrize("output", ["float16", "instances"])
def test_interrupted_run_resumes_to_the_same_output(tmp_path, chunky_stack, tiny_checkpoint, monkeypatch, output):
    import segkit.inference.pipeline  # noqa: F401 - imported before the patch below, so it keeps the real predict_planes
    from segkit.inference import tiler

    option = ["--instances"] if output == "instances" else ["--output-type", "float16"]
    assert run("predict", chunky_stack, "-o", tmp_path / "single.tif", "-m", tiny_checkpoint, "--tile", 236, *option,
               "-q").exit_code == 0
    reference = tifffile.imread(tmp_path / "single.tif")
    original, calls = tiler.predict_planes, []

    def dies_after_four(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("worker killed")
        return original(*args, **kwargs)

    store = tmp_path / "out.ome.zarr"
    args = ["predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, "--tile", 236, *option, "--chunk", 100]
    monkeypatch.setattr(tiler, "predict_planes", dies_after_four)
    result = run(*args)
    assert result.exit_code != 0 and "worker killed" in str(result.exception)
    monkeypatch.setattr(tiler, "predict_planes", original)
    partial = tmp_path / "out.ome.zarr.partial"
    assert partial.exists() and not store.exists()  # an unfinished store never looks finished
    written = len(list((partial / "segkit_done").iterdir()))
    assert 0 < written < 12  # 3 planes x 2 x 2 chunks (the short last chunks merge into their neighbours)
    assert not (partial / "segkit_labels_done").exists()  # instances: no plane's watershed before all its chunks
    assert_user_error(run(*args), "interrupted run", "--resume")
    result = run(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{written} chunks already written" in result.stderr
    array = zarr.open_array(str(store / ("labels/instances/0" if output == "instances" else "0")), mode="r")[:]
    if output == "instances":
        np.testing.assert_array_equal(array, reference)
        assert_ids_unique_across_slices(array)  # the resumed run's offsets are the uninterrupted run's
    else:
        assert np.abs(array.astype(np.float32) - reference.astype(np.float32)).max() <= 1e-3


def test_resume_refuses_another_model_or_settings(tmp_path, chunky_stack, tiny_checkpoint, monkeypatch):
    import torch

    import segkit.inference.pipeline  # noqa: F401 - imported before the patch below, so it keeps the real predict_planes
    from segkit.checkpoint import save_checkpoint
    from segkit.inference import tiler
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    def interrupted(*args, **kwargs):
        raise RuntimeError("stop")

    store = tmp_path / "out.ome.zarr"
    monkeypatch.setattr(tiler, "predict_planes", interrupted)
    assert run("predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, "--tile", 236, "--chunk", 100).exit_code
    monkeypatch.undo()
    torch.manual_seed(1)
    other = create_model("unet", base=4, depth=4)
    save_checkpoint(tmp_path / "other.safetensors", other, CheckpointInfo(
        "segmenter", "unet", {"base": 4, "depth": 4}, other.geometry, Normalization(120.0, 40.0)))
    assert_user_error(run("predict", chunky_stack, "-o", store, "-m", tmp_path / "other.safetensors", "--tile", 236,
                          "--chunk", 100, "--resume"), "another model")
    common = ["predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, "--chunk", 100, "--resume"]
    for other in (["--tile", 220], ["--tta", "flips"], ["--instances"], ["--engine", "onnx"], ["--threshold", 0.5],
                  ["--output-type", "float16"], ["--normalize", "stack"]):
        assert_user_error(run(*common, "--tile", 236, *other), "other settings")
    assert run(*common, "--tile", 236, "-q").exit_code == 0  # the same settings finish it


def test_dask_path_option_errors(tmp_path, chunky_stack, tiny_checkpoint):
    assert_user_error(run("predict", chunky_stack, "-o", tmp_path / "x.tif", "--workers", 2), "NAME.ome.zarr")
    assert_user_error(run("predict", chunky_stack, chunky_stack, "-o", tmp_path / "x.ome.zarr"), "one stack")
    assert_user_error(run("predict", chunky_stack, "-o", tmp_path / "x.ome.zarr", "-m", tiny_checkpoint, "--tile",
                          230), "use --tile 220 or 236")
    # an ONNX graph fixed to its export tile: checked before any store is made, and its tile is the default
    fixed = tmp_path / "fixed.onnx"
    assert run("export", tiny_checkpoint, "-o", fixed, "--tile", 220, "--fixed-tile").exit_code == 0
    assert_user_error(run("predict", chunky_stack, "-o", tmp_path / "x.ome.zarr", "-m", fixed, "--tile", 236),
                      "220 px only")
    assert not list(tmp_path.glob("x.ome.zarr*"))
    result = run("predict", chunky_stack, "-o", tmp_path / "f.ome.zarr", "-m", fixed, "--chunk", 100)
    assert result.exit_code == 0 and "tile 220" in result.stderr, result.output


# every option of the single-process path works on the Dask path and gives the same output there: a valid-conv
# model, chunk borders that are not tile borders (local threads here; real workers above)
OPTIONS = {
    "tta flips": ["--tta", "flips"],
    "instances": ["--instances"],
    "onnx engine": ["--engine", "onnx"],
    "threshold": ["--threshold", "0.5"],
    "tile auto": ["--tile", "auto"],
    "denoise": ["--denoise"],  # + a denoiser checkpoint; the pair's default tile (276, not the segmenter's 236)
}


@pytest.mark.parametrize("option", OPTIONS)
def test_dask_path_options_match_the_single_process_path(tmp_path, chunky_stack, tiny_checkpoint, option,
                                                        monkeypatch, request):
    from segkit.inference.engines import OnnxEngine

    options = OPTIONS[option] + ([request.getfixturevalue("tiny_denoiser")] if option == "denoise" else [])
    onnx_tiles, onnx_call = [], OnnxEngine.__call__
    monkeypatch.setattr(OnnxEngine, "__call__", lambda engine, x: onnx_tiles.append(len(x)) or onnx_call(engine, x))
    tile = [] if option in ("tile auto", "denoise") else ["--tile", 236]
    single = tmp_path / "single.tif"
    result = run("predict", chunky_stack, "-o", single, "-m", tiny_checkpoint, *tile, *options, "-q")
    assert result.exit_code == 0, result.output
    store = tmp_path / "out.ome.zarr"
    onnx_tiles.clear()
    result = run("predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, *tile, *options, "--chunk", 100)
    assert result.exit_code == 0, result.output
    dask_onnx_tiles = sum(onnx_tiles)
    expected = tifffile.imread(single)
    array = zarr.open_array(str(store / ("labels/instances/0" if option == "instances" else "0")), mode="r")
    assert array.shape == expected.shape and array.dtype == expected.dtype and array.chunks[1] < 300
    written = array[:]
    if option == "instances":
        assert written.dtype == np.uint32 and len(np.unique(written)) > 10  # real segments, not one blob
        np.testing.assert_array_equal(written, expected)
        assert_ids_unique_across_slices(written)  # both paths (they are equal)
        # the ids before their offsets and the float32 probabilities the watershed read: gone when finished
        assert not (store / "segkit_slice_labels").exists() and not (store / "probability").exists()
        # the store's image: the probabilities the labels were cut from, as uint8
        probability = zarr.open_array(str(store / "0"), mode="r")[:]
        reference = single_process(tmp_path, chunky_stack, tiny_checkpoint, name="probability.tif")
        assert probability.dtype == np.uint8 and np.abs(probability / 255.0 - reference).max() <= 0.5 / 255 + 1e-3
    elif option == "threshold":
        assert set(np.unique(written)) == {0, 255}
        assert (written != expected).mean() < 1e-4  # only pixels within float rounding of the threshold may differ
        # a mask is classes, as on the TIFF path: its pyramid takes every second pixel (no 64, 128, 191)
        from segkit.io.calibration import read_content

        assert read_content(store) == "classes"
        level1 = zarr.open_array(str(store / "1"), mode="r")[:]
        np.testing.assert_array_equal(level1, written[:, ::2, ::2])
    else:
        assert written.dtype == np.uint8 and np.ptp(written) > 0
        assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    if option == "tile auto":
        assert "tile auto: tile" in result.stderr
    if option == "denoise":
        assert "tile 276" in result.stderr
    if option == "onnx engine":
        assert dask_onnx_tiles > 0  # the chunks ran on onnxruntime


def test_worker_device_round_robin():
    from segkit.inference.distributed import worker_device

    # LocalCluster names its workers 0, 1, ...; dask-worker --name gives strings
    assert [worker_device("cuda", i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [worker_device("cuda", i, 4) for i in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0",
                                                                "cuda:1"]
    assert [worker_device("cuda", str(i), 4) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert worker_device("cuda", "gpu-node-3", 2) == "cuda:1"
    assert worker_device("auto", 3, 2) == "cuda:1"  # auto on a machine with several GPUs
    # one GPU (or dask-cuda's one visible GPU per worker): every worker on it
    assert {worker_device("cuda", i, 1) for i in range(3)} == {"cuda"}
    assert worker_device("auto", 1, 1) == "auto" and worker_device("auto", 1, 0) == "auto"
    # a worker named by its address has no index: a fixed GPU of those present
    address = "tcp://10.0.0.7:40123"
    assert worker_device("cuda", address, 4) == worker_device("cuda", address, 4) in {f"cuda:{i}" for i in range(4)}
    # an explicit GPU, the CPU, or no Dask worker (local threads): as asked
    assert worker_device("cuda:1", 0, 4) == "cuda:1"
    assert worker_device("cpu", 3, 4) == "cpu"
    assert worker_device("cuda", None, 4) == "cuda"


def test_zarr_and_ome_zarr_inputs(tmp_path, chunky_stack, tiny_checkpoint):
    data = tifffile.imread(chunky_stack)
    zarr.save_array(str(tmp_path / "raw.zarr"), data, zarr_format=2)
    group = zarr.open_group(str(tmp_path / "raw.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, chunks=(1, 128, 128), dtype=data.dtype)[:] = data
    reference = single_process(tmp_path, chunky_stack, tiny_checkpoint)
    for source, tile in (("raw.zarr", 236), ("raw.ome.zarr", 236), ("raw.zarr", "auto")):  # auto: measured on zarr
        out = tmp_path / f"out_{tile}_{source}"
        result = run("predict", tmp_path / source, "-o", out, "-m", tiny_checkpoint, "--tile", tile,
                     "--output-type", "float16", "--chunk", 100)
        assert result.exit_code == 0, result.output
        assert np.abs(zarr.open_array(str(out / "0"), mode="r")[:].astype(np.float32) - reference).max() <= 1e-3
    assert_user_error(run("predict", tmp_path / "raw.zarr", "-o", tmp_path / "raw.zarr", "-m", tiny_checkpoint),
                      "would replace its input")
