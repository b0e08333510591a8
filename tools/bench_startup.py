"""Start-up of `segkit predict`: a whole process predicting one small slice, against importing torch.

Usage:
  python tools/bench_startup.py                    # 3 repeats, one 256 x 256 uint8 slice, the bundled U-Net, CPU
  python tools/bench_startup.py --repeats 5 --size 512 --device cuda

Measures, each in a fresh process, the median over --repeats of:
  torch_s        `python -c "import torch; torch.zeros(1)"`: the floor any torch program pays
  predict_s      `python -m segkit.cli predict slice.tif -o out.tif` with the bundled U-Net, whole process
  first_tile_s   process start to the first finished tile batch (segkit.predict with a progress object)
and prints one JSON line with them, predict_s / torch_s (issue 24's goal: <= 1.5 on the CPU) and the five
slowest top-level imports of the predict process (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

FIRST_TILE = """
import sys, time
started = float(sys.argv[1])
import segkit

class First:
    seen = None
    def reset(self, total=None):
        pass
    def update(self, n=1):
        if First.seen is None:
            First.seen = time.time()

segkit.predict(sys.argv[2], sys.argv[3], overwrite=True, device=sys.argv[4], report=lambda line: None,
               progress=First())
print(First.seen - started)
"""


def _wall(command: list[str]) -> float:
    """Seconds a command takes as a whole process (it must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def _first_tile(image: Path, output: Path, device: str) -> float:
    started = time.time()
    done = subprocess.run([sys.executable, "-c", FIRST_TILE, repr(started), str(image), str(output), device],
                          check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def _slowest_imports(image: Path, output: Path, device: str, count: int = 5) -> list[tuple[str, float]]:
    """The `count` slowest top-level imports (cumulative seconds) of one predict process."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "segkit.cli", "predict", str(image), "-o",
                           str(output), "--overwrite", "--device", device], capture_output=True, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if cumulative.strip().isdigit() and len(name) - len(name.lstrip()) <= 1:  # top level: one space
            rows.append((name.strip(), int(cumulative) / 1e6))
    return [(name, round(seconds, 3)) for name, seconds in sorted(rows, key=lambda row: -row[1])[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="slice height and width (px)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.repeats < 1 or args.size < 16:
        parser.error("--repeats must be >= 1 and --size >= 16")
    with tempfile.TemporaryDirectory() as folder:
        image, output = Path(folder) / "slice.tif", Path(folder) / "out.tif"
        tifffile.imwrite(image, np.random.default_rng(0).integers(0, 256, (args.size, args.size), dtype=np.uint8))
        predict = [sys.executable, "-m", "segkit.cli", "predict", str(image), "-o", str(output), "--overwrite",
                   "--device", args.device]
        _wall(predict)  # warm the file system cache: every repeat then reads the same files from memory
        torch_s = statistics.median(_wall([sys.executable, "-c", "import torch; torch.zeros(1)"])
                                    for _ in range(args.repeats))
        predict_s = statistics.median(_wall(predict) for _ in range(args.repeats))
        first_tile_s = statistics.median(_first_tile(image, output, args.device) for _ in range(args.repeats))
        slowest = _slowest_imports(image, output, args.device)
    import torch

    print(json.dumps({
        "bench": "startup", "device": args.device, "size": args.size, "repeats": args.repeats,
        "torch": torch.__version__, "torch_s": round(torch_s, 3), "predict_s": round(predict_s, 3),
        "first_tile_s": round(first_tile_s, 3), "predict_over_torch": round(predict_s / torch_s, 2),
        "slowest_imports": slowest,
    }))


if __name__ == "__main__":
    main()
