"""Shared fixtures: tiny models and checkpoints, small synthetic stacks, the ISBI data if present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


@pytest.fixture(scope="session")
def tiny_unet():
    import torch

    from segkit.models import create_model

    torch.manual_seed(0)
    return create_model("unet", base=4, depth=4).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_unet) -> Path:
    from segkit.checkpoint import CheckpointInfo, Normalization, save_checkpoint

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
        pytest.skip("ISBI 2012 data not found next to the checkout")
    return ISBI
