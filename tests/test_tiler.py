import numpy as np
import pytest
import torch

from segkit.errors import TileSizeError
from segkit.inference.tiler import pad_plane, plan_tiles, predict_plane, predict_planes
from segkit.models import create_model


def torch_forward(model):
    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    return forward


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return create_model("unet", base=4, depth=4).eval()


@pytest.mark.parametrize("shape", [(301, 419), (130, 77)])
@pytest.mark.parametrize("tile", [204, 268])
def test_tiled_equals_whole_plane(model, shape, tile):
    """Seamless: tiled output == one forward pass over the mirror-padded plane."""
    forward = torch_forward(model)
    plane = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    plan = plan_tiles(shape, model.geometry, tile=tile)
    assert plan.n_tiles > 1
    tiled = predict_plane(plane, forward, model.geometry, tile=tile, batch=3)
    whole = forward(pad_plane(plane, plan)[None, None])[0][:, : shape[0], : shape[1]]
    assert tiled.shape == (2, *shape)
    assert np.abs(tiled - whole).max() < 1e-5


def test_plan_covers_plane_and_stays_inside(model):
    plan = plan_tiles((700, 389), model.geometry, tile=572)
    g = model.geometry
    for origins, extent in ((plan.origins_y, plan.extent[0]), (plan.origins_x, plan.extent[1])):
        assert origins[0] == 0 and origins[-1] + plan.out_tile == extent
        assert all(o % g.step == 0 for o in origins)  # pooling grid kept: tiled == whole
        assert all(b - a <= plan.out_tile for a, b in zip(origins, origins[1:]))  # no gaps
    padded = np.zeros((700, 389))
    padded = pad_plane(padded, plan)
    assert padded.shape == (plan.extent[0] + 2 * g.margin, plan.extent[1] + 2 * g.margin)


def test_plane_smaller_than_tile(model):
    forward = torch_forward(model)
    plane = np.random.default_rng(1).standard_normal((9, 5)).astype(np.float32)
    out = predict_plane(plane, forward, model.geometry, tile=572)
    assert out.shape == (2, 9, 5) and np.isfinite(out).all()


def test_batches_across_planes_match_single_planes(model):
    forward = torch_forward(model)
    rng = np.random.default_rng(2)
    planes = [rng.standard_normal((50, 61)).astype(np.float32) for _ in range(4)]
    seen = []
    together = list(predict_planes(planes, forward, model.geometry, tile=236, batch=5, on_tiles=seen.append))
    assert sum(seen) == 4 * plan_tiles((50, 61), model.geometry, tile=236).n_tiles
    for plane, out in zip(planes, together):
        np.testing.assert_allclose(out, predict_plane(plane, forward, model.geometry, tile=236, batch=1), atol=1e-5)


def test_pointwise_forward_is_identity_through_tiler():
    from segkit.models.geometry import Geometry

    g = Geometry(margin=3, step=4, min_output=4)

    def crop_forward(batch):  # a valid model that returns the centre of its input
        return batch[:, :, 3:-3, 3:-3]

    plane = np.arange(37 * 23, dtype=np.float32).reshape(37, 23)
    out = predict_plane(plane, crop_forward, g, tile=18, batch=2)
    np.testing.assert_array_equal(out[0], plane)


def test_bad_tiles(model):
    with pytest.raises(TileSizeError, match="556 or 572"):
        plan_tiles((100, 100), model.geometry, tile=570)
    with pytest.raises(TileSizeError, match="204 or larger"):
        plan_tiles((100, 100), model.geometry, tile=188)
