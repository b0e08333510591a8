"""The bundled U-Net's name, `demo`, wherever a model file is taken (issue 25: `segkit export demo` failed
while `predict` defaulted to the model), and `segkit models` listing it without loading smp or timm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from segkit.errors import SegkitError
from segkit.inference.loading import BUNDLED_MODEL, default_model_path, resolve_model
from tests.helpers import assert_user_error, run


@pytest.fixture
def plane(tmp_path):
    """A small uint8 plane: one tile of the bundled U-Net (fast on a CPU)."""
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    return path


def test_the_name_resolves_to_the_bundled_model_unless_a_file_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert BUNDLED_MODEL == "demo"
    assert resolve_model(None) == resolve_model("demo") == resolve_model(Path("demo")) == default_model_path()
    assert resolve_model("runs/best.safetensors") == Path("runs/best.safetensors")
    (tmp_path / "demo").write_bytes(b"not a model")  # an existing path of that name wins
    assert resolve_model("demo") == Path("demo")
    assert_user_error(run("export", "demo"), "demo is not a segkit checkpoint")


def test_predict_and_the_python_api_take_the_name(tmp_path, plane):
    import segkit

    result = run("predict", plane, "-m", "demo", "-o", tmp_path / "cli.tif", "-q")
    assert result.exit_code == 0, result.output
    assert "model the bundled U-Net 'demo' (unet_isbi_demo.safetensors)" in result.stderr
    done = segkit.predict(plane, tmp_path / "api.tif", model="demo", report=lambda line: None)
    assert done.model == "the bundled U-Net 'demo' (unet_isbi_demo.safetensors)"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "api.tif"), tifffile.imread(tmp_path / "cli.tif"))
    assert segkit.Model("demo", report=None).name == done.model


def test_segment_and_evaluate_take_the_name(tmp_path):
    probability = np.zeros((1, 48, 48), np.uint8)
    probability[:, ::12, :] = probability[:, :, ::12] = 255
    tifffile.imwrite(tmp_path / "p.tif", probability, photometric="minisblack")
    result = run("segment", tmp_path / "p.tif", "-m", "demo", "-o", tmp_path / "n.tif", "-q")
    assert result.exit_code == 0, result.output
    assert "'threshold': 0.3, 'seed_distance': 4.0" in result.stdout  # the settings stored in the bundled model
    labels = np.where(probability > 0, 0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    assert "(stored in demo, the bundled U-Net)" in run("evaluate", tmp_path / "p.tif", tmp_path / "l.tif",
                                                        "-m", "demo").stdout


def test_export_takes_the_name_and_writes_here(tmp_path, monkeypatch):
    """`segkit export demo` exports the bundled checkpoint to ./demo.onnx (not beside the installed file); the
    export itself (about 10 s on a CPU) is replaced by a stand-in that records what it was given."""
    import segkit.export

    seen = {}

    def export_onnx(model, info, **kwargs):
        seen["model"] = info.model, info.model_kwargs["base"]
        return b"onnx", SimpleNamespace(parity={"max_abs_diff": 0.0}, precision="fp32")

    def write_onnx(data, output, *, overwrite):
        seen["output"] = Path(output)
        return Path(output)

    monkeypatch.setattr(segkit.export, "export_onnx", export_onnx)
    monkeypatch.setattr(segkit.export, "write_onnx", write_onnx)
    monkeypatch.chdir(tmp_path)
    result = run("export", "demo")
    assert result.exit_code == 0, result.output
    assert seen == {"model": ("unet", 16), "output": Path("demo.onnx")}
    run("export", "demo", "-o", tmp_path / "named.onnx")
    assert seen["output"] == tmp_path / "named.onnx"


def test_package_takes_the_name(tmp_path, monkeypatch):
    pytest.importorskip("bioimageio.spec")
    import segkit.bioimageio.write

    seen = {}

    def package_checkpoint(checkpoint, output, **kwargs):
        seen.update(checkpoint=Path(checkpoint), output=Path(output))
        raise SegkitError("stopped before packaging")

    monkeypatch.setattr(segkit.bioimageio.write, "package_checkpoint", package_checkpoint)
    monkeypatch.chdir(tmp_path)
    assert_user_error(run("package", "demo", "--author", "Jane Doe"), "stopped before packaging")
    assert seen == {"checkpoint": default_model_path(), "output": Path("demo.bioimageio.zip")}


def test_models_lists_the_bundled_model_by_name():
    result = run("models")
    assert result.exit_code == 0, result.output
    assert "-m demo, segkit export demo" in result.stdout
    demo = next(line for line in result.stdout.splitlines() if line.startswith("demo "))
    assert "1.94 M params" in demo and "188 + 16k" in demo and "threshold 0.8" in demo


def test_models_imports_neither_smp_nor_timm():
    """`segkit models` took 10.5 s: it built every model with its weights (FCN-VGG16's 134 M three times) and
    loaded segmentation-models-pytorch and timm for the smp rows. Shapes come from torch's meta device, and
    smp only with --smp."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom segkit.cli import main\n"
            "result = CliRunner().invoke(main, ['models'])\nassert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('segmentation_models_pytorch', 'timm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_models_with_smp_counts_them():
    pytest.importorskip("segmentation_models_pytorch")
    result = run("models", "--smp")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("smp:Unet:resnet34 "))
    assert "24.43 M params" in row and "halo 64" in row
