"""GPU checks of the device-resident pipeline, printed as JSON lines (run by tools/gpu_benchmarks.sh).

- the bundled U-Net on the bundled ISBI slices: GPU (full precision) == CPU, within one uint8 level;
- what the fast defaults (amp auto: bf16 where the GPU has it, fp16; torch.compile) change in the uint8 output;
- uint16 input, TTA, instances, the blended smp path and a many-file run on the GPU against the CPU;
- the batch segkit chooses from the free memory.
`--quick`: only the first two.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "segkit" / "data" / "isbi_test_raw.tif"


def levels(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two uint8 outputs are apart, in levels."""
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return {"max_levels": int(diff.max()), "mean_levels": round(float(diff.mean()), 4),
            "fraction_differing": round(float((diff > 0).mean()), 5)}


def main(quick: bool = False) -> None:
    import torch

    import segkit

    tmp = Path(tempfile.mkdtemp(prefix="segkit-gpu-"))
    quiet = {"report": lambda _: None, "overwrite": True}

    def run(name: str, source: Path, **options) -> np.ndarray:
        out = tmp / f"{name}.tif"
        started = time.perf_counter()
        result = segkit.predict(source, out, **quiet, **options)
        print(json.dumps({"run": name, "seconds": round(time.perf_counter() - started, 2), "tile": result.tile,
                          "batch": result.batch, "engine": result.engine}), flush=True)
        return tifffile.imread(out)

    cpu = run("cpu-fp32", SAMPLE, device="cpu", amp="none")
    gpu = run("gpu-fp32", SAMPLE, device="cuda", amp="none", compile_model="off")
    print(json.dumps({"check": "gpu fp32 vs cpu fp32, bundled U-Net, ISBI 25-29", **levels(gpu, cpu)}), flush=True)
    for amp in ("auto", "bf16", "fp16"):
        fast = run(f"gpu-{amp}", SAMPLE, device="cuda", amp=amp, compile_model="off")
        print(json.dumps({"check": f"gpu amp {amp} vs cpu fp32", **levels(fast, cpu)}), flush=True)
    for amp in ("none", "auto", "fp16"):  # torch.compile (what --compile auto does on a GPU) at each precision
        compiled = run(f"gpu-{amp}-compiled", SAMPLE, device="cuda", amp=amp, compile_model="on")
        print(json.dumps({"check": f"gpu amp {amp} compiled vs cpu fp32", **levels(compiled, cpu)}), flush=True)
    print(json.dumps({"amp_auto_resolves_to": "bf16" if torch.cuda.is_bf16_supported() else "fp16"}), flush=True)
    onnx_gpu(run, cpu)
    if quick:
        return

    raw = tifffile.imread(SAMPLE)
    wide = tmp / "uint16.tif"
    tifffile.imwrite(wide, raw.astype(np.uint16) * 257, photometric="minisblack")
    a = run("uint16-cpu", wide, device="cpu", amp="none", normalize="stack")
    b = run("uint16-gpu", wide, device="cuda", amp="none", normalize="stack")
    print(json.dumps({"check": "uint16 input gpu vs cpu", **levels(b, a)}), flush=True)

    a = run("tta-cpu", SAMPLE, device="cpu", amp="none", tta="flips")
    b = run("tta-gpu", SAMPLE, device="cuda", amp="none", tta="flips")
    print(json.dumps({"check": "tta flips gpu vs cpu", **levels(b, a)}), flush=True)

    a = run("instances-cpu", SAMPLE, device="cpu", amp="none", instances=True)
    b = run("instances-gpu", SAMPLE, device="cuda", amp="none", instances=True)
    print(json.dumps({"check": "instances gpu vs cpu", "equal": bool((a == b).all()),
                      "fraction_differing": round(float((a != b).mean()), 5)}), flush=True)

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    torch.manual_seed(0)
    model = create_model("smp:Unet:resnet18", halo=32)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 256, 256))
    model.eval()
    smp = tmp / "smp.safetensors"
    save_checkpoint(smp, model, CheckpointInfo("segmenter", "smp:Unet:resnet18", {"halo": 32}, model.geometry,
                                               Normalization(127.0, 50.0), inference={"tile": 512}))
    plane = tmp / "plane.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(plane, rng.integers(0, 255, (2, 1000, 1100), dtype=np.uint8), photometric="minisblack")
    a = run("smp-cpu", plane, model=smp, device="cpu", amp="none", tile=512)
    b = run("smp-gpu", plane, model=smp, device="cuda", amp="none", tile=512)
    print(json.dumps({"check": "blended smp gpu vs cpu", **levels(b, a)}), flush=True)

    folder = tmp / "many"
    folder.mkdir()
    for index in range(3):
        tifffile.imwrite(folder / f"s{index}.tif", raw[index], photometric="minisblack")
    result = segkit.predict(str(folder / "*.tif"), str(tmp / "many_out") + "/", device="cuda", **quiet)
    print(json.dumps({"check": "many files on the gpu", "written": len(result.outputs),
                      "failed": result.failed}), flush=True)


def onnx_gpu(run, cpu: np.ndarray) -> None:
    """ONNX Runtime's CUDA provider through IO binding (needs onnxruntime-gpu): the exported graph,
    fp32 and fp16, against the CPU in full precision."""
    try:
        import onnxruntime as ort
    except ImportError:
        print(json.dumps({"check": "onnx gpu", "skipped": "no onnxruntime"}), flush=True)
        return
    print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}), flush=True)
    for amp in ("none", "fp16"):
        try:
            out = run(f"onnx-gpu-{amp}", SAMPLE, device="cuda", amp=amp, engine="onnx")
        except Exception as exc:  # report and go on to the other checks
            print(json.dumps({"check": f"onnx gpu amp {amp}", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            continue
        print(json.dumps({"check": f"onnx gpu amp {amp} vs cpu fp32", **levels(out, cpu)}), flush=True)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
