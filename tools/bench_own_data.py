"""segkit on your own data (`segkit init` + `segkit train`) against a plain smp baseline
(tools/baseline_smp.py), side by side for the same training time, scored on the same test split.

Usage:
  python tools/bench_own_data.py                                   # every shared set under --data-root, 20 min each
  python tools/bench_own_data.py --datasets bbbc039,isbi2012 --minutes 5
  python tools/bench_own_data.py --data my_folder --kind instances --minutes 10 --out runs/bench
  python tools/bench_own_data.py --minutes 0.5 --datasets isbi2012  # smoke test

Per data set, in RUN = OUT/NAME: `segkit init DATA -o RUN/recipe.yaml --minutes M --device D [--kind K]
[--images NAME --labels NAME]` (its measuring is not counted), then at once (one thread each,
OMP_NUM_THREADS=MKL_NUM_THREADS=1) or with --sequential one after the other (all threads):
`segkit train RUN/recipe.yaml train.out=RUN/segkit` and the baseline on the same data, kind, split
(the recipe's; for a stack, its plane ranges), minutes, threads and device. segkit's best checkpoint
is scored on the test split (segkit.training.validation.score_split); the baseline scores itself.

Prints one JSON line per data set (both tools' test scores, the headline metrics and who wins each,
iterations, wall seconds, run folder) and, at the end, a markdown table (one row per data set and tool).
The same lines go to OUT/results.jsonl and the table to OUT/results.md. Run folders are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_train import BASELINE, ROOT, run_side_by_side, score_segkit, thread_env  # noqa: E402
from baseline_smp import SHARED, default_data_root, foreground_dice, rounded  # noqa: E402

#: How `segkit init` is pointed at a shared data set (beyond its folder).
SHARED_INIT_ARGS: dict[str, tuple[str, ...]] = {
    "bbbc039": (),
    "axondeepseg_sem": (),
    "isbi2012": ("--images", "train-volume.tif", "--labels", "train-labels.tif"),
}
#: Headline metrics per label kind: (score key, "higher" or "lower" is better); the first decides `winner`.
HEADLINE: dict[str, tuple[tuple[str, str], ...]] = {
    "instances": (("map", "higher"), ("f1@0.5", "higher")),
    "semantic": (("dice_foreground", "higher"),),
    "membrane": (("adapted_rand_error", "lower"),),
}
TABLE_COLUMNS = (("F1@0.5", "f1@0.5"), ("mean AP", "map"), ("fg Dice", "dice_foreground"),
                 ("adapted Rand error", "adapted_rand_error"))


@dataclass(frozen=True)
class DataSet:
    """One data set to benchmark: `path` is what `segkit init` gets, with `init_args`; `kind` None: init decides."""

    name: str
    path: Path
    kind: str | None = None
    init_args: tuple[str, ...] = ()


def _shared_present(root: Path, name: str) -> bool:
    stack = SHARED[name][1]
    return (root / name / stack[0]).is_file() if stack else (root / name / "train.txt").is_file()


def discover(data_root: Path, datasets: str | None = None, folders: list[Path] | tuple[Path, ...] = (),
             kind: str | None = None, images: str | None = None, labels: str | None = None) -> list[DataSet]:
    """The data sets to run: the shared ones named in `datasets` ('bbbc039,isbi2012') and the `folders`
    (with `kind`, and `images` / `labels` file names for a stack); neither given: every shared set
    present under `data_root`. Raises ValueError for an unknown or missing set."""
    chosen: list[DataSet] = []
    names = [n.strip() for n in datasets.split(",") if n.strip()] if datasets else []
    for name in names:
        if name not in SHARED:
            raise ValueError(f"unknown data set {name!r}; shared sets are {', '.join(SHARED)} (other folders: --data DIR)")
        if not _shared_present(data_root, name):
            raise ValueError(f"data set {name} not found under {data_root}; set --data-root or $SEGKIT_DATA")
    if not names and not folders:
        names = [name for name in SHARED if _shared_present(data_root, name)]
        if not names:
            raise ValueError(f"no shared data set ({', '.join(SHARED)}) under {data_root}; set --data-root or "
                             "$SEGKIT_DATA, or pass --data DIR")
    for name in names:
        chosen.append(DataSet(name, data_root / name, SHARED[name][0], SHARED_INIT_ARGS[name]))
    if (images is None) != (labels is None):
        raise ValueError("--images and --labels go together (the image stack and its label stack)")
    stack = ("--images", images, "--labels", labels) if images is not None else ()
    used = {d.name for d in chosen}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"--data {folder} is not a folder")
        name = folder.name if folder.name not in used else f"{folder.name}_{len(used)}"
        used.add(name)
        chosen.append(DataSet(name, folder, kind, stack))
    return chosen


def baseline_data_args(data: dict[str, Any]) -> list[str]:
    """The baseline's data options for a recipe's `data` section (paths resolved, as load_recipe returns
    them): a stack -> --images/--labels/--slices with the recipe's plane ranges; a folder with split files
    -> --data ROOT, when they are the layout the baseline reads (ROOT/images, ROOT/labels, ROOT/train.txt,
    val.txt, test.txt). ValueError when the baseline cannot read the same split."""
    root = Path(data["root"])
    raw, labels = root / data["raw"], root / data["labels"]
    if raw.is_file():
        ranges = []
        for split in ("train", "val", "test"):
            slices = data.get(f"{split}_slices")
            if not slices:
                raise ValueError(f"the recipe splits the stack {raw} without data.{split}_slices")
            ranges.append(f"{int(slices[0])}:{int(slices[1])}")
        return ["--images", str(raw), "--labels", str(labels), "--slices", ",".join(ranges)]
    same_split = all(isinstance(data.get(f"{s}_files"), str)
                     and _same(root / data[f"{s}_files"], root / f"{s}.txt") for s in ("train", "val", "test"))
    if not (_same(raw, root / "images") and _same(labels, root / "labels") and same_split):
        raise ValueError(f"the recipe's data ({raw}, {labels}, splits "
                         f"{[data.get(f'{s}_files') for s in ('train', 'val', 'test')]}) is not the folder layout the "
                         f"baseline reads (images/, labels/, train.txt, val.txt, test.txt in one folder); put the "
                         f"split in {root} as train.txt, val.txt and test.txt (e.g. the files segkit init wrote)")
    return ["--data", str(root)]


def _same(a: Path, b: Path) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def with_foreground_dice(scores: dict[str, Any]) -> dict[str, Any]:
    """Class scores with dice_foreground (the mean Dice of classes 1..K-1) added when missing."""
    if "dice_mean" in scores and "dice_foreground" not in scores:
        return {**scores, "dice_foreground": foreground_dice(scores)}
    return scores


def headline(kind: str, segkit: dict[str, Any], baseline: dict[str, Any] | None) -> tuple[dict, dict]:
    """({metric: {"segkit": v, "baseline": v}}, {metric: "segkit" | "baseline" | "tie" | None}) for the kind's
    headline metrics of the two test score dictionaries (values compared at 4 digits)."""
    values, winners = {}, {}
    for key, better in HEADLINE[kind]:
        s, b = _value(segkit, key), _value(baseline or {}, key)
        values[key] = {"segkit": s, "baseline": b}
        if s is None or b is None:
            winners[key] = None
        elif s == b:
            winners[key] = "tie"
        else:
            winners[key] = "segkit" if (s > b) == (better == "higher") else "baseline"
    return values, winners


def _value(scores: dict[str, Any], key: str) -> float | None:
    value = scores.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """A README table of bench results: one row per data set and tool; '–' where a metric does not apply."""
    head = ["data set", "kind", "tool", "minutes", "iterations", *(title for title, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for result in results:
        for tool in ("segkit", "baseline"):
            scores = (result.get(tool) or {}).get("test") or {}
            cells = [result["data_set"], result["kind"], "segkit" if tool == "segkit" else "smp baseline",
                     f"{result['minutes']:g}", str(result["iterations"].get(tool) or "–")]
            for _, key in TABLE_COLUMNS:
                value = _value(scores, key) if key in dict(HEADLINE[result["kind"]]) else None
                cells.append("–" if value is None else f"{value:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench_own_data] {message}", file=sys.stderr, flush=True)


def bench(dataset: DataSet, *, minutes: float, device: str, sequential: bool, out: Path) -> dict[str, Any]:
    """init, then segkit train and the baseline side by side, then segkit's test scores: the result line."""
    from segkit.config import load_recipe

    run_dir = out / dataset.name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} holds an earlier run; choose another --out (run folders are kept)")
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = None if sequential else 1
    recipe_path = run_dir / "recipe.yaml"
    init_cmd = [sys.executable, "-m", "segkit.cli", "init", str(dataset.path), *dataset.init_args,
                "-o", str(recipe_path), "--minutes", f"{minutes:g}", "--device", device,
                *(["--kind", dataset.kind] if dataset.kind else [])]
    log(f"{dataset.name}: {' '.join(init_cmd[2:])}")
    started = time.perf_counter()
    init = subprocess.run(init_cmd, env=thread_env(threads), capture_output=True, text=True, cwd=ROOT)
    init_seconds = round(time.perf_counter() - started, 1)
    (run_dir / "init.log").write_text(init.stdout + init.stderr)
    if init.returncode != 0:
        raise SystemExit(f"segkit init failed on {dataset.path} (exit {init.returncode}); see {run_dir / 'init.log'}:\n"
                         f"{(init.stdout + init.stderr)[-2000:]}")
    recipe = load_recipe(recipe_path)
    kind = recipe["data"]["labels_kind"]
    if dataset.kind and kind != dataset.kind:
        raise SystemExit(f"segkit init wrote labels_kind {kind} for {dataset.name}, not {dataset.kind}")
    train_cmd = [sys.executable, "-m", "segkit.cli", "train", str(recipe_path), f"train.out={run_dir / 'segkit'}"]
    base_cmd = [sys.executable, str(BASELINE), *baseline_data_args(recipe["data"]), "--kind", kind,
                "--minutes", f"{minutes:g}", "--threads", str(threads or os.cpu_count() or 1), "--device", device]
    log(f"{dataset.name}: segkit train and the baseline {'one after the other' if sequential else 'at once'}, "
        f"{minutes:g} min each; logs in {run_dir}")
    baseline, wall = run_side_by_side(train_cmd, base_cmd, run_dir, sequential=sequential, threads=threads)
    segkit = score_segkit(run_dir / "segkit", recipe, device)
    segkit["test"] = rounded(with_foreground_dice(segkit["test"]))
    segkit |= {"recipe": str(recipe_path), "init_seconds": init_seconds}
    values, winners = headline(kind, segkit["test"], baseline["test"])
    return {"tool": "bench_own_data", "data_set": dataset.name, "data": str(dataset.path), "kind": kind,
            "minutes": minutes, "device": device, "concurrent": not sequential,
            "threads_each": threads or os.cpu_count(), "headline": values, "winner": winners,
            "iterations": {"segkit": segkit["iterations"], "baseline": baseline["iterations"]},
            "wall_seconds": wall, "segkit": segkit, "baseline": baseline, "run_folder": str(run_dir)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", help=f"comma-separated shared sets ({','.join(SHARED)}); default: every one present")
    p.add_argument("--data", type=Path, action="append", default=[], metavar="DIR",
                   help="another data folder (repeatable): what `segkit init DIR` takes")
    p.add_argument("--kind", choices=tuple(HEADLINE), help="label kind of the --data folders (default: init decides)")
    p.add_argument("--images", help="image stack file name in the --data folders (with --labels)")
    p.add_argument("--labels", help="label stack file name in the --data folders")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder of the shared data sets (default: $SEGKIT_DATA or ../shared/data)")
    p.add_argument("--minutes", type=float, default=20.0, help="training wall time of each tool (default 20)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequential", action="store_true", help="one after the other, with all threads")
    p.add_argument("--out", type=Path, default=None, help="folder of the runs (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    try:
        datasets = discover(args.data_root or default_data_root(), args.datasets, args.data, args.kind,
                            args.images, args.labels)
    except ValueError as exc:
        p.error(str(exc))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_own_data_"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"{', '.join(d.name for d in datasets)}: {args.minutes:g} min each on {args.device}; runs in {out}")
    results = []
    for dataset in datasets:
        result = bench(dataset, minutes=args.minutes, device=args.device, sequential=args.sequential, out=out)
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(line + "\n")
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table, flush=True)


if __name__ == "__main__":
    main()
