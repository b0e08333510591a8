"""Write throughput and peak memory of segkit's TIFF writer, ImageJ hyperstack vs OME-TIFF.

Each case runs in a fresh process (its own peak RSS) and prints one JSON line: format, dtype,
compression, planes, plane size, workers, Mpx/s, MB/s of raw pixels, seconds, output MB and peak
RSS (and the RSS before writing: what the writer adds is the difference). The planes are made before the clock starts (four smooth probability-like planes with noise,
cycled), so only casting, compressing and writing are timed. Two plane counts per case show that
memory does not grow with the stack.

    python tools/bench_tiff_write.py                         # uint8 and float32, ImageJ and OME, zlib
    python tools/bench_tiff_write.py --size 4096 --planes 16 64 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_peak_rss() -> None:
    """Set the peak RSS to the current RSS (Linux: writing 5 to /proc/self/clear_refs); elsewhere a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_planes(size: int, dtype: str) -> list[np.ndarray]:
    """Four planes like a model's output: smooth blobs in [0, 1] plus a little noise, as `dtype`."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    planes = []
    for k in range(4):
        smooth = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + k) * x) * np.cos(2 * np.pi * (2 + k) * y)
        value = np.clip(smooth + rng.normal(0, 0.02, smooth.shape), 0, 1)
        planes.append((value * 255 + 0.5).astype(np.uint8) if dtype == "uint8" else value.astype(np.float32))
    return planes


def run_case(fmt: str, dtype: str, compression: str, planes: int, size: int, workers: int | None) -> dict:
    from segkit.io.calibration import Calibration
    from segkit.io.tiff import write_stack

    stock = make_planes(size, dtype)
    shape = (planes, size, size)
    reset_peak_rss()  # forget the temporaries of make_planes
    before = peak_rss_mb()  # the interpreter, numpy, tifffile and the four planes
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.tif"
        start = time.perf_counter()
        write_stack(out, (stock[i % 4] for i in range(planes)), shape=shape, dtype=np.dtype(dtype),
                    calibration=Calibration(0.005, 0.005, 0.04, "micrometer"), content="probabilities",
                    compression=compression, workers=workers, imagej_limit=2**32 if fmt == "imagej" else 0)
        seconds = time.perf_counter() - start
        size_mb = out.stat().st_size / 1e6
    pixels = planes * size * size
    return {"format": fmt, "dtype": dtype, "compression": compression, "planes": planes, "plane": f"{size}x{size}",
            "workers": workers or min(os.cpu_count() or 1, 8), "cpus": os.cpu_count(),
            "mpx_per_s": round(pixels / seconds / 1e6, 1),
            "raw_mb_per_s": round(pixels * np.dtype(dtype).itemsize / seconds / 1e6, 1),
            "seconds": round(seconds, 2), "output_mb": round(size_mb, 1), "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="plane width and height (default 2048: 4 Mpx)")
    parser.add_argument("--planes", type=int, nargs="+", default=[8, 32], help="plane counts (default 8 32)")
    parser.add_argument("--dtypes", nargs="+", default=["uint8", "float32"])
    parser.add_argument("--formats", nargs="+", default=["imagej", "ome"])
    parser.add_argument("--compression", default="zlib")
    parser.add_argument("--workers", type=int, default=None, help="compression threads (default: write_stack's)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (JSON)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))), flush=True)
        return
    for dtype in args.dtypes:
        for fmt in args.formats:
            for planes in args.planes:
                case = {"fmt": fmt, "dtype": dtype, "compression": args.compression, "planes": planes,
                        "size": args.size, "workers": args.workers}
                subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], check=True)


if __name__ == "__main__":
    main()
