"""The null run of tools/bench_predict.py, before and after the device-resident pipeline, in one
harness, for the before/after CPU figure in README. Before: commit 2af01e0 (numpy tiler, a
one-thread zlib writer); after: this checkout (segkit.predict).

Usage (the old code in a worktree of its own, this script from the new one):
  git worktree add /tmp/segkit-before 2af01e0
  python tools/bench_null_before.py /tmp/segkit-before                 # as that commit installs: Python's zlib
  python tools/bench_null_before.py /tmp/segkit-before --imagecodecs   # with imagecodecs (libdeflate) added by hand
  python tools/bench_null_before.py --after                            # this checkout

Same stack (8 x 2048 x 2048 uint8, tools/bench_predict.make_stack), same smp geometry (halo 64,
tile 1152, batch 2, cosine blending), same null engine (sigmoid(8 x) of each tile, on one thread:
it stands for an engine that costs nothing), zlib output.
Prints one JSON line: the seconds of `--runs` runs in one process (default 7; this VM's timings
vary by a third from run to run), the best and the median as Mpx/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, nargs="?", help="a checkout of the old commit")
    parser.add_argument("--after", action="store_true", help="measure this checkout instead")
    parser.add_argument("--imagecodecs", action="store_true", help="let tifffile use imagecodecs (libdeflate)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segkit-null"))
    parser.add_argument("--runs", type=int, default=7, help="runs in this process")
    args = parser.parse_args()
    sys.path.insert(0, str(TOOLS))
    if args.after:
        after(args.workdir, args.runs)
        return
    if not args.imagecodecs:
        sys.modules["imagecodecs"] = None  # the last commit did not depend on it: tifffile uses Python's zlib
    sys.path.insert(0, str(args.checkout))
    import torch
    from bench_predict import SMP_KWARGS, SMP_NAME, fewest_pixels_tile, make_stack, on_one_thread

    # the old checkout's names (commit 2af01e0): OutputSpec and Normalization lived there then
    from segkit.checkpoint import Normalization
    from segkit.inference.pipeline import OutputSpec, predict_stack
    from segkit.io.tiff import open_stack
    from segkit.models import create_model

    assert Path(sys.modules["segkit"].__file__).is_relative_to(args.checkout), "the old segkit was not imported"
    geometry = create_model(SMP_NAME, **SMP_KWARGS).geometry
    args.workdir.mkdir(parents=True, exist_ok=True)
    stack_path = make_stack(args.workdir / "stack_8x2048.tif", 8, 2048)
    tile = fewest_pixels_tile(2048)

    def null(x):  # numpy in and out, as that commit's engines; on one thread, as bench_predict.NullEngine
        return on_one_thread(lambda: torch.sigmoid(8 * torch.from_numpy(x)).numpy(), "cpu")

    seconds = []
    for _ in range(args.runs):
        with open_stack(stack_path) as stack:
            started = time.perf_counter()
            predict_stack(stack, null, geometry, args.workdir / "out_before.tif", normalization=Normalization(110.0, 60.0),
                          tile=tile, batch=2, spec=OutputSpec(), overwrite=True)
            seconds.append(time.perf_counter() - started)
    print(json.dumps({"run": "null-before", "imagecodecs": args.imagecodecs, "tile": tile, **rates(seconds)}))


def after(workdir: Path, runs: int) -> None:
    from bench_predict import SMP_KWARGS, SMP_NAME, NullEngine, fewest_pixels_tile, make_stack

    import segkit
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    geometry = create_model(SMP_NAME, **SMP_KWARGS).geometry
    info = CheckpointInfo("segmenter", SMP_NAME, SMP_KWARGS, geometry, Normalization(110.0, 60.0))
    workdir.mkdir(parents=True, exist_ok=True)
    stack_path = make_stack(workdir / "stack_8x2048.tif", 8, 2048)
    tile = fewest_pixels_tile(2048)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        segkit.predict(stack_path, workdir / "out_after.tif", model=NullEngine(geometry, info, "cpu"), tile=tile,
                       batch=2, overwrite=True, report=lambda _: None)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"run": "null-after", "tile": tile, **rates(seconds)}))


def rates(seconds: list[float]) -> dict:
    """The runs' seconds, and the best and median rate in Mpx/s (8 planes of 2048 x 2048)."""
    mpx = 8 * 2048**2 / 1e6
    return {"seconds": [round(s, 3) for s in seconds], "mpx_per_s": round(mpx / min(seconds), 1),
            "median_mpx_per_s": round(mpx / statistics.median(seconds), 1)}


if __name__ == "__main__":
    main()
