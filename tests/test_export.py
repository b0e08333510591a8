"""ONNX export, ONNX Runtime engine, and prediction over many files (CPU provider)."""

import contextlib
import types

import numpy as np
import pytest
import tifffile
import torch

from segkit.checkpoint import save_checkpoint
from segkit.errors import CheckpointError, SegkitError
from segkit.export import ExportError, check_parity, export_onnx, inference_head, read_onnx_metadata, write_onnx
from segkit.inference.engines import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    OnnxEngine,
    TorchEngine,
    plan_providers,
)
from segkit.models import create_model, model_kind
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo
from tests.helpers import REPO, assert_user_error, randomize_zero_layers, run, tiny


def tiny_info(name, kwargs, model, **inference):
    return CheckpointInfo(model_kind(name), name, kwargs, model.geometry, Normalization(120.0, 40.0),
                          classes=[] if model_kind(name) == "denoiser" else ["interior", "membrane"],
                          inference={"input_dtype": "uint8", **inference})


@pytest.mark.parametrize("registered", ["unet", "fcn8s", "smp:Unet:resnet34", "denoiser"])
def test_export_matches_torch_and_keeps_metadata(registered, tmp_path):
    torch.manual_seed(0)
    name, kwargs = tiny(registered)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    info = tiny_info(name, kwargs, model, tile=model.geometry.min_input + 2 * model.geometry.step)
    tile = info.inference.tile
    onnx_bytes, record = export_onnx(model, info, tile=tile)
    print(f"{name}: {record.parity}")
    assert record.precision == "fp32" and record.spatial == "dynamic" and record.tile == tile
    assert record.output == ("intensity" if info.kind == "denoiser" else "probability")
    # random input at batch 2, a real EM crop, and a second tile size (dynamic H and W) were checked
    assert {"max_abs_diff_random", "max_abs_diff_real"} <= set(record.parity) and len(record.parity) == 6
    assert max(record.parity.values()) <= 1e-4
    path = write_onnx(onnx_bytes, tmp_path / "m.onnx")
    read_info, read_record = read_onnx_metadata(path)
    assert read_info.to_json() == info.to_json() and read_record == record
    # the engine agrees with torch at batch sizes 3 and then 1 (two preallocated bindings)
    engine = OnnxEngine(path, model.geometry, device="cpu")
    reference = TorchEngine(model, device="cpu", channel=1 if info.kind == "segmenter" else None)
    # engines take and return tensors on their device
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 1, tile, tile)).astype(np.float32))
    for batch in (x, x[:1], x):
        out = engine(batch)
        assert isinstance(out, torch.Tensor) and out.device == engine.device
        assert (out - reference(batch)).abs().max() < 1e-4
    assert engine.label == "onnxruntime CPU" and engine.device == torch.device("cpu")
    # after an out-of-memory error short batches are no longer padded to the old size
    engine.release_memory()
    assert engine._largest_batch == 0
    assert (engine(x[:2]) - reference(x[:2])).abs().max() < 1e-4 and engine._largest_batch == 2


def test_fp16_export_and_fixed_tile(tiny_unet):
    info = tiny_info("unet", {"base": 4, "depth": 4}, tiny_unet)
    onnx_bytes, record = export_onnx(tiny_unet, info, tile=220, fp16=True, fixed_tile=True)
    print(record.parity)
    assert record.precision == "fp16" and record.spatial == "fixed" and len(record.parity) == 4
    engine = OnnxEngine(onnx_bytes, tiny_unet.geometry, device="cpu", fp16=True)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 1, 220, 220)).astype(np.float32))
    out = engine(x)
    assert out.dtype == torch.float32
    assert (out - TorchEngine(tiny_unet, device="cpu")(x)).abs().mean() < 1e-3
    with pytest.raises(Exception, match="dimensions"):  # the graph takes only its export tile
        engine(torch.zeros((1, 1, 236, 236)))


def test_parity_failure_is_loud(tiny_unet):
    info = tiny_info("unet", {"base": 4, "depth": 4}, tiny_unet)
    onnx_bytes, _ = export_onnx(tiny_unet, info, tile=220)
    head = inference_head(tiny_unet, output="probability")
    inputs = {"random": np.random.default_rng(0).standard_normal((1, 1, 220, 220)).astype(np.float32)}
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(onnx_bytes, lambda x: head(x) * 0.5, inputs, fp16=False)
    with pytest.raises(ExportError, match="fp16 graph differs"):
        check_parity(onnx_bytes, lambda x: head(x) + 0.01, inputs, fp16=True)
    with pytest.raises(ExportError, match="opset=9 is not supported"):
        export_onnx(tiny_unet, info, tile=220, opset=9)
    with pytest.raises(SegkitError, match="use tile 204 or 220"):  # the CLI says --tile (test_cli_onnx_errors)
        export_onnx(tiny_unet, info, tile=210)


def test_provider_plan_prefers_tensorrt_then_cuda_and_never_guesses():
    assert plan_providers("cpu", [CUDA_PROVIDER, CPU_PROVIDER], use_tensorrt=True, fp16=False) == [(CPU_PROVIDER, {})]
    plan = plan_providers("cuda:1", [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER], use_tensorrt=True, fp16=True,
                          conv_algo_search="EXHAUSTIVE", cache_dir="/tmp/trt")
    assert [name for name, _ in plan] == [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    assert plan[0][1]["trt_fp16_enable"] and plan[0][1]["device_id"] == 1
    assert plan[1][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and plan[1][1]["device_id"] == 1
    assert plan[1][1]["use_tf32"] == "1"  # an fp16 graph: TF32 irrelevant, left at the provider's default
    no_trt = plan_providers("cuda", [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER], use_tensorrt=False, fp16=False)
    assert [name for name, _ in no_trt] == [CUDA_PROVIDER, CPU_PROVIDER]
    assert no_trt[0][1]["use_tf32"] == "0"  # an fp32 graph in full precision (the provider's default is TF32)
    with pytest.raises(SegkitError, match="pip install onnxruntime-gpu"):
        plan_providers("cuda", [CPU_PROVIDER], use_tensorrt=True, fp16=False)
    with pytest.raises(SegkitError, match="algorithm search"):
        plan_providers("cuda", [CUDA_PROVIDER, CPU_PROVIDER], use_tensorrt=False, fp16=False, conv_algo_search="FAST")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without a GPU")
def test_cuda_provider_that_fails_to_load_is_an_error_not_a_cpu_run(tiny_unet, monkeypatch):
    import onnxruntime

    from segkit.inference import engines

    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    info = tiny_info("unet", {"base": 4, "depth": 4}, tiny_unet)
    onnx_bytes, _ = export_onnx(tiny_unet, info, tile=220)
    # torch's check passes (and gives its stream), then onnxruntime cannot load its CUDA provider and would run on
    # the CPU
    monkeypatch.setattr(engines, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=0))
    with pytest.raises(SegkitError, match="CUDA provider failed to load"):
        OnnxEngine(onnx_bytes, tiny_unet.geometry, device="cuda")


# -- CLI -------------------------------------------------------------------------------------

def test_cli_export_and_predict_onnx_equals_torch(tmp_path, uint8_stack, tiny_checkpoint):
    onnx_path = tmp_path / "tiny.onnx"
    result = run("export", tiny_checkpoint, "-o", onnx_path)
    assert result.exit_code == 0, result.output
    assert "max abs difference from torch" in result.output
    assert_user_error(run("export", tiny_checkpoint, "-o", onnx_path), "already exists", "--overwrite")
    common = ["--output-type", "float16", "--tile", 220, "--batch", 2, "-q"]
    assert run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", tmp_path / "torch.tif", *common).exit_code == 0
    result = run("predict", uint8_stack, "-m", onnx_path, "-o", tmp_path / "onnx.tif", *common)
    assert result.exit_code == 0, result.output
    assert "onnxruntime CPU" in result.stderr
    result = run("predict", uint8_stack, "-m", tiny_checkpoint, "--engine", "onnx", "-o", tmp_path / "in_memory.tif",
                 *common)
    assert result.exit_code == 0, result.output
    reference = tifffile.imread(tmp_path / "torch.tif").astype(np.float32)
    for name in ("onnx.tif", "in_memory.tif"):
        assert np.abs(tifffile.imread(tmp_path / name).astype(np.float32) - reference).max() <= 1e-3
    # the ONNX file's default tile is the checkpoint's (236)
    assert "tiles of 236 px" in run("predict", uint8_stack, "-m", onnx_path, "-o", tmp_path / "d.tif", "-q").stderr


def test_cli_onnx_errors(tmp_path, uint8_stack, tiny_checkpoint):
    out = tmp_path / "x.tif"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf" * 50)
    assert_user_error(run("predict", uint8_stack, "-m", garbage, "-o", out), "not a valid ONNX model")
    assert_user_error(run("predict", uint8_stack, "-m", tmp_path / "missing.onnx", "-o", out), "does not exist")
    foreign = tmp_path / "foreign.onnx"
    import onnx
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "foreign",
                              [tensor("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [tensor("output", TensorProto.FLOAT, [1, 1, 8, 8])])
    onnx.save(helper.make_model(graph), str(foreign))
    assert_user_error(run("predict", uint8_stack, "-m", foreign, "-o", out), "without segkit metadata", "segkit export")
    fixed = tmp_path / "fixed.onnx"
    assert run("export", tiny_checkpoint, "-o", fixed, "--tile", 220, "--fixed-tile").exit_code == 0
    assert_user_error(run("predict", uint8_stack, "-m", fixed, "-o", out, "--tile", 236), "220 px only")
    assert_user_error(run("predict", uint8_stack, "-m", fixed, "-o", out, "--amp", "fp16"), "--fp16")
    assert_user_error(run("predict", uint8_stack, "-m", fixed, "-o", out, "--engine", "torch"), "onnx engine")
    assert_user_error(run("predict", uint8_stack, "-m", tiny_checkpoint, "-o", out, "--engine", "onnx",
                          "--amp", "bf16"), "fp32 or fp16")
    assert_user_error(run("export", tiny_checkpoint, "-o", tmp_path / "t.onnx", "--tile", 230), "use --tile 220 or 236")
    assert not out.exists() and not (tmp_path / "t.onnx").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_cli_export_with_denoiser_and_onnx_denoise(tmp_path, uint8_stack):
    torch.manual_seed(0)
    den, seg = create_model("denoiser", base=4), create_model("unet", base=4)
    save_checkpoint(tmp_path / "den.safetensors", den, CheckpointInfo(
        "denoiser", "denoiser", {"base": 4}, den.geometry, Normalization(110.0, 30.0), classes=[],
        inference={"tile": 108, "input_dtype": "uint8"}))
    save_checkpoint(tmp_path / "seg.safetensors", seg, CheckpointInfo(
        "segmenter", "unet", {"base": 4}, seg.geometry, Normalization(120.0, 40.0), inference={"tile": 220}))
    result = run("export", tmp_path / "seg.safetensors", "--with-denoiser", tmp_path / "den.safetensors",
                 "-o", tmp_path / "pair.onnx")
    assert result.exit_code == 0, result.output
    info, record = read_onnx_metadata(tmp_path / "pair.onnx")
    assert info.model == "denoised" and record.tile == 260 and info.normalization == Normalization(110.0, 30.0)
    common = ["--output-type", "float16", "-q"]
    assert run("predict", uint8_stack, "-m", tmp_path / "seg.safetensors", "--denoise", tmp_path / "den.safetensors",
               "-o", tmp_path / "torch.tif", *common).exit_code == 0
    assert run("predict", uint8_stack, "-m", tmp_path / "pair.onnx", "-o", tmp_path / "onnx.tif", *common).exit_code == 0
    assert np.abs(tifffile.imread(tmp_path / "onnx.tif").astype(np.float32)
                  - tifffile.imread(tmp_path / "torch.tif").astype(np.float32)).max() <= 1e-3
    assert_user_error(run("predict", uint8_stack, "-m", tmp_path / "pair.onnx", "--denoise", tmp_path / "den.safetensors",
                          "-o", tmp_path / "x.tif"), "--with-denoiser")
    # a denoiser alone: `segkit denoise` runs its ONNX file like its checkpoint
    assert run("export", tmp_path / "den.safetensors", "-o", tmp_path / "den.onnx").exit_code == 0
    assert run("denoise", uint8_stack, "-m", tmp_path / "den.safetensors", "-o", tmp_path / "d_torch.tif",
               "--output-type", "float32", "-q").exit_code == 0
    assert run("denoise", uint8_stack, "-m", tmp_path / "den.onnx", "-o", tmp_path / "d_onnx.tif",
               "--output-type", "float32", "-q").exit_code == 0
    assert np.abs(tifffile.imread(tmp_path / "d_onnx.tif") - tifffile.imread(tmp_path / "d_torch.tif")).max() < 1e-3
    assert_user_error(run("denoise", uint8_stack, "-m", tmp_path / "pair.onnx", "-o", tmp_path / "x.tif"),
                      "segmenter model", "denoiser is needed")


# -- many files --------------------------------------------------------------------------------

def _write_inputs(folder, count=3):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(count):
        tifffile.imwrite(folder / f"s{index}.tif", rng.integers(0, 256, (2, 60, 75 + index), dtype=np.uint8))
    return sorted(folder.glob("*.tif"))


def test_predict_many_files_skips_a_bad_one_and_keeps_the_others(tmp_path, tiny_checkpoint):
    files = _write_inputs(tmp_path / "in")
    truncated = tmp_path / "in" / "s1.tif"
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    result = run("predict", str(tmp_path / "in" / "*.tif"), "-o", f"{tmp_path / 'out'}/", "-m", tiny_checkpoint,
                 "--engine", "onnx", "--tile", 220, "-q")
    assert result.exit_code == 1, result.output
    assert "wrote 2 of 3 files" in result.stdout and "1 failed: s1.tif" in result.stdout
    assert "failed: " in result.stderr and "truncated" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s0.tif", "s2.tif"]  # no partial file
    single = tmp_path / "single.tif"
    assert run("predict", files[2], "-o", single, "-m", tiny_checkpoint, "--tile", 220, "-q").exit_code == 0
    assert np.abs(tifffile.imread(tmp_path / "out" / "s2.tif").astype(int) - tifffile.imread(single).astype(int)).max() <= 1
    # rerun: existing outputs are refused, or skipped on request
    args = [str(tmp_path / "in"), "-o", tmp_path / "out", "-m", tiny_checkpoint, "--tile", 220, "-q"]
    assert_user_error(run("predict", *args), "2 of the outputs already exist", "--skip-existing")
    truncated.write_bytes(files[0].read_bytes())  # repaired
    result = run("predict", *args, "--skip-existing")
    assert result.exit_code == 0 and "wrote 1 of 1 file " in result.stdout and "skipping 2 files" in result.stderr


def test_predict_many_files_argument_errors(tmp_path, tiny_checkpoint):
    files = _write_inputs(tmp_path / "in", count=2)
    assert_user_error(run("predict", *files, "-o", tmp_path / "one.tif"), "2 inputs given", "output folder")
    assert_user_error(run("predict", str(tmp_path / "in"), "-o", tmp_path / "in", "-m", tiny_checkpoint),
                      "would replace its input")
    (tmp_path / "other").mkdir()
    tifffile.imwrite(tmp_path / "other" / "s0.tif", np.zeros((40, 40), np.uint8))
    assert_user_error(run("predict", files[0], tmp_path / "other" / "s0.tif", "-o", f"{tmp_path / 'out'}/",
                          "-m", tiny_checkpoint), "would both be written")
    # several files unquoted by the shell: one output each
    result = run("predict", *files, "-o", f"{tmp_path / 'out'}/", "-m", tiny_checkpoint, "--tile", 220, "-q")
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s0.tif", "s1.tif"]


def test_onnx_file_is_written_atomically_and_old_formats_are_refused(tmp_path, tiny_unet):
    import onnx

    info = tiny_info("unet", {"base": 4, "depth": 4}, tiny_unet)
    path = write_onnx(export_onnx(tiny_unet, info, tile=220)[0], tmp_path / "m.onnx")
    with pytest.raises(SegkitError, match="already exists"):
        write_onnx(b"", path)
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "segkit_export":
            entry.value = entry.value.replace("segkit-onnx/1", "segkit-onnx/0")
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(CheckpointError, match="unsupported segkit ONNX format"):
        read_onnx_metadata(tmp_path / "old.onnx")


def test_bench_engines_script_reports_both_cpu_engines():
    import json
    import subprocess
    import sys

    script = REPO / "tools" / "bench_engines.py"
    out = subprocess.run([sys.executable, str(script), "--base", "4", "--tile", "188", "--batch", "1", "--seconds", "0",
                          "--warmup", "1", "--engines", "torch-cpu,ort-cpu"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {row["engine"]: row for row in report["results"]}
    assert set(rows) == {"torch-cpu", "ort-cpu"} and not any("error" in row for row in rows.values())
    assert rows["ort-cpu"]["tiles_per_s"] > 0 and rows["ort-cpu"]["max_abs_diff_vs_torch_fp32"] < 1e-4
    assert rows["ort-cpu"]["output"] == 4
