"""--tile auto, the batch, out-of-memory back-off and torch.compile, driven by fake engines where a GPU would be needed."""

import numpy as np
import pytest
import tifffile
import torch

from segkit.inference.device_fit import (
    BackoffForward,
    DeviceMemoryError,
    Trial,
    best_trial,
    candidate_tiles,
    choose_batch,
    choose_tile,
    measure_tiles,
    with_smaller_tiles,
)
from segkit.inference.tiler import plan_tiles, predict_plane
from segkit.models.geometry import Geometry, valid_unet_geometry
from tests.helpers import REPO, FakeEngine, as_plane, assert_user_error, run

UNET = valid_unet_geometry(4)


def centre(batch):
    return batch[:, :, 92:-92, 92:-92] * 2.0


def test_backoff_halves_the_batch_remembers_it_and_reports_once():
    notes = []

    def small_gpu(batch):
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return centre(batch)

    engine = FakeEngine(small_gpu, label="small gpu")
    forward = BackoffForward(engine, report=notes.append)
    assert forward.device == engine.device and forward.label == "small gpu"  # an engine itself
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 1, 188, 188)).astype(np.float32))
    out = forward(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, centre(x))
    assert engine.calls == [8, 4, 2, 2, 2, 2] and forward.max_batch == 2
    assert notes == ["out of device memory at batch 8: continuing with batch 4",
                     "out of device memory at batch 4: continuing with batch 2"]
    engine.calls.clear()
    assert torch.equal(forward(x[:5]), centre(x[:5]))
    assert engine.calls == [2, 2, 1] and len(notes) == 2
    # through the tiler: the same plane as without back-off
    g = Geometry(margin=92, step=4, min_output=4)
    plane = as_plane(np.random.default_rng(1).standard_normal((40, 30)))
    expected = predict_plane(plane, FakeEngine(centre), g, tile=188, batch=8)
    torch.testing.assert_close(predict_plane(plane, BackoffForward(FakeEngine(small_gpu), report=notes.append), g,
                                             tile=188, batch=8), expected, atol=0, rtol=0)


def test_backoff_knows_onnxruntime_oom_and_lets_other_errors_through():
    released = []

    def ort_gpu(batch):
        if len(batch) > 1:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                               "buffer of size 1073741824")
        return centre(batch)

    forward = BackoffForward(FakeEngine(ort_gpu), report=lambda _: None, release=lambda: released.append(1))
    x = torch.zeros((3, 1, 188, 188))
    assert forward(x).shape == (3, 1, 4, 4) and forward.max_batch == 1
    assert len(released) == 1  # device memory given back before the smaller batch

    def broken(batch):
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        BackoffForward(FakeEngine(broken))(x)

    def hopeless(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceMemoryError, match="one tile of 188 px"):
        BackoffForward(FakeEngine(hopeless), report=lambda _: None)(x)


def test_smaller_tiles_after_one_tile_does_not_fit():
    tried, notes = [], []

    def run_at(tile):
        tried.append(tile)
        if tile > 300:
            raise DeviceMemoryError("out of device memory with one tile")
        return f"done at {tile}"

    assert with_smaller_tiles(run_at, 1052, UNET, report=notes.append) == "done at 252"
    assert tried == [1052, 524, 252] and all(UNET.is_valid_input(t) for t in tried)
    assert notes[0] == "out of device memory with one tile of 1052 px: starting again with tile 524"
    with pytest.raises(DeviceMemoryError):
        with_smaller_tiles(lambda tile: run_at(10_000), 188, UNET, report=notes.append)


def test_candidate_tiles_waste_little_beyond_the_plane():
    assert candidate_tiles(UNET, (512, 512)) == [700, 764]  # 700 -> 516: the whole plane in one tile
    assert candidate_tiles(UNET, (20, 30)) == [220]  # a tiny plane: one small tile
    # 4096-px planes: 1212 -> 1028 covers them in 4 x 4 tiles (1.4 input px per output px); 572 needs 11 x 11
    assert 1212 in candidate_tiles(UNET, (4096, 4096)) and 572 not in candidate_tiles(UNET, (4096, 4096))
    smp_like = Geometry(margin=0, step=32, min_output=32, halo=64)
    tiles = candidate_tiles(smp_like, (4096, 4096))
    assert 1152 in tiles and len(tiles) <= 4  # 4 x 4 tiles of 1152 with a 64 px halo cover 4096 + 2 x 64
    assert plan_tiles((4096, 4096), smp_like, tile=1152).n_tiles == 16
    for geometry, shape in ((UNET, (4096, 3000)), (smp_like, (700, 700)), (smp_like, (1024, 1024))):
        found = candidate_tiles(geometry, shape)
        assert found and all(geometry.is_valid_input(t) and t <= 1344 for t in found)


def test_measure_tiles_picks_the_fastest_per_plane_and_stops_at_oom():
    now = [0.0]

    def fake_gpu(batch):  # 0.05 s per call plus a cost per input pixel; tiles of 1324 px fit only in pairs
        assert isinstance(batch, torch.Tensor) and batch.device == engine.device
        n, _, size, _ = batch.shape
        if size == 1324 and n > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        now[0] += 0.05 + n * size * size * 1e-8
        return centre(batch)

    engine = FakeEngine(fake_gpu)
    trials = measure_tiles(engine, UNET, (4096, 4096), tiles=[572, 1052, 1324], batches=[4, 2],
                           clock=lambda: now[0])
    by_key = {(t.tile, t.batch): t for t in trials}
    assert (1324, 4) in by_key and by_key[1324, 4].seconds_per_batch is None
    assert by_key[572, 2].seconds_per_batch == pytest.approx(0.05 + 2 * 572**2 * 1e-8)
    tiles_572 = plan_tiles((4096, 4096), UNET, tile=572).n_tiles
    assert tiles_572 == 121
    assert by_key[572, 4].seconds_per_plane == pytest.approx((0.05 + 4 * 572**2 * 1e-8) / 4 * tiles_572)
    # 1052 px at batch 4: 25 tiles of 0.024 s beat 121 of 0.016 s (572) and 16 of 0.043 s (1324, batch 2 only)
    best = best_trial(trials)
    assert (best.tile, best.batch) == (1052, 4)
    assert best == min((t for t in trials if t.seconds_per_plane), key=lambda t: t.seconds_per_plane)
    with pytest.raises(Exception, match="fits in device memory"):
        best_trial([Trial(572, 4, None, None)])


def test_cli_tile_auto_on_cpu(tmp_path, uint8_stack, tiny_checkpoint):
    result = run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", tmp_path / "auto.tif", "--tile", "auto", "-q")
    assert result.exit_code == 0, result.output
    assert "tile auto: measuring tiles" in result.stderr and "tile auto: tile " in result.stderr
    chosen = result.stderr.split("tile auto: tile ")[1].split(" (")[0]  # "284, batch 2"
    tile, batch = int(chosen.split(",")[0]), int(chosen.split("batch ")[1])
    # the same tile and batch by hand give the same bytes (another batch may round a pixel differently)
    assert run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", tmp_path / "fixed.tif", "--tile", tile,
               "--batch", batch, "-q").exit_code == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "auto.tif"), tifffile.imread(tmp_path / "fixed.tif"))
    assert_user_error(run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", tmp_path / "x.tif", "--tile", "big"),
                      "--tile 'big'", "auto")


def test_tile_and_batch_auto_on_cpu():
    """On the CPU: batch 4 without measuring; tile auto times the candidates at batches 1 and 2 on
    zero tensors on the engine's device and picks a valid tile."""
    assert choose_batch(FakeEngine(centre), UNET, 572, report=lambda _: None) == 4
    seen, notes = set(), []

    def cpu_engine(batch):
        assert isinstance(batch, torch.Tensor) and batch.device == engine.device and not batch.any()
        seen.add(tuple(batch.shape))
        return centre(batch)

    engine = FakeEngine(cpu_engine, label="fake cpu")
    tile, batch = choose_tile(engine, UNET, (60, 50), report=notes.append)
    assert UNET.is_valid_input(tile) and batch in (1, 2)
    assert {shape[0] for shape in seen} == {1, 2} and (batch, 1, tile, tile) in seen
    assert notes[0].startswith("tile auto: measuring tiles") and "on fake cpu" in notes[0]
    assert notes[1].startswith(f"tile auto: tile {tile}, batch {batch} (")
    assert choose_tile(engine, UNET, (60, 50), batch=2, only=220, report=notes.append) == (220, 2)


def test_cli_backs_off_on_out_of_memory(tmp_path, uint8_stack, tiny_checkpoint, monkeypatch):
    from segkit.inference import engines

    original = engines.TorchEngine.__call__

    def small_gpu(self, batch):
        if len(batch) > 1 or batch.shape[-1] > 220:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(self, batch)

    assert run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", tmp_path / "ref.tif", "--tile", 220,
               "-q").exit_code == 0
    monkeypatch.setattr(engines.TorchEngine, "__call__", small_gpu)
    result = run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", tmp_path / "oom.tif", "--tile", 412,
                 "--batch", 4, "-q")
    assert result.exit_code == 0, result.output
    assert "continuing with batch" in result.stderr and "starting again with tile" in result.stderr
    # exact tiling: the smaller tile gives the same membranes (up to float rounding of uint8 levels)
    assert np.abs(tifffile.imread(tmp_path / "oom.tif").astype(int) - tifffile.imread(tmp_path / "ref.tif")).max() <= 1


def test_torch_compile_gives_the_eager_result(tiny_unet):
    from segkit.inference.engines import TorchEngine

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 220, 220)).astype(np.float32))
    eager = TorchEngine(tiny_unet, device="cpu")(x)
    compiled = TorchEngine(tiny_unet, device="cpu", compile_model=True)
    out = compiled(x)
    assert isinstance(out, torch.Tensor) and out.shape == eager.shape and out.device == compiled.device
    assert (out - eager).abs().max() < 1e-5


def test_bench_predict_script_runs_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    script = REPO / "tools" / "bench_predict.py"
    out = subprocess.run([sys.executable, str(script), "--planes", "2", "--size", "200", "--device", "cpu",
                          "--runs", "segkit-torch,segkit-onnx,nnunet-loop", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {row["run"]: row for row in summary["results"]}
    assert set(rows) == {"segkit-torch", "segkit-onnx", "nnunet-loop"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["mpx_per_s"] > 0 and row["peak_rss_mb"] > 100
    outputs = {name: tifffile.imread(tmp_path / f"out_{name}.tif") for name in rows}
    assert all(o.shape == (2, 200, 200) and o.dtype == np.uint8 for o in outputs.values())
    # the same weights through torch and ONNX Runtime give the same membranes
    assert np.abs(outputs["segkit-torch"].astype(int) - outputs["segkit-onnx"]).max() <= 1


def test_tile_auto_is_kept_per_device_and_a_second_run_reuses_it(tmp_path, tiny_checkpoint, uint8_stack):
    import segkit
    from segkit.inference.measurements import measurement_key, recall, remember

    first, second = [], []
    for lines in (first, second):
        segkit.predict(uint8_stack, tmp_path / "out.tif", model=tiny_checkpoint, tile="auto", device="cpu",
                       overwrite=True, report=lines.append)
    assert any("tile auto: measuring" in line for line in first)
    assert not any("tile auto: measuring" in line for line in second)
    assert any("measured before on this device" in line for line in second)
    key = measurement_key(kind="demo")
    assert recall(key) is None
    remember(key, {"tile": 3})
    assert recall(key) == {"tile": 3}


def test_an_unreadable_measurement_is_measured_again(tmp_path):
    from segkit.cache import cache_subdir
    from segkit.inference.measurements import measurement_key, recall

    key = measurement_key(kind="broken")
    (cache_subdir("measurements") / f"{key}.json").write_text("{not json")
    assert recall(key) is None


def test_a_cache_that_cannot_be_written_never_fails_a_run(monkeypatch):
    from segkit.errors import OutputError
    from segkit.inference import measurements

    def refuse(path):
        raise OutputError(f"writing {path} failed (No space left on device)")

    monkeypatch.setattr(measurements, "atomic_path", refuse)
    measurements.remember(measurements.measurement_key(kind="full"), {"tile": 1})  # no exception
    assert measurements.recall(measurements.measurement_key(kind="full")) is None
