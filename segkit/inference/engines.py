"""Engines run a model on a batch of tiles. One protocol for torch and ONNX Runtime:

    engine(x) -> y    x: (N, C, h, w) float32 tensor on `engine.device`
                      y: (N, K, h - 2 margin, w - 2 margin) float32 tensor on the same device

`device` is always a torch.device; `label` says in words what runs (for display). Tiles never
leave the device between the tiler and the engine: on CUDA, ONNX Runtime reads and writes torch's
device buffers through IO binding.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from segkit._optional import require
from segkit.devices import resolve_amp, resolve_device
from segkit.errors import SegkitError


class Engine(Protocol):
    """What the tiler needs of an engine (TorchEngine, OnnxEngine, TTAForward, a test double)."""

    device: Any  # torch.device
    label: str

    def __call__(self, x: Any) -> Any: ...


#: torch.compile's mode on CUDA devices: inductor's Triton kernels and cuDNN/cuBLAS algorithms chosen
#: by benchmarking each shape (the earlier H100 measurement of the paper U-Net at 572, fp16: 199 Mpx/s
#: against 109 eager). No CUDA graphs: the U-Net's batches of 572-px tiles take milliseconds each, so
#: launch overhead is small, and graphs would pin a second copy of every output. tools/bench_compile.py
#: measures the modes against each other on a GPU.
GPU_COMPILE_MODE = "max-autotune-no-cudagraphs"
#: The `compile_model` choices: auto compiles on CUDA devices only. On 2 shared CPU cores the bundled
#: U-Net at 572, batch 4, ran 2.13 s per batch compiled against 2.49 s eager channels_last (median
#: of 5, interleaved; 1.17x), but its first compile took 45 s (a cached one about 1 s more than
#: eager's first batch) and importing the compiler adds seconds: a loss for the one-slice runs the
#: CPU mostly sees, so auto leaves the CPU alone and `on` is there for long CPU runs.
COMPILE_CHOICES = ("auto", "on", "off")
#: Models `auto` compiles (on CUDA): those a GPU measurement showed to win, the paper U-Net (199 vs 109
#: Mpx/s on an H100, tile 572, fp16). Others (smp, FCN, the denoiser) run eager under auto until
#: tools/bench_compile.py shows a win for them; `on` compiles any model.
AUTO_COMPILE_MODELS = ("unet",)


def compile_choice_for(choice: str | bool, model_name: str) -> str:
    """The compile choice for the registry model `model_name`: `auto` becomes 'off' for models not in
    `AUTO_COMPILE_MODELS` (no measured win); 'on', 'off' (and booleans) are kept."""
    if isinstance(choice, bool):
        return "on" if choice else "off"
    return "off" if str(choice) == "auto" and model_name not in AUTO_COMPILE_MODELS else str(choice)


def wants_compile(choice: str | bool, device_type: str) -> bool:
    """Whether `compile_model=choice` compiles on a device of `device_type` ('cpu', 'cuda').

    Raises
    ------
    SegkitError
        A choice that is not auto, on, off (or a bool).
    """
    choice = {True: "on", False: "off"}[choice] if isinstance(choice, bool) else str(choice)
    if choice not in COMPILE_CHOICES:
        raise SegkitError(f"unknown compile choice {choice!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    return choice == "on" or (choice == "auto" and device_type == "cuda")


def use_compile_cache(environ: Any = None) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, autotuning results, Triton kernels)
    at segkit's user cache dir, so a second process loads the compiled kernels instead of compiling
    again; torch's default is a folder under /tmp that is lost on reboot and is per node on
    clusters. A TORCHINDUCTOR_CACHE_DIR the user set is kept. Returns the directory in use.

    The FX graph and AOT autograd caches are on by default in torch 2.14; torch's "mega-cache"
    (`torch.compiler.save_cache_artifacts`) packs these same entries to move them to another
    machine, which a persistent cache dir on the same machine does not need.
    """
    import os

    from segkit.cache import cache_subdir

    environ = os.environ if environ is None else environ
    if not environ.get("TORCHINDUCTOR_CACHE_DIR"):
        environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_subdir("torchinductor", environ))
    return Path(environ["TORCHINDUCTOR_CACHE_DIR"])


class TorchEngine:
    """Holds a model on a device and returns the softmax probability of one class per tile.

    Args:
        model: a segkit model (logits N x K x h x w).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        amp: 'auto', 'none', 'fp16' or 'bf16' autocast (auto: bf16/fp16 on a GPU, none on the CPU).
        channel: the class whose probability is returned (1 = membrane for EM models); "all" returns
            every class's probability (K-class models); None returns the model's output as it is
            (denoisers).
        compile_model: 'auto' (torch.compile on CUDA devices only), 'on', 'off' (or True/False).
            The compiled model runs one batch shape: shorter batches are padded to the largest
            batch seen, so the last batch of a run does not compile again. Compiled kernels are
            cached on disk (`use_compile_cache`); the first run of a shape is slow while it
            compiles, later runs load them.
        compile_mode: torch.compile's mode (default: GPU_COMPILE_MODE on CUDA, inductor's default
            on the CPU).
    """

    def __init__(self, model: Any, *, device: str = "auto", amp: str = "none", channel: int | str | None = 1,
                 compile_model: str | bool = "off", compile_mode: str | None = None) -> None:
        import torch

        resolved = resolve_device(device)
        self.amp = resolve_amp(amp, resolved)
        if self.amp == "fp16" and not resolved.startswith("cuda"):
            raise SegkitError("amp fp16 needs a CUDA device; use bf16 or none on the CPU")
        self.device = torch.device(resolved)
        self.channel = channel
        # channels_last: faster on GPUs (tensor cores) and on the CPU (oneDNN; 5.2 -> 4.1 s per two
        # 572-px tiles of the paper U-Net on 2 cores).
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        if self.uses_gpu:  # cuDNN searches its algorithms once per shape; the tiler's shapes are fixed
            torch.backends.cudnn.benchmark = True
        self.compiled = wants_compile(compile_model, self.device.type)
        self.compile_mode = (compile_mode or (GPU_COMPILE_MODE if self.uses_gpu else None)) if self.compiled else None
        self._compiled_model = None
        if self.compiled:
            use_compile_cache()
            self._compiled_model = torch.compile(self.model, mode=self.compile_mode, dynamic=False)
        self._largest_batch = 0
        self._measuring = False
        self.geometry = model.geometry
        self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)
        # amp none means full precision: cuDNN would otherwise run fp32 convolutions as TF32 on
        # Ampere and newer GPUs (10-bit mantissa), which moves probabilities by a few uint8 levels
        self._full_precision = self.amp == "none" and self.uses_gpu
        self.label = (f"torch {resolved}" + (f" {self.amp}" if self.amp != "none" else "")
                      + (" compiled" if self.compiled else ""))

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def eager(self) -> Any:
        """Run the eager model inside this block (the batch and tile measurements), so that only
        the run's own batch shape is compiled."""
        measuring, self._measuring = self._measuring, True
        try:
            yield self
        finally:
            self._measuring = measuring

    def release_memory(self) -> None:
        """Give cached GPU memory back after an out-of-memory error, before a smaller batch (and
        stop padding batches to the size that did not fit)."""
        import torch

        self._largest_batch = 0
        if self.uses_gpu:
            torch.cuda.empty_cache()

    def __call__(self, x: Any) -> Any:
        import torch

        count = len(x)
        model = self.model
        if self._compiled_model is not None and not self._measuring:
            model = self._compiled_model
            self._largest_batch = max(self._largest_batch, count)
            if count < self._largest_batch:  # one shape: no recompile for the last, shorter batch
                x = torch.cat([x, x.new_zeros((self._largest_batch - count, *x.shape[1:]))])
        precision = (torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False)
                     if self._full_precision else contextlib.nullcontext())
        with torch.inference_mode(), precision:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self._autocast, enabled=self._autocast is not None):
                logits = model(x)[:count]
            if self.channel is None:
                out = logits.float()
                # a copy of compiled output: CUDA graph modes reuse their output buffers on the next call
                return out.clone() if out is logits and model is not self.model else out
            if self.channel == "all":
                return torch.softmax(logits.float(), dim=1)
            return torch.softmax(logits.float(), dim=1)[:, self.channel : self.channel + 1]


# -- ONNX Runtime ----------------------------------------------------------------------------

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
#: cuDNN convolution algorithm search of the CUDA provider. EXHAUSTIVE and HEURISTIC ran the
#: 572-px U-Net equally fast on an H100 (measured when this default was chosen); HEURISTIC starts at once.
CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def onnxruntime_distribution(system: str | None = None, machine: str | None = None) -> str:
    """The ONNX Runtime distribution segkit depends on here, as pyproject.toml's markers choose it:
    onnxruntime-gpu on Linux x86-64 (its wheel also runs the CPU provider), onnxruntime elsewhere (macOS,
    Linux aarch64 and Windows get the CPU build). Defaults to this machine's `platform.system()` and
    `platform.machine()`."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    return "onnxruntime-gpu" if (system, machine) == ("Linux", "x86_64") else "onnxruntime"


def cuda_provider_fix(system: str | None = None, machine: str | None = None) -> str:
    """How to get ONNX Runtime's CUDA provider on this platform (or, where no build has one, what to
    use instead), for the one-line errors and `segkit info`."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if (system, machine) in (("Linux", "x86_64"), ("Windows", "AMD64")):
        return "pip uninstall onnxruntime, then pip install onnxruntime-gpu"
    return f"ONNX Runtime publishes no CUDA build for {system} {machine}; use the torch engine there"


def tensorrt_loadable() -> bool:
    """Whether the TensorRT runtime library can be loaded (onnxruntime-gpu lists its TensorRT
    provider whether or not TensorRT is installed)."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def plan_providers(device: str, available: list[str], *, use_tensorrt: bool, fp16: bool,
                   conv_algo_search: str = "HEURISTIC", cache_dir: str | None = None) -> list[tuple[str, dict]]:
    """ONNX Runtime providers to ask for, best first: TensorRT > CUDA > CPU on a CUDA device, the
    CPU alone on 'cpu'. Raises when CUDA is wanted but this onnxruntime build has no CUDA provider."""
    if device == "cpu":
        return [(CPU_PROVIDER, {})]
    if CUDA_PROVIDER not in available:
        raise SegkitError(f"device={device!r} needs onnxruntime's CUDA provider ({CUDA_PROVIDER}), but this "
                          f"onnxruntime offers only {', '.join(available)}; use device='cpu', or {cuda_provider_fix()}")
    if conv_algo_search not in CONV_ALGO_SEARCH:
        raise SegkitError(f"unknown cuDNN algorithm search {conv_algo_search!r}; choose {', '.join(CONV_ALGO_SEARCH)}")
    device_id = int(device.partition(":")[2] or 0)
    providers: list[tuple[str, dict]] = []
    if use_tensorrt and TENSORRT_PROVIDER in available:
        options: dict = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_engine_cache_enable": cache_dir is not None}
        if cache_dir is not None:
            options["trt_engine_cache_path"] = cache_dir
        providers.append((TENSORRT_PROVIDER, options))
    # an fp32 graph runs in full precision, as the torch engine does with amp none (the CUDA
    # provider's default, TF32, changed 0.8 % of the bundled model's uint8 output by a level; for
    # fp16 graphs it is left on: turning it off there made cuDNN log failed plans, for no gain)
    providers.append((CUDA_PROVIDER, {"device_id": device_id, "cudnn_conv_algo_search": conv_algo_search,
                                      "cudnn_conv_use_max_workspace": "1", "do_copy_in_default_stream": "1",
                                      "use_tf32": "1" if fp16 else "0"}))
    providers.append((CPU_PROVIDER, {}))  # only for ops the GPU providers lack; checked after loading
    return providers


class OnnxEngine:
    """Runs a segkit ONNX graph (from `segkit export`) on ONNX Runtime with the engine protocol.

    One session serves every tile and file. Inputs and outputs are bound to torch tensors through
    IO binding (their data pointers), so tiles stay where they are: on the GPU the CUDA provider
    reads the tiler's device buffer and writes into a preallocated device output, on the compute
    stream torch uses (no host round trip, no extra synchronisation). On a GPU, short batches are
    padded to the largest batch seen so every run has the same shape (no cuDNN search or
    TensorRT build per shape).

    Args:
        model: path or bytes of the ONNX file.
        geometry: the model's geometry (output size = input size - 2 * margin).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'; CUDA that fails to load is an error, never a
            silent CPU run.
        fp16: whether the graph is fp16 inside (enables TensorRT's fp16 mode).
        use_tensorrt: try the TensorRT provider first when its library is present.
        conv_algo_search: the CUDA provider's cuDNN convolution algorithm search.
        threads: CPU threads (0 = one per physical core).
    """

    def __init__(self, model: str | Path | bytes, geometry: Any, *, device: str = "auto", fp16: bool = False,
                 use_tensorrt: bool = True, conv_algo_search: str = "HEURISTIC", threads: int = 0,
                 tensorrt_cache: str | None = None) -> None:
        import torch

        ort = require("onnxruntime", feature="engine='onnx'", package=onnxruntime_distribution())
        self._ort = ort
        self.geometry = geometry
        resolved = resolve_device(device)
        self.device = torch.device(resolved)
        wanted = plan_providers(resolved, ort.get_available_providers(),
                                use_tensorrt=use_tensorrt and tensorrt_loadable(), fp16=fp16,
                                conv_algo_search=conv_algo_search, cache_dir=tensorrt_cache)
        if self.uses_gpu:  # run on torch's stream: inputs written by the tiler are ready in stream order
            with torch.cuda.device(self.device):
                stream = str(torch.cuda.current_stream().cuda_stream)
            wanted = [(name, {**opts, "user_compute_stream": stream}) if name == CUDA_PROVIDER else (name, opts)
                      for name, opts in wanted]
        # onnxruntime's process-wide logger warns at session creation about things that are not
        # the user's concern (e.g. "No registered plugin EP device found"); errors still surface
        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SegkitError(f"onnxruntime cannot load the model: {first}") from exc
        active = self.session.get_providers()
        if resolved != "cpu" and CUDA_PROVIDER not in active and TENSORRT_PROVIDER not in active:
            raise SegkitError(f"onnxruntime's CUDA provider failed to load for device={device!r} (its CUDA/cuDNN "
                              "libraries do not match this machine's; import torch first or fix LD_LIBRARY_PATH), "
                              "so it would run on the CPU; use device='cpu' to do that deliberately")
        self.provider = active[0]
        self.label = f"onnxruntime {self.provider.removesuffix('ExecutionProvider')}" + (
            f" ({resolved})" if resolved != "cpu" else "")
        self._input_name = self.session.get_inputs()[0].name
        self._output_name = self.session.get_outputs()[0].name
        channels = self.session.get_outputs()[0].shape[1]
        self._out_channels = channels if isinstance(channels, int) else 1
        self._largest_batch = 0

    def check_geometry(self, tile: int, source: Any) -> None:
        """Run one `tile` x `tile` tile of zeros and check that the graph takes (N, C, H, W) input and
        returns tile - 2 margin px, as its metadata says; a graph whose metadata lies (about the
        margin, or its input rank) fails here with one line instead of inside onnxruntime later."""
        graph_input = self.session.get_inputs()[0]
        if len(graph_input.shape) != 4:
            raise SegkitError(f"{source} takes input of rank {len(graph_input.shape)} ({graph_input.shape}), but segkit "
                              "feeds (N, C, H, W) batches of rank 4; export the model with `segkit export`")
        channels = graph_input.shape[1] if isinstance(graph_input.shape[1], int) else 1
        quiet = self._ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is reported below, in one line
        try:
            got = self.session.run(None, {self._input_name: np.zeros((1, channels, tile, tile), np.float32)},
                                   quiet)[0].shape
        except Exception as exc:  # onnxruntime raises its own exception types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = text.rpartition("Status Message: ")[2][:200]
            raise SegkitError(f"{source} fails on a {tile} px tile that its metadata calls valid ({first}); its "
                              "metadata does not match its graph: export it again with `segkit export`") from exc
        expected = tile - 2 * self.geometry.margin
        if len(got) != 4 or tuple(got[2:]) != (expected, expected):
            raise SegkitError(f"{source} turns a {tile} px tile into output of shape {tuple(got)}, but its metadata "
                              f"(margin {self.geometry.margin}) says {expected} x {expected} px; its metadata does not "
                              "match its graph: export it again with `segkit export`")

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    def release_memory(self) -> None:
        """After an out-of-memory error: stop padding batches to the size that did not fit, so the
        smaller batch that follows really is smaller, and give cached device memory back."""
        self._largest_batch = 0
        if self.uses_gpu:
            import torch

            torch.cuda.empty_cache()

    def __call__(self, x: Any) -> Any:
        import torch

        count = len(x)
        self._largest_batch = max(self._largest_batch, count)
        if self.uses_gpu and count < self._largest_batch:
            x = torch.cat([x, x.new_zeros((self._largest_batch - count, *x.shape[1:]))])
        x = x.float().contiguous()
        margin = self.geometry.margin
        # a fresh output per call (torch's caching allocator makes this cheap): the tiler may still
        # be reading the previous batch's output
        output = torch.empty((x.shape[0], self._out_channels, x.shape[2] - 2 * margin, x.shape[3] - 2 * margin),
                             dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        device_type, device_id = self.device.type, self.device.index or 0
        binding.bind_input(self._input_name, device_type, device_id, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(self._output_name, device_type, device_id, np.float32, list(output.shape),
                            output.data_ptr())
        self.session.run_with_iobinding(binding)
        return output[:count]
