"""The widget's guard against the LLVM clash: after a napari viewer has drawn (Mesa's OpenGL loads the system's
libLLVM on Linux), torch's compiler stack imports triton; without `load_triton_apart` that import ends the process
with a segmentation fault under Xvfb's llvmpipe. Run in a subprocess, so a crash fails this test only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.napari.conftest import needs_viewer

pytestmark = needs_viewer

SCRIPT = """
import sys
import napari
viewer = napari.Viewer(show=False)          # an OpenGL context: Mesa's driver (and its libLLVM) is loaded
from segkit.napari.widget import load_triton_apart
loaded = load_triton_apart() if sys.argv[1] == "guarded" else False
import torch._dynamo                        # imports triton (torch.utils._triton.has_triton_package)
viewer.close()
print("alive", loaded)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the clash is Linux's (Mesa's libLLVM)")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (torch without it)")
def test_torch_compiler_stack_loads_after_a_viewer_drew():
    done = subprocess.run([sys.executable, "-c", SCRIPT, "guarded"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split()[-2:] == ["alive", "True"]
