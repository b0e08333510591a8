"""PredictOptions: every prediction option in one place, choices checked once, in the library's words."""

from __future__ import annotations

import dataclasses

import pytest

from segkit.errors import SegkitError
from segkit.inference.options import Amp, PredictOptions


@pytest.mark.parametrize("setting, fragment", [
    (dict(engine="tensorrt"), "unknown engine 'tensorrt'; choose one of auto, torch, onnx"),
    (dict(amp="fp8"), "unknown amp 'fp8'; choose one of auto, none, fp16, bf16"),
    (dict(blend="box"), "unknown blend window 'box'; choose one of cosine, gaussian"),
    (dict(normalize="minmax"), "unknown normalisation 'minmax'"),
    (dict(tta="d8"), "unknown test-time augmentation 'd8'; choose one of none, flips, d4"),
    (dict(kind="classifier"), "unknown model kind 'classifier'"),
    (dict(output_type="same"), "unknown output type 'same'; choose one of uint8, float16"),
    (dict(kind="denoiser", output_type="uint8"), "unknown output type 'uint8'; choose one of same, float32"),
    (dict(kind="denoiser", instances=True), "instances come from a segmenter's probabilities"),
    (dict(compression="gzip"), "unknown compression 'gzip'"),
    (dict(tile="big"), "tile 'big' must be a whole number of pixels or 'auto'"),
])
def test_a_bad_choice_fails_once_in_one_line(setting, fragment):
    with pytest.raises(SegkitError) as caught:
        PredictOptions(**setting)
    assert fragment in str(caught.value) and "\n" not in str(caught.value) and "--" not in str(caught.value)
    if "unknown" in fragment:  # an unknown choice is a ValueError too (engine='tensorrt' used to run ONNX Runtime)
        assert isinstance(caught.value, ValueError)


def test_choices_compare_and_print_as_their_values():
    options = PredictOptions(amp="fp16", tile="572")
    assert options.amp is Amp.FP16 and options.amp == "fp16"
    assert f"{options.amp} {options.amp!r} {options.amp!s}" == "fp16 'fp16' fp16"
    assert options.tile == 572 and options.fixed_tile == 572 and PredictOptions(tile="auto").fixed_tile is None
    assert PredictOptions().output_type == "uint8" and PredictOptions(kind="denoiser").output_type == "same"
    assert dataclasses.replace(options, device="cpu") == PredictOptions(amp="fp16", tile=572, device="cpu")


def test_segkit_predict_takes_every_option_by_name():
    import inspect

    import segkit

    names = {field.name for field in dataclasses.fields(PredictOptions)}
    assert {"tile", "batch", "device", "amp", "output_type", "threshold", "instances", "class_index", "argmax",
            "compression", "kind", "workers", "scheduler", "chunk", "resume", "overwrite", "skip_existing",
            "engine", "denoise", "compile_model", "blend", "halo", "normalize", "tta", "trust_model_code"} == names
    parameters = inspect.signature(segkit.predict).parameters
    assert parameters["settings"].kind is inspect.Parameter.VAR_KEYWORD and "options" in parameters


@pytest.mark.parametrize("settings, error, words", [
    ({"batch": 0}, ValueError, "batch must be at least 1"),
    ({"batch": "4"}, TypeError, "batch must be a whole number"),
    ({"batch": True}, TypeError, "batch must be a whole number"),
    ({"tile": 380.7}, TypeError, "tile 380.7 must be a whole number"),
    ({"workers": 0}, ValueError, "workers must be at least 1"),  # it started a cluster of no workers and waited
    ({"halo": -1}, ValueError, "halo must be at least 0"),
    ({"class_index": -1}, ValueError, "class_index must be at least 0"),
    ({"chunk": 0}, ValueError, "chunk must be at least 16"),
    ({"instances": "yes"}, TypeError, "instances must be True or False"),
    ({"overwrite": "false"}, TypeError, "overwrite must be True or False"),
    ({"threshold": 2.0}, ValueError, "between 0 and 1"),
    ({"threshold": "abc"}, TypeError, "threshold 'abc'"),
])
def test_the_python_api_refuses_values_it_would_change_silently(settings, error, words):
    """Each is a SegkitError (one line from the CLI) and a TypeError / ValueError naming the option."""
    with pytest.raises(error, match=words) as caught:
        PredictOptions(**settings)
    assert isinstance(caught.value, SegkitError)


def test_numbers_as_text_and_numpy_integers_are_taken():
    import numpy as np

    options = PredictOptions(tile="572", batch=np.int64(2), threshold="0.5")
    assert (options.tile, options.batch, options.threshold) == (572, 2, 0.5)
