"""Memory estimates made before allocating: a plane, a model's parameters, one tile's activations.

Each check compares a lower bound of what the work needs with the memory available now and
refuses with both numbers, so an impossible input or record fails at once with one line instead
of a MemoryError (or a machine swapping) after the model has loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segkit.errors import CheckpointError, SegkitError
from segkit.models import create_model

#: float32 copies of a plane that predicting it holds at once: the normalised plane, its padded copy
#: (the tiler cuts tiles from it) and the output it accumulates.
PLANE_FLOAT32_COPIES = 3


def available_memory() -> int | None:
    """Bytes of host memory available now to this process: the machine's (psutil where installed,
    else Linux MemAvailable, else the physical memory), capped by its cgroup's limit (SLURM --mem,
    a container's memory limit); None when none of them can be read."""
    machine = _machine_memory()
    limit = _cgroup_memory_left()
    if machine is None or limit is None:
        return machine if limit is None else limit
    return min(machine, limit)


def _cgroup_memory_left(root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup (cgroup v2: its own folder from /proc/self/cgroup,
    else the root's; v1: memory.limit_in_bytes); None when there is no limit or nothing to read.
    The limit itself, not limit - usage: usage counts page cache the kernel gives back on demand."""
    folders = [root]
    try:
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                if line.startswith("0::"):
                    folders.insert(0, os.path.join(root, line.strip()[3:].lstrip("/")))
    except OSError:
        pass
    candidates = [os.path.join(folder, "memory.max") for folder in folders]
    candidates.append(os.path.join(root, "memory", "memory.limit_in_bytes"))
    for limit_file in candidates:
        try:
            with open(limit_file) as handle:
                limit = handle.read().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            return int(limit)
        return None
    return None


def _machine_memory() -> int | None:
    """Bytes of memory available on the machine now (psutil, /proc/meminfo, else physical memory)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device: str) -> tuple[int | None, str]:
    """Bytes available on `device` ('cpu', 'cuda', 'cuda:N', 'auto') and a name for it in messages."""
    if device.startswith("cuda") or device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                index = int(device.partition(":")[2] or torch.cuda.current_device())
                return int(torch.cuda.mem_get_info(index)[0]), f"GPU {index}"
        except Exception:  # no usable GPU: the engine reports that itself
            pass
        if device != "auto":
            return None, device
    return available_memory(), "this machine"


def format_bytes(count: float) -> str:
    """1.5 GB, 300 TB, 12 MB (powers of 1000, as disk and memory sizes are usually quoted)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError  # unreachable


def plane_bytes(shape: tuple[int, int], itemsize: int) -> int:
    """What predicting one plane of `shape` holds at least: the stored plane plus PLANE_FLOAT32_COPIES
    float32 copies of it (normalised, padded, output)."""
    pixels = int(shape[0]) * int(shape[1])
    return pixels * (int(itemsize) + 4 * PLANE_FLOAT32_COPIES)


def plane_problem(shape: tuple[int, int], itemsize: int, *, available: int | None = None) -> str | None:
    """Why a plane of `shape` cannot be processed in the memory available, or None when it fits."""
    available = available_memory() if available is None else available
    need = plane_bytes(shape, itemsize)
    if available is None or need <= available:
        return None
    return (f"one plane is {shape[0]} x {shape[1]} px and processing it needs about {format_bytes(need)} "
            f"(the plane as float32, its padded copy and the output), but {format_bytes(available)} of memory is "
            "available; crop or split the planes into smaller images (e.g. with Fiji or tifffile), or use a machine "
            "with more memory")


def meta_model(name: str, kwargs: dict[str, Any]) -> Any:
    """The model built on torch's meta device: shapes only, no memory (for counting and tracing)."""
    import torch

    with torch.device("meta"):
        return create_model(name, **kwargs)


def parameter_bytes(model: Any) -> int:
    """float32 bytes of a model's parameters and buffers."""
    return 4 * (sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def check_weights_fit(path: str | Path, info: Any, stored: int) -> Any:
    """Check a checkpoint's record against its file and the memory available, before anything is allocated.

    The record's model is built on torch's meta device (shapes only); it is refused when its values
    do not match the file's, or when its parameters do not fit in the memory available.

    Parameters
    ----------
    path : str or Path
        The checkpoint (named in messages).
    info : CheckpointInfo
        Its record.
    stored : int
        The number of values the file's tensors hold.

    Returns
    -------
    torch.nn.Module
        The model on the meta device.

    Raises
    ------
    CheckpointError
        The record names a model that cannot be built, its values differ from `stored`, or its
        parameters exceed the memory available (one line, with the numbers).
    """
    fix = "the checkpoint is damaged or was edited: use another one or train again"
    try:
        meta = meta_model(info.model, info.model_kwargs)
    except SegkitError as exc:
        raise CheckpointError(f"{path}: {exc}; {fix}") from exc
    wanted = sum(t.numel() for t in meta.state_dict().values())
    params = parameter_bytes(meta)
    available = available_memory()
    if available is not None and params > available:
        why = (f" (and the file holds only {stored:,} values: its weights do not match its record); {fix}"
               if stored != wanted else "; use a machine with more memory")
        raise CheckpointError(f"{path}: its record describes a {info.model} model ({_kwargs_text(info.model_kwargs)}) of "
                              f"{format_bytes(params)} of parameters, but {format_bytes(available)} of memory is "
                              f"available{why}")
    if stored != wanted:
        raise CheckpointError(f"{path}: its weights do not match its record: the record describes a {info.model} model "
                              f"({_kwargs_text(info.model_kwargs)}) of {wanted:,} values, but the file holds {stored:,}; "
                              f"{fix}")
    return meta


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if not isinstance(v, dict)) or "defaults"
    return text if len(text) <= 120 else text[:117] + "..."


#: float32 copies of the parameters that training holds: weights, gradients, two optimiser moments (Adam).
TRAINING_PARAMETER_COPIES = 4


def training_model_problem(name: str, kwargs: dict[str, Any], device: str) -> str | None:
    """Why the model `name(**kwargs)` cannot be trained in the memory of `device` (its parameters,
    gradients and optimiser state alone do not fit), or None when they fit or nothing can be said.
    Nothing is allocated: the model is built on the meta device."""
    try:
        model = meta_model(name, kwargs)
    except Exception:  # an invalid model is reported where it is built, with its own message
        return None
    available, where = device_memory(device)
    need = TRAINING_PARAMETER_COPIES * parameter_bytes(model)
    if available is None or need <= available:
        return None
    return (f"this {name} model has {format_bytes(parameter_bytes(model))} of parameters, and training it needs at "
            f"least {format_bytes(need)} (weights, gradients, optimiser state), but {format_bytes(available)} of "
            f"memory is available on {where}; choose smaller model.params")


def tile_activation_bytes(model: Any, tile: int, *, channels: int = 1) -> int | None:
    """A lower bound of what one forward pass of a `tile` x `tile` input holds at its peak: the input
    plus twice the largest layer output (a layer's input and output live together). Traced on the
    meta device, so nothing is allocated; None where the model cannot be traced there."""
    import torch

    largest = [0]

    def record(_module: Any, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * 4)

    if not _trace_on_meta(model, tile, channels, record, training=False):
        return None
    return channels * tile * tile * 4 + 2 * largest[0]


def _trace_on_meta(model: Any, tile: int, channels: int, record: Any, *, training: bool) -> bool:
    """Run `model` once on a 1 x `channels` x `tile` x `tile` meta tensor (nothing allocated) with `record` as a
    forward hook on every leaf module, in eval mode without gradients or in training mode with them; the
    model's mode is restored. False where the meta device cannot run the model."""
    import torch

    was_training = model.training
    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        model.train(training)
        with torch.set_grad_enabled(training):
            model(torch.empty((1, channels, tile, tile), device="meta"))
    except Exception:  # a model the meta device cannot run: no estimate
        return False
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return True


#: Pixels any layer output of segkit's models may exceed the tile by on each side (FCN's first conv pads
#: by 100, its upsampling layers add their kernel; the U-Net and smp models stay within the tile).
_MAX_LAYER_GROWTH = 128


def tile_activation_bound(model: Any, tile: int, *, channels: int = 1) -> int | None:
    """An upper bound of `tile_activation_bytes` without running the model: the input plus twice a layer
    output as wide as the widest layer (its output channels) at the tile's size plus `_MAX_LAYER_GROWTH`
    px on each side. None when the model has no layer with `out_channels` (no bound can be given)."""
    widest = max((int(m.out_channels) for m in model.modules() if isinstance(getattr(m, "out_channels", None), int)),
                 default=0)
    if widest <= 0:
        return None
    side = tile + 2 * _MAX_LAYER_GROWTH
    return channels * tile * tile * 4 + 2 * side * side * widest * 4


def tile_problem(info: Any, geometry: Any, tile: int, device: str) -> str | None:
    """Why the model of `info` cannot run one `tile` x `tile` tile in the memory of `device`, or None
    when it fits (or no estimate can be made). Nothing is allocated: the model is traced on the meta device."""
    try:
        model = meta_model(info.model, info.model_kwargs)
    except Exception:  # the record is checked elsewhere; no estimate here
        return None
    channels = int(info.model_kwargs.get("in_channels", 1))
    available, where = device_memory(device)
    if available is None:
        return None
    params = parameter_bytes(model)
    bound = tile_activation_bound(model, tile, channels=channels)
    if bound is not None and params + bound <= available:
        return None  # fits even at the upper bound: the trace (about 2 s of imports on the meta device) is not needed
    activations = tile_activation_bytes(model, tile, channels=channels)
    if activations is None:
        return None
    if params + activations <= available:
        return None
    smaller = geometry.default_tile
    smaller = smaller if smaller < tile else geometry.min_input
    return (f"tile {tile} needs at least {format_bytes(params + activations)} ({format_bytes(params)} of parameters and "
            f"{format_bytes(activations)} of activations for one tile), but {format_bytes(available)} of memory is "
            f"available on {where}; use tile {smaller}")


def training_activation_bytes(model: Any, tile: int, *, channels: int = 1, element_bytes: int = 4) -> int | None:
    """What one `tile` x `tile` sample keeps for the backward pass: the output of every layer that autograd
    records (each leaf module's output that requires a gradient and is a new tensor: in-place layers share
    their input's; a frozen pre-stage records nothing), traced on the meta device in training mode, so
    nothing is allocated. Measured peaks of a training step on the CPU are 1.2-3.9 times this for segkit's
    U-Nets, FCNs and smp models (gradients, workspaces), so it is a lower estimate: a batch refused by it
    does not fit. None where the model cannot be traced there."""
    import torch

    recorded = [0]

    def record(_module: Any, args: Any, output: Any) -> None:
        if (isinstance(output, torch.Tensor) and output.requires_grad
                and not any(output is a for a in args if isinstance(a, torch.Tensor))):
            recorded[0] += output.numel() * element_bytes

    if not _trace_on_meta(model, tile, channels, record, training=True):
        return None
    return recorded[0]


def training_activation_bound(model: Any, tile: int, *, channels: int = 1) -> int | None:
    """An upper bound of `training_activation_bytes` (float32) without running the model: two tensors per
    leaf module (its output and one more the forward makes around it: a concatenation, an upsampling), each as
    wide as the widest layer (out_channels, out_features, num_features) at the tile's size plus
    `_MAX_LAYER_GROWTH` px on each side. None when no layer says its width (no bound can be given)."""
    widths = [int(getattr(m, attr)) for m in model.modules()
              for attr in ("out_channels", "out_features", "num_features") if isinstance(getattr(m, attr, None), int)]
    if not widths or max(widths) <= 0:
        return None
    leaves = sum(1 for m in model.modules() if not list(m.children()))
    side = tile + 2 * _MAX_LAYER_GROWTH
    return channels * tile * tile * 4 + 2 * leaves * side * side * max(widths) * 4


def largest_batch(available: int, fixed: int, per_item: int) -> int:
    """The largest batch whose items (`per_item` bytes each) fit in `available` bytes beside `fixed` ones
    (0: not even one)."""
    return max(0, (available - fixed) // max(per_item, 1))
