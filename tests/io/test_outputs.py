"""Outputs (segkit.io.outputs): never the input, only names segkit writes, checked before anything is
loaded, a late write error in one line, and the temporary files of killed runs removed by the next run."""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

import segkit
from segkit.errors import OutputError, OutputExistsError
from segkit.io.outputs import (
    HOST,
    check_output,
    remove_stale_partials,
    stale_partials,
    temporary_path,
)
from segkit.io.tiff import write_stack
from tests.helpers import assert_user_error, run


@pytest.fixture
def probability(tmp_path):
    """A small uint8 membrane probability stack (input of `segkit segment`)."""
    path = tmp_path / "prob.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((2, 40, 40)) * 255).astype(np.uint8),
                     photometric="minisblack")
    return path


def _dead_pid():
    """The id of a process that has exited (ids are not reused that soon)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# == 1. the output is never an input, under any name ==============================================

def test_predict_refuses_its_input_as_output_also_through_a_hard_link_or_symlink(tmp_path, uint8_stack,
                                                                                 tiny_checkpoint, no_model_load):
    raw = uint8_stack.read_bytes()
    os.link(uint8_stack, tmp_path / "hard.tif")
    os.symlink(uint8_stack, tmp_path / "soft.tif")
    for output, other in ((uint8_stack, False), (tmp_path / "hard.tif", True), (tmp_path / "soft.tif", True)):
        result = run("predict", uint8_stack, "-o", output, "-m", tiny_checkpoint, "--overwrite", "-q")
        assert_user_error(result, "would replace its input", *(["under another name"] if other else []))
    # a folder read as one stack, into one of its own files; and the library's keyword
    assert_user_error(run("predict", tmp_path, "-o", tmp_path / "hard.tif", "--overwrite"), "would replace its input")
    with pytest.raises(OutputError, match="would replace its input"):
        segkit.predict(uint8_stack, tmp_path / "hard.tif", overwrite=True, kind="denoiser")
    assert uint8_stack.read_bytes() == raw and (tmp_path / "hard.tif").read_bytes() == raw


def test_every_writing_command_refuses_its_input(tmp_path, probability, tiny_checkpoint):
    os.link(probability, tmp_path / "same.tif")
    assert_user_error(run("segment", probability, "-o", probability, "--overwrite", "-q"), "would replace its input")
    assert_user_error(run("segment", probability, "-o", tmp_path / "same.tif", "--overwrite", "-q"),
                      "under another name")
    assert_user_error(run("denoise", probability, "-o", tmp_path / "same.tif", "-m", tiny_checkpoint, "--overwrite",
                          "-q"), "would replace its input")
    os.link(tiny_checkpoint, tmp_path / "model.onnx")
    assert_user_error(run("export", tiny_checkpoint, "-o", tmp_path / "model.onnx", "--overwrite"),
                      "would replace its input")
    os.link(probability, tmp_path / "scores.json")
    assert_user_error(run("evaluate", probability, probability, "--json", tmp_path / "scores.json"),
                      "would replace its input")
    assert (tmp_path / "same.tif").read_bytes() == probability.read_bytes()


def test_folder_output_refuses_a_hard_link_of_an_input(tmp_path, tiny_checkpoint, no_model_load):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", np.zeros((40, 40), np.uint8))
    tifffile.imwrite(tmp_path / "in" / "b.tif", np.zeros((40, 40), np.uint8))
    os.link(tmp_path / "in" / "a.tif", tmp_path / "out" / "a.tif")
    assert_user_error(run("predict", tmp_path / "in" / "a.tif", tmp_path / "in" / "b.tif", "-o", tmp_path / "out",
                          "-m", tiny_checkpoint, "--overwrite"), "would replace its input")


def test_dask_path_refuses_a_store_symlinked_to_its_input(tmp_path, tiny_checkpoint, no_model_load):
    zarr = pytest.importorskip("zarr")
    zarr.save_array(str(tmp_path / "raw.zarr"), np.zeros((1, 40, 40), np.uint8), zarr_format=2)
    os.symlink(tmp_path / "raw.zarr", tmp_path / "out.ome.zarr")
    assert_user_error(run("predict", tmp_path / "raw.zarr", "-o", tmp_path / "out.ome.zarr", "-m", tiny_checkpoint,
                          "--overwrite"), "would replace its input", "under another name")
    assert (tmp_path / "raw.zarr").is_dir()


# == 17. only names segkit writes ================================================================

def test_names_segkit_does_not_write_are_refused_with_the_allowed_ones(tmp_path, uint8_stack, probability,
                                                                       tiny_checkpoint, no_model_load):
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "out.png", "-m", tiny_checkpoint),
                      "does not write .png", ".tif or .tiff")
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "out", "-m", tiny_checkpoint),
                      "no extension", ".tif or .tiff")
    assert_user_error(run("segment", probability, "-o", tmp_path / "labels.png", "-q"), ".tif or .tiff")
    assert_user_error(run("denoise", probability, "-o", tmp_path / "clean.jpg", "-m", tiny_checkpoint, "-q"),
                      ".tif or .tiff")
    assert_user_error(run("export", tiny_checkpoint, "-o", tmp_path / "model.pt"), "does not write .pt", ".onnx")
    assert_user_error(run("evaluate", probability, probability, "--json", tmp_path / "scores.txt"), ".json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prob.tif", "stack.tif"]
    check_output(tmp_path / "UPPER.TIF", kind="tiff")  # any case
    check_output(tmp_path / "x.ome.zarr", kind="store")


def test_convert_refuses_other_names(tmp_path):
    zarr = pytest.importorskip("zarr")
    from segkit.io.zarr import create_ome_zarr

    create_ome_zarr(tmp_path / "s.ome.zarr", (1, 16, 16), (1, 16, 16), np.uint8, None)
    assert zarr.open_array(str(tmp_path / "s.ome.zarr" / "0")).shape == (1, 16, 16)
    assert_user_error(run("convert", tmp_path / "s.ome.zarr", tmp_path / "s.png"), "does not write .png", ".tif")


# == 5. unfinished OME-Zarr stores are refused ====================================================

def test_convert_and_predict_refuse_an_unfinished_store(tmp_path, tiny_checkpoint):
    pytest.importorskip("zarr")
    from segkit.errors import InputError
    from segkit.io.calibration import zarr_attributes
    from segkit.io.zarr import MANIFEST, convert_zarr_to_tiff, create_ome_zarr, mark_complete

    partial = tmp_path / "x.ome.zarr.partial"
    create_ome_zarr(partial, (2, 16, 16), (1, 16, 16), np.uint8, None)
    (partial / MANIFEST).write_text('{"input": "12 bytes, sha256 ..."}')  # a run that marks completion
    assert_user_error(run("convert", partial, tmp_path / "out.tif"), "unfinished store", "resume", "x.ome.zarr")
    renamed = tmp_path / "renamed.ome.zarr"
    partial.rename(renamed)  # renamed by hand: still not marked complete
    assert_user_error(run("convert", renamed, tmp_path / "out.tif"), "not marked complete", "resume")
    assert_user_error(run("predict", renamed, "-o", tmp_path / "p.ome.zarr", "-m", tiny_checkpoint),
                      "not marked complete")
    assert not (tmp_path / "out.tif").exists()
    mark_complete(renamed)  # what the Dask path does before its rename
    assert zarr_attributes(renamed)["segkit"]["complete"] is True  # the mark is an attribute, not a file
    assert convert_zarr_to_tiff(renamed, tmp_path / "out.tif") == tmp_path / "out.tif"
    create_ome_zarr(tmp_path / "y.ome.zarr.partial", (1, 16, 16), (1, 16, 16), np.uint8, None)  # by its name
    with pytest.raises(InputError, match="unfinished store"):
        convert_zarr_to_tiff(tmp_path / "y.ome.zarr.partial", tmp_path / "y.tif")
    older = tmp_path / "older.ome.zarr"  # finished by a segkit from before the mark: its rename says so
    create_ome_zarr(older, (1, 16, 16), (1, 16, 16), np.uint8, None)
    (older / MANIFEST).write_text('{"model_sha256": "..."}')
    assert convert_zarr_to_tiff(older, tmp_path / "older.tif") == tmp_path / "older.tif"


# == 9. output problems found before any work, or said in one line ===============================

def test_output_kind_and_folder_are_checked_before_the_model_loads(tmp_path, uint8_stack, probability,
                                                                   tiny_checkpoint, no_model_load):
    (tmp_path / "f.ome.zarr").write_bytes(b"a file")
    result = run("predict", uint8_stack, "-o", tmp_path / "f.ome.zarr", "-m", tiny_checkpoint, "--overwrite")
    assert_user_error(result, "is a file, not an OME-Zarr store")
    assert not (tmp_path / "f.ome.zarr.partial").exists() and (tmp_path / "f.ome.zarr").read_bytes() == b"a file"
    assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "missing" / "o.tif", "-m", tiny_checkpoint),
                      "output folder", "does not exist")
    (tmp_path / "d.tif").mkdir()
    assert_user_error(run("segment", probability, "-o", tmp_path / "d.tif", "--overwrite", "-q"), "is a folder")
    result = run("evaluate", probability, probability, "--json", tmp_path / "missing" / "scores.json")
    assert_user_error(result, "output folder", "does not exist")
    assert "pixel_error" not in result.stdout  # refused before scoring


def _unwritable_probe(monkeypatch, error=errno.EACCES):
    """os.open fails for segkit's write probe, as in a read-only folder (root ignores chmod)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if ".segkit-write-test" in str(path):
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_read_only_folder_or_full_disk_refused_before_loading(tmp_path, uint8_stack, tiny_checkpoint, no_model_load,
                                                              monkeypatch):
    with monkeypatch.context() as patch:
        _unwritable_probe(patch)
        assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tiny_checkpoint),
                          "cannot write to", "Permission denied")
        assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.ome.zarr", "-m", tiny_checkpoint),
                          "cannot write to")
        assert_user_error(run("demo", "-o", tmp_path / "demo"), "cannot write to")
    with monkeypatch.context() as patch:
        _unwritable_probe(patch, errno.EROFS)
        assert_user_error(run("predict", uint8_stack, uint8_stack, "-o", tmp_path / "outdir", "-m", tiny_checkpoint),
                          "Read-only file system")
    with monkeypatch.context() as patch:
        patch.setattr("segkit.io.outputs.shutil.disk_usage", lambda path: type("U", (), {"free": 0})())
        assert_user_error(run("predict", uint8_stack, "-o", tmp_path / "o.tif", "-m", tiny_checkpoint),
                          "is full", "0 bytes free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.tif"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders; test_read_only_folder_or_full_disk_refused_before_loading "
                           "covers this case by failing segkit's write probe")
def test_chmod_read_only_folder(tmp_path, uint8_stack, tiny_checkpoint, no_model_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_user_error(run("predict", uint8_stack, "-o", folder / "o.tif", "-m", tiny_checkpoint),
                          "cannot write to")
    finally:
        folder.chmod(0o700)


def _full_disk(monkeypatch):
    def write(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "write", write)


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, uint8_stack, probability, tiny_checkpoint,
                                                                monkeypatch):
    _full_disk(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    result = run("segment", probability, "-o", out / "labels.tif", "-q")
    assert_user_error(result, "writing", "labels.tif", "No space left on device", "was removed", "free space")
    result = run("predict", uint8_stack, "-o", out / "m.tif", "-m", tiny_checkpoint, "--device", "cpu", "-q")
    assert_user_error(result, "No space left on device", "was removed")
    assert list(out.iterdir()) == []  # no output, no temporary file
    with pytest.raises(OutputError, match="No space left"):
        write_stack(out / "w.tif", [np.zeros((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8)
    assert list(out.iterdir()) == []


def test_full_disk_on_the_dask_path_keeps_the_store_for_resume(tmp_path, tiny_checkpoint, monkeypatch):
    pytest.importorskip("zarr")
    pytest.importorskip("dask")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("segkit.inference.distributed._compute", full)
    source = tmp_path / "plane.tif"  # larger than the model's context (96 px), as the Dask path needs
    tifffile.imwrite(source, np.zeros((1, 128, 128), np.uint8), photometric="minisblack")
    result = run("predict", source, "-o", tmp_path / "o.ome.zarr", "-m", tiny_checkpoint, "--tile", 236,
                 "--batch", 2, "--device", "cpu")
    assert_user_error(result, "No space left on device", "kept in", "--resume")
    assert (tmp_path / "o.ome.zarr.partial").is_dir() and not (tmp_path / "o.ome.zarr").exists()


# == 13. temporary files of killed runs ===========================================================

def test_temporary_names_carry_the_writer(tmp_path):
    name = temporary_path(tmp_path / "a.b.tif").name
    assert name.startswith(f".a.b.tif.{os.getpid()}@{HOST}.") and name.endswith(".partial")


def test_next_run_removes_stale_temporary_files_and_names_live_ones(tmp_path, probability):
    out = tmp_path / "labels.tif"
    dead = tmp_path / f".labels.tif.{_dead_pid()}@{HOST}.0123abcd.partial"  # killed (kill -9) on this machine
    old = tmp_path / ".labels.tif.89abcdef.partial"  # an older segkit's, untouched for 2 hours
    live = tmp_path / f".labels.tif.{os.getppid()}@{HOST}.deadbeef.partial"  # a run still writing
    other = tmp_path / f".other.tif.{_dead_pid()}@{HOST}.01234567.partial"  # another output's: not ours to touch
    remote = tmp_path / f".labels.tif.{_dead_pid()}@{HOST}x.fedcba98.partial"  # another machine's: named, kept
    for path in (dead, old, live, other, remote):
        path.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(remote, (two_hours_ago, two_hours_ago))
    assert sorted(p.name for p in stale_partials([out])[0]) == sorted([dead.name, old.name])
    result = run("segment", probability, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    removed = [line for line in result.stderr.splitlines() if line.startswith("removed")]
    assert len(removed) == 1 and "2 temporary files" in removed[0] and dead.name in removed[0], result.stderr
    assert "may still be written" in result.stderr and live.name in result.stderr and remote.name in result.stderr
    assert not dead.exists() and not old.exists() and live.exists() and other.exists() and out.exists()
    assert remote.exists()


def test_predict_removes_stale_temporary_files_of_its_outputs(tmp_path, uint8_stack, tiny_checkpoint):
    dead = tmp_path / f".o.tif.{_dead_pid()}@{HOST}.0123abcd.partial"
    dead.write_bytes(b"half")
    messages = []
    segkit.predict(uint8_stack, tmp_path / "o.tif", model=tiny_checkpoint, device="cpu", report=messages.append)
    assert not dead.exists() and any("removed 1 temporary file" in m and dead.name in m for m in messages)
    # into an output folder: one line for the stale files of all its outputs
    (tmp_path / "out").mkdir()
    stale = [tmp_path / "out" / f".stack.tif.{_dead_pid()}@{HOST}.0123abc{i}.partial" for i in range(2)]
    for path in stale:
        path.write_bytes(b"half")
    messages.clear()
    result = segkit.predict([uint8_stack], f"{tmp_path / 'out'}/", model=tiny_checkpoint, device="cpu",
                            report=messages.append)
    assert result.outputs == [tmp_path / "out" / "stack.tif"] and not any(p.exists() for p in stale)
    assert len([m for m in messages if m.startswith("removed 2 temporary files")]) == 1
    assert remove_stale_partials([tmp_path / "out" / "stack.tif"], messages.append) == []  # nothing left


def test_library_check_output_and_existing_outputs(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        check_output(tmp_path / "a.tif")
    assert check_output(tmp_path / "a.tif", overwrite=True) == tmp_path / "a.tif"
    with pytest.raises(OutputError, match="is a folder"):
        write_stack(tmp_path, [np.zeros((8, 8), np.uint8)], shape=(8, 8), dtype=np.uint8, overwrite=True)


def test_only_errors_of_the_output_count_as_write_failures(tmp_path):
    """A full disk (no file named) or an error naming the output or a file in its store is the output's;
    a permission error naming an input is not (it must not say "choose an output folder you can write to")."""
    import errno

    from segkit.io.outputs import is_write_error

    out, store = tmp_path / "o.tif", tmp_path / "o.ome.zarr.partial"
    assert is_write_error(OSError(errno.ENOSPC, "No space left on device"), out)
    assert is_write_error(PermissionError(errno.EACCES, "Permission denied", str(out)), out)
    assert is_write_error(PermissionError(errno.EACCES, "Permission denied", str(store / "0" / "c" / "1")), store)
    assert not is_write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.tif")), out)
    assert not is_write_error(OSError(errno.EIO, "Input/output error"), out)
