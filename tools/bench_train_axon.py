"""segkit's axon/myelin recipe vs a plain smp Unet(resnet34) baseline on AxonDeepSeg SEM, equal
training time; test-split mean Dice/IoU and the Dice of myelin and axon (per-image means). Prints one
JSON line.

    python tools/bench_train_axon.py --minutes 20                          # CPU recipe, both on 1 thread each
    python tools/bench_train_axon.py --recipe recipes/axon_myelin_sem.yaml --device cuda --minutes 20 --sequential
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_train import run  # noqa: E402

if __name__ == "__main__":
    run("axondeepseg_sem", "axon_myelin_sem_cpu.yaml", ("dice_mean", "iou_mean", "dice_1", "dice_2"))
