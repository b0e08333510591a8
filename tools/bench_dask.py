"""Throughput of the Dask/OME-Zarr path with 1 and 2 local workers against the plain pipeline.

Usage:
  python tools/bench_dask.py                               # CPU: 8 x 1024 x 1024, a width-16 U-Net
  python tools/bench_dask.py --planes 64 --size 4096 --base 64 --device cuda --workers 1

Same stack, same checkpoint, same tile: `segkit predict` to a TIFF (plain), then to OME-Zarr on a
local Dask cluster of N worker processes for each N in --workers. Wall time includes cluster
start-up and model loading. Prints one JSON line per run and a summary line with the Dask
overhead relative to the plain path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()

    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.cli import main as cli
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    work = Path(tempfile.mkdtemp(prefix="segkit-dask-"))
    try:
        rng = np.random.default_rng(0)
        stack = work / "stack.tif"
        with tifffile.TiffWriter(stack, bigtiff=True) as writer:
            for _ in range(args.planes):
                writer.write(rng.integers(0, 256, (args.size, args.size), dtype=np.uint8), photometric="minisblack",
                             contiguous=True)
        torch.manual_seed(0)
        model = create_model("unet", base=args.base)
        checkpoint = work / "unet.safetensors"
        save_checkpoint(checkpoint, model, CheckpointInfo("segmenter", "unet", {"base": args.base}, model.geometry,
                                                          Normalization(127.0, 73.0)))
        mpx = args.planes * args.size**2 / 1e6
        runs = [("plain", None)] + [(f"dask-{n}-workers", int(n)) for n in args.workers.split(",")]
        rows = []
        for name, workers in runs:
            out = work / ("plain.tif" if workers is None else f"{name}.ome.zarr")
            command = ["predict", str(stack), "-o", str(out), "-m", str(checkpoint), "--tile", str(args.tile),
                       "--device", args.device, "-q"]
            if workers is not None:
                command += ["--workers", str(workers), "--chunk", str(args.chunk)]
            started = time.perf_counter()
            code = cli(command, standalone_mode=False)
            if code:
                raise SystemExit(f"segkit predict failed ({name})")
            seconds = time.perf_counter() - started
            rows.append({"run": name, "seconds": round(seconds, 2), "mpx_per_s": round(mpx / seconds, 3)})
            print(json.dumps(rows[-1]), flush=True)
        plain = rows[0]["seconds"]
        print(json.dumps({"benchmark": "dask", "planes": args.planes, "size": args.size, "device": args.device,
                          "results": rows, "overhead_vs_plain": {r["run"]: round(r["seconds"] / plain - 1, 3)
                                                                 for r in rows[1:]}}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
