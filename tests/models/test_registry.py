import numpy as np
import pytest
import torch

from segkit.checkpoint import load_model, read_info, save_checkpoint
from segkit.errors import CheckpointError, ConfigError
from segkit.models import create_model, list_models, model_kind
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo
from tests.helpers import randomize_zero_layers, tiny


@pytest.mark.parametrize("registered", list_models())
def test_forward_shape_matches_geometry(registered):
    torch.manual_seed(0)
    name, kwargs = tiny(registered)
    model = create_model(name, **kwargs).eval()
    g = model.geometry
    for size in (g.min_input + g.step, g.min_input + 3 * g.step):
        with torch.no_grad():
            out = model(torch.randn(2, 1, size, size))
        assert out.shape == (2, model.out_channels, g.output_size(size), g.output_size(size))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("registered", list_models())
def test_checkpoint_roundtrip(registered, tmp_path):
    torch.manual_seed(0)
    name, kwargs = tiny(registered)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    kind = model_kind(name)
    info = CheckpointInfo(kind, name, kwargs, model.geometry, Normalization(1.5, 2.5))
    save_checkpoint(tmp_path / "m.safetensors", model, info)
    loaded, loaded_info = load_model(tmp_path / "m.safetensors", expect_kind=kind)
    assert loaded_info.normalization == Normalization(1.5, 2.5)
    assert read_info(tmp_path / "m.safetensors").geometry == model.geometry
    x = torch.randn(1, 1, model.geometry.min_input + model.geometry.step, model.geometry.min_input + model.geometry.step)
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())


def test_paper_unet_size_and_parts():
    model = create_model("unet")
    assert sum(p.numel() for p in model.parameters()) == 31_030_658  # 23 conv layers, 31.0 M as in the paper
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 23


def test_unet_options():
    model = create_model("unet", base=4, batch_norm=True, dropout=0.5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.Dropout2d) for m in model.modules())


def test_unknown_model_and_parameter():
    with pytest.raises(ConfigError, match="did you mean 'unet'"):
        create_model("unte")
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        create_model("unet", dept=3)
    with pytest.raises(ConfigError, match="rejected"):
        create_model("unet", dropout=1.5)


def test_checkpoint_of_another_model(tmp_path, tiny_unet):
    info = CheckpointInfo("segmenter", "unet", {"base": 8}, tiny_unet.geometry, Normalization(0, 1))
    save_checkpoint(tmp_path / "wrong.safetensors", tiny_unet, info)  # base-4 weights, claims base 8
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "wrong.safetensors")
    info = CheckpointInfo("denoiser", "unet", {"base": 4}, tiny_unet.geometry, Normalization(0, 1))
    save_checkpoint(tmp_path / "den.safetensors", tiny_unet, info)
    with pytest.raises(CheckpointError, match="denoiser checkpoint"):
        load_model(tmp_path / "den.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a segkit checkpoint"):
        load_model(tmp_path / "junk.safetensors")


def test_contract_keeps_each_level_and_crop_and_concat_joins_the_centre():
    from segkit.models.blocks import contract, crop_and_concat, valid_encoder

    encoder, _ = valid_encoder(1, [2, 4, 8], batch_norm=False)
    x, skips = contract(encoder, torch.nn.MaxPool2d(2), torch.randn(1, 1, 44, 44))
    assert [tuple(s.shape) for s in skips] == [(1, 2, 40, 40), (1, 4, 16, 16)]
    assert tuple(x.shape) == (1, 4, 8, 8)
    skip = torch.arange(36.0).reshape(1, 1, 6, 6)
    joined = crop_and_concat(skip, torch.zeros(1, 2, 2, 2))
    assert joined.shape == (1, 3, 2, 2)
    assert torch.equal(joined[0, 0], skip[0, 0, 2:4, 2:4]) and not joined[0, 1:].any()
