"""`segkit.predict`, the library's one entry point: one stack, many files into a folder, the output
encodings and compressions, denoisers, engine objects, what it returns and how it fails.
(The Dask path through the same entry point: tests/inference/test_distributed.py.)"""

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

import segkit
from segkit.errors import OutputExistsError, SegkitError
from tests.helpers import assert_plane_matches_library


class Progress:
    """A tqdm-like recorder."""

    def __init__(self):
        self.total, self.done = None, 0

    def reset(self, total=None):
        self.total = total

    def update(self, n=1):
        self.done += n


def predict(sources, output=None, **options):
    """segkit.predict on the CPU, its messages collected in `predict.messages`."""
    predict.messages = []
    return segkit.predict(sources, output, device="cpu", report=predict.messages.append, **options)


def test_one_stack_into_one_tiff(tmp_path, uint8_stack, tiny_checkpoint):

    progress = Progress()
    out = tmp_path / "out.tif"
    result = predict(uint8_stack, out, model=tiny_checkpoint, progress=progress)
    assert result.outputs == [out] and result.folder is None and result.failed == []
    # the checkpoint's tile, 4 tiles per forward on the CPU, the engine in words, the time to the first tiles
    assert result.tile == 236 and result.batch == 4 and result.engine == "torch cpu"
    assert 0 < result.first_tiles_seconds <= result.seconds
    assert progress.total == progress.done == 12  # 3 planes of 2 x 2 tiles (52 px out each)
    assert any(f"-> {out}: 3 x 70 x 91 uint8, 12 tiles of 236 px, batch 4, model {tiny_checkpoint}, on torch cpu; "
               "writes uint8 membrane probabilities" in m for m in predict.messages)
    written = tifffile.imread(out)
    assert written.shape == (3, 70, 91) and written.dtype == np.uint8
    assert_plane_matches_library(written, uint8_stack, tiny_checkpoint, index=2, tile=236)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].resolution == pytest.approx((1 / 40, 1 / 40))  # 250 px/cm: px per micron (ImageJ)
    # an existing output is kept unless overwrite; the default output sits beside the input
    with pytest.raises(OutputExistsError, match="already exists"):
        predict(uint8_stack, out, model=tiny_checkpoint)
    assert predict(uint8_stack, model=tiny_checkpoint).outputs == [tmp_path / "stack_membranes.tif"]


def test_tile_auto_measures_on_this_device(tmp_path, uint8_stack, tiny_checkpoint, tiny_unet):
    result = predict(uint8_stack, tmp_path / "auto.tif", model=tiny_checkpoint, tile="auto")
    assert tiny_unet.geometry.is_valid_input(result.tile) and result.batch >= 1
    assert any(m.startswith("tile auto: tile") for m in predict.messages)
    reference = predict(uint8_stack, tmp_path / "fixed.tif", model=tiny_checkpoint, tile=220)
    assert reference.tile == 220
    # a valid-conv model gives the same values at any tile
    difference = tifffile.imread(tmp_path / "auto.tif").astype(int) - tifffile.imread(tmp_path / "fixed.tif")
    assert np.abs(difference).max() <= 1


def _write_files(folder, count=3):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(count):
        tifffile.imwrite(folder / f"s{index}.tif", rng.integers(0, 256, (60, 75 + index), dtype=np.uint8))
    return sorted(folder.glob("*.tif"))


def test_many_files_into_a_folder_a_bad_one_reported(tmp_path, tiny_checkpoint):
    files = _write_files(tmp_path / "in")
    (tmp_path / "in" / "bad.tif").write_text("not an image")
    out = tmp_path / "out"  # several inputs and a path that is not a .tif: a folder, made for them
    progress = Progress()
    result = predict([*files, tmp_path / "in" / "bad.tif"], out, model=tiny_checkpoint, tile=220, progress=progress)
    assert result.folder == out and sorted(result.outputs) == [out / "s0.tif", out / "s1.tif", out / "s2.tif"]
    assert len(result.failed) == 1 and result.failed[0][0].endswith("bad.tif")
    assert "not a readable TIFF" in result.failed[0][1]
    assert any(m.startswith("failed: ") and "bad.tif" in m for m in predict.messages)
    assert sorted(p.name for p in out.iterdir()) == ["s0.tif", "s1.tif", "s2.tif"]  # no output for the bad file
    assert progress.total == progress.done == 3 * 6  # one bar over the readable files: 2 x 3 tiles (36 px) each
    single = predict(files[1], tmp_path / "single.tif", model=tiny_checkpoint, tile=220)
    np.testing.assert_array_equal(tifffile.imread(out / "s1.tif"), tifffile.imread(single.outputs[0]))
    # rerun into the same folder (now given as an existing folder): refused, or only the missing ones
    (out / "s2.tif").unlink()
    with pytest.raises(OutputExistsError, match="2 of the outputs already exist"):
        predict(str(tmp_path / "in" / "s*.tif"), out, model=tiny_checkpoint, tile=220)
    result = predict(str(tmp_path / "in" / "s*.tif"), out, model=tiny_checkpoint, tile=220, skip_existing=True)
    assert result.outputs == [out / "s2.tif"] and result.failed == []
    assert any("skipping 2 files" in m for m in predict.messages)


@pytest.mark.parametrize("compression, tag", [("zlib", 8), ("zstd", 50000), ("lzw", 5), ("none", 1)])
def test_compression_round_trips(tmp_path, uint8_stack, tiny_checkpoint, compression, tag):
    out = tmp_path / f"{compression}.tif"
    predict(uint8_stack, out, model=tiny_checkpoint, compression=compression, output_type="float16")
    with tifffile.TiffFile(out) as tif:
        assert {int(page.compression) for page in tif.pages} == {tag}
        values = tif.asarray()
    reference = tmp_path / "reference.tif"
    predict(uint8_stack, reference, model=tiny_checkpoint, compression="none", output_type="float16")
    np.testing.assert_array_equal(values, tifffile.imread(reference))


def test_output_encodings(tmp_path, uint8_stack, tiny_checkpoint):
    def run(name, **options):
        return tifffile.imread(predict(uint8_stack, tmp_path / name, model=tiny_checkpoint, **options).outputs[0])

    probability = run("f.tif", output_type="float16").astype(np.float32)
    assert 0 <= probability.min() and probability.max() <= 1 and np.ptp(probability) > 0.1
    as_uint8 = run("u.tif")
    assert as_uint8.dtype == np.uint8 and np.abs(as_uint8 - probability * 255).max() <= 0.51 + 255 * 1e-3
    mask = run("m.tif", threshold=0.5)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    sure = np.abs(probability - 0.5) > 1e-3  # float16 rounding aside
    np.testing.assert_array_equal(mask[sure], np.where(probability[sure] >= 0.5, 255, 0))
    np.testing.assert_array_equal(run("a.tif", threshold="auto"), mask)  # the checkpoint's threshold (0.5)
    instances = run("i.tif", instances=True)
    assert instances.dtype == np.uint32 and instances.shape == (3, 70, 91) and len(np.unique(instances)) > 2
    # with instances the threshold is the watershed's interior threshold
    assert not np.array_equal(run("i2.tif", instances=True, threshold=0.3), instances)
    assert predict(uint8_stack, model=tiny_checkpoint, instances=True).outputs == [
        tmp_path / "stack_instances.tif"]
    for wrong, match in ((dict(output_type="int8"), "uint8, float16"), (dict(threshold="high"), "'high'"),
                         (dict(threshold=1.5), "between 0 and 1"), (dict(output_type="same"), "output type")):
        with pytest.raises(SegkitError, match=match):
            predict(uint8_stack, tmp_path / "x.tif", model=tiny_checkpoint, **wrong)
    assert not (tmp_path / "x.tif").exists()


def test_denoiser_kind(tmp_path, uint8_stack, tiny_denoiser, tiny_checkpoint):
    same = predict(uint8_stack, model=tiny_denoiser, kind="denoiser")
    assert same.outputs == [tmp_path / "stack_denoised.tif"] and same.tile == 108 and same.batch == 4
    as_input = tifffile.imread(same.outputs[0])
    assert as_input.dtype == np.uint8 and as_input.shape == (3, 70, 91)
    floats = tifffile.imread(predict(uint8_stack, tmp_path / "f.tif", model=tiny_denoiser, kind="denoiser",
                                     output_type="float32").outputs[0])
    assert floats.dtype == np.float32 and np.ptp(floats) > 0
    np.testing.assert_array_equal(as_input, np.clip(np.rint(floats), 0, 255).astype(np.uint8))
    with pytest.raises(SegkitError, match="segmenter checkpoint, but a denoiser"):
        predict(uint8_stack, tmp_path / "x.tif", model=tiny_checkpoint, kind="denoiser")
    with pytest.raises(SegkitError, match="instances come from a segmenter"):
        predict(uint8_stack, tmp_path / "x.tif", model=tiny_denoiser, kind="denoiser", instances=True)
    with pytest.raises(SegkitError, match="same, float32"):
        predict(uint8_stack, tmp_path / "x.tif", model=tiny_denoiser, kind="denoiser", output_type="uint8")


class Sigmoid:
    """A test engine: the sigmoid of each tile's centre (what a valid-conv model of `geometry` returns)."""

    label = "sigmoid test engine"
    device = torch.device("cpu")

    def __init__(self, geometry):
        self.geometry = geometry

    def __call__(self, x):
        m = self.geometry.margin
        return torch.sigmoid((x[:, :, m:-m, m:-m] - 128) / 32)


def test_an_engine_object_as_model(tmp_path, uint8_stack, tiny_checkpoint, tiny_unet):
    from segkit.checkpoint import read_info
    from segkit.inference.engines import TorchEngine

    # a built engine with the checkpoint's record gives what the checkpoint gives
    engine = TorchEngine(tiny_unet, device="cpu")
    engine.info = read_info(tiny_checkpoint)
    result = predict(uint8_stack, tmp_path / "engine.tif", model=engine, tile=236)
    assert result.engine == "torch cpu" and result.tile == 236
    reference = predict(uint8_stack, tmp_path / "checkpoint.tif", model=tiny_checkpoint, tile=236)
    np.testing.assert_array_equal(tifffile.imread(result.outputs[0]), tifffile.imread(reference.outputs[0]))
    # any object with the engine protocol and a geometry: raw intensities (no record), its default tile
    result = predict(uint8_stack, tmp_path / "sigmoid.tif", model=Sigmoid(tiny_unet.geometry), output_type="float16")
    assert result.engine == "sigmoid test engine" and result.tile == 572
    raw = tifffile.imread(uint8_stack).astype(np.float32)
    expected = 1 / (1 + np.exp(-(raw - 128) / 32))
    assert np.abs(tifffile.imread(result.outputs[0]).astype(np.float32) - expected).max() < 1e-3
    with pytest.raises(SegkitError, match="pass a model file"):  # the Dask workers build their own engines
        predict(uint8_stack, tmp_path / "x.ome.zarr", model=engine)


@pytest.mark.parametrize("case", ["compression", "tile", "several inputs", "no input", "tile size"])
def test_errors_are_one_line_segkit_errors(tmp_path, uint8_stack, tiny_checkpoint, case):
    out = tmp_path / "out.tif"
    call, fragments = {
        "compression": (dict(sources=uint8_stack, compression="gzip"), ["unknown compression 'gzip'", "zlib, zstd"]),
        "tile": (dict(sources=uint8_stack, tile="abc"), ["tile 'abc'", "'auto'"]),
        "several inputs": (dict(sources=[uint8_stack, uint8_stack]), ["2 inputs given", "output folder"]),
        "no input": (dict(sources=[]), ["no input"]),
        "tile size": (dict(sources=uint8_stack, tile=230), ["use tile 220 or 236"]),
    }[case]
    with pytest.raises(SegkitError) as caught:
        predict(call.pop("sources"), out, model=tiny_checkpoint, **call)
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert "--" not in message  # the library's words; the CLI names its flags
    assert not out.exists()


def test_import_segkit_stays_light_and_predict_is_there():
    code = ("import sys, segkit; from segkit import predict; "
            "print(callable(segkit.predict), predict is segkit.predict, 'torch' in sys.modules, "
            "'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False", "False"]
    assert "predict" in segkit.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        segkit.nope  # noqa: B018


def test_the_input_is_opened_while_the_model_loads(tmp_path, tiny_checkpoint, uint8_stack, monkeypatch):
    """Start-up: the input's headers are read on a thread of their own while torch, the device and the model
    load; the open stack is the one predicted (opened once), and it is closed at the end."""
    import threading

    from segkit.inference import api

    events, opened = [], []
    real_open, real_load = api.open_stack, api._load

    def open_stack(source, **kwargs):
        events.append(("open", threading.current_thread().name))
        stack = real_open(source, **kwargs)
        opened.append(stack)
        return stack

    def load(*args, **kwargs):
        events.append(("load starts", threading.current_thread().name))
        loaded = real_load(*args, **kwargs)
        events.append(("load ends", threading.current_thread().name))
        return loaded

    monkeypatch.setattr(api, "open_stack", open_stack)
    monkeypatch.setattr(api, "_load", load)
    segkit.predict(uint8_stack, tmp_path / "out.tif", model=tiny_checkpoint, tile=236, device="cpu",
                   report=lambda _: None)
    names = dict(events)
    assert names["open"].startswith("segkit-open-input") and names["load starts"] == threading.main_thread().name
    assert [kind for kind, _ in events].count("open") == 1 and len(opened) == 1 and not opened[0]._handles


@pytest.mark.parametrize("call, words", [
    (dict(sources=np.zeros((64, 64), np.uint8)), "sources is an array; segkit.predict reads files: use "
                                                 "segkit.predict_array"),
    (dict(sources=None), "sources must be a path"),
    (dict(sources=3), "sources must be a path"),
    (dict(model=123), "model must be a path"),
    (dict(model={}), "model must be a path"),
    (dict(report=None), "report must be a function"),
    (dict(progress="yes"), "progress must be True (a bar on stderr, the default), False (none) or a bar with"),
    (dict(cancel=True), "cancel must be a threading.Event"),
])
def test_arguments_of_the_wrong_type_are_one_line_before_any_work(tmp_path, call, words):
    """Issue 25, findings 20 and 21: these failed mid-run or with Python's own words ("64 inputs given",
    "'NoneType' object is not iterable")."""
    arguments = {"sources": str(tmp_path / "missing.tif"), **call}
    with pytest.raises(TypeError) as caught:
        segkit.predict(arguments.pop("sources"), tmp_path / "out.tif", **arguments)
    assert isinstance(caught.value, segkit.errors.SegkitError) and words in str(caught.value)
