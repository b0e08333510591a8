"""Claims and temporary names (segkit.io.outputs): one writer per output at a time, temporary files
created exclusively (a planted symlink is never followed), and every name within the file-name limit."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile

import segkit
from segkit.errors import OutputError
from segkit.io import outputs
from segkit.io.outputs import (
    NAME_MAX,
    atomic_path,
    check_output,
    claim_path,
    release_claim,
    resumable_path,
    stale_partials,
    temporary_path,
)
from segkit.io.tiff import write_stack
from tests.helpers import assert_user_error, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def holder():
    """Start another process that claims an output and holds the claim until the test ends."""
    children = []

    def hold(path):
        code = ("import sys, time; from segkit.io.outputs import claim; claim(sys.argv[1]); "
                "print('held', flush=True); time.sleep(120)")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env)
        children.append(child)
        assert child.stdout.readline().strip() == "held"
        return child

    yield hold
    for child in children:
        child.kill()
        child.wait()


def _plant_first_token(monkeypatch, token="0123abcd", times=4):
    """Make the next `times` random tokens predictable (as a fixed temporary name would be: the write
    probe of the folder draws one too), the ones after them random."""
    real = uuid.uuid4
    tokens = iter([uuid.UUID(token + "0" * 24)] * times)
    monkeypatch.setattr(outputs.uuid, "uuid4", lambda: next(tokens, None) or real())


# == two writers ===================================================================================

def test_a_second_writer_is_refused_before_any_work(tmp_path, uint8_stack, tiny_checkpoint, holder, no_model_load):
    out = tmp_path / "same.tif"
    child = holder(out)
    with pytest.raises(OutputError, match=f"another segkit run \\(pid {child.pid} on "):
        check_output(out, overwrite=True)
    # the CLI: one line, before the model loads, with or without --overwrite, and nothing written
    for extra in ((), ("--overwrite",)):
        assert_user_error(run("predict", uint8_stack, "-o", out, "-m", tiny_checkpoint, *extra),
                          "another segkit run", f"pid {child.pid}", "is writing", "choose another output")
    assert not out.exists()
    # an atomic write of the same name (a checkpoint, a log) is refused too, and writes nothing
    with pytest.raises(OutputError, match="another segkit run"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"x")
    assert not out.exists() and not list(tmp_path.glob(".same.tif.*.partial"))
    # once the other run ends (here: killed, so its lock file stays), the claim is free again
    child.kill()
    child.wait()
    messages = []
    check_output(out, report=messages.append)
    assert any("took over the claim" in m and f"pid {child.pid}" in m for m in messages), messages
    release_claim(out)
    assert not claim_path(out).exists()


def test_resume_beside_a_live_writer_of_the_store_is_refused(tmp_path, tiny_checkpoint, holder, no_model_load):
    zarr = pytest.importorskip("zarr")
    zarr.save_array(str(tmp_path / "raw.zarr"), np.zeros((1, 40, 40), np.uint8), zarr_format=2)
    out = tmp_path / "out.ome.zarr"
    (tmp_path / "out.ome.zarr.partial").mkdir()  # the store the live run is writing
    child = holder(out)
    assert_user_error(run("predict", tmp_path / "raw.zarr", "-o", out, "-m", tiny_checkpoint, "--resume"),
                      "another segkit run", f"pid {child.pid}")
    assert (tmp_path / "out.ome.zarr.partial").is_dir()  # the live run's store is untouched


def test_a_stale_claim_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "a.tif"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    claim_path(out).write_text(f"{child.pid} {outputs.HOST}\n")  # left by a run killed with kill -9
    messages = []
    assert check_output(out, report=messages.append) == out
    assert len([m for m in messages if "took over the claim" in m and str(child.pid) in m]) == 1
    write_stack(out, [np.zeros((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8, overwrite=False)
    assert tifffile.imread(out).shape == (8, 8) and not claim_path(out).exists()  # released with the rename


def test_the_claim_is_released_after_a_write_and_after_a_failed_one(tmp_path):
    out = tmp_path / "a.json"
    with atomic_path(out) as tmp:
        assert claim_path(out).exists()
        tmp.write_text("{}")
    assert out.read_text() == "{}" and not claim_path(out).exists()
    with pytest.raises(RuntimeError):
        with atomic_path(out):
            raise RuntimeError("interrupted")
    assert not claim_path(out).exists() and not list(tmp_path.glob(".a.json.*.partial"))


# == temporary names are created exclusively =======================================================

def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.tif"
    _plant_first_token(monkeypatch, times=1)
    planted = temporary_path(out)
    _plant_first_token(monkeypatch)
    planted.symlink_to(victim)
    write_stack(out, [np.ones((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8, overwrite=False)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and tifffile.imread(out).sum() == 64
    assert planted.is_symlink()  # not ours: left alone


def test_the_training_curve_does_not_follow_a_planted_symlink(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from segkit.training.runs import plot_curve

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    curve = tmp_path / "run" / "curve.png"
    curve.parent.mkdir()
    _plant_first_token(monkeypatch, times=1)
    planted = temporary_path(curve)
    _plant_first_token(monkeypatch)
    planted.symlink_to(victim)
    history = [{"epoch": 1, "train_loss": 0.5, "dice": 0.7}, {"epoch": 2, "train_loss": 0.4, "dice": 0.8}]
    assert plot_curve(history, curve, loss_label="loss", metrics=("dice",), metric_label="Dice")
    assert victim.read_text() == "precious"
    assert not curve.is_symlink() and curve.read_bytes().startswith(b"\x89PNG")


def test_a_dangling_symlink_at_the_store_partial_is_one_line(tmp_path, tiny_checkpoint, no_model_load):
    zarr = pytest.importorskip("zarr")
    zarr.save_array(str(tmp_path / "raw.zarr"), np.zeros((1, 40, 40), np.uint8), zarr_format=2)
    (tmp_path / "out.ome.zarr.partial").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="is a symbolic link"):
        resumable_path(tmp_path / "out.ome.zarr")
    for extra in ((), ("--resume",)):
        assert_user_error(run("predict", tmp_path / "raw.zarr", "-o", tmp_path / "out.ome.zarr", "-m",
                              tiny_checkpoint, *extra), "out.ome.zarr.partial is a symbolic link", "delete it")
    assert not (tmp_path / "nowhere").exists()


# == names within the file-name limit ==============================================================

def test_a_long_output_name_is_written_through_a_shortened_temporary_name(tmp_path, uint8_stack, tiny_checkpoint):
    out = tmp_path / ("n" * 236 + ".tif")  # 240 bytes: fits, its .NAME.PID@HOST.TOKEN.partial would not
    assert len(out.name) == 240
    for derived in (temporary_path(out), claim_path(out), resumable_path(tmp_path / ("s" * 240 + ".ome.zarr"))):
        assert len(derived.name.encode()) <= NAME_MAX and derived.parent == tmp_path
    assert temporary_path(out).name != temporary_path(tmp_path / ("n" * 235 + "m.tif")).name[:-17]  # hashed apart
    segkit.predict(uint8_stack, out, model=tiny_checkpoint, device="cpu")
    assert tifffile.imread(out).shape == tifffile.imread(uint8_stack).shape
    # a killed run's shortened temporary file is still found and removed by the next
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    base = temporary_path(out).name.split(f".{os.getpid()}@")[0]
    left = tmp_path / f"{base}.{dead.pid}@{outputs.HOST}.0123abcd.partial"
    left.write_bytes(b"half")
    assert stale_partials([out])[0] == [left]


def test_an_output_name_over_the_limit_is_refused_before_any_work(tmp_path, uint8_stack, tiny_checkpoint,
                                                                  no_model_load):
    out = tmp_path / ("n" * 300 + ".tif")
    with pytest.raises(OutputError, match="is 304 bytes long, but file names may have at most 255; choose a shorter"):
        check_output(out)
    # a 251-character input: its default output name (NAME_pred.tif) is too long, refused before the model loads
    source = tmp_path / ("i" * 247 + ".tif")
    source.write_bytes(uint8_stack.read_bytes())
    assert_user_error(run("predict", source, "-m", tiny_checkpoint), "bytes long", "choose a shorter output name")


def test_an_output_name_over_the_limit_given_with_o_is_one_line(tmp_path, uint8_stack):
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / ("x" * 300 + ".tif")), "bytes long",
                      "choose a shorter output name")


def test_a_failed_run_of_the_python_api_releases_its_claim(tmp_path, uint8_stack, tiny_checkpoint):
    out = tmp_path / "out.tif"
    with pytest.raises(segkit.errors.SegkitError):
        segkit.predict(uint8_stack, out, model=tiny_checkpoint, tile=230, report=lambda _: None)  # not a valid tile
    assert not [p.name for p in tmp_path.iterdir() if "segkit-lock" in p.name]  # other processes may write it now
