import pytest
import torch
import torch.nn.functional as F

from segkit.checkpoint import initialize_from, save_checkpoint
from segkit.errors import CheckpointError, ConfigError
from segkit.models import create_model
from segkit.models.fcn import bilinear_kernel
from segkit.normalization import Normalization
from segkit.record import CheckpointInfo


def test_fcn32s_has_vgg16_size():
    model = create_model("fcn32s")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.27e6, rel=1e-3)  # paper: 134 M
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features) == 5


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_upsampling_aligns_pixel_centres(factor):
    """Transposed bilinear conv (kernel 2f, stride f) cropped by f/2 == bilinear interpolation."""
    x = torch.randn(1, 2, 6, 5)
    up = F.conv_transpose2d(x, bilinear_kernel(2, 2 * factor), stride=factor, groups=2)
    up = up[..., factor // 2 : factor // 2 + 6 * factor, factor // 2 : factor // 2 + 5 * factor]
    reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (..., slice(factor, -factor), slice(factor, -factor))  # the borders differ by padding only
    torch.testing.assert_close(up[inner], reference[inner], atol=1e-5, rtol=1e-5)


def test_initialisation_as_in_the_paper():
    model = create_model("fcn8s", width=4, fc=16)
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        assert not layer.weight.any() and not layer.bias.any()
    expected = bilinear_kernel(1, 4)[0, 0]
    torch.testing.assert_close(model.upscore2.weight[1, 1], expected)
    assert not model.upscore2.weight[0, 1].any()
    assert torch.count_nonzero(model(torch.randn(1, 1, 64, 64))) == 0  # zero scores at the start


def test_skip_layers_per_variant():
    assert not hasattr(create_model("fcn32s", width=2, fc=4), "score_pool4")
    m16 = create_model("fcn16s", width=2, fc=4)
    assert hasattr(m16, "score_pool4") and not hasattr(m16, "score_pool3")
    assert hasattr(create_model("fcn8s", width=2, fc=4), "score_pool3")


def test_rgb_input():
    assert create_model("fcn8s", in_channels=3, width=2, fc=4)(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)


def _fake_vgg16_state(width, fc, in_channels=3):
    """A state dict laid out like torchvision's vgg16 (features.N, classifier.0/3/6)."""
    import torchvision

    state = {}
    vgg = torchvision.models.vgg16(weights=None) if width == 64 else None
    if vgg is not None:
        return vgg.state_dict()
    channels, index = in_channels, 0
    for item in (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"):
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(width * item, channels, 3, 3)
        state[f"features.{index}.bias"] = torch.randn(width * item)
        channels, index = width * item, index + 2
    state["classifier.0.weight"] = torch.randn(fc, 8 * width * 7 * 7)
    state["classifier.0.bias"] = torch.randn(fc)
    state["classifier.3.weight"] = torch.randn(fc, fc)
    state["classifier.3.bias"] = torch.randn(fc)
    state["classifier.6.weight"] = torch.randn(1000, fc)
    return state


def test_pretrained_vgg16_loads_by_name(tmp_path):
    state = _fake_vgg16_state(4, 16)
    torch.save(state, tmp_path / "vgg16.pth")
    model = create_model("fcn16s", width=4, fc=16)
    assert model.load_pretrained(tmp_path / "vgg16.pth") == 30
    torch.testing.assert_close(model.features[0].weight, state["features.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.features[28].bias, state["features.28.bias"])
    torch.testing.assert_close(model.fc6.weight, state["classifier.0.weight"].reshape(16, 32, 7, 7))
    torch.testing.assert_close(model.fc7.weight[:, :, 0, 0], state["classifier.3.weight"])
    rgb = create_model("fcn16s", in_channels=3, width=4, fc=16)
    rgb.load_pretrained(tmp_path / "vgg16.pth")
    torch.testing.assert_close(rgb.features[0].weight, state["features.0.weight"])


def test_real_torchvision_vgg16_layout_matches():
    state = _fake_vgg16_state(64, 4096)  # torchvision's own vgg16 (random weights, nothing downloaded)
    ours = create_model("fcn8s", in_channels=3).state_dict()
    for key, value in state.items():
        if key.startswith("features."):
            assert ours[key].shape == value.shape
    assert ours["fc6.weight"].numel() == state["classifier.0.weight"].numel()


def test_pretrained_errors(tmp_path):
    model = create_model("fcn32s", width=4, fc=16)
    with pytest.raises(ConfigError, match="does not exist"):
        model.load_pretrained(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a torch state dict"):
        model.load_pretrained(tmp_path / "junk.pth")
    torch.save(_fake_vgg16_state(8, 16), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        model.load_pretrained(tmp_path / "wide.pth")


def test_staged_initialisation_32s_to_16s(tmp_path):
    torch.manual_seed(0)
    stage1 = create_model("fcn32s", width=4, fc=16)
    with torch.no_grad():
        stage1.score_fr.weight.normal_()
    save_checkpoint(tmp_path / "32s.safetensors", stage1,
                    CheckpointInfo("segmenter", "fcn32s", {"width": 4, "fc": 16}, stage1.geometry, Normalization(0, 1)))
    stage2 = create_model("fcn16s", width=4, fc=16)
    copied = initialize_from(stage2, tmp_path / "32s.safetensors")
    assert copied == len(stage1.state_dict())
    torch.testing.assert_close(stage2.score_fr.weight, stage1.score_fr.weight)
    assert not stage2.score_pool4.weight.any()  # the new skip keeps its zero start
