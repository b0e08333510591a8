"""`--compile auto|on|off`, channels_last and the on-disk compile cache of the torch engine, on the CPU.

One real compile per test file (of a U-Net of base 4, depth 2, in two child processes: the second
must load the first one's kernels from SEGKIT_CACHE_DIR instead of compiling them again)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from segkit.cache import user_cache_dir
from segkit.errors import SegkitError
from segkit.inference.engines import TorchEngine, use_compile_cache, wants_compile
from segkit.inference.options import PredictOptions
from tests.helpers import REPO, run, skip_unless_required

# The child: `segkit predict ARGS` in this process, then inductor's cache counters and the seconds it took.
CHILD = """
import json, sys, time
started = time.perf_counter()
from segkit.cli import main
code = main(sys.argv[1:], standalone_mode=False)
from torch._dynamo.utils import counters
print("RESULT " + json.dumps({"code": code, "seconds": time.perf_counter() - started,
                              "inductor": dict(counters["inductor"])}))
"""


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A U-Net of base 4 and depth 2 (margin 20): the cheapest model whose compile is still a U-Net's."""
    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    torch.manual_seed(0)
    model = create_model("unet", base=4, depth=2).eval()
    path = tmp_path_factory.mktemp("compile") / "small.safetensors"
    save_checkpoint(path, model, CheckpointInfo("segmenter", "unet", {"base": 4, "depth": 2}, model.geometry,
                                                Normalization(120.0, 40.0),
                                                inference={"tile": 108, "input_dtype": "uint8"}))
    return path, model


def test_compile_choices():
    assert not wants_compile("auto", "cpu") and wants_compile("auto", "cuda")
    assert wants_compile("on", "cpu") and not wants_compile("off", "cuda")
    assert wants_compile(True, "cpu") and not wants_compile(False, "cuda")  # the old boolean
    assert PredictOptions(compile_model=True).compile_model == "on"
    assert PredictOptions(compile_model=False).compile_model == "off"
    assert PredictOptions().compile_model == "auto"
    with pytest.raises(SegkitError, match=r"unknown compile choice 'maybe'; choose one of auto, on, off") as raised:
        PredictOptions(compile_model="maybe")
    assert "\n" not in str(raised.value)
    with pytest.raises(SegkitError, match="choose one of auto, on, off"):
        wants_compile("yes", "cpu")


def test_a_bad_compile_value_is_one_line(uint8_stack, tmp_path):
    result = run("predict", uint8_stack, "-o", tmp_path / "out.tif", "--compile", "maybe")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert errors == ["Error: Invalid value for '--compile': 'maybe' is not one of 'auto', 'on', 'off'."], result.stderr
    assert not (tmp_path / "out.tif").exists()


def test_auto_does_not_compile_on_the_cpu(small_checkpoint):
    _, model = small_checkpoint
    engine = TorchEngine(model, device="cpu", compile_model="auto")
    assert not engine.compiled and engine._compiled_model is None and "compiled" not in engine.label
    x = torch.zeros((3, 1, 108, 108))
    engine(x)
    assert engine._largest_batch == 0  # the eager path: no padding to a compiled shape
    # measurements (tile auto, the trial tile for the batch) run eager even when compiling
    from torch._dynamo.utils import counters

    compiling = TorchEngine(model, device="cpu", compile_model="on")
    frames = sum(counters["frames"].values())
    with compiling.eager():
        compiling(x)
    assert compiling.compiled and sum(counters["frames"].values()) == frames and compiling._largest_batch == 0


def test_auto_compiles_only_models_measured_to_win():
    from segkit.inference.engines import compile_choice_for

    assert compile_choice_for("auto", "unet") == "auto"  # the paper U-Net: compiled on CUDA
    assert [compile_choice_for("auto", name) for name in ("smp:Unet:resnet34", "fcn8s", "denoiser", "")] == ["off"] * 4
    assert (compile_choice_for("on", "fcn8s"), compile_choice_for(False, "unet"), compile_choice_for(True, "x")) == (
        "on", "off", "on")


def test_channels_last_gives_the_plain_models_result(small_checkpoint):
    _, model = small_checkpoint
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 108, 108)).astype(np.float32))
    with torch.inference_mode():
        plain = torch.softmax(model.to(memory_format=torch.contiguous_format)(x.contiguous()), dim=1)[:, 1:2]
    engine = TorchEngine(model, device="cpu", compile_model="off")
    conv = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    out = engine(x)
    assert out.shape == plain.shape and float((out - plain).abs().max()) < 1e-5


def test_user_cache_dir_follows_the_platform_and_segkit_cache_dir(tmp_path):
    home = os.path.expanduser("~")
    assert user_cache_dir({}, "linux") == user_cache_dir({"XDG_CACHE_HOME": "relative"}, "linux")
    assert str(user_cache_dir({}, "linux")) == os.path.join(home, ".cache", "segkit")
    assert user_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}, "linux") == tmp_path / "segkit"
    assert str(user_cache_dir({}, "darwin")) == os.path.join(home, "Library", "Caches", "segkit")
    assert user_cache_dir({"LOCALAPPDATA": str(tmp_path)}, "win32") == tmp_path / "segkit" / "Cache"
    assert user_cache_dir({"SEGKIT_CACHE_DIR": str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}, "linux") == tmp_path / "c"
    # inductor's caches go under it, unless the user chose their own TORCHINDUCTOR_CACHE_DIR
    environ = {"SEGKIT_CACHE_DIR": str(tmp_path / "c")}
    assert use_compile_cache(environ) == tmp_path / "c" / "torchinductor" and (tmp_path / "c" / "torchinductor").is_dir()
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "torchinductor")
    mine = {"SEGKIT_CACHE_DIR": str(tmp_path / "c"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}
    assert use_compile_cache(mine) == tmp_path / "mine"


def test_compiled_run_equals_eager_and_a_second_process_reuses_the_cache(small_checkpoint, tmp_path):
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        skip_unless_required("torch.compile on the CPU needs a C++ compiler (g++ or clang++); none is installed")
    checkpoint, _ = small_checkpoint
    stack = tmp_path / "plane.tif"
    tifffile.imwrite(stack, np.random.default_rng(2).integers(0, 256, (1, 100, 100), dtype=np.uint8),
                     photometric="minisblack")
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_CACHE"))}
    env.update(SEGKIT_CACHE_DIR=str(cache), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def compiled_run(name: str) -> dict:
        args = ["predict", str(stack), "-m", str(checkpoint), "--device", "cpu", "--tile", "108", "--batch", "3",
                "--compile", "on", "-o", str(tmp_path / f"{name}.tif"), "-q"]
        done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and lines, done.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT "):])

    first = compiled_run("first")
    # 4 tiles at batch 3: the short second batch is padded to the compiled shape, not compiled again
    assert first["code"] in (0, None) and first["inductor"].get("fxgraph_cache_miss", 0) == 1, first
    assert any((cache / "torchinductor").rglob("*")), "nothing was written to the cache dir"
    second = compiled_run("second")
    # the second process loads the compiled graph from disk instead of compiling it
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1, second
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second
    print(f"compiled run: first process {first['seconds']:.1f} s, second {second['seconds']:.1f} s")

    eager = run("predict", stack, "-m", checkpoint, "--device", "cpu", "--tile", 108, "--batch", 3,
                "--compile", "off", "-o", tmp_path / "eager.tif", "-q")
    assert eager.exit_code == 0, eager.output
    reference = tifffile.imread(tmp_path / "eager.tif").astype(int)
    for name in ("first", "second"):
        out = tifffile.imread(tmp_path / f"{name}.tif").astype(int)
        # float32 on both sides: at most a rounding of the uint8 level apart
        assert out.shape == reference.shape and np.abs(out - reference).max() <= 1
        assert (out != reference).mean() < 0.01
