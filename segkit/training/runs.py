"""What every training run shares: its files, optimizer state as safetensors, logs and curves."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segkit.checkpoint import match_umask, read_info
from segkit.errors import CheckpointError, SegkitError


@dataclass
class RunFiles:
    """Paths of one training run."""

    root: Path

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.root / "last.optimizer.safetensors"

    @property
    def log_csv(self) -> Path:
        return self.root / "log.csv"

    @property
    def log_json(self) -> Path:
        return self.root / "log.json"

    @property
    def curve(self) -> Path:
        return self.root / "curve.png"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"


def open_run(out: str | Path, *, resume: bool) -> RunFiles:
    """The run folder, created if needed; never overwrites a run unless resuming it."""
    files = RunFiles(Path(out))
    if files.last.exists() and not resume:
        raise SegkitError(f"{files.root} already holds a run; pass resume=True to continue it or set train.out=<new folder>")
    if resume and not files.last.exists():
        raise SegkitError(f"resume=True: no last checkpoint in {files.root}; start without resume=True")
    files.root.mkdir(parents=True, exist_ok=True)
    return files


def resume_run(files: RunFiles, model: Any, optimizer: Any, *, name: str, kwargs: dict[str, Any], lr: float) -> dict[str, Any]:
    """Load the last weights and optimizer state of `files` into `model` and `optimizer`.

    Refuses a run of another model. The recipe's learning rate applies from here on. Returns the
    extra state saved with the optimizer (epoch, history, best score).
    """
    from safetensors.torch import load_file

    previous = read_info(files.last)
    if previous.model != name or previous.model_kwargs != kwargs:
        raise CheckpointError(f"resume=True: {files.last} holds model {previous.model} {previous.model_kwargs}, "
                              f"not this recipe's {name} {kwargs}")
    model.load_state_dict(load_file(str(files.last)))
    meta = load_optimizer(files.optimizer, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return meta


def amp_setup(enabled: bool, device: str) -> tuple[Any, Any]:
    """(autocast dtype or None, GradScaler) for training: bf16 where the GPU has it, else fp16 with
    loss scaling; nothing on the CPU."""
    import torch

    dtype = None
    if enabled and device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.backends.cudnn.benchmark = True
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def optimizer_step(loss: Any, optimizer: Any, scaler: Any, *, epoch: int) -> float:
    """One optimiser step through the AMP grad scaler (a no-op scaler without AMP); a loss that is
    not finite stops training with advice instead of corrupting the weights. Returns the loss."""
    import torch

    if not torch.isfinite(loss):
        raise SegkitError(f"loss became {loss.item()} at epoch {epoch}; lower train.lr or disable train.amp")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.item())


def build_optimizer(params: Any, settings: dict[str, Any]) -> Any:
    """Adam or SGD with momentum, from a recipe's `train` section."""
    import torch

    if settings["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"],
                           weight_decay=settings["weight_decay"])


def save_optimizer(path: Path, optimizer: Any, state: dict[str, Any]) -> None:
    """Optimizer tensors as safetensors, its scalars and `state` (epoch, history...) as JSON; no pickle."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"param_groups": optimizer.state_dict()["param_groups"], "scalars": scalars, **state}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"segkit-optimizer": json.dumps(meta)})
    match_umask(tmp)
    os.replace(tmp, path)


def load_optimizer(path: Path, optimizer: Any) -> dict[str, Any]:
    """Restore what save_optimizer wrote; returns the extra state."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["segkit-optimizer"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the optimizer state for resume=True: {exc}") from exc
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.pop("scalars").items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


def write_logs(files: RunFiles, history: list[dict[str, float]], fields: list[str]) -> None:
    """The per-epoch history as CSV (the given columns) and JSON (everything)."""
    with open(files.log_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in fields})
    files.log_json.write_text(json.dumps(history, indent=1))


def plot_curve(history: list[dict[str, float]], path: Path, *, loss_label: str, metrics: tuple[str, ...],
               metric_label: str) -> None:
    """Training loss and validation metrics per epoch, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel=loss_label, title="training loss")
    for key in metrics:
        right.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", label=key)
    right.set(xlabel="epoch", ylabel=metric_label, title="validation (slices held out from training)")
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
