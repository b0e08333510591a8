"""Issue 25, the Python scoring calls of `segkit.evaluation`: every argument checked before any file is read,
one line naming it, as a TypeError or ValueError (OptionTypeError / OptionValueError), like segkit.predict's.
The paths do not exist, so a check made after reading would fail with another error (InputError)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segkit.errors import InputError, OptionTypeError, OptionValueError
from segkit.evaluation import (
    evaluate_instances,
    evaluate_matched_instances,
    evaluate_semantic,
    evaluate_stacks,
    evaluate_watershed,
    label_constancy,
    membrane_threshold,
    sweep_watershed,
)
from tests.helpers import assert_user_error, run

MISSING = "missing/prediction.tif"
MISSING_LABELS = Path("missing/labels.tif")
SLICES = "slices must be None or (start, stop) with 0 <= start < stop, not "

#: Every scoring call with the arguments it needs besides the paths.
CALLS = {
    "evaluate_stacks": (evaluate_stacks, {}),
    "evaluate_instances": (evaluate_instances, {}),
    "evaluate_watershed": (evaluate_watershed, {}),
    "sweep_watershed": (sweep_watershed, {}),
    "evaluate_semantic": (evaluate_semantic, {"classes": 3}),
    "evaluate_matched_instances": (evaluate_matched_instances, {}),
}

#: (paths, keywords, error, message): the cases every scoring call shares.
COMMON = {
    "prediction-none": ((None, MISSING_LABELS), {}, OptionTypeError, "prediction must be a path (str or Path), not None"),
    "prediction-array": ((np.zeros((2, 2)), MISSING_LABELS), {}, OptionTypeError, "prediction must be a path"),
    "labels-int": ((MISSING, 3), {}, OptionTypeError, "labels must be a path (str or Path), not 3 (int)"),
    "slices-reversed": ((MISSING, MISSING_LABELS), {"slices": (5, 2)}, OptionValueError, SLICES + "(5, 2)"),
    "slices-empty": ((MISSING, MISSING_LABELS), {"slices": (3, 3)}, OptionValueError, SLICES + "(3, 3)"),
    "slices-negative": ((MISSING, MISSING_LABELS), {"slices": (-1, 2)}, OptionValueError, SLICES + "(-1, 2)"),
    "slices-text": ((MISSING, MISSING_LABELS), {"slices": "25:30"}, OptionTypeError, SLICES + "'25:30'"),
    "slices-floats": ((MISSING, MISSING_LABELS), {"slices": (0.5, 2)}, OptionTypeError, SLICES + "(0.5, 2)"),
    "slices-three": ((MISSING, MISSING_LABELS), {"slices": (0, 1, 2)}, OptionTypeError, SLICES + "(0, 1, 2)"),
    "slices-bools": ((MISSING, MISSING_LABELS), {"slices": (False, True)}, OptionTypeError, SLICES),
}

#: Cases of one call: name -> (call, keywords, error, message).
OWN = {
    "stacks-threshold-high": (evaluate_stacks, {"threshold": 2}, OptionValueError,
                              "threshold=2 must be between 0 and 1"),
    "stacks-threshold-zero": (evaluate_stacks, {"threshold": 0.0}, OptionValueError, "threshold=0.0 must be between"),
    "stacks-threshold-nan": (evaluate_stacks, {"threshold": float("nan")}, OptionValueError, "threshold=nan must be"),
    "stacks-threshold-text": (evaluate_stacks, {"threshold": "0.5"}, OptionTypeError,
                              "threshold='0.5' must be a number between 0 and 1, not str"),
    "stacks-threshold-bool": (evaluate_stacks, {"threshold": True}, OptionTypeError, "threshold=True must be a number"),
    "stacks-sweep": (evaluate_stacks, {"sweep": "yes"}, OptionTypeError, "sweep must be True or False, not 'yes' (str)"),
    "watershed-params": (evaluate_watershed, {"params": {"threshold": 0.5}}, OptionTypeError,
                         "params must be None or a segkit.instances.WatershedParams, not {'threshold': 0.5} (dict)"),
    "sweep-min-seed-size": (sweep_watershed, {"min_seed_size": 0}, OptionValueError,
                            "min_seed_size must be at least 1, not 0"),
    "sweep-min-size": (sweep_watershed, {"min_size": 2.5}, OptionTypeError, "min_size must be an int, not 2.5 (float)"),
    "semantic-classes-one": (evaluate_semantic, {"classes": 1}, OptionValueError, "classes must be at least 2, not 1"),
    "semantic-classes-text": (evaluate_semantic, {"classes": "3"}, OptionTypeError,
                              "classes must be an int, not '3' (str)"),
    "semantic-classes-bool": (evaluate_semantic, {"classes": True}, OptionTypeError,
                              "classes must be an int, not True (bool)"),
    "semantic-ignore": (evaluate_semantic, {"classes": 3, "ignore": 2.0}, OptionTypeError,
                        "ignore must be None or an int (a label value), not 2.0 (float)"),
}


def _refused(error: type[Exception], message: str, call, *args, **kwargs) -> None:
    """The call raises `error` (a TypeError or ValueError as well), one line starting with `message`."""
    base = TypeError if error is OptionTypeError else ValueError
    with pytest.raises(error) as raised:
        call(*args, **kwargs)
    assert isinstance(raised.value, base)
    text = str(raised.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize("case", list(COMMON))
@pytest.mark.parametrize("name", list(CALLS))
def test_scoring_calls_check_the_common_arguments_before_reading(name, case):
    call, needed = CALLS[name]
    paths, keywords, error, message = COMMON[case]
    _refused(error, message, call, *paths, **needed, **keywords)


@pytest.mark.parametrize("case", list(OWN))
def test_scoring_calls_check_their_own_arguments_before_reading(case):
    call, keywords, error, message = OWN[case]
    _refused(error, message, call, MISSING, MISSING_LABELS, **keywords)


@pytest.mark.parametrize("threshold, model, error, message", ids=[
    "text", "high-text", "high", "one", "bool", "list", "model-int"], argvalues=[
    ("high", None, OptionTypeError, "threshold='high' must be a number between 0 and 1, or 'auto'"),
    ("1.5", None, OptionValueError, "threshold='1.5' must be between 0 and 1"),
    (2, None, OptionValueError, "threshold=2 must be between 0 and 1"),
    (1.0, None, OptionValueError, "threshold=1.0 must be between 0 and 1"),
    (False, None, OptionTypeError, "threshold=False must be a number"),
    ([0.5], None, OptionTypeError, "threshold=[0.5] must be a number"),
    (None, 3, OptionTypeError, "model must be None or a path (str or Path), not 3 (int)"),
])
def test_membrane_threshold_checks_before_the_model_is_read(threshold, model, error, message):
    model = model if model is not None else "missing.safetensors"  # read only when the check came too late
    _refused(error, message, membrane_threshold, threshold, model)


def test_good_values_pass_the_checks():
    """Paths (str or Path), numpy ints in slices and numbers given as text (the CLI's) get past the checks: the
    missing file is what is refused."""
    assert membrane_threshold("0.7") == (0.7, "given")
    assert membrane_threshold(np.float32(0.25)) == (0.25, "given")
    for call, needed in CALLS.values():
        with pytest.raises(InputError):
            call(Path(MISSING), MISSING_LABELS, slices=(np.int64(0), 2), **needed)


@pytest.mark.parametrize("plane, error, message", [
    ([[1, 1], [1, 1]], OptionTypeError, "plane must be a 2D numpy array, not list"),
    (np.ones((2, 3, 3)), OptionValueError, "plane must be a 2D array (H, W), not of shape (2, 3, 3)"),
])
def test_label_constancy_takes_a_plane(plane, error, message):
    _refused(error, message, label_constancy, plane)


def test_cli_names_the_threshold_flag(tmp_path):
    """`segkit evaluate --threshold 2` is refused before reading, naming the flag (was: only after opening)."""
    assert_user_error(run("evaluate", tmp_path / "p.tif", tmp_path / "l.tif", "--threshold", "2"),
                      "--threshold 2 must be between 0 and 1")
