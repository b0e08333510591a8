"""Issue 13, items 12 (SIGTERM), 17 (a failing file named once), 18 (what was chosen) and 19 (swapped
evaluate arguments)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import REPO, assert_user_error, run

REPO = REPO


def _leftovers(folder: Path, name: str) -> list[str]:
    """The output and any hidden temporary file of it (.NAME.xxxx.partial) in `folder`."""
    return sorted(f for f in os.listdir(folder) if f == name or (f.startswith(f".{name}.") and f.endswith(".partial")))


# -- 12: SIGTERM does what Ctrl-C does -------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_predict_leaves_no_output_and_no_partial_file(tmp_path, tiny_checkpoint):
    """`kill` (or SLURM) during predict: as Ctrl-C (tested in-process below), exit code 143."""
    signum, code, how = signal.SIGTERM, 143, "SIGTERM"
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 256, (8, 256, 256), dtype=np.uint8),
                     photometric="minisblack")  # 8 x 36 tiles of the tiny U-Net: seconds on a CPU
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "segkit.cli", "predict", str(stack), "-o", str(tmp_path / "out.tif"),
                                "-m", str(tiny_checkpoint), "--device", "cpu", "-q"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _leftovers(tmp_path, "out.tif") and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [f for f in _leftovers(tmp_path, "out.tif") if f.endswith(".partial")], "the output never started"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted by {how}: segkit predict stopped (exit code {code})"
    assert "Traceback" not in stderr and stdout == ""
    assert _leftovers(tmp_path, "out.tif") == []


def test_interrupt_or_sigterm_maps_to_one_line_and_exit_code_and_the_handler_is_restored(tmp_path, monkeypatch):
    import segkit.evaluation
    from segkit.cli import Terminated

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def stop(error):
        def evaluate_stacks(*args, **kwargs):
            seen.append(signal.getsignal(signal.SIGTERM))
            raise error
        return evaluate_stacks

    for error, code, how in ((Terminated(), 143, "SIGTERM"), (KeyboardInterrupt(), 130, "Ctrl-C")):
        monkeypatch.setattr(segkit.evaluation, "evaluate_stacks", stop(error))
        result = run("evaluate", tmp_path / "p.tif", tmp_path / "l.tif")
        assert result.exit_code == code
        assert result.stderr.strip() == f"interrupted by {how}: segkit evaluate stopped (exit code {code})"
    assert seen[0] is not before and seen[0] is not signal.SIG_DFL  # raised Terminated while the command ran
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("when", ["before the first plane", "while the writer writes", "as the writer finishes"])
def test_an_interrupt_at_any_point_of_a_streamed_write_leaves_no_partial_file(tmp_path, when):
    """consume_behind + write_stack (the predict pipeline's writer thread): SIGTERM, raised as
    Terminated in the main thread, stops both sides; the writer's temporary file never outlives it."""
    from segkit.cli import Terminated, _sigterm_as_interrupt
    from segkit.inference.pipeline import consume_behind
    from segkit.io.tiff import write_stack

    out = tmp_path / "out.tif"
    shape = (6, 32, 32)

    def produce():
        for z in range(shape[0]):
            if when == "before the first plane":
                raise Terminated()
            time.sleep(0.05)
            yield np.full(shape[1:], z, np.uint8)

    def signal_self():
        os.kill(os.getpid(), signal.SIGTERM)

    def write(stream):
        if when == "as the writer finishes":  # every plane is in: the interrupt finds the main thread joining
            planes = list(stream)
            signal_self()
            time.sleep(0.3)
            return write_stack(out, planes, shape=shape, dtype=np.uint8)

        def planes():
            for z, plane in enumerate(stream):
                if z == 2:
                    assert _leftovers(tmp_path, "out.tif")  # the temporary file is there
                    signal_self()
                yield plane
        return write_stack(out, planes(), shape=shape, dtype=np.uint8)

    assert threading.current_thread() is threading.main_thread()
    with _sigterm_as_interrupt(), pytest.raises(Terminated):
        consume_behind(write, produce())
        time.sleep(1)  # (a signal not delivered yet)
    if when == "as the writer finishes":  # the file was complete: it is kept
        assert _leftovers(tmp_path, "out.tif") == ["out.tif"]
        assert tifffile.imread(out)[:, 0, 0].tolist() == list(range(shape[0]))
    else:
        assert _leftovers(tmp_path, "out.tif") == []
    deadline = time.monotonic() + 5  # the writer thread ends with its work
    while [t for t in threading.enumerate() if t.name == "segkit-writer"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "segkit-writer"]


# -- 17: a file that fails in a many-file run is named once -----------------------------------------

def test_a_failing_file_of_a_batch_is_named_once(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "good.tif", np.full((40, 50), 90, np.uint8))
    (folder / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    tifffile.imwrite(folder / "nan.tif", np.full((40, 50), np.nan, np.float32))  # fails while predicting
    result = run("predict", folder, "-o", f"{tmp_path / 'out'}/", "-m", tiny_checkpoint, "-q")
    assert result.exit_code == 1
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failures) == 2, result.stderr
    for line, name in zip(sorted(failures), ("bad.tif", "nan.tif")):
        assert line.count(name) == 1, line
    assert "wrote 1 of 3 files" in result.stdout


def test_failure_line():
    from segkit.inference.files import failure_line

    assert failure_line("a/b.tif", "a/b.tif: plane 2 is cut short") == "failed: a/b.tif: plane 2 is cut short"
    assert failure_line("a/b.tif", "ValueError: boom") == "failed: a/b.tif: ValueError: boom"


# -- 18: the header says what runs and what is written; 'auto' says what it chose ---------------------

def test_predict_header_names_model_output_tile_batch_engine_and_the_auto_threshold(tmp_path, uint8_stack,
                                                                                    tiny_checkpoint):
    out = tmp_path / "mask.tif"
    result = run("predict", uint8_stack, "-o", out, "-m", tiny_checkpoint, "--threshold", "auto", "--device", "cpu",
                 "--batch", "3", "-q")
    assert result.exit_code == 0, result.output
    header = result.stderr.strip().splitlines()[0]
    for part in (f"{uint8_stack} -> {out}:", "tiles of 236 px", "batch 3", f"model {tiny_checkpoint},", "torch cpu",
                 "0/255 membrane mask at threshold 0.5 (auto: the checkpoint's)"):
        assert part in header, header


def test_library_result_says_the_threshold_and_model(tmp_path, uint8_stack, tiny_checkpoint):
    import segkit

    messages = []
    result = segkit.predict(uint8_stack, tmp_path / "n.tif", model=tiny_checkpoint, threshold="auto", instances=True,
                            device="cpu", report=messages.append)
    assert result.threshold == 0.5 and result.model == str(tiny_checkpoint)
    assert "uint32 instances, ids unique across the stack: seeded watershed at threshold 0.5 (auto: the checkpoint's)" in result.writes
    plain = segkit.predict(uint8_stack, tmp_path / "p.tif", model=tiny_checkpoint, device="cpu", report=messages.append)
    assert plain.threshold is None and plain.writes == "uint8 membrane probabilities"


# -- 19: evaluate with PREDICTION and LABELS swapped ------------------------------------------------

@pytest.fixture
def membranes(tmp_path):
    """ISBI-style 0/255 labels (a grid of cells), a noisy uint8 probability map of them, and cell-ID labels."""
    labels = np.full((2, 48, 48), 255, np.uint8)
    labels[:, ::12, :] = labels[:, :, ::12] = 0
    noise = np.random.default_rng(0).integers(0, 40, labels.shape)
    probability = np.where(labels == 0, 215 + noise, noise).astype(np.uint8)
    from segkit.metrics import label_cells

    cells = np.stack([label_cells(plane > 0) for plane in labels]).astype(np.uint16)
    paths = {}
    for name, data in (("labels", labels), ("prob", probability), ("cells", cells)):
        paths[name] = tmp_path / f"{name}.tif"
        tifffile.imwrite(paths[name], data, photometric="minisblack")
    return paths


def test_evaluate_refuses_swapped_arguments(membranes):
    assert run("evaluate", membranes["prob"], membranes["labels"]).exit_code == 0
    for extra in ((), ("--watershed",), ("--sweep",)):
        assert_user_error(run("evaluate", membranes["labels"], membranes["prob"], *extra),
                          "prob.tif does not look like labels", "swapped")
    # instance mode: the labels are still ISBI labels; a probability map there is refused the same way
    assert run("evaluate", membranes["cells"], membranes["labels"], "--instances").exit_code == 0
    assert_user_error(run("evaluate", membranes["cells"], membranes["prob"], "--instances"), "swapped")


def test_cell_id_labels_are_labels(membranes):
    """Labels may hold one id per cell (0 = membrane) instead of a 0/255 mask."""
    from segkit.evaluation import evaluate_stacks, label_constancy

    by_mask = evaluate_stacks(str(membranes["prob"]), str(membranes["labels"]))["scores"]
    by_ids = evaluate_stacks(str(membranes["prob"]), str(membranes["cells"]))["scores"]
    assert by_mask == pytest.approx(by_ids)
    assert label_constancy(tifffile.imread(membranes["prob"])[0]) < 0.5


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_interrupt_stops_waiting_for_a_busy_writer():
    """The first interrupt waits for the writer (so it can delete its temporary file); a second one,
    the user insisting, returns at once instead of waiting out a long compression or watershed."""
    from segkit.cli import Terminated, _sigterm_as_interrupt
    from segkit.inference.pipeline import consume_behind

    def slow_writer(stream):
        list(stream)
        time.sleep(3)  # the last plane, huge, being compressed

    timers = [threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGTERM)) for delay in (0.2, 0.5)]
    started = time.monotonic()
    with _sigterm_as_interrupt(), pytest.raises(Terminated):
        for timer in timers:
            timer.start()
        consume_behind(slow_writer, iter([1, 2]))  # every item is in: this thread waits for the writer
    for timer in timers:
        timer.join()  # both signals were delivered inside the handler's block
    assert time.monotonic() - started < 2.0  # not the writer's 3 s
