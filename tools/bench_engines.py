"""Engine throughput: the same model, tiles and batch through every engine this machine has.

Usage:
  python tools/bench_engines.py                      # the paper U-Net (base 64, random weights), tile 572
  python tools/bench_engines.py -m runs/em_neurons/best.safetensors --batch 16 --seconds 20
  python tools/bench_engines.py --engines torch-cpu,ort-cpu --batch 2

Engines: torch-fp32, torch-fp16 (autocast, channels_last), torch-compile (fp16, max-autotune-no-cudagraphs)
and ort-cuda-fp32, ort-cuda-fp16, ort-tensorrt-fp16 on a GPU; torch-cpu and ort-cpu everywhere.
Tiles are cut from the bundled ISBI crop (mirror-padded to the tile), normalised as the model
says, so every engine sees the same real input. Each engine runs warm-up batches, then as many
batches as fit in --seconds. Prints one JSON line per engine (tiles/s, output Mpx/s, max abs
difference from torch fp32 on the first batch) and a last line with all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

GPU_ENGINES = ("torch-fp32", "torch-fp16", "torch-compile", "ort-cuda-fp32", "ort-cuda-fp16", "ort-tensorrt-fp16")
CPU_ENGINES = ("torch-cpu", "ort-cpu")


def load(model_path: str | None, base: int) -> tuple[object, object]:
    import torch

    from segkit.checkpoint import load_model
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    if model_path:
        return load_model(model_path)
    torch.manual_seed(0)
    model = create_model("unet", base=base).eval()
    info = CheckpointInfo("segmenter", "unet", {"base": base}, model.geometry, Normalization(127.0, 50.0),
                          inference={"input_dtype": "uint8"})
    return model, info


def real_tiles(info: object, tile: int, batch: int) -> np.ndarray:
    raw = tifffile.imread(Path(__file__).resolve().parents[1] / "segkit" / "data" / "isbi_test_raw.tif")
    planes = info.normalization.apply(raw)
    reps = -(-tile // raw.shape[1])
    planes = np.pad(planes, [(0, 0), (0, raw.shape[1] * (reps - 1)), (0, raw.shape[2] * (reps - 1))], mode="symmetric")
    picks = [planes[i % len(planes), :tile, :tile] for i in range(batch)]
    return np.ascontiguousarray(np.stack(picks)[:, None])


def make_engine(name: str, model: object, info: object, tile: int) -> Callable[[np.ndarray], np.ndarray]:
    from segkit.export import export_onnx
    from segkit.inference.engines import OnnxEngine, TorchEngine, tensorrt_loadable

    if name == "torch-cpu":
        return TorchEngine(model, device="cpu", amp="none")
    if name == "torch-fp32":
        return TorchEngine(model, device="cuda", amp="none")
    if name == "torch-fp16":
        return TorchEngine(model, device="cuda", amp="fp16")
    if name == "torch-compile":
        import torch

        engine = TorchEngine(model, device="cuda", amp="fp16")
        engine.model = torch.compile(engine.model, mode="max-autotune-no-cudagraphs")
        return engine
    fp16 = name.endswith("fp16")
    onnx_bytes, _ = export_onnx(model, info, tile=tile, fp16=fp16, fixed_tile=name == "ort-tensorrt-fp16")
    if name == "ort-cpu":
        return OnnxEngine(onnx_bytes, info.geometry, device="cpu")
    if name == "ort-tensorrt-fp16":
        if not tensorrt_loadable():
            raise RuntimeError("TensorRT (libnvinfer) is not installed")
        engine = OnnxEngine(onnx_bytes, info.geometry, device="cuda", fp16=True, use_tensorrt=True)
        if "Tensorrt" not in engine.provider:
            raise RuntimeError(f"TensorRT provider did not load (got {engine.provider})")
        return engine
    return OnnxEngine(onnx_bytes, info.geometry, device="cuda", fp16=fp16, use_tensorrt=False)


def measure(engine: Callable, tiles: np.ndarray, *, warmup: int, seconds: float) -> tuple[float, np.ndarray]:
    """Tiles per second of the engine protocol: tiles already on the engine's device, outputs left there."""
    import torch

    from segkit.inference.device_fit import synchronize

    x = torch.from_numpy(tiles).to(engine.device)
    first = engine(x).cpu().numpy()
    for _ in range(warmup - 1):
        engine(x)
    synchronize(engine.device)
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < seconds:
        engine(x)
        runs += 1
    synchronize(engine.device)
    return runs * len(tiles) / (time.perf_counter() - started), first


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="checkpoint (default: paper U-Net, random weights)")
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--batch", type=int, default=None, help="default 16 on a GPU, 2 on the CPU")
    parser.add_argument("--engines", default=None, help="comma-separated (default: all this machine has)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    engines = args.engines.split(",") if args.engines else list(GPU_ENGINES if gpu else ()) + list(CPU_ENGINES)
    batch = args.batch or (16 if gpu else 2)
    model, info = load(args.model, args.base)
    out = info.geometry.output_size(args.tile)
    tiles = real_tiles(info, args.tile, batch)
    reference = None
    results = []
    for name in engines:
        row = {"engine": name, "tile": args.tile, "output": out, "batch": batch,
               "device": torch.cuda.get_device_name(0) if gpu and name not in CPU_ENGINES else f"cpu x {torch.get_num_threads()}"}
        try:
            started = time.perf_counter()
            engine = make_engine(name, model, info, args.tile)
            row["setup_s"] = round(time.perf_counter() - started, 1)
            rate, first = measure(engine, tiles, warmup=args.warmup, seconds=args.seconds)
            if reference is None and name in ("torch-fp32", "torch-cpu"):
                reference = first
            row.update(tiles_per_s=round(rate, 3), output_mpx_per_s=round(rate * out * out / 1e6, 3),
                       provider=getattr(engine, "label", ""))
            if reference is not None:
                row["max_abs_diff_vs_torch_fp32"] = float(np.abs(first - reference).max())
        except Exception as exc:  # one engine missing on this machine must not stop the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps({"benchmark": "engines", "model": args.model or f"unet base {args.base} (random)",
                      "results": results}))


if __name__ == "__main__":
    main()
