"""What the napari tests need: napari with a Qt binding, pytest-qt, a display, and segkit's plugin registered.

The display comes from inside pytest: pytest-xvfb (the test extra) starts Xvfb for the session when the `Xvfb`
binary is installed (.ci/run installs it with Qt's xcb libraries), so README's plain `python -m pytest -q` runs
these tests headless. Without napari, pytest-qt or any display they skip, saying which is missing (in CI, where
$SEGKIT_REQUIRE_OPTIONAL_TOOLS is set, they fail instead).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import skip_unless_required

MANIFEST = Path(__file__).resolve().parents[2] / "segkit" / "napari" / "napari.yaml"
PLUGIN = "segkit-bio"


def missing(*, display: bool = True) -> str | None:
    """Why napari (and, with `display`, a viewer) cannot be used here: a package or a display is missing."""
    for module, extra in (("napari", "napari"), ("qtpy", "a Qt binding (PyQt6)"), ("pytestqt", "pytest-qt"),
                          ("magicgui", "magicgui")):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{extra} is not installed ({exc}); pip install -e '.[test]'"
    if display and sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                             or os.environ.get("WAYLAND_DISPLAY")):
        return "no display: install Xvfb (apt-get install xvfb, as .ci/run does); pytest-xvfb then starts it"
    return None


@pytest.fixture
def napari_installed():
    """Skips the test, saying why, where napari and its Qt tools are not installed."""
    reason = missing(display=False)
    if reason:
        skip_unless_required(reason)


@pytest.fixture
def display():
    """Skips the test, saying why, where no viewer can be made (no napari, pytest-qt or display). Checked at
    setup: pytest-xvfb sets DISPLAY after this conftest is imported."""
    reason = missing()
    if reason:
        skip_unless_required(reason)


#: Put on tests that import napari (`@needs_napari`) and on modules that open viewers (`pytestmark = needs_viewer`).
needs_napari = pytest.mark.usefixtures("napari_installed")
needs_viewer = pytest.mark.usefixtures("display")


@pytest.fixture(autouse=True, scope="session")
def _triton_before_opengl():
    """triton loaded before the first viewer, as the widget loads it: tests later in the session that import it
    for the first time would otherwise crash on the libLLVM that Mesa's OpenGL left in the process
    (segkit.napari.widget.load_triton_apart says why)."""
    try:
        from segkit.napari.widget import load_triton_apart
    except ImportError:  # no napari: no viewer either
        return
    load_triton_apart()


@pytest.fixture(scope="session")
def segkit_plugin():
    """segkit's manifest registered with napari's plugin manager (npe2), as the installed entry point does.

    After `pip install -e '.[test]'` napari discovers it through the `napari.manifest` entry point; where the
    installed distribution predates the entry point (an editable install of another checkout) the manifest is
    registered from its file, once for the session (napari keeps the commands it registered)."""
    from npe2 import PluginManager, PluginManifest

    manager = PluginManager.instance()
    manager.discover()
    if PLUGIN not in manager._manifests:
        manager.register(PluginManifest.from_file(MANIFEST))
    return manager


@pytest.fixture
def notifications():
    """The napari notifications shown during a test, as (severity, message) pairs."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(notification) -> None:
        seen.append((str(notification.severity), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)
