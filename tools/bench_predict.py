"""End-to-end prediction throughput, TIFF on disk to TIFF on disk, segkit against MONAI and an
nnU-Net-style loop, with the same weights, in one run.

Usage:
  python tools/bench_predict.py                                   # GPU: 64 x 4096 x 4096 uint8 (1 Gpx)
  python tools/bench_predict.py --planes 256                      # 4 Gpx, for the flat-RSS check
  python tools/bench_predict.py --planes 8 --size 2048 --device cpu --runs null   # the pipeline's own ceiling
  python tools/bench_predict.py --planes 2 --size 1024 --device cpu --amp none --runs segkit-torch,monai-best
  python tools/bench_predict.py --isbi-slice --device cpu         # seconds per 512 x 512 ISBI slice, torch vs ORT

Runs (each in its own process, so peak RSS and GPU memory are its own):
  model-device   the bare smp model (autocast as --amp) on batches of --tile tiles already on the device:
                 the model's own rate
  model-only     segkit's engine protocol on the same device tensors (the ceiling for segkit-*)
  null           `segkit.predict` with a zero-cost engine of the smp model's geometry (tiles blended,
                 output sigmoid(8 x input), which compresses like a real probability map): the
                 pipeline's own ceiling (read, upload, pad, tile, blend, encode, download, compress, write)
  segkit-torch   `segkit.predict` with the smp model (--tile, halo 64, blended), torch engine, --batch, --amp
  segkit-default the same with segkit's defaults (amp auto, batch from the free device memory)
  segkit-onnx    the same through ONNX Runtime (the file exported beforehand, fp16 with --amp fp16)
  unet-auto      `segkit predict --tile auto` with the original U-Net (base 64)
  unet-572       the original U-Net (base 64) at tile 572 (segkit's defaults: --compile auto compiles on a GPU)
  unet-572-eager the same with --compile off
  monai-default  per plane: tifffile read -> MONAI sliding_window_inference (roi 512, overlap 0.25,
                 constant, sw_batch_size 4) -> uint8 -> the same TIFF writer
  monai-best     the same with overlap 0.25, gaussian, sw_batch_size 32
  nnunet-loop    per plane: one 512 patch at a time, step 0.5, Gaussian weights (sigma 1/8), fp16
The stack is synthetic and built once in --workdir: smooth structures plus noise, which zlib
compresses to 0.94 of its size as it does the ISBI 2012 EM slices (0.943); the null run's output
compresses to 0.57 as the bundled U-Net's real probability maps do (0.54). Weights are random
with a fixed seed: throughput does not depend on them. monai is needed for the monai runs only
(pip install monai). Each run reports total seconds, steady-state Mpx/s (from the first finished
tile batch to the last plane written, so start-up is excluded), start-up seconds (process start
to the first finished tile batch), GPU busy % in the steady state, peak RSS and peak GPU memory.
Prints one JSON line per run and a summary line.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the child's start, before any heavy import: start-up is measured from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

RUNS = ("model-device", "model-only", "null", "segkit-torch", "segkit-default", "segkit-onnx", "unet-auto", "unet-572", "unet-572-eager",
        "monai-default", "monai-best", "nnunet-loop")
SMP_NAME, SMP_KWARGS = "smp:Unet:resnet34", {"halo": 64}
TILE = 512  # MONAI's roi and the nnU-Net patch


# -- setup ---------------------------------------------------------------------------------------

def make_stack(path: Path, planes: int, size: int) -> Path:
    if path.exists():
        with tifffile.TiffFile(path) as tif:
            if tif.series[0].shape == (planes, size, size):
                return path
    import cv2

    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for _ in range(planes):
            noise = rng.random((size // 8, size // 8)).astype(np.float32)
            plane = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
            plane = np.clip(plane * 200 + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)
            writer.write(plane, photometric="minisblack", contiguous=True)
    return path


def make_checkpoints(workdir: Path, *, tile: int, fp16: bool, onnx: bool = True) -> dict[str, Path]:
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    paths = {}
    for key, name, kwargs, trained_tile in (("smp", SMP_NAME, SMP_KWARGS, TILE), ("unet", "unet", {}, 572)):
        path = workdir / f"{key}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            model = create_model(name, **kwargs)
            if key == "smp":  # BatchNorm statistics of the random network's own activations, as training
                model.train()  # would give; without them activations grow layer by layer
                with torch.no_grad():
                    for _ in range(4):
                        model(torch.randn(4, 1, 256, 256))
                model.eval()
            save_checkpoint(path, model, CheckpointInfo("segmenter", name, kwargs, model.geometry,
                                                        Normalization(110.0, 60.0),
                                                        inference={"tile": trained_tile, "input_dtype": "uint8"}))
        paths[key] = path
    onnx_path = workdir / f"smp_{tile}_{'fp16' if fp16 else 'fp32'}.onnx"
    if onnx and not onnx_path.exists():
        run_cli(["export", str(paths["smp"]), "-o", str(onnx_path), "--tile", str(tile)] + (["--fp16"] if fp16 else []))
    paths["onnx"] = onnx_path
    return paths


def run_cli(arguments: list[str]) -> None:
    """Run a segkit command in this process; a failure ends the run with its exit code."""
    from segkit.cli import main as cli

    code = cli(arguments, standalone_mode=False)
    if code:
        raise SystemExit(f"segkit {arguments[0]} failed with exit code {code}")


def plan_pixels(size: int, tile: int) -> int:
    """Tile pixels the smp model computes per size x size plane at `tile`."""
    from segkit.inference.tiler import plan_tiles
    from segkit.models import create_model

    geometry = create_model(SMP_NAME, **SMP_KWARGS).geometry
    return plan_tiles((size, size), geometry, tile=tile).n_tiles * tile * tile


def fewest_pixels_tile(size: int) -> int:
    from segkit.inference.device_fit import candidate_tiles
    from segkit.inference.tiler import plan_tiles
    from segkit.models import create_model

    geometry = create_model(SMP_NAME, **SMP_KWARGS).geometry
    return min(candidate_tiles(geometry, (size, size)),
               key=lambda t: plan_tiles((size, size), geometry, tile=t).n_tiles * t * t)


# -- measurement helpers (in the child process) -------------------------------------------------------

class GpuSampler:
    """Mean GPU utilisation from nvidia-smi, sampled every 0.2 s while a run is going."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append((time.perf_counter(), float(out.strip().splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuSampler":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def mean(self, since: float | None = None) -> float | None:
        """Mean utilisation of the samples taken after `since` (all when None)."""
        values = [u for t, u in self.samples if since is None or t >= since]
        return round(float(np.mean(values)), 1) if values else None


class Timeline:
    """A progress sink for `segkit.predict` that notes when the first tile batch finished."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.first_tiles = 0
        self.total = 0

    def reset(self, total: int | None = None) -> None:
        self.total = total or 0

    def update(self, n: int = 1) -> None:
        if self.first is None:
            self.first, self.first_tiles = time.perf_counter(), n


class NullEngine:
    """A zero-cost engine with a real model's geometry: sigmoid(8 x) of each tile's centre, so the
    output is a smooth, compressible map like a real probability map. Measures the pipeline alone."""

    label = "null engine"

    def __init__(self, geometry, info, device: str) -> None:
        import torch

        self.geometry, self.info = geometry, info
        self.device = torch.device(device)

    def __call__(self, x):
        import torch

        m = self.geometry.margin
        centre = x[:, :1, m : x.shape[2] - m, m : x.shape[3] - m] if m else x[:, :1]
        return on_one_thread(lambda: torch.sigmoid(centre * 8.0), x.device)


def on_one_thread(compute, device):
    """Run a stand-in computation on one CPU thread: a zero-cost engine should not compete with
    the pipeline for cores (on a GPU it runs on the device and this changes nothing)."""
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        return compute()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would also count the parent's pages at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def plane_writer(path: Path, planes, shape, timeline: Timeline):
    """The peers' planes through segkit's TIFF writer; the first plane marks the end of start-up."""
    from segkit.io.tiff import write_stack

    def noted(planes):
        for plane in planes:
            if timeline.first is None:
                timeline.first, timeline.first_tiles, timeline.total = time.perf_counter(), 1, shape[0]
            yield plane

    return write_stack(path, noted(planes), shape=shape, dtype=np.uint8, overwrite=True)


def load_torch_model(checkpoint: Path, device: str, amp: str):
    import torch

    from segkit.checkpoint import load_model

    model, info = load_model(checkpoint)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    return model, info


def monai_planes(stack_path: Path, checkpoint: Path, device: str, amp: str, *, best: bool):
    import torch
    from monai.inferers import sliding_window_inference

    model, info = load_torch_model(checkpoint, device, amp)
    mean, std = info.normalization.mean, info.normalization.std
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16 if amp == "bf16" else None
    with tifffile.TiffFile(stack_path) as tif:
        for page in tif.pages:
            x = torch.from_numpy(page.asarray()).to(device).float()[None, None]
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                logits = sliding_window_inference(x, (TILE, TILE), 32 if best else 4, model, overlap=0.25,
                                                  mode="gaussian" if best else "constant")
                probability = torch.softmax(logits.float(), dim=1)[0, 1]
            yield (probability * 255).round().to(torch.uint8).cpu().numpy()


def gaussian_importance(size: int, device: str):
    import torch

    centre = (size - 1) / 2
    axis = torch.exp(-0.5 * ((torch.arange(size, device=device) - centre) / (size / 8)) ** 2)
    weights = axis[:, None] * axis[None, :]
    return (weights / weights.max()).clamp_min(1e-3)


def nnunet_planes(stack_path: Path, checkpoint: Path, device: str, amp: str):
    """The nnU-Net v2 predictor's scheme in 2D: constant padding, step 0.5, one patch per forward,
    Gaussian importance weights, accumulation on the device."""
    import torch

    model, info = load_torch_model(checkpoint, device, amp)
    mean, std = info.normalization.mean, info.normalization.std
    weights = gaussian_importance(TILE, device)
    dtype = torch.float16 if amp == "fp16" else None
    with tifffile.TiffFile(stack_path) as tif:
        for page in tif.pages:
            plane = torch.from_numpy(page.asarray()).to(device).float()
            h, w = plane.shape
            ph, pw = max(h, TILE), max(w, TILE)
            x = torch.zeros((ph, pw), device=device)
            x[:h, :w] = (plane - mean) / std
            acc = torch.zeros((2, ph, pw), device=device)
            norm = torch.zeros((ph, pw), device=device)
            step = TILE // 2
            ys = sorted({*range(0, ph - TILE + 1, step), ph - TILE})
            xs = sorted({*range(0, pw - TILE + 1, step), pw - TILE})
            with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                for y in ys:
                    for x0 in xs:
                        patch = x[y : y + TILE, x0 : x0 + TILE][None, None]
                        logits = model(patch.contiguous(memory_format=torch.channels_last))[0].float()
                        acc[:, y : y + TILE, x0 : x0 + TILE] += torch.softmax(logits, 0) * weights
                        norm[y : y + TILE, x0 : x0 + TILE] += weights
            probability = (acc[1] / norm)[:h, :w]
            yield (probability * 255).round().to(torch.uint8).cpu().numpy()


def model_only(checkpoint: Path, device: str, amp: str, tile: int, batch: int, *, bare: bool,
               seconds: float = 20.0) -> dict:
    """Tile Mpx/s on batches already on the device: segkit's engine protocol, or (bare) the model
    itself in autocast, as a user would call it."""
    import torch

    from segkit.checkpoint import load_model
    from segkit.inference.device_fit import synchronize
    from segkit.inference.engines import TorchEngine

    model, _ = load_model(checkpoint)
    engine = TorchEngine(model, device=device, amp=amp)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 1, tile, tile)).astype(np.float32))
    x = x.to(engine.device)
    if bare:
        net, dtype = engine.model, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(engine.amp)
        x = x.contiguous(memory_format=torch.channels_last)

        def forward(x):
            with torch.inference_mode(), torch.autocast(engine.device.type, dtype=dtype, enabled=dtype is not None):
                return net(x)
    else:
        forward = engine
    for _ in range(3):
        forward(x)
    synchronize(engine.device)
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < seconds:
        forward(x)
        runs += 1
    synchronize(engine.device)
    elapsed = time.perf_counter() - started
    return {"tile_mpx_per_s": round(runs * batch * tile * tile / elapsed / 1e6, 3), "batch": batch, "tile": tile,
            "amp": engine.amp}


def segkit_run(run: str, args: argparse.Namespace, stack: Path, out: Path, checkpoints: dict,
               timeline: Timeline) -> None:
    """One `segkit.predict` call, as the CLI makes it (the API is what the CLI calls)."""
    import segkit

    common = dict(device=args.device, amp=args.amp, overwrite=True, report=lambda _: None, progress=timeline,
                  compression=args.compression)
    if run == "null":
        from segkit.checkpoint import read_info

        info = read_info(checkpoints["smp"])
        segkit.predict(stack, out, model=NullEngine(info.geometry, info, args.device), tile=args.tile,
                       batch=args.batch, **common)
    elif run == "segkit-default":  # `segkit predict big.tif --tile T`: amp and batch chosen by segkit
        segkit.predict(stack, out, model=checkpoints["smp"], tile=args.tile, device=args.device, overwrite=True,
                       report=lambda _: None, progress=timeline)
    elif run == "unet-auto":
        segkit.predict(stack, out, model=checkpoints["unet"], tile="auto", **common)
    elif run in ("unet-572", "unet-572-eager"):  # batch chosen by segkit
        segkit.predict(stack, out, model=checkpoints["unet"], tile=572,
                       compile_model="off" if run == "unet-572-eager" else "auto", **common)
    else:
        model = checkpoints["onnx"] if run == "segkit-onnx" else checkpoints["smp"]
        segkit.predict(stack, out, model=model, tile=args.tile, batch=args.batch, **common)


def child(run: str, args: argparse.Namespace) -> None:
    import torch

    workdir = Path(args.workdir)
    stack, out = workdir / args.stack_name, workdir / f"out_{run}.tif"
    checkpoints = {"smp": workdir / "smp.safetensors", "unet": workdir / "unet.safetensors",
                   "onnx": workdir / f"smp_{args.tile}_{'fp16' if args.amp != 'none' else 'fp32'}.onnx"}
    gpu = args.device.startswith("cuda")
    with tifffile.TiffFile(stack) as tif:
        shape = tif.series[0].shape
    row: dict = {"run": run}
    timeline = Timeline()
    with GpuSampler() as sampler:
        started = time.perf_counter()
        if run in ("model-only", "model-device"):
            row.update(model_only(checkpoints["smp"], args.device, args.amp, args.tile, args.batch,
                                  bare=run == "model-device", seconds=args.seconds))
        elif run.startswith("segkit") or run.startswith("unet") or run == "null":
            segkit_run(run, args, stack, out, checkpoints, timeline)
        elif run.startswith("monai"):
            plane_writer(out, monai_planes(stack, checkpoints["smp"], args.device, args.amp, best=run == "monai-best"),
                         shape, timeline)
        elif run == "nnunet-loop":
            plane_writer(out, nnunet_planes(stack, checkpoints["smp"], args.device, args.amp), shape, timeline)
        ended = time.perf_counter()
    if run not in ("model-only", "model-device"):
        pixels = float(np.prod(shape))
        first = timeline.first or started
        done_before = pixels * (timeline.first_tiles / timeline.total if timeline.total else 1 / shape[0])
        row.update(seconds=round(ended - started, 2), mpx_per_s=round(pixels / (ended - started) / 1e6, 3),
                   steady_mpx_per_s=round((pixels - done_before) / max(ended - first, 1e-9) / 1e6, 3),
                   startup_s=round(first - STARTED, 2))
    row.update(peak_rss_mb=peak_rss_mb(),
               gpu_util_percent=sampler.mean(since=timeline.first),
               peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None)
    print("RESULT " + json.dumps(row), flush=True)


# -- ISBI slice on the CPU -------------------------------------------------------------------------

def isbi_slice(args: argparse.Namespace) -> None:
    """Seconds per 512 x 512 ISBI slice with the paper U-Net (base 64), torch vs ONNX Runtime, as
    `segkit predict` runs it (model load and ONNX export excluded, tile auto-chosen as one 700 tile)."""
    import torch

    from segkit.export import export_onnx
    from segkit.inference.engines import OnnxEngine, TorchEngine
    from segkit.inference.tiler import predict_arrays
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    raw = tifffile.imread(Path(__file__).resolve().parents[1] / "segkit" / "data" / "isbi_test_raw.tif")[0]
    torch.manual_seed(0)
    model = create_model("unet").eval()
    info = CheckpointInfo("segmenter", "unet", {}, model.geometry, Normalization(127.0, 50.0))
    plane = info.normalization.apply(raw)
    rows = []
    for tile in (572, 700):
        engines = {"torch": TorchEngine(model, device=args.device, amp="none"),
                   "onnx": OnnxEngine(export_onnx(model, info, tile=tile)[0], model.geometry, device=args.device)}
        for name, engine in engines.items():
            list(predict_arrays([plane], engine, model.geometry, tile=tile, batch=4))  # warm-up
            started = time.perf_counter()
            repeats = 3
            for _ in range(repeats):
                list(predict_arrays([plane], engine, model.geometry, tile=tile, batch=4))
            rows.append({"engine": name, "tile": tile, "seconds_per_slice": round((time.perf_counter() - started) / repeats, 2),
                         "device": args.device, "threads": torch.get_num_threads()})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "isbi_slice_512", "model": "unet base 64", "results": rows}))


# -- driver ------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=64)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="auto (segkit's default: bf16 or fp16 on a GPU, none on the "
                                                      "CPU), none, fp16, bf16; the peers run at the same precision")
    parser.add_argument("--batch", type=int, default=None, help="segkit batch (default 16 on a GPU, 2 on the CPU)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the model-only runs measure")
    parser.add_argument("--compression", default="zlib", help="segkit's output compression (zlib, zstd, lzw, none)")
    parser.add_argument("--tile", type=int, default=None,
                        help="segkit's tile for the smp model (default: the valid size that covers a plane with the "
                             "fewest tile pixels, e.g. 1152 for 4096-px planes)")
    parser.add_argument("--workdir", default=None, help="where the stack and outputs go (default: a temp folder)")
    parser.add_argument("--isbi-slice", action="store_true", help="only time one 512 x 512 ISBI slice, torch vs ORT")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stack-name", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    from segkit.devices import resolve_amp

    args.amp = resolve_amp(args.amp, args.device)
    args.batch = args.batch or (16 if gpu else 2)
    if args.isbi_slice:
        isbi_slice(args)
        return
    if args.child:
        child(args.child, args)
        return

    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="segkit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack_name = f"stack_{args.planes}x{args.size}.tif"
    started = time.perf_counter()
    make_stack(workdir / stack_name, args.planes, args.size)
    if args.tile is None:
        args.tile = fewest_pixels_tile(args.size)
    make_checkpoints(workdir, tile=args.tile, fp16=args.amp != "none", onnx="segkit-onnx" in args.runs.split(","))
    print(json.dumps({"stack": str(workdir / stack_name), "gpx": args.planes * args.size**2 / 1e9,
                      "built_s": round(time.perf_counter() - started, 1)}), flush=True)
    results = []
    for run in args.runs.split(","):
        command = [sys.executable, __file__, "--child", run, "--stack-name", stack_name, "--workdir", str(workdir),
                   "--device", args.device, "--amp", args.amp, "--batch", str(args.batch),
                   "--compression", args.compression, "--seconds", str(args.seconds),
                   "--planes", str(args.planes), "--size", str(args.size), "--tile", str(args.tile)]
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1][len("RESULT "):])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row = {"run": run, "error": tail[:300]}
        print(json.dumps(row), flush=True)
        results.append(row)
    summary = {"benchmark": "predict_end_to_end", "planes": args.planes, "size": args.size, "device": args.device,
               "amp": args.amp, "results": results}
    by_run = {row["run"]: row for row in results if "error" not in row}
    # a plane costs its tiles: model-only's tile rate in plane pixels, for the smp model at --tile
    tile_px_per_plane = plan_pixels(args.size, args.tile)
    for name in ("model-only", "model-device"):
        if name in by_run:
            by_run[name]["plane_mpx_per_s"] = round(by_run[name]["tile_mpx_per_s"] * args.size**2
                                                    / tile_px_per_plane, 3)
    if "model-only" in by_run and "model-device" in by_run:
        summary["model_only_vs_model_device"] = round(by_run["model-only"]["tile_mpx_per_s"]
                                                      / by_run["model-device"]["tile_mpx_per_s"], 3)
    if "segkit-torch" in by_run and "model-only" in by_run:
        summary["segkit_vs_model_only"] = round(by_run["segkit-torch"]["steady_mpx_per_s"]
                                                / by_run["model-only"]["plane_mpx_per_s"], 3)
    for monai in ("monai-best", "monai-default"):
        if "segkit-torch" in by_run and monai in by_run:
            summary[f"segkit_vs_{monai}"] = round(by_run["segkit-torch"]["mpx_per_s"] / by_run[monai]["mpx_per_s"], 2)
    print(json.dumps(summary))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
