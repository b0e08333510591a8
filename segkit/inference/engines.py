"""Engines run a model on a batch of tiles: numpy (N, C, H, W) float32 in, probabilities out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segkit.errors import SegkitError

AMP_DTYPES = ("none", "fp16", "bf16")


def resolve_device(requested: str) -> str:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error, not a fallback."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SegkitError(f"--device {requested} was asked for but CUDA is not available here; use --device cpu")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise SegkitError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    return requested


class TorchEngine:
    """Holds a model on a device and returns the softmax probability of one class per tile.

    Args:
        model: a segkit model (logits N x K x h x w).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        amp: 'none', 'fp16' or 'bf16' autocast (CUDA; bf16 also works on CPU).
        channel: the class whose probability is returned (1 = membrane for EM models); None returns
            the model's output as it is (denoisers).
        compile_model: torch.compile the model (max-autotune on GPUs); the first batches of each
            shape are slow while it compiles.
    """

    def __init__(self, model: Any, *, device: str = "auto", amp: str = "none", channel: int | None = 1,
                 compile_model: bool = False) -> None:
        import torch

        if amp not in AMP_DTYPES:
            raise SegkitError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_DTYPES)}")
        self.device = resolve_device(device)
        if amp == "fp16" and not self.device.startswith("cuda"):
            raise SegkitError("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
        self.amp = amp
        self.channel = channel
        # channels_last: faster on GPUs (tensor cores) and on the CPU (oneDNN; 5.2 -> 4.1 s per two
        # 572-px tiles of the paper U-Net on 2 cores).
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        if self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
        if compile_model:
            mode = "max-autotune-no-cudagraphs" if self.uses_gpu else None
            self.model = torch.compile(self.model, mode=mode, dynamic=False)
        self.geometry = model.geometry

    @property
    def uses_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def release_memory(self) -> None:
        """Give cached GPU memory back after an out-of-memory error, before a smaller batch."""
        import torch

        if self.uses_gpu:
            torch.cuda.empty_cache()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(x)
            if self.channel is None:
                return logits.float().cpu().numpy()
            probs = torch.softmax(logits.float(), dim=1)[:, self.channel : self.channel + 1]
            return probs.cpu().numpy()


# -- ONNX Runtime ----------------------------------------------------------------------------

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
#: cuDNN convolution algorithm search of the CUDA provider. EXHAUSTIVE and HEURISTIC ran the
#: 572-px U-Net equally fast on an H100 (../shared/tools/ort-gpu-to-device.md); HEURISTIC starts at once.
CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


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
        raise SegkitError(f"--device {device} needs onnxruntime's CUDA provider, but this onnxruntime offers only "
                          f"{', '.join(available)}; pip install onnxruntime-gpu, or use --device cpu")
    if conv_algo_search not in CONV_ALGO_SEARCH:
        raise SegkitError(f"unknown cuDNN algorithm search {conv_algo_search!r}; choose {', '.join(CONV_ALGO_SEARCH)}")
    device_id = int(device.partition(":")[2] or 0)
    providers: list[tuple[str, dict]] = []
    if use_tensorrt and TENSORRT_PROVIDER in available:
        options: dict = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_engine_cache_enable": cache_dir is not None}
        if cache_dir is not None:
            options["trt_engine_cache_path"] = cache_dir
        providers.append((TENSORRT_PROVIDER, options))
    providers.append((CUDA_PROVIDER, {"device_id": device_id, "cudnn_conv_algo_search": conv_algo_search,
                                      "cudnn_conv_use_max_workspace": "1", "do_copy_in_default_stream": "1"}))
    providers.append((CPU_PROVIDER, {}))  # only for ops the GPU providers lack; checked after loading
    return providers


class _Binding:
    """Input and output buffers of one batch shape, allocated once on the provider's device."""

    def __init__(self, session: Any, ort: Any, shape: tuple[int, ...], out_shape: tuple[int, ...], device: str,
                 device_id: int, output_name: str) -> None:
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, device_id)
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, device, device_id)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(session.get_inputs()[0].name, self.input)
        self.binding.bind_ortvalue_output(output_name, self.output)


class OnnxEngine:
    """Runs a segkit ONNX graph (from `segkit export`) on ONNX Runtime: same call as TorchEngine.

    One session serves every tile and file. Inputs and outputs go through IO binding into
    buffers preallocated per batch shape; on a GPU, short batches are padded to the largest
    batch seen so every run has the same shape (no cuDNN search or TensorRT build per shape).

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
        from segkit._optional import require

        ort = require("onnxruntime", feature="--engine onnx", package="onnxruntime-gpu")
        self._ort = ort
        self.geometry = geometry
        resolved = resolve_device(device)
        wanted = plan_providers(resolved, ort.get_available_providers(),
                                use_tensorrt=use_tensorrt and tensorrt_loadable(), fp16=fp16,
                                conv_algo_search=conv_algo_search, cache_dir=tensorrt_cache)
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
            raise SegkitError(f"onnxruntime's CUDA provider failed to load for --device {device} (its CUDA/cuDNN "
                              "libraries do not match this machine's; import torch first or fix LD_LIBRARY_PATH), "
                              "so it would run on the CPU; use --device cpu to do that deliberately")
        self.provider = active[0]
        self.device = f"onnxruntime {self.provider.removesuffix('ExecutionProvider')}" + (
            f" ({resolved})" if resolved != "cpu" else "")
        self._device_type, self._device_id = ("cpu", 0) if resolved == "cpu" else ("cuda", int(resolved.partition(":")[2] or 0))
        self._output_name = self.session.get_outputs()[0].name
        channels = self.session.get_outputs()[0].shape[1]
        self._out_channels = channels if isinstance(channels, int) else 1
        self._bindings: dict[tuple[int, ...], _Binding] = {}
        self._largest_batch = 0

    @property
    def uses_gpu(self) -> bool:
        return self._device_type != "cpu"

    def release_memory(self) -> None:
        """After an out-of-memory error: free the device buffers and stop padding batches to the
        size that did not fit, so the smaller batch that follows really is smaller."""
        self._bindings.clear()
        self._largest_batch = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        count = len(batch)
        self._largest_batch = max(self._largest_batch, count)
        if self._device_type != "cpu" and count < self._largest_batch:
            padding = np.zeros((self._largest_batch - count,) + batch.shape[1:], np.float32)
            batch = np.concatenate([batch, padding])
        binding = self._binding(batch.shape)
        binding.input.update_inplace(batch)
        self.session.run_with_iobinding(binding.binding)
        return binding.output.numpy()[:count]

    def _binding(self, shape: tuple[int, ...]) -> _Binding:
        if shape not in self._bindings:
            if len(self._bindings) >= 4:  # tile shapes rarely vary; keep device memory bounded if they do
                self._bindings.pop(next(iter(self._bindings)))
            margin = self.geometry.margin
            out_shape = (shape[0], self._out_channels, shape[2] - 2 * margin, shape[3] - 2 * margin)
            self._bindings[shape] = _Binding(self.session, self._ort, shape, out_shape, self._device_type,
                                             self._device_id, self._output_name)
        return self._bindings[shape]
