"""The Dask/OME-Zarr path: same output as the single-process path, resumable, refuses mixed runs."""

import json

import numpy as np
import pytest
import tifffile

from tests.test_cli import assert_user_error, run

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


def single_process(tmp_path, stack, checkpoint):
    out = tmp_path / "single.tif"
    assert run("predict", stack, "-o", out, "-m", checkpoint, "--tile", 236, "--output-type", "float16",
               "-q").exit_code == 0
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


def test_interrupted_run_resumes_to_the_same_output(tmp_path, chunky_stack, tiny_checkpoint, monkeypatch):
    from segkit.inference import tiler

    reference = single_process(tmp_path, chunky_stack, tiny_checkpoint)
    original, calls = tiler.predict_planes, []

    def dies_after_four(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("worker killed")
        return original(*args, **kwargs)

    store = tmp_path / "out.ome.zarr"
    args = ["predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, "--tile", 236, "--output-type", "float16",
            "--chunk", 100]
    monkeypatch.setattr(tiler, "predict_planes", dies_after_four)
    result = run(*args)
    assert result.exit_code != 0 and "worker killed" in str(result.exception)
    monkeypatch.setattr(tiler, "predict_planes", original)
    partial = tmp_path / "out.ome.zarr.partial"
    assert partial.exists() and not store.exists()  # an unfinished store never looks finished
    written = len(list((partial / "segkit_done").iterdir()))
    assert 0 < written < 12  # 3 planes x 2 x 2 chunks (the short last chunks merge into their neighbours)
    assert_user_error(run(*args), "interrupted run", "--resume")
    result = run(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{written} chunks already written" in result.stderr
    array = zarr.open_array(str(store / "0"), mode="r")[:].astype(np.float32)
    assert np.abs(array - reference).max() <= 1e-3


def test_resume_refuses_another_model_or_settings(tmp_path, chunky_stack, tiny_checkpoint, monkeypatch):
    import torch

    from segkit.checkpoint import CheckpointInfo, Normalization, save_checkpoint
    from segkit.inference import tiler
    from segkit.models import create_model

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
    assert_user_error(run("predict", chunky_stack, "-o", store, "-m", tiny_checkpoint, "--tile", 220, "--chunk", 100,
                          "--resume"), "other settings")


def test_dask_path_option_errors(tmp_path, chunky_stack, tiny_checkpoint):
    assert_user_error(run("predict", chunky_stack, "-o", tmp_path / "x.tif", "--workers", 2), "-o NAME.ome.zarr")
    assert_user_error(run("predict", chunky_stack, "-o", tmp_path / "x.ome.zarr", "--tta", "d4"), "--tta")
    assert_user_error(run("convert", tmp_path / "missing.ome.zarr", tmp_path / "x.tif"), "not a segkit OME-Zarr")


def test_zarr_and_ome_zarr_inputs(tmp_path, chunky_stack, tiny_checkpoint):
    data = tifffile.imread(chunky_stack)
    zarr.save_array(str(tmp_path / "raw.zarr"), data, zarr_format=2)
    group = zarr.open_group(str(tmp_path / "raw.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, chunks=(1, 128, 128), dtype=data.dtype)[:] = data
    reference = single_process(tmp_path, chunky_stack, tiny_checkpoint)
    for source in ("raw.zarr", "raw.ome.zarr"):
        out = tmp_path / f"out_{source}"
        result = run("predict", tmp_path / source, "-o", out, "-m", tiny_checkpoint, "--tile", 236,
                     "--output-type", "float16", "--chunk", 100)
        assert result.exit_code == 0, result.output
        assert np.abs(zarr.open_array(str(out / "0"), mode="r")[:].astype(np.float32) - reference).max() <= 1e-3
    zarr.save_array(str(tmp_path / "rgb.zarr"), np.zeros((2, 8, 8, 3), np.uint8), zarr_format=2)
    assert_user_error(run("predict", tmp_path / "rgb.zarr", "-o", tmp_path / "x.ome.zarr", "-m", tiny_checkpoint),
                      "YX or ZYX array")
    assert_user_error(run("predict", tmp_path / "raw.zarr", "-o", tmp_path / "raw.zarr", "-m", tiny_checkpoint),
                      "would replace its input")
    with_nan = np.ones((1, 40, 40), np.float32)
    with_nan[0, 3, 3] = np.nan
    zarr.save_array(str(tmp_path / "nan.zarr"), with_nan, zarr_format=2)
    assert_user_error(run("predict", tmp_path / "nan.zarr", "-o", tmp_path / "y.ome.zarr", "-m", tiny_checkpoint),
                      "NaN or inf")
