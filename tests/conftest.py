"""Shared fixtures: tiny models and checkpoints, small synthetic stacks, the ISBI data if present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile


def data_root() -> Path:
    """The folder holding the real data sets (isbi2012/, bbbc039/, axondeepseg_sem/): $SEGKIT_DATA, by
    default ../shared/data beside the repository root. Tests that read real data skip when it is absent."""
    return Path(os.environ.get("SEGKIT_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


ISBI = data_root() / "isbi2012"


@pytest.fixture(scope="session")
def tiny_unet():
    import torch

    from segkit.models import create_model

    torch.manual_seed(0)
    return create_model("unet", base=4, depth=4).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_unet) -> Path:
    from segkit.checkpoint import save_checkpoint
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    info = CheckpointInfo(
        kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 4},
        geometry=tiny_unet.geometry, normalization=Normalization(120.0, 40.0),
        inference={"tile": 236, "threshold": 0.5, "input_dtype": "uint8"},
    )
    save_checkpoint(path, tiny_unet, info)
    return path


@pytest.fixture
def uint8_stack(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, 70, 91), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack", resolution=(250.0, 250.0), resolutionunit="CENTIMETER",
                     metadata={"axes": "ZYX"})
    return path


@pytest.fixture
def isbi() -> Path:
    if not (ISBI / "train-volume.tif").exists():
        pytest.skip(f"ISBI 2012 data not found in {ISBI.parent} (set SEGKIT_DATA)")
    return ISBI


# == CLI runner and tiny registry models (shared by test_cli, test_export, test_distributed, test_api) ==========
# Import them as `from tests.conftest import run, ...`; test files do not import each other.


def run(*args):
    """`segkit ARGS...` in-process; stdout and stderr kept apart (result.stdout, result.stderr)."""
    from click.testing import CliRunner

    from segkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments):
    """A user error: exit code 2, exactly one `error:` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def tiny(name: str) -> tuple[str, dict]:
    """A small variant of every registered model (tests must stay fast on 2 CPU cores)."""
    if name.startswith("smp:"):
        return name.replace(":resnet34", ":resnet18"), {"halo": 16}
    if name.startswith("fcn"):
        return name, {"width": 4, "fc": 16, "halo": 16}
    return name, {"base": 4}  # unet, denoiser


def randomize_zero_layers(model):
    """FCN score layers start at zero (as in the paper); give them values so outputs vary."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    return model


# == Engine-protocol test doubles and plane helpers (test_tiler, test_engines, test_device_fit, test_pipeline,
# test_instances, test_denoiser). Import them as `from tests.conftest import FakeEngine, ...`.


class FakeEngine:
    """A test double that follows the engine protocol (segkit.inference.engines.Engine): `fn` maps a
    (N, C, h, w) float32 CPU tensor to an (N, K, h - 2 margin, w - 2 margin) float32 tensor;
    `.device` is the CPU, `.label` says what it is, `.calls` records the batch sizes it was given."""

    def __init__(self, fn, label: str = "fake engine"):
        import torch

        self.fn = fn
        self.device = torch.device("cpu")
        self.label = label
        self.calls: list[int] = []

    def __call__(self, x):
        self.calls.append(len(x))
        return self.fn(x)


def crop_engine(margin: int, fn=None) -> FakeEngine:
    """A pointwise "valid" model: `fn` (default: identity) of its input's centre, `margin` px in
    from every side, as a fresh tensor (as real engines return)."""

    def forward(x):
        centre = x[:, :, margin:-margin, margin:-margin] if margin else x
        return centre.clone() if fn is None else fn(centre)

    return FakeEngine(forward, label=f"crop {margin}")


def as_plane(array):
    """A numpy (H, W) or (C, H, W) array as the (C, H, W) float32 CPU tensor the tiler takes."""
    import torch

    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))
    return tensor[None] if tensor.ndim == 2 else tensor


# == A tiny training recipe on the bundled ISBI crop (test_training, test_denoiser) ==================


def tiny_recipe(tmp_path, base=4, **train):
    """A validated recipe for a base-`base` U-Net trained for a few iterations on the bundled crop."""
    from segkit.config import validate_recipe
    from segkit.demo import SAMPLE_LABELS, SAMPLE_RAW

    return validate_recipe({
        "model": {"name": "unet", "params": {"base": base, "batch_norm": True}},
        "data": {"root": str(SAMPLE_RAW.parent), "raw": SAMPLE_RAW.name, "labels": SAMPLE_LABELS.name,
                 "tile": 236, "train_slices": [0, 3], "val_slices": [3, 4], "test_slices": [4, 5]},
        "train": {"epochs": 2, "iters_per_epoch": 2, "batch": 2, "device": "cpu", "out": str(tmp_path / "run"),
                  "lr": 1e-3, **train},
    })


@pytest.fixture(scope="module")
def tiny_denoiser(tmp_path_factory):
    """A base-4 denoiser checkpoint (random weights) trained on uint8 data, for the pre-stage paths."""
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo

    torch.manual_seed(0)
    model = create_model("denoiser", base=4)
    path = tmp_path_factory.mktemp("den") / "den.safetensors"
    save_checkpoint(path, model, CheckpointInfo("denoiser", "denoiser", {"base": 4}, model.geometry,
                                                Normalization(110.0, 30.0), classes=[],
                                                inference={"tile": 108, "input_dtype": "uint8"}))
    return path


def assert_plane_matches_library(written, stack_path, checkpoint, *, index: int, tile: int) -> None:
    """Plane `index` of a written uint8 prediction is the library's overlap-tiled probability of
    that input plane (predict_plane with a TorchEngine), to within one uint8 level."""
    import torch

    from segkit.checkpoint import load_model
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_plane

    model, info = load_model(checkpoint)
    plane = info.normalization.apply(torch.from_numpy(tifffile.imread(stack_path)[index]))[None]
    expected = predict_plane(plane, TorchEngine(model, device="cpu"), info.geometry, tile=tile)[0].numpy()
    assert np.abs(written[index].astype(int) - np.rint(expected * 255)).max() <= 1
