"""The checkpoint record's inference defaults (segkit.checkpoint.InferenceDefaults): round trips,
every record written so far still loads, bad values are refused with one line."""

import dataclasses
import json
import shutil

import pytest

from segkit.checkpoint import read_info, update_inference_defaults
from segkit.errors import CheckpointError
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo, InferenceDefaults


def _with_inference(tmp_path, checkpoint, inference, name="edited.safetensors"):
    """A copy of `checkpoint` whose record's inference entry is `inference` (`...`: no entry at all)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(checkpoint), "pt") as handle:
        record = json.loads(handle.metadata()["segkit"])
    if inference is ...:
        del record["inference"]
    else:
        record["inference"] = inference
    path = tmp_path / name
    save_file(load_file(str(checkpoint)), str(path), metadata={"segkit": json.dumps(record)})
    return path


FULL = InferenceDefaults(tile=236, threshold=0.4, input_dtype="uint16", watershed={"threshold": 0.5, "min_size": 10},
                         intensity_scale=65535.0, labels_kind="instances", pixel_size=0.004, output_channel=1)


def test_round_trip_keeps_every_field_and_leaves_out_unset_ones(tmp_path, tiny_checkpoint):
    assert InferenceDefaults.from_dict(FULL.to_dict()) == FULL
    assert InferenceDefaults().to_dict() == {"labels_kind": "membrane"}  # None values are not written
    assert InferenceDefaults(tile=236).to_dict() == {"tile": 236, "labels_kind": "membrane"}
    info = read_info(tiny_checkpoint)
    info.inference = FULL
    again = CheckpointInfo.from_json(info.to_json(), "x")
    assert again.inference == FULL and isinstance(again.inference, InferenceDefaults)
    assert json.loads(info.to_json())["inference"] == FULL.to_dict()
    path = _with_inference(tmp_path, tiny_checkpoint, FULL.to_dict())
    assert read_info(path).inference == FULL


@pytest.mark.parametrize("stored, expected", [
    # what segkit train (segmenter), segkit train (denoiser), --denoise composition and
    # evaluate --write-defaults have written, and records without any inference entry
    ({"threshold": 0.5, "tile": 236, "input_dtype": "uint8"},
     InferenceDefaults(tile=236, threshold=0.5, input_dtype="uint8")),
    ({"tile": 236, "input_dtype": "uint8", "intensity_scale": 255.0},
     InferenceDefaults(tile=236, input_dtype="uint8", intensity_scale=255.0)),
    ({"threshold": 0.5, "tile": None, "input_dtype": None}, InferenceDefaults(threshold=0.5)),
    ({"tile": 236, "threshold": 0.6, "watershed": {"threshold": 0.5, "seed_distance": 2.0, "min_seed_size": 1,
                                                   "min_size": 20}},
     InferenceDefaults(tile=236, threshold=0.6, watershed={"threshold": 0.5, "seed_distance": 2.0,
                                                           "min_seed_size": 1, "min_size": 20})),
    ({}, InferenceDefaults()),
    (..., InferenceDefaults()),
    ({"threshold": 1, "some_future_key": [1, 2]}, InferenceDefaults(threshold=1)),  # unknown keys are ignored
])
def test_records_written_so_far_load(tmp_path, tiny_checkpoint, stored, expected):
    inference = read_info(_with_inference(tmp_path, tiny_checkpoint, stored)).inference
    assert inference == expected and inference.labels_kind == "membrane" and inference.pixel_size is None
    assert CheckpointInfo.from_json(json.dumps({**json.loads(read_info(tiny_checkpoint).to_json()),
                                                "inference": expected.to_dict()}), "x").inference == expected


@pytest.mark.parametrize("entry, message", [
    ({"labels_kind": "boundaries"}, "inference labels_kind 'boundaries' is not one of membrane, semantic, instances"),
    ({"labels_kind": 3}, "inference labels_kind 3 is not one of"),
    ({"pixel_size": 0}, "inference pixel_size 0 is not a finite number of micrometres per pixel above 0"),
    ({"pixel_size": -0.5}, "pixel_size -0.5 is not"),
    ({"pixel_size": float("nan")}, "pixel_size nan is not"),
    ({"pixel_size": float("inf")}, "pixel_size inf is not"),
    ({"pixel_size": "5nm"}, "pixel_size '5nm' is not"),
    ({"pixel_size": True}, "pixel_size True is not"),
    ({"watershed": [0.5, 2]}, "inference watershed [0.5, 2] is not a table of watershed settings"),
    ({"output_channel": -1}, "inference output_channel -1 is not a channel index"),
    ({"output_channel": 1.5}, "output_channel 1.5 is not a channel index"),
    ({"intensity_scale": 0}, "inference intensity_scale 0 is not a finite number above 0"),
    ({"input_dtype": 8}, "inference input_dtype 8 is not a dtype name"),
    ({"threshold": 7}, "threshold 7 is not a number between 0 and 1"),
    ({"tile": 237}, "inference tile 237 is not a valid tile of this model (nearest valid: 236 or 252)"),
    ([1, 2], "its inference entry is a list, not an object"),
])
def test_bad_inference_entries_are_refused_with_one_line(tmp_path, tiny_checkpoint, entry, message):
    path = _with_inference(tmp_path, tiny_checkpoint, entry)
    with pytest.raises(CheckpointError) as caught:
        read_info(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text
    assert "use another one" in text


def test_valid_new_fields_load(tmp_path, tiny_checkpoint):
    entry = {"labels_kind": "semantic", "pixel_size": 0.25, "output_channel": 0, "tile": 236}
    inference = read_info(_with_inference(tmp_path, tiny_checkpoint, entry)).inference
    assert (inference.labels_kind, inference.pixel_size, inference.output_channel) == ("semantic", 0.25, 0)


def test_frozen_replace_and_dicts_in_the_constructor(tiny_unet):
    base = InferenceDefaults(tile=236, threshold=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.threshold = 0.7
    changed = base.replace(threshold=0.7, pixel_size=0.01)
    assert changed == InferenceDefaults(tile=236, threshold=0.7, pixel_size=0.01) and base.threshold == 0.5
    with pytest.raises(TypeError):
        base.replace(thresold=0.7)
    # a plain dict (a record's inference entry) is converted; no entry gives the defaults
    info = CheckpointInfo("segmenter", "unet", {"base": 4, "depth": 4}, tiny_unet.geometry, Normalization(0.0, 1.0),
                          inference={"tile": 236, "threshold": 0.5, "other": 1})
    assert info.inference == base
    assert CheckpointInfo("segmenter", "unet", {}, tiny_unet.geometry, Normalization(0.0, 1.0)).inference \
        == InferenceDefaults()


def test_update_inference_defaults_validates_its_updates(tmp_path, tiny_checkpoint):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint, path)
    before = read_info(path).inference
    for updates, message in (({"threshold": 7}, "threshold 7 is not a number between 0 and 1"),
                             ({"labels_kind": "cells"}, "labels_kind 'cells' is not one of"),
                             ({"pixel_size": -1.0}, "pixel_size -1.0 is not"),
                             ({"watershed": "deep"}, "watershed 'deep' is not a table"),
                             ({"tresholds": 0.5}, "unknown inference default 'tresholds'; choose from tile, ")):
        with pytest.raises(CheckpointError) as caught:
            update_inference_defaults(path, updates, chosen_on=(0, 3))
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert read_info(path).inference == before  # nothing written
    info = update_inference_defaults(path, {"threshold": 0.3, "watershed": {"threshold": 0.4}}, chosen_on=(0, 3))
    assert info.inference == before.replace(threshold=0.3, watershed={"threshold": 0.4}) == read_info(path).inference
