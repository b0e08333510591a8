"""The plugin's manifest: valid for npe2, every command importable, found through pyproject's entry point,
shipped as package data; and `import segkit` / the CLI never import the plugin."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from tests.helpers import REPO as ROOT
from tests.napari.conftest import MANIFEST, PLUGIN, needs_napari

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@needs_napari
def test_manifest_validates_and_its_commands_import():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # imports segkit.napari.widget:PredictWidget and reader:get_reader
    assert manifest.name == PLUGIN == PYPROJECT["project"]["name"]
    assert [w.display_name for w in manifest.contributions.widgets] == ["Segment"]
    reader = manifest.contributions.readers[0]
    assert {"*.tif", "*.tiff", "*.zarr"} <= set(reader.filename_patterns) and reader.accepts_directories


@needs_napari
def test_npe2_validate_command_accepts_the_manifest():
    done = subprocess.run([sys.executable, "-m", "npe2", "validate", str(MANIFEST)], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout.lower()


@needs_napari
def test_the_entry_point_leads_npe2_to_the_manifest():
    from npe2 import PluginManifest

    value = PYPROJECT["project"]["entry-points"]["napari.manifest"][PLUGIN]
    entry_point = metadata.EntryPoint(name=PLUGIN, value=value, group="napari.manifest")
    # what npe2's discovery does with an installed distribution's entry point (and the name check against it)
    manifest = PluginManifest._from_entrypoint(entry_point, metadata.distribution(PLUGIN))
    assert manifest.name == PLUGIN
    assert "napari/napari.yaml" in PYPROJECT["tool"]["setuptools"]["package-data"]["segkit"]


def test_extras_name_napari_and_the_test_tools():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {extra: {spec.split(">")[0].split("=")[0].split("[")[0].strip().lower() for spec in specs}
             for extra, specs in extras.items()}
    assert {"napari", "pyqt6", "magicgui"} <= names["napari"]
    assert {"napari", "pyqt6", "pytest-qt", "pytest-xvfb"} <= names["test"]


@pytest.mark.parametrize("code", ["import segkit", "import segkit.cli"])
def test_segkit_and_the_cli_do_not_import_the_plugin(code):
    check = f"{code}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
            "('napari', 'qtpy', 'PyQt6', 'magicgui', 'vispy') or m.startswith('segkit.napari')))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
