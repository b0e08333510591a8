"""Which encoding a model and its options get, and the words the header prints for it."""

from __future__ import annotations

import pytest

from segkit.errors import SegkitError
from segkit.inference.encodings import (
    ClassMapEncoding,
    InstanceEncoding,
    ObjectEncoding,
    ProbabilityEncoding,
    describe_output,
    model_encoding,
)
from segkit.inference.options import PredictOptions
from segkit.models import create_model
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults


def _record(classes: int, labels_kind: str, **inference) -> CheckpointInfo:
    model = create_model("unet", base=4, depth=2, classes=classes)
    names = {2: [], 3: ["background", "interior", "boundary"]}[classes]
    return CheckpointInfo(kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 2, "classes": classes},
                          geometry=model.geometry, normalization=Normalization(100.0, 60.0), classes=names,
                          inference=InferenceDefaults(labels_kind=labels_kind, **inference))


def test_membrane_models_write_probabilities_masks_or_instances():
    info = _record(2, "membrane", threshold=0.4)
    assert model_encoding(info, PredictOptions()) == ProbabilityEncoding("uint8")
    assert model_encoding(info, PredictOptions(threshold="auto")) == ProbabilityEncoding("mask", 0.4)
    assert isinstance(model_encoding(info, PredictOptions(instances=True)), InstanceEncoding)
    assert describe_output(info, PredictOptions(threshold="auto")) == (
        "a 0/255 membrane mask at threshold 0.4 (auto: the checkpoint's)", 0.4)
    assert describe_output(info, PredictOptions(output_type="float16")) == ("float16 membrane probabilities", None)
    with pytest.raises(SegkitError, match="argmax and class_index are for models trained on semantic"):
        model_encoding(info, PredictOptions(argmax=True))


def test_models_of_classes_write_every_class_one_class_argmax_or_objects():
    semantic = _record(3, "semantic")
    assert model_encoding(semantic, PredictOptions()) == ProbabilityEncoding("uint8", channel=None, channels=3)
    assert model_encoding(semantic, PredictOptions(argmax=True)) == ClassMapEncoding()
    assert model_encoding(semantic, PredictOptions(class_index=2, threshold=0.3)) == ProbabilityEncoding(
        "mask", 0.3, channel=2)
    assert describe_output(semantic, PredictOptions(argmax=True))[0] == (
        "uint8 classes (argmax): 0 background, 1 interior, 2 boundary")
    with pytest.raises(SegkitError, match="class_index=5 is not a class of this model"):
        model_encoding(semantic, PredictOptions(class_index=5))
    objects = _record(3, "instances")
    assert isinstance(model_encoding(objects, PredictOptions()), ObjectEncoding)
    assert describe_output(objects, PredictOptions())[0].startswith("uint32 objects, ids unique across the stack: seeded watershed")


def test_denoisers_are_described_by_their_output_type():
    info = _record(2, "membrane")
    assert describe_output(info, PredictOptions(kind="denoiser")) == ("denoised intensities in the input's dtype", None)
    assert describe_output(info, PredictOptions(kind="denoiser", output_type="float32")) == (
        "denoised float32 intensities", None)
