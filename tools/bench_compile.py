"""The paper U-Net (base 64) at tile 572 through segkit's torch engine: eager against torch.compile's
modes, on batches already on the device. One child process per variant, so each compiles from a
cold cache (a fresh SEGKIT_CACHE_DIR in --workdir) unless --warm runs it a second time.

Usage (on a GPU machine; one JSON line per variant, then a summary line):
  python tools/bench_compile.py                                  # fp16, batch 16, eager + 3 modes
  python tools/bench_compile.py --variants eager,max-autotune-no-cudagraphs --warm
  python tools/bench_compile.py --device cpu --amp none --batch 2 --tile 188 --seconds 5 --variants eager,default

Each line: compile seconds (the first call), tile and output Mpx/s in the steady state (output pixels
= what the tiles cover of a plane, comparable to bench_predict's plane rates), GPU busy % while
measuring, peak GPU memory, and how far the output is from eager's (max absolute probability
difference and uint8 levels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("eager", "max-autotune-no-cudagraphs", "default", "reduce-overhead")


def child(args: argparse.Namespace) -> None:
    import torch
    from bench_predict import GpuSampler

    from segkit.inference.device_fit import synchronize
    from segkit.inference.engines import TorchEngine
    from segkit.models import create_model

    torch.manual_seed(0)
    model = create_model("unet")
    variant = args.child
    engine = TorchEngine(model, device=args.device, amp=args.amp, compile_model=variant != "eager",
                         compile_mode=None if variant in ("eager", "default") else variant)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((args.batch, 1, args.tile, args.tile))
                         .astype(np.float32)).to(engine.device)
    started = time.perf_counter()
    out = engine(x)
    synchronize(engine.device)
    first = time.perf_counter() - started
    for _ in range(3):
        out = engine(x)
    synchronize(engine.device)
    reference = Path(args.workdir) / "eager.npy"
    probabilities = out.float().cpu().numpy()
    row = {"variant": variant, "tile": args.tile, "batch": args.batch, "amp": engine.amp, "device": str(engine.device),
           "first_call_s": round(first, 2)}
    if variant == "eager":
        np.save(reference, probabilities)
    elif reference.exists():
        eager = np.load(reference)
        levels = np.abs(np.round(probabilities * 255).astype(int) - np.round(eager * 255).astype(int))
        row.update(max_abs_diff_vs_eager=float(np.abs(probabilities - eager).max()),
                   max_levels_vs_eager=int(levels.max()), fraction_levels_differ=round(float((levels > 0).mean()), 5))
    with GpuSampler() as sampler:
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < args.seconds:
            engine(x)
            runs += 1
        synchronize(engine.device)
        elapsed = time.perf_counter() - started
    margin = engine.geometry.margin
    row.update(tile_mpx_per_s=round(runs * args.batch * args.tile ** 2 / elapsed / 1e6, 3),
               output_mpx_per_s=round(runs * args.batch * (args.tile - 2 * margin) ** 2 / elapsed / 1e6, 3),
               gpu_util_percent=sampler.mean(),
               peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2**20) if engine.uses_gpu else None)
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="eager and/or torch.compile modes (default = inductor's default mode)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", default="fp16")
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each variant is measured")
    parser.add_argument("--warm", action="store_true", help="run each compiled variant again on the warm cache")
    parser.add_argument("--workdir", default=None, help="cache and reference output (default: a fresh temp folder; "
                        "a reused one makes the \"cold\" runs warm)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="segkit-compile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    env["SEGKIT_CACHE_DIR"] = str(workdir / "cache")
    variants = args.variants.split(",")
    order = [(v, "cold") for v in variants] + [(v, "warm") for v in variants if args.warm and v != "eager"]
    rows = []
    for variant, cache in order:
        command = [sys.executable, __file__, "--child", variant, "--workdir", str(workdir), "--device", args.device,
                   "--amp", args.amp, "--tile", str(args.tile), "--batch", str(args.batch), "--seconds", str(args.seconds)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            row = {"variant": variant, "cache": cache, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
        else:
            row = {**json.loads(lines[-1][len("RESULT "):]), "cache": cache}
        rows.append(row)
        print(json.dumps(row), flush=True)
    eager = next((r for r in rows if r["variant"] == "eager" and "output_mpx_per_s" in r), None)
    best = max((r for r in rows if r["variant"] != "eager" and "output_mpx_per_s" in r),
               key=lambda r: r["output_mpx_per_s"], default=None)
    summary = {"summary": "paper U-Net eager vs compiled", "eager_output_mpx_per_s": eager and eager["output_mpx_per_s"],
               "best_mode": best and best["variant"], "best_output_mpx_per_s": best and best["output_mpx_per_s"]}
    if eager and best and eager["output_mpx_per_s"] > 0:
        summary["speedup"] = round(best["output_mpx_per_s"] / eager["output_mpx_per_s"], 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
