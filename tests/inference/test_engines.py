"""The engine protocol: a (N, C, h, w) float32 tensor on `engine.device` in, an (N, K, h - 2 margin,
w - 2 margin) float32 tensor on the same device out; `.device` a torch.device, `.label` in words.
TorchEngine, OnnxEngine and the TTA wrapper all follow it (CUDA checks run only where there is a GPU)."""

import copy

import numpy as np
import pytest
import torch

from segkit.devices import resolve_amp
from segkit.errors import SegkitError
from segkit.inference.engines import OnnxEngine, TorchEngine
from segkit.inference.tiler import predict_plane
from segkit.inference.tta import TTA_MODES, TTAForward, tta_transforms
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo
from tests.helpers import as_plane, crop_engine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_batch(n, size, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 1, size, size)).astype(np.float32))


def assert_protocol(engine, x, channels):
    out = engine(x)
    margin = engine.geometry.margin
    assert isinstance(engine.device, torch.device) and isinstance(engine.label, str) and engine.label
    assert isinstance(out, torch.Tensor) and out.device == engine.device and out.dtype == torch.float32
    assert out.shape == (len(x), channels, x.shape[-2] - 2 * margin, x.shape[-1] - 2 * margin)
    return out


def test_torch_engine_follows_the_protocol(tiny_unet):
    assert resolve_amp("auto", "cpu") == "none"
    engine = TorchEngine(tiny_unet, device="cpu", amp="auto")
    assert engine.amp == "none" and engine.device == torch.device("cpu") and engine.label == "torch cpu"
    x = random_batch(3, 220)
    before = x.clone()
    probability = assert_protocol(engine, x, 1)
    assert torch.equal(x, before)  # the input is left alone
    assert ((probability >= 0) & (probability <= 1)).all()
    logits = assert_protocol(TorchEngine(tiny_unet, device="cpu", channel=None), x, 2)
    torch.testing.assert_close(probability, torch.softmax(logits, dim=1)[:, 1:2], atol=1e-6, rtol=1e-5)
    # one tile at a time gives what the batch gave
    torch.testing.assert_close(engine(x[1:2]), probability[1:2], atol=1e-5, rtol=0)
    bf16 = TorchEngine(tiny_unet, device="cpu", amp="bf16")
    assert bf16.label == "torch cpu bf16"
    assert (assert_protocol(bf16, x[:1], 1) - probability[:1]).abs().mean() < 0.02  # float32 out, whatever amp
    with pytest.raises(SegkitError, match="fp16 needs a CUDA device"):
        TorchEngine(tiny_unet, device="cpu", amp="fp16")
    with pytest.raises(SegkitError, match="unknown amp"):
        TorchEngine(tiny_unet, device="cpu", amp="fp8")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_unet):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from segkit.export import export_onnx

    info = CheckpointInfo("segmenter", "unet", {"base": 4, "depth": 4}, tiny_unet.geometry,
                          Normalization(120.0, 40.0), inference={"input_dtype": "uint8"})
    return export_onnx(tiny_unet, info, tile=220)[0]


def test_onnx_engine_follows_the_protocol_and_equals_torch(tiny_onnx, tiny_unet):
    engine = OnnxEngine(tiny_onnx, tiny_unet.geometry, device="cpu")
    reference = TorchEngine(tiny_unet, device="cpu")
    assert engine.device == torch.device("cpu") and engine.label == "onnxruntime CPU"
    for x in (random_batch(3, 220, seed=1), random_batch(1, 236, seed=2), random_batch(2, 220, seed=3)):
        out = assert_protocol(engine, x, 1)
        assert (out - reference(x)).abs().max() < 1e-4
    # through the tiler: the same plane prediction as torch
    plane = as_plane(np.random.default_rng(4).standard_normal((150, 133)))
    tiled = predict_plane(plane, engine, tiny_unet.geometry, tile=220, batch=3)
    assert tiled.shape == (1, 150, 133) and tiled.device == engine.device
    assert (tiled - predict_plane(plane, reference, tiny_unet.geometry, tile=220, batch=2)).abs().max() < 1e-4


@pytest.mark.parametrize("mode", TTA_MODES)
def test_tta_of_a_pointwise_engine_is_the_identity(mode):
    """A pointwise model commutes with flips and rotations: TTA over it changes nothing, per batch and
    through the tiler."""
    g = Geometry(margin=3, step=4, min_output=4)
    engine = crop_engine(3, lambda centre: centre * 2.0 + 1.0)
    engine.geometry = g
    tta = TTAForward(engine, mode)
    passes = len(tta_transforms(mode))
    assert tta.device == engine.device and tta.label == f"crop 3, TTA {mode} ({passes} passes)"
    x = random_batch(3, 18)
    torch.testing.assert_close(assert_protocol(tta, x, 1), engine(x), atol=1e-6, rtol=1e-6)
    engine.calls.clear()
    plane = as_plane(np.random.default_rng(5).standard_normal((37, 23)))
    out = predict_plane(plane, tta, g, tile=18, batch=4)
    torch.testing.assert_close(out, plane * 2.0 + 1.0, atol=1e-6, rtol=1e-6)
    assert len(engine.calls) % passes == 0 and set(engine.calls) <= {1, 2, 3, 4}


# -- CUDA (skipped without a GPU) -------------------------------------------------------------

@needs_cuda
def test_torch_engine_on_cuda_keeps_tiles_on_the_device(tiny_unet, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    # TorchEngine moves the model it is given (nn.Module.to works in place): one copy per device
    engine = TorchEngine(copy.deepcopy(tiny_unet), device="cuda", amp="none")
    assert engine.device.type == "cuda" and engine.label.startswith("torch cuda")
    cpu = TorchEngine(tiny_unet, device="cpu")
    x = random_batch(2, 220)
    out = engine(x.to("cuda"))
    assert out.is_cuda and out.dtype == torch.float32 and (out.cpu() - cpu(x)).abs().max() < 1e-4
    plane = as_plane(np.random.default_rng(6).standard_normal((150, 133)))
    on_gpu = predict_plane(plane.to("cuda"), engine, tiny_unet.geometry, tile=220, batch=3)
    assert on_gpu.is_cuda
    assert (on_gpu.cpu() - predict_plane(plane, cpu, tiny_unet.geometry, tile=220)).abs().max() < 1e-4
    auto = TorchEngine(copy.deepcopy(tiny_unet), device="cuda", amp="auto")
    assert auto.amp in ("bf16", "fp16") and auto(x.to("cuda")).dtype == torch.float32
    # the protocol: the output's device equals engine.device (cuda:0 == cuda:0, not cuda:0 != cuda)
    assert_protocol(engine, x.to(engine.device), 1)


@needs_cuda
def test_onnx_engine_on_cuda_reads_and_writes_device_tensors(tiny_onnx, tiny_unet):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    engine = OnnxEngine(tiny_onnx, tiny_unet.geometry, device="cuda", use_tensorrt=False)
    reference = TorchEngine(tiny_unet, device="cpu")
    x = random_batch(3, 220)
    for batch in (x, x[:1], x):  # a short batch is padded to the largest seen, and cropped back
        out = assert_protocol(engine, batch.to(engine.device), 1)
        assert (out.cpu() - reference(batch)).abs().max() < 1e-3


@pytest.mark.parametrize("system, machine, fix", [
    ("Linux", "x86_64", "pip uninstall onnxruntime, then pip install onnxruntime-gpu"),
    ("Linux", "aarch64", "ONNX Runtime publishes no CUDA build for Linux aarch64; use the torch engine there"),
    ("Darwin", "arm64", "ONNX Runtime publishes no CUDA build for Darwin arm64; use the torch engine there"),
])
def test_onnx_engine_on_a_cpu_only_onnxruntime_names_the_missing_provider(tiny_onnx, tiny_unet, monkeypatch,
                                                                           system, machine, fix):
    """CUDA asked of the CPU build of ONNX Runtime (what macOS and Linux aarch64 install): one line naming
    CUDAExecutionProvider and the fix for this platform, never a silent CPU run."""
    import platform

    import onnxruntime

    from segkit.inference import engines

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])  # the CPU wheel's list
    monkeypatch.setattr(engines, "resolve_device", lambda device: "cuda:0")  # torch sees a GPU
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    with pytest.raises(SegkitError) as error:
        OnnxEngine(tiny_onnx, tiny_unet.geometry, device="cuda")
    message = str(error.value)
    assert "\n" not in message and "needs onnxruntime's CUDA provider (CUDAExecutionProvider)" in message
    assert "offers only AzureExecutionProvider, CPUExecutionProvider; use device='cpu', or " in message
    assert message.endswith(fix)
