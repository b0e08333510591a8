"""Progress bars of the Python API (issue 25, a new user's papercuts): a bar on stderr by default, none with
`progress=False`, a bar of one's own used and left open; the finished bar drawn once; every slice of
`segment_stack` counted."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import tifffile

import segkit
from segkit.errors import OptionTypeError
from segkit.inference import segment
from segkit.inference.progress import ProgressBar
from segkit.instances import WatershedParams
from tests.helpers import states


def quiet(_: str) -> None:
    pass




def test_predict_draws_a_bar_on_stderr_by_default_and_none_with_false(tmp_path, uint8_stack, tiny_checkpoint, capsys):
    """45 s of silence on a big stack: the library drew no bar unless given one."""
    segkit.predict(uint8_stack, tmp_path / "a.tif", model=tiny_checkpoint, device="cpu", batch=4, report=quiet)
    err = capsys.readouterr().err
    assert "12/12" in err and "tile/s" in err  # 3 planes of 2 x 2 tiles
    segkit.predict(uint8_stack, tmp_path / "b.tif", model=tiny_checkpoint, device="cpu", batch=4, report=quiet,
                   progress=False)
    assert capsys.readouterr().err == ""


def test_arrays_get_a_bar_by_default_and_none_with_false(tiny_checkpoint, capsys):
    image = np.random.default_rng(0).integers(0, 256, (2, 60, 70), dtype=np.uint8)  # 2 x 2 tiles a plane
    model = segkit.Model(tiny_checkpoint, device="cpu", batch=4, report=None)
    capsys.readouterr()
    model.predict(image)
    assert states(capsys.readouterr().err)[-1] == "8/8"
    model.predict(image, progress=False)
    assert capsys.readouterr().err == ""
    segkit.predict_array(image, tiny_checkpoint, device="cpu", batch=4, report=None)
    assert states(capsys.readouterr().err)[-1] == "8/8"


def test_a_bar_of_ones_own_gets_the_tiles_and_is_left_open(tiny_checkpoint, capsys):
    class Bar:
        total, done, closed = None, 0, False

        def reset(self, total=None):
            self.total = total

        def update(self, n=1):
            self.done += n

        def close(self):
            self.closed = True

    bar = Bar()
    segkit.predict_array(np.zeros((60, 70), np.uint8), tiny_checkpoint, device="cpu", batch=4, report=None,
                         progress=bar)
    assert bar.total == bar.done == 4 and not bar.closed  # 2 x 2 tiles (52 px out each)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("progress", ["yes", print, 1])
def test_a_progress_that_is_no_bar_is_refused_before_the_model_loads(tmp_path, progress):
    words = "progress must be True (a bar on stderr, the default), False (none) or a bar with reset(total)"
    with pytest.raises(OptionTypeError, match=re.escape(words)):
        segkit.predict_array(np.zeros((8, 8), np.uint8), tmp_path / "missing.safetensors", progress=progress)
    with pytest.raises(OptionTypeError, match=re.escape(words)):
        segkit.predict(tmp_path / "missing.tif", progress=progress)


def test_the_finished_bar_is_drawn_once(slow_clock, capsys):
    """In a log (stderr no terminal) tqdm drew the finished bar at its last update and again at close, with
    another rate: the last line appeared twice."""
    with ProgressBar() as bar:
        bar.update(1)  # before the first reset (the total is not known yet): nothing to draw
        bar.reset(total=3)
        for _ in range(3):
            bar.update(1)
    assert states(capsys.readouterr().err) == ["0/3", "1/3", "2/3", "3/3"]


def test_the_bar_is_made_at_its_first_reset_and_draws_nothing_when_disabled(capsys):
    with ProgressBar():
        pass
    with ProgressBar(disable=True) as bar:
        bar.reset(total=2)
        bar.update(2)
    assert capsys.readouterr().err == ""


def test_segment_stack_counts_every_slice_whatever_the_writer(tmp_path, monkeypatch):
    """`segkit segment`'s bar ended at '80% 4/5' in a log: a slice was counted when the writer asked for the
    next one, and a writer that takes exactly the stack's slices (as tifffile does) never asks after the last."""
    probabilities = tmp_path / "p.tif"
    tifffile.imwrite(probabilities, np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8))
    write_stack = segment.write_stack

    def exact_writer(path, planes, /, *, shape, **kwargs):
        return write_stack(path, list(itertools.islice(planes, shape[0])), shape=shape, **kwargs)

    monkeypatch.setattr(segment, "write_stack", exact_writer)
    counted = []
    segment.segment_stack(str(probabilities), tmp_path / "labels.tif", WatershedParams(), on_plane=counted.append)
    assert counted == [1] * 5
