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


# -- same-padding models: halo + blending ---------------------------------------------------

def test_cosine_window_is_a_partition_of_unity():
    from segkit.inference.tiler import blend_window

    size, overlap = 96, 32
    window = blend_window(size, overlap, "cosine")
    stride = size - overlap
    total = np.zeros((stride * 5 + size, stride * 5 + size))
    for oy in range(0, total.shape[0] - size + 1, stride):
        for ox in range(0, total.shape[1] - size + 1, stride):
            total[oy : oy + size, ox : ox + size] += window
    interior = total[overlap:-overlap, overlap:-overlap]
    np.testing.assert_allclose(interior, 1.0, atol=1e-6)
    assert window.min() > 0  # every pixel keeps a weight, so normalisation never divides by 0


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
def test_blended_pointwise_model_is_exact(blend):
    from segkit.models.geometry import Geometry

    g = Geometry(margin=0, step=8, min_output=8, halo=6)
    plane = np.random.default_rng(0).standard_normal((77, 50)).astype(np.float32)
    out = predict_plane(plane, lambda b: np.tanh(b), g, tile=48, batch=3, blend=blend)
    np.testing.assert_allclose(out[0], np.tanh(plane), atol=1e-6)


def test_tile_must_leave_room_beyond_the_halo():
    from segkit.models.geometry import Geometry

    g = Geometry(margin=0, step=32, min_output=32, halo=40)
    with pytest.raises(TileSizeError, match="halo"):
        plan_tiles((100, 100), g, tile=96)
    assert plan_tiles((100, 100), g, tile=128).stride == (32, 32)


@pytest.mark.parametrize("name, kwargs", [("fcn8s", {"width": 4, "fc": 16, "halo": 128}),
                                          ("smp:Unet:resnet18", {"halo": 128})])
def test_blended_tiles_close_to_whole_plane(name, kwargs):
    """Same-padding model: blended tiles vs one forward of the padded plane; difference measured."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    forward = torch_forward(model)
    plane = np.random.default_rng(0).standard_normal((400, 370)).astype(np.float32)
    plan = plan_tiles(plane.shape, model.geometry, tile=512)
    assert plan.n_tiles == 4
    tiled = predict_plane(plane, forward, model.geometry, tile=512, batch=4)
    padded = pad_plane(plane, plan)
    whole = forward(padded[None, None])[0][:, plan.halo : plan.halo + 400, plan.halo : plan.halo + 370]
    diff = np.abs(tiled - whole)
    scale = float(whole.std())
    print(f"{name}: blended vs whole-plane max |diff| {diff.max():.4g}, mean {diff.mean():.4g}, output std {scale:.4g}")
    # Random weights see far (no training has made the receptive field local), so this bounds the
    # worst case; a pointwise model (above) shows the blending itself is exact.
    assert diff.mean() < 0.12 * scale and diff.max() < 0.6 * scale
