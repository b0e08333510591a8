"""Shared by tools/bench_train_nuclei.py and tools/bench_train_axon.py: train a segkit recipe and the
plain smp baseline (tools/baseline_smp.py) for the same wall time, score both on the test split.

By default both train at once, one CPU thread each, so they share the machine evenly (and any other
load on it equally); --sequential runs them one after the other with all threads.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse(dataset: str, default_recipe: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"segkit vs an smp Unet(resnet34) baseline on {dataset}")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / default_recipe))
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall time of each (default 20)")
    parser.add_argument("--sequential", action="store_true", help="one after the other, with all threads")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (section.key=value)")
    return parser.parse_args()


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run(dataset: str, default_recipe: str, keys: tuple[str, ...]) -> None:
    """Train, score and print the one JSON line (`keys` of the test scores, rounded)."""
    result = _train_both(dataset, default_recipe)
    result["segkit"]["test"] = {k: round(result["segkit"]["test"][k], 4) for k in keys}
    print(json.dumps(result))


def _train_both(dataset: str, default_recipe: str) -> dict[str, Any]:
    args = parse(dataset, default_recipe)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"bench_{dataset}_"))
    threads = None if args.sequential else 1
    train_cmd = [sys.executable, "-m", "segkit.cli", "train", args.recipe, f"train.out={out / 'segkit'}",
                 f"train.time_limit_min={args.minutes}", f"train.device={args.device}",
                 "train.epochs=1000", *args.overrides]
    base_cmd = [sys.executable, str(ROOT / "tools" / "baseline_smp.py"), "--dataset", dataset,
                "--minutes", str(args.minutes), "--threads", str(threads or os.cpu_count() or 1), "--device", args.device]
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "segkit_train.log", "w")
    segkit_proc = subprocess.Popen(train_cmd, env=_env(threads), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    baseline_line = None
    if not args.no_baseline:
        if args.sequential:
            segkit_proc.wait()
        baseline = subprocess.run(base_cmd, env=_env(threads), capture_output=True, text=True, cwd=ROOT)
        (out / "baseline.log").write_text(baseline.stderr)
        if baseline.returncode != 0:
            raise SystemExit(f"baseline failed:\n{baseline.stderr[-2000:]}")
        baseline_line = json.loads(baseline.stdout.strip().splitlines()[-1])
    if segkit_proc.wait() != 0:
        raise SystemExit(f"segkit train failed; see {out / 'segkit_train.log'}")
    sys.path.insert(0, str(ROOT))
    from segkit.config import load_recipe
    from segkit.training.validation import score_split

    recipe = load_recipe(args.recipe, args.overrides)
    history = json.loads((out / "segkit" / "log.json").read_text())
    test = score_split(str(out / "segkit" / "best.safetensors"), recipe["data"], "test", device=args.device)
    best = max(history, key=lambda row: row.get("map", row.get("dice_mean", -row.get("adapted_rand_error", 1))))
    segkit_result = {"recipe": args.recipe, "overrides": args.overrides, "epochs": len(history),
                     "best_epoch": best["epoch"], "test": test["scores"], "test_images": test["images"]}
    return {"tool": f"bench_train_{dataset}", "minutes": args.minutes, "threads_each": threads or os.cpu_count(),
            "concurrent": not args.sequential, "device": args.device, "segkit": segkit_result,
            "baseline": baseline_line, "wall_seconds": round(time.time() - started, 1), "run_folder": str(out)}
