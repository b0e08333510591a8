import pytest
import torch

from segkit.errors import CheckpointError, ConfigError
from segkit.models import create_model


def test_names_and_errors():
    with pytest.raises(ConfigError, match="did you mean 'Unet'"):
        create_model("smp:Unt:resnet18")
    with pytest.raises(ConfigError, match="closest: resnet18"):
        create_model("smp:Unet:resnt18")
    with pytest.raises(ConfigError, match="smp:<Arch>:<encoder>"):
        create_model("smp:Unet")
    with pytest.raises(ConfigError, match="did you mean 'decoder_channels'"):
        create_model("smp:Unet:resnet18", decoder_chanels=(8, 8, 8, 8, 8))


def test_geometry_follows_the_encoder_depth():
    assert create_model("smp:Unet:resnet18").geometry.step == 32
    assert create_model("smp:Unet:resnet18", encoder_depth=3, decoder_channels=(16, 8, 4)).geometry.step == 8
    assert create_model("smp:PSPNet:resnet18").geometry.step == 8  # PSPNet uses 3 encoder stages


def test_encoder_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = create_model("smp:Unet:resnet18", in_channels=3)
    torch.save(source.net.encoder.state_dict(), tmp_path / "resnet18.pth")
    gray = create_model("smp:Unet:resnet18")  # 1 input channel: RGB filters are summed
    assert gray.load_pretrained(tmp_path / "resnet18.pth") == len(source.net.encoder.state_dict())
    torch.testing.assert_close(gray.net.encoder.conv1.weight, source.net.encoder.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.net.encoder.layer4[1].conv2.weight, source.net.encoder.layer4[1].conv2.weight)
    with pytest.raises(ConfigError, match="does not exist"):
        gray.load_pretrained(tmp_path / "missing.pth")
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no tensor"):
        gray.load_pretrained(tmp_path / "other.pth")
