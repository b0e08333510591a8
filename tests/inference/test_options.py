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
            "engine", "denoise", "compile_model", "blend", "halo", "normalize", "tta"} == names
    parameters = inspect.signature(segkit.predict).parameters
    assert parameters["settings"].kind is inspect.Parameter.VAR_KEYWORD and "options" in parameters
