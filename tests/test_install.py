"""What `pip install` brings on each platform, read from pyproject.toml with packaging's marker
evaluation (pip's own rules): exactly one ONNX Runtime everywhere (the GPU build only where it has
wheels), no torchvision or matplotlib in the core dependencies, and a distribution name that is ours."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from segkit.inference.engines import cuda_provider_fix, onnxruntime_distribution
from segkit.version import DISTRIBUTION

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

#: packaging's marker environments of the platforms segkit installs on (what pip reports there)
PLATFORMS = {
    "linux x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "darwin arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "darwin x86_64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
    "win amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}


def installed_names(requirements: list[str], environment: dict[str, str], extra: str = "") -> set[str]:
    names = set()
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**environment, "extra": extra}):
            names.add(req.name)
    return names


@pytest.mark.parametrize("platform", PLATFORMS)
def test_exactly_one_onnxruntime_per_platform(platform):
    names = installed_names(PYPROJECT["dependencies"], PLATFORMS[platform])
    runtimes = names & {"onnxruntime", "onnxruntime-gpu"}
    env = PLATFORMS[platform]
    want = "onnxruntime-gpu" if platform == "linux x86_64" else "onnxruntime"
    assert runtimes == {want} == {onnxruntime_distribution(env["platform_system"], env["platform_machine"])}
    assert {"onnx", "torch", "segmentation-models-pytorch"} <= names  # the model registry needs smp


def test_torchvision_and_matplotlib_are_not_core_dependencies_but_tests_get_them():
    core = installed_names(PYPROJECT["dependencies"], PLATFORMS["linux x86_64"])
    assert not core & {"torchvision", "matplotlib"}
    extras = PYPROJECT["optional-dependencies"]
    assert {Requirement(r).name for r in extras["plot"]} == {"matplotlib"}
    tested = {Requirement(r).name for r in extras["test"]}
    assert {"pytest", "matplotlib", "torchvision", "dask", "zarr", "bioimageio.spec", "bioimageio.core"} <= tested


def test_segkit_itself_never_imports_torchvision():
    sources = (Path(__file__).parents[1] / "segkit").rglob("*.py")
    assert not [p for p in sources if "import torchvision" in p.read_text() or "from torchvision" in p.read_text()]


def test_the_distribution_name_is_ours_and_the_import_name_stays():
    # `segkit` on PyPI is an unrelated project (0.0.1); segkit-bio had no release there when chosen
    assert PYPROJECT["name"] == DISTRIBUTION == "segkit-bio"
    assert PYPROJECT["scripts"] == {"segkit": "segkit.cli:main"}


def test_the_cuda_provider_fix_fits_the_platform():
    assert "pip install onnxruntime-gpu" in cuda_provider_fix("Linux", "x86_64")
    assert "pip install onnxruntime-gpu" in cuda_provider_fix("Windows", "AMD64")
    for system, machine in (("Linux", "aarch64"), ("Darwin", "arm64")):
        fix = cuda_provider_fix(system, machine)
        assert "no CUDA build" in fix and "torch engine" in fix and "pip install" not in fix
