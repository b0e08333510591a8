"""Issue 25, finding 19: batch sizes checked against the training device's memory before anything is allocated
(train.batch=1000000 was killed by the kernel at 24 GB, train.val_batch=100000000 could not allocate 4.6 TB)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from segkit.errors import ConfigError
from segkit.memory import meta_model, training_activation_bytes
from segkit.training import runs
from tests.helpers import assert_user_error, run, tiny_recipe

TINY = {"base": 4, "batch_norm": True, "in_channels": 1, "classes": 2}
GB = 10**9


def _recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, epochs=1, iters_per_epoch=1)))
    return path


# -- batch sizes against memory ------------------------------------------------------------------------

def _memory(monkeypatch, available: int, where: str = "this machine") -> None:
    monkeypatch.setattr(runs, "device_memory", lambda device: (available, where))


def _check(**settings) -> None:
    values = {"tile": 236, "val_tile": 236, "batch": 2, "val_batch": 4, "device": "cpu", "amp": False, **settings}
    runs.check_batch_memory("unet", TINY, **values)


def test_a_sane_batch_passes_and_an_absurd_one_is_refused_at_once(monkeypatch):
    _memory(monkeypatch, 8 * GB)
    _check()  # the tiny recipe's batches fit
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        _check(batch=1_000_000)
    assert time.monotonic() - started < 8  # traced on the meta device: nothing is allocated
    text = str(caught.value)
    assert text.startswith("train.batch: 1000000 needs at least ") and "\n" not in text
    assert "per patch of 236 px and" in text and "but 8.0 GB of memory is available on this machine" in text
    # the largest batch the estimate allows, from the model's own activations for this patch size
    largest = int(text.rsplit("set train.batch to at most ", 1)[1])
    model = meta_model("unet", TINY)
    per_patch = training_activation_bytes(model, 236) + 2 * (236 * 236 * 4 + 52 * 52 * 12)
    fixed = 4 * runs.TRAINING_PARAMETER_COPIES * sum(p.numel() for p in model.parameters())
    buffers = 4 * sum(b.numel() for b in model.buffers())
    assert largest == (8 * GB - fixed - buffers) // per_patch and 50 < largest < 1_000_000


def test_an_absurd_validation_batch_is_refused_with_the_largest_that_fits(monkeypatch):
    """train.val_batch=100000000 ended in "can't allocate 4.6 TB" after the first epoch."""
    _memory(monkeypatch, 8 * GB)
    with pytest.raises(ConfigError, match=r"^train.val_batch: 100000000 needs at least .* [TP]B \(.* per validation tile "
                                          r"of 572 px and .*\), but 8.0 GB of memory is available on this machine; "
                                          r"set train.val_batch to at most \d+$"):
        _check(val_tile=572, val_batch=100_000_000)


def test_the_check_uses_the_memory_of_the_training_device(monkeypatch):
    """On CUDA the GPU's free memory counts, and autocast halves what a patch keeps."""
    asked: list[str] = []
    monkeypatch.setattr(runs, "device_memory", lambda device: (asked.append(device), (GB, "GPU 1"))[1])
    with pytest.raises(ConfigError, match="available on GPU 1; set train.batch to at most") as full:
        _check(batch=100_000, device="cuda:1")
    with pytest.raises(ConfigError, match="available on GPU 1; set train.batch to at most") as half:
        _check(batch=100_000, device="cuda:1", amp=True)
    assert asked == ["cuda:1", "cuda:1"]
    most = [int(str(e.value).rsplit(" ", 1)[1]) for e in (full, half)]
    assert most[1] > 1.5 * most[0]


def test_not_even_one_patch_says_what_to_shrink(monkeypatch):
    _memory(monkeypatch, 10**6)
    with pytest.raises(ConfigError, match="not even train.batch=1 fits: use a smaller data.tile or model.params"):
        _check()


def test_an_absurd_batch_is_refused_by_the_cli_before_the_run_folder_exists(tmp_path):
    """train.batch=1000000 was killed by the kernel at 24 GB (exit 137, no message)."""
    path = _recipe_file(tmp_path)
    for override, fragment in (("train.batch=1000000", "train.batch: 1000000 needs at least"),
                               ("train.val_batch=100000000", "train.val_batch: 100000000 needs at least")):
        result = run("train", path, override)
        assert_user_error(result, fragment, "of memory is available on this machine; set ", " to at most ")
        assert not (tmp_path / "run").exists()


def test_the_training_estimate_counts_what_autograd_keeps():
    """Leaf outputs that need a gradient, once: in-place layers share their input, frozen layers keep nothing."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True),
                                    torch.nn.Conv2d(4, 2, 1), torch.nn.ReLU())
    assert training_activation_bytes(model, 8) == (4 + 2 + 2) * 64 * 4
    assert training_activation_bytes(model, 8, element_bytes=2) == (4 + 2 + 2) * 64 * 2
    model[0].requires_grad_(False)
    assert training_activation_bytes(model, 8) == (2 + 2) * 64 * 4
    model.eval()
    training_activation_bytes(model, 8)
    assert not model.training  # the model's mode is restored
