import pytest
import torch

from segkit.errors import TileSizeError
from segkit.models import create_model
from segkit.models.geometry import Geometry, valid_unet_geometry


def test_paper_unet_geometry():
    g = valid_unet_geometry(4)
    assert (g.margin, g.step, g.min_input) == (92, 16, 188)
    assert g.output_size(572) == 388
    assert g.is_valid_input(572) and g.is_valid_input(188 + 16 * 50)
    assert not g.is_valid_input(570) and not g.is_valid_input(187)


def test_tile_570_names_556_and_572():
    g = valid_unet_geometry(4)
    assert g.nearest_valid(570) == (556, 572)
    with pytest.raises(TileSizeError, match=r"556 or 572"):
        g.check_tile(570)
    assert g.nearest_valid(100) == (None, 188)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_declared_geometry_matches_forward(depth):
    torch.manual_seed(0)
    model = create_model("unet", base=2, depth=depth).eval()
    g = model.geometry
    for k in (0, 1, 3):
        size = g.min_input + k * g.step
        with torch.no_grad():
            out = model(torch.zeros(1, 1, size, size + g.step))
        assert out.shape[-2:] == (g.output_size(size), g.output_size(size + g.step))


def test_invalid_input_breaks_model_pooling():
    # The geometry is not a guess: a size off the grid does not produce the declared output.
    model = create_model("unet", base=2, depth=2).eval()
    g = model.geometry
    bad = g.min_input + 1
    with torch.no_grad():
        out = model(torch.zeros(1, 1, bad, bad))
    assert out.shape[-1] != bad - 2 * g.margin


def test_roundtrip_dict():
    g = Geometry(margin=92, step=16, min_output=4)
    assert Geometry.from_dict(g.to_dict()) == g


def test_with_halo():
    g = Geometry(margin=0, step=32, min_output=32, halo=64)
    assert g.with_halo(16).halo == 16
    with pytest.raises(TileSizeError, match="halo=16 applies to same-padding"):
        valid_unet_geometry(4).with_halo(16)


def test_default_tile_is_the_papers_572_where_valid_else_the_smallest_valid_size_from_512():
    assert valid_unet_geometry(4).default_tile == 572
    assert Geometry(margin=0, step=32, min_output=32).default_tile == 512
    assert Geometry(margin=0, step=48, min_output=48).default_tile == 528
    g = valid_unet_geometry(2)
    assert g.is_valid_input(g.default_tile) and g.default_tile >= 512
