"""segkit's nuclei recipe vs a plain smp Unet(resnet34) baseline on BBBC039, equal training time;
test-split F1@0.5, AP@0.5 and mean AP@0.5:0.95 (per-image means). Prints one JSON line.

    python tools/bench_train_nuclei.py --minutes 20                        # CPU recipe, both on 1 thread each
    python tools/bench_train_nuclei.py --recipe recipes/nuclei_bbbc039.yaml --device cuda --minutes 20 --sequential
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_train import run  # noqa: E402

if __name__ == "__main__":
    run("bbbc039", "nuclei_bbbc039_cpu.yaml", ("f1@0.5", "ap@0.5", "map", "f1@0.75"))
