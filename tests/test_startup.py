"""Start-up: what a prediction with a plain U-Net imports, and the memory bound that spares a meta trace."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from segkit.memory import meta_model, tile_activation_bound, tile_activation_bytes

#: Modules a prediction with a plain U-Net checkpoint does not need; each costs start-up time (torch._dynamo
#: and sympy about 2 s together, smp/timm about 3 s).
HEAVY = ("torch._dynamo", "sympy", "segmentation_models_pytorch", "timm", "albumentations", "onnx", "onnxruntime",
         "dask", "distributed", "zarr", "cv2", "matplotlib", "bioimageio", "torchvision")


def test_predicting_with_the_bundled_unet_imports_nothing_heavy(tmp_path):
    image = tmp_path / "slice.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8))
    code = (
        "import sys, segkit\n"
        f"segkit.predict({str(image)!r}, {str(tmp_path / 'out.tif')!r}, report=lambda line: None)\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name, kwargs", [("unet", {}), ("unet", {"base": 8, "batch_norm": True}), ("fcn8s", {}),
                                          ("fcn32s", {}), ("smp:Unet:resnet18", {}), ("denoiser", {})])
@pytest.mark.parametrize("tile", [256, 572])
def test_the_activation_bound_is_never_below_the_traced_size(name, kwargs, tile):
    model = meta_model(name, kwargs)
    traced, bound = tile_activation_bytes(model, tile), tile_activation_bound(model, tile)
    assert traced is not None and bound is not None
    assert traced <= bound


def test_shapes_only_models_are_not_initialised():
    import torch

    model = meta_model("fcn8s", {})  # FCN's init draws weights and builds bilinear kernels
    assert all(parameter.is_meta for parameter in model.parameters())
    assert isinstance(model.final_kernel, torch.Tensor) and model.final_kernel.is_meta
