"""Shared fixtures: tiny models and checkpoints, small synthetic stacks, the ISBI data if present.
Plain helpers (the CLI runner, test doubles, ...) are in tests/helpers.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import ISBI


@pytest.fixture(autouse=True)
def segkit_cache_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """Each test gets an empty segkit cache (SEGKIT_CACHE_DIR; child processes inherit it): compiled kernels
    and device measurements never go to the user's ~/.cache/segkit, and one test's cached measurement
    never answers another's."""
    monkeypatch.setenv("SEGKIT_CACHE_DIR", str(tmp_path_factory.mktemp("segkit-cache")))


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


@pytest.fixture
def slow_clock(monkeypatch):
    """tqdm's clock advances a second per reading, as in a slow run: every update is drawn (tqdm draws at most
    every 0.1 s), so what a log ends with does not depend on this machine's speed."""
    seconds = itertools.count(1000.0)
    monkeypatch.setattr("tqdm.std.time", lambda: next(seconds))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if predict gets as far as loading the model (the output must be refused before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("segkit.inference.api._load", refuse)
    monkeypatch.setattr("segkit.inference.api._fit_to_device", refuse)
