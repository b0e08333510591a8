"""segkit never touches the network: train (with DataLoader workers), predict, export and demo run
in subprocesses whose sockets refuse and record every Internet connection or name lookup
(a sitecustomize module, which each Python process, workers included, imports at start)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import yaml

from tests.helpers import REPO

GUARD = '''
import os, socket
_log = os.environ["SEGKIT_SOCKET_LOG"]
def _note(what):
    with open(_log, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):  # Unix sockets (worker plumbing) stay allowed
        _note(f"connect {address}")
        raise OSError("network disabled by segkit's offline test")
    return _connect(self, address)
socket.socket.connect = connect
def getaddrinfo(host, *args, **kwargs):
    _note(f"getaddrinfo {host}")
    raise socket.gaierror("network disabled by segkit's offline test")
socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture
def offline(tmp_path):
    """run(code or CLI args) in a subprocess without network; returns the attempts it logged."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "sockets.log"
    root = REPO

    def run(args: list[str], *, env: dict | None = None) -> list[str]:
        environment = {**os.environ, "SEGKIT_SOCKET_LOG": str(log), **(env or {}),
                       "PYTHONPATH": os.pathsep.join([str(guard), str(root), os.environ.get("PYTHONPATH", "")])}
        environment.pop("NO_ALBUMENTATIONS_UPDATE", None)  # what a user's shell has: nothing
        done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=environment, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return log.read_text().splitlines() if log.exists() else []

    return run


def test_the_guard_sees_albumentations_update_check(offline):
    """Without segkit's switch, importing albumentations looks up pypi.org: the guard must see it,
    or the tests below prove nothing."""
    assert any("pypi.org" in line for line in offline(["-W", "ignore", "-c", "import albumentations"]))


def test_train_with_workers_predict_export_and_demo_make_no_network_call(offline, tmp_path, tiny_checkpoint):
    from segkit.demo import SAMPLE_LABELS, SAMPLE_RAW

    cli = ["-c", "from segkit.cli import main; main()"]
    recipe = {
        "model": {"name": "unet", "params": {"base": 4}},
        "data": {"root": str(SAMPLE_RAW.parent), "raw": SAMPLE_RAW.name, "labels": SAMPLE_LABELS.name, "tile": 236,
                 "train_slices": [0, 3], "val_slices": [3, 4], "test_slices": [4, 5]},
        "train": {"epochs": 1, "iters_per_epoch": 2, "batch": 2, "device": "cpu", "workers": 2,
                  "out": str(tmp_path / "run")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert offline([*cli, "train", "recipe.yaml", "--quiet"]) == []
    tifffile.imwrite(tmp_path / "stack.tif", np.random.default_rng(0).integers(0, 255, (2, 80, 90), dtype=np.uint8))
    assert offline([*cli, "predict", "stack.tif", "-m", str(tiny_checkpoint), "-o", "out.tif", "--quiet"]) == []
    assert offline([*cli, "export", str(tiny_checkpoint), "-o", "tiny.onnx"]) == []
    assert offline([*cli, "demo", "--output-dir", "demo"]) == []
