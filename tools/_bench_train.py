"""Shared by tools/bench_train_nuclei.py, tools/bench_train_axon.py and tools/bench_own_data.py: train
segkit and the plain smp baseline (tools/baseline_smp.py) for the same wall time, score both on the
test split.

By default both train at once, one CPU thread each, so they share the machine evenly (and any other
load on it equally); --sequential runs them one after the other with all threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tools" / "baseline_smp.py"


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


def thread_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with OpenMP / MKL limited to `threads` (None: unchanged)."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_side_by_side(segkit_cmd: list[str], baseline_cmd: list[str] | None, out: Path, *, sequential: bool,
                     threads: int | None) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Run `segkit train` (log: out/segkit_train.log) and the baseline (log: out/baseline.log, its stdout:
    out/baseline.out) at once, or
    one after the other when `sequential`, under `thread_env(threads)`; the baseline's JSON line (None
    without a baseline) and the wall seconds of each. Either failing stops the program with its log."""
    out.mkdir(parents=True, exist_ok=True)
    env = thread_env(threads)
    wall: dict[str, float] = {}
    with (open(out / "segkit_train.log", "w") as segkit_log, open(out / "baseline.log", "w") as baseline_log,
          open(out / "baseline.out", "w") as baseline_out):
        started = {"segkit": time.perf_counter()}
        procs = {"segkit": subprocess.Popen(segkit_cmd, env=env, stdout=segkit_log, stderr=subprocess.STDOUT,
                                            cwd=ROOT)}
        if baseline_cmd is not None:
            if sequential:
                wall["segkit"] = _wait(procs["segkit"], started["segkit"])
            started["baseline"] = time.perf_counter()
            procs["baseline"] = subprocess.Popen(baseline_cmd, env=env, stdout=baseline_out, stderr=baseline_log,
                                                 cwd=ROOT)
        while len(wall) < len(procs):  # poll, so each one's wall time is its own
            for name, proc in procs.items():
                if name not in wall and proc.poll() is not None:
                    wall[name] = round(time.perf_counter() - started[name], 1)
            time.sleep(0.5)
    if procs["segkit"].returncode != 0:
        raise SystemExit(f"segkit train failed; see {out / 'segkit_train.log'}:\n{_tail(out / 'segkit_train.log')}")
    if baseline_cmd is None:
        return None, wall
    if procs["baseline"].returncode != 0:
        raise SystemExit(f"baseline failed; see {out / 'baseline.log'}:\n{_tail(out / 'baseline.log')}")
    return json.loads((out / "baseline.out").read_text().strip().splitlines()[-1]), wall


def _wait(proc: subprocess.Popen, started: float) -> float:
    proc.wait()
    return round(time.perf_counter() - started, 1)


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def best_epoch(history: list[dict[str, Any]]) -> int | None:
    """The epoch with the best validation score of a log.json history (mean AP, mean Dice, or the lowest
    adapted Rand error)."""
    if not history:
        return None
    # membrane runs keep the epoch of the lowest error at the threshold chosen on validation
    return max(history, key=lambda row: row.get("map", row.get("dice_mean", -row.get(
        "best_adapted_rand_error", row.get("adapted_rand_error", 1)))))["epoch"]


def segkit_iterations(history: list[dict[str, Any]], iters_per_epoch: int, log_text: str = "") -> int:
    """Training iterations of a run: full epochs x iters_per_epoch, the last epoch cut short by
    train.time_limit_min counted as the log says ("stopping in epoch E after N of M iterations")."""
    if history and all("iterations" in row for row in history):
        return int(sum(row["iterations"] for row in history))
    short = re.search(r"stopping in epoch (\d+) after (\d+) of (\d+) iterations", log_text)
    if short and history:
        return (len(history) - 1) * iters_per_epoch + int(short.group(2))
    return len(history) * iters_per_epoch


def score_segkit(run_dir: Path, recipe: dict[str, Any], device: str) -> dict[str, Any]:
    """segkit's run in `run_dir` (log.json, best.safetensors): epochs, iterations, best epoch, and the
    best checkpoint's scores on the test split of `recipe`'s data (score_split, per-image means)."""
    from segkit.training.validation import score_split

    history = json.loads((run_dir / "log.json").read_text())
    log = run_dir.parent / "segkit_train.log"
    test = score_split(str(run_dir / "best.safetensors"), recipe["data"], "test", device=device)
    return {"epochs": len(history), "best_epoch": best_epoch(history),
            "iterations": segkit_iterations(history, recipe["train"]["iters_per_epoch"],
                                            log.read_text(errors="replace") if log.exists() else ""),
            "test": test["scores"], "test_images": test["images"]}


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
    base_cmd = [sys.executable, str(BASELINE), "--dataset", dataset, "--minutes", str(args.minutes),
                "--threads", str(threads or os.cpu_count() or 1), "--device", args.device]
    started = time.time()
    baseline_line, wall = run_side_by_side(train_cmd, None if args.no_baseline else base_cmd, out,
                                           sequential=args.sequential, threads=threads)
    sys.path.insert(0, str(ROOT))
    from segkit.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    segkit_result = {"recipe": args.recipe, "overrides": args.overrides, **score_segkit(out / "segkit", recipe, args.device)}
    return {"tool": f"bench_train_{dataset}", "minutes": args.minutes, "threads_each": threads or os.cpu_count(),
            "concurrent": not args.sequential, "device": args.device, "segkit": segkit_result,
            "baseline": baseline_line, "wall_seconds": round(time.time() - started, 1), "run_folder": str(out)}
