"""Peak host memory of `segkit predict` on a 200 MB and a 2 GB synthetic stack (CPU, tiny model).

Usage: python tools/bench_memory.py [--small-mb 200] [--large-mb 2000] [--size 2048] [--base 2 --depth 2]

Each prediction runs in its own process, which reports its peak RSS (ru_maxrss). Streaming
means the two peaks are about equal although the large stack has 10x the planes.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile


def make_stack(path: Path, megabytes: int, size: int) -> int:
    planes = max(1, int(megabytes * 1e6 // (size * size)))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size), dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for z in range(planes):
            writer.write(np.roll(base, z, axis=1), photometric="minisblack", contiguous=True)
    return planes


def make_checkpoint(path: Path, base: int, depth: int) -> int:
    """A random tiny U-Net checkpoint; returns its valid tile size nearest above 1024."""
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    torch.manual_seed(0)
    model = create_model("unet", base=base, depth=depth)
    info = CheckpointInfo("segmenter", "unet", {"base": base, "depth": depth}, model.geometry,
                          Normalization(127.0, 73.0), inference={"input_dtype": "uint8"})
    save_checkpoint(path, model, info)
    return model.geometry.nearest_valid(1024)[1]


def child(stack: str, checkpoint: str, output: str, tile: int, batch: int) -> None:
    from segkit.cli import main as cli

    started = time.perf_counter()
    try:
        code = cli(["predict", stack, "-o", output, "-m", checkpoint, "--tile", str(tile), "--batch", str(batch),
                    "--device", "cpu", "-q"], standalone_mode=False)
        if code:  # standalone_mode=False returns the exit code of a user error instead of exiting
            raise SystemExit(f"segkit predict failed with exit code {code}")
    finally:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=int, default=200)
    parser.add_argument("--large-mb", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048, help="plane edge in pixels")
    parser.add_argument("--tile", type=int, default=None, help="default: the valid size nearest above 1024")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--base", type=int, default=2, help="U-Net base width of the tiny model")
    parser.add_argument("--depth", type=int, default=2, help="U-Net depth of the tiny model")
    parser.add_argument("--child", nargs=3, metavar=("STACK", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.tile, args.batch)
        return
    with tempfile.TemporaryDirectory(prefix="segkit-bench-") as tmp:
        checkpoint = Path(tmp) / "tiny.safetensors"
        args.tile = args.tile or make_checkpoint(checkpoint, args.base, args.depth)
        if not checkpoint.exists():
            make_checkpoint(checkpoint, args.base, args.depth)
        result: dict = {"plane": [args.size, args.size], "tile": args.tile, "batch": args.batch,
                        "model": f"unet base {args.base} depth {args.depth}"}
        for label, megabytes in (("small", args.small_mb), ("large", args.large_mb)):
            stack = Path(tmp) / f"{label}.tif"
            planes = make_stack(stack, megabytes, args.size)
            proc = subprocess.run(
                [sys.executable, __file__, "--tile", str(args.tile), "--batch", str(args.batch),
                 "--child", str(stack), str(checkpoint), str(Path(tmp) / f"{label}_out.tif")],
                capture_output=True, text=True, check=True,
            )
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            result[label] = {"stack_mb": round(stack.stat().st_size / 1e6), "planes": planes, **measured}
            stack.unlink()
    result["rss_ratio_large_over_small"] = round(result["large"]["peak_rss_mb"] / result["small"]["peak_rss_mb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
