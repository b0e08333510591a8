"""Progress bars of the CLI in a log (stderr no terminal, as CliRunner's) and the start-up of a refusal
(issue 25, a new user's papercuts)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import tifffile

from tests.helpers import run, states


def test_predicts_last_progress_line_is_printed_once(tmp_path, uint8_stack, tiny_checkpoint, slow_clock):
    """The log of `segkit predict` ended with the finished bar twice, with different rates."""
    result = run("predict", uint8_stack, "-o", tmp_path / "out.tif", "-m", tiny_checkpoint, "--device", "cpu",
                 "--batch", 4)
    assert result.exit_code == 0, result.output
    drawn = states(result.stderr)
    assert drawn[-1] == "12/12" and drawn.count("12/12") == 1, result.stderr  # 3 planes of 2 x 2 tiles
    assert result.stderr.endswith("tile/s]\n")


def test_segments_bar_ends_at_every_slice_once(tmp_path, slow_clock):
    """`segkit segment`'s bar ended at '80% 4/5' in a log (and the finished bar was drawn twice)."""
    probabilities = tmp_path / "membranes.tif"
    tifffile.imwrite(probabilities, np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8))
    result = run("segment", probabilities, "-o", tmp_path / "neurons.tif")
    assert result.exit_code == 0, result.output
    drawn = states(result.stderr)
    assert drawn[-1] == "5/5" and drawn.count("5/5") == 1, result.stderr
    assert run("segment", probabilities, "-o", tmp_path / "quiet.tif", "-q").stderr == ""


def test_missing_inputs_and_models_are_refused_before_torch_loads(tmp_path, uint8_stack):
    """`segkit predict nonexist.tif` took 3.4 s to say so: the input was checked after the model loaded."""
    cases = [["nonexist.tif"], ["*.nope"], ["missing.ome.zarr", "-o", "out.ome.zarr"],
             [str(uint8_stack), "-m", "nope.safetensors"], [str(uint8_stack), "--denoise", "nope.safetensors"]]
    code = (
        "import sys\n"
        "from segkit.cli import main\n"
        f"for case in {cases!r}:\n"
        "    main(['predict', *case], standalone_mode=False)\n"
        "print(sorted(name for name in ('torch', 'onnxruntime', 'dask') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert done.stderr.splitlines() == [
        "error: input nonexist.tif does not exist; check the path",
        "error: no files match '*.nope'; check the pattern (quote it in the shell)",
        "error: input missing.ome.zarr does not exist; check the path",
        "error: model file nope.safetensors does not exist; check the path (segkit reads .safetensors checkpoints "
        "from `segkit train`, .onnx files from `segkit export`, and 'demo', the bundled U-Net)",
        "error: model file nope.safetensors does not exist; check the path (segkit reads .safetensors checkpoints "
        "from `segkit train`, .onnx files from `segkit export`, and 'demo', the bundled U-Net)",
    ]
