"""Plain helpers the tests share (import them: `from tests.helpers import run, ...`); the fixtures are in
conftest.py. The CLI runner, tiny registry models, engine-protocol test doubles, plane helpers, a tiny
training recipe on the bundled ISBI crop, and where the repository and the real data sets are."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import tifffile

#: The repository root (recipes/, tools/, README.md, .ci/).
REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The folder holding the real data sets (isbi2012/, bbbc039/, axondeepseg_sem/): $SEGKIT_DATA, by
    default ../shared/data beside the repository root (segkit.data_check.data_root, the one place that says
    so). Tests that read real data skip when it is absent."""
    from segkit.data_check import data_root as segkit_data_root

    return segkit_data_root()


ISBI = data_root() / "isbi2012"


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


def assert_ids_unique_across_slices(labels):
    """A uint32 label stack whose ids are unique across the stack: each slice's ids (1..n, 0 = background)
    come after the previous slice's, with no gap and no id shared between slices."""
    assert labels.dtype == np.uint32 and labels.ndim == 3
    last = 0
    for z, plane in enumerate(labels):
        ids = np.unique(plane[plane > 0])
        if len(ids):
            assert ids[0] == last + 1 and ids[-1] == last + len(ids), (z, ids[:3], last)
            last = int(ids[-1])


#: Set by .ci/run: a test that needs an optional tool (napari and a display, ImageJ, Bio-Formats) fails instead of
#: skipping when the tool is missing, so CI cannot pass with those tests silently skipped.
REQUIRE_OPTIONAL_TOOLS = "SEGKIT_REQUIRE_OPTIONAL_TOOLS"


def skip_unless_required(reason: str) -> None:
    """Skip with `reason`, or fail with it where $SEGKIT_REQUIRE_OPTIONAL_TOOLS is set (CI)."""
    import pytest

    if os.environ.get(REQUIRE_OPTIONAL_TOOLS):
        pytest.fail(f"{reason} (${REQUIRE_OPTIONAL_TOOLS} is set: CI must run this test)")
    pytest.skip(reason)


def states(stderr: str) -> list[str]:
    """The 'n/total' of every state tqdm drew (separated by carriage returns and newlines)."""
    return [found.group(0) for part in re.split(r"[\r\n]", stderr) if (found := re.search(r"\d+/\d+", part))]
