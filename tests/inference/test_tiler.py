"""Overlap-tile prediction on tensors: tiled == whole-plane forward, blending, mirror padding, normalisation."""

import numpy as np
import pytest
import torch

from segkit.errors import TileSizeError
from segkit.inference.engines import TorchEngine
from segkit.inference.tiler import (
    blend_window,
    mirror_pad,
    pad_plane,
    plan_tiles,
    predict_arrays,
    predict_plane,
    predict_planes,
)
from segkit.models import create_model
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization
from tests.helpers import FakeEngine, as_plane, crop_engine, randomize_zero_layers


@pytest.fixture(scope="module")
def model():
    # seed 3: logits up to ~7, so float32 rounding (different conv blockings for a tile and for the
    # whole plane) stays below the 1e-5 the tiled == whole-plane tests allow
    torch.manual_seed(3)
    return create_model("unet", base=4, depth=4).eval()


@pytest.fixture(scope="module")
def logits_engine(model):
    """The tiny valid-conv U-Net on the CPU, returning both classes' logits."""
    return TorchEngine(model, device="cpu", channel=None)


@pytest.mark.parametrize("shape", [(301, 419), (130, 77)])
@pytest.mark.parametrize("tile", [204, 268])
def test_tiled_equals_whole_plane(logits_engine, model, shape, tile):
    """Seamless: tiled output == one forward pass over the mirror-padded plane."""
    plane = as_plane(np.random.default_rng(0).standard_normal(shape))
    plan = plan_tiles(shape, model.geometry, tile=tile)
    assert plan.n_tiles > 1
    tiled = predict_plane(plane, logits_engine, model.geometry, tile=tile, batch=3)
    whole = logits_engine(pad_plane(plane, plan)[None])[0][:, : shape[0], : shape[1]]
    assert isinstance(tiled, torch.Tensor) and tiled.device == logits_engine.device
    assert tiled.shape == (2, *shape) and tiled.dtype == torch.float32
    assert (tiled - whole).abs().max() < 1e-5


def test_plan_covers_plane_and_stays_inside(model):
    plan = plan_tiles((700, 389), model.geometry, tile=572)
    g = model.geometry
    for origins, extent in ((plan.origins_y, plan.extent[0]), (plan.origins_x, plan.extent[1])):
        assert origins[0] == 0 and origins[-1] + plan.out_tile == extent
        assert all(o % g.step == 0 for o in origins)  # pooling grid kept: tiled == whole
        assert all(b - a <= plan.out_tile for a, b in zip(origins, origins[1:]))  # no gaps
    padded = pad_plane(torch.zeros((1, 700, 389)), plan)
    assert padded.shape == (1, plan.extent[0] + 2 * g.margin, plan.extent[1] + 2 * g.margin)


def test_plane_smaller_than_tile(logits_engine, model):
    plane = as_plane(np.random.default_rng(1).standard_normal((9, 5)))  # padding far wider than the plane
    out = predict_plane(plane, logits_engine, model.geometry, tile=572)
    assert out.shape == (2, 9, 5) and torch.isfinite(out).all()


def test_batches_across_planes_match_single_planes(logits_engine, model):
    rng = np.random.default_rng(2)
    planes = [as_plane(rng.standard_normal((50, 61))) for _ in range(4)]
    seen = []
    together = list(predict_planes(planes, logits_engine, model.geometry, tile=236, batch=5,
                                   on_tiles=seen.append))
    assert sum(seen) == 4 * plan_tiles((50, 61), model.geometry, tile=236).n_tiles
    assert max(seen) == 5  # batches really mixed tiles of consecutive planes
    for plane, out in zip(planes, together):
        single = predict_plane(plane, logits_engine, model.geometry, tile=236, batch=1)
        torch.testing.assert_close(out, single, atol=1e-5, rtol=0)


def test_pointwise_forward_is_identity_through_tiler():
    g = Geometry(margin=3, step=4, min_output=4)
    plane = torch.arange(37 * 23, dtype=torch.float32).reshape(1, 37, 23)
    engine = crop_engine(3)  # a valid model that returns the centre of its input
    out = predict_plane(plane, engine, g, tile=18, batch=2)
    assert torch.equal(out, plane)
    assert set(engine.calls) <= {1, 2}
    # several channels in, several out: each channel placed where it belongs
    stacked = torch.cat([plane, -plane, plane * 0.5])
    assert torch.equal(predict_plane(stacked, engine, g, tile=18, batch=3), stacked)


def test_predict_arrays_is_the_numpy_adapter():
    g = Geometry(margin=3, step=4, min_output=4)
    rng = np.random.default_rng(4)
    engine = crop_engine(3, torch.tanh)
    planes = [rng.standard_normal((29, 31)).astype(np.float32), rng.standard_normal((30, 17)).astype(np.float32)]
    out = list(predict_arrays(planes, engine, g, tile=18, batch=4))  # (H, W) planes
    assert [type(o) for o in out] == [np.ndarray, np.ndarray] and out[0].dtype == np.float32
    assert out[0].shape == (1, 29, 31) and out[1].shape == (1, 30, 17)
    for plane, values in zip(planes, out):
        np.testing.assert_allclose(values[0], np.tanh(plane), atol=1e-6)
    channels = rng.standard_normal((2, 17, 40)).astype(np.float32)  # a (C, H, W) plane
    (values,) = predict_arrays([channels], engine, g, tile=18)
    assert values.shape == (2, 17, 40)
    np.testing.assert_allclose(values, np.tanh(channels), atol=1e-6)


def test_bad_tiles(model):
    with pytest.raises(TileSizeError, match="use tile 556 or 572"):
        plan_tiles((100, 100), model.geometry, tile=570)
    with pytest.raises(TileSizeError, match="use tile 204 or larger"):
        plan_tiles((100, 100), model.geometry, tile=188)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        predict_plane(torch.zeros(1, 1, 30, 30), crop_engine(3), Geometry(margin=3, step=4, min_output=4), tile=18)


# -- mirror padding and normalisation ---------------------------------------------------------

@pytest.mark.parametrize("padding", [
    ((2, 3), (1, 4)),  # narrow: torch's reflection padding
    ((0, 0), (0, 0)),
    ((4, 4), (6, 6)),  # as wide as torch's reflection allows (size - 1)
    ((5, 0), (0, 7)),  # as wide as the plane: repeated reflection from here on
    ((13, 9), (20, 2)),
    ((40, 41), (3, 50)),  # many reflections
])
@pytest.mark.parametrize("leading", [(), (1,), (3,), (2, 3)], ids=["HW", "1HW", "CHW", "NCHW"])
def test_mirror_pad_equals_numpy_reflect(padding, leading):
    """numpy's 'reflect' (edge not repeated) on the last two axes, any width, any leading axes."""
    rng = np.random.default_rng(5)
    array = rng.standard_normal((*leading, 5, 7)).astype(np.float32)
    out = mirror_pad(torch.from_numpy(array), padding)
    expected = np.pad(array, ((0, 0),) * len(leading) + padding, mode="reflect")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), expected)


def test_mirror_pad_of_a_single_pixel_axis():
    array = np.arange(6, dtype=np.float32).reshape(1, 1, 6)
    out = mirror_pad(torch.from_numpy(array), ((2, 3), (1, 1)))
    np.testing.assert_array_equal(out.numpy(), np.pad(array, ((0, 0), (2, 3), (1, 1)), mode="reflect"))


@pytest.mark.parametrize("norm", [Normalization(120.0, 40.0), Normalization(0.1234, 3.7), Normalization(30000.5, 1234.5)])
def test_normalization_is_the_same_for_every_dtype_and_for_tensors(norm):
    rng = np.random.default_rng(6)
    values16 = np.concatenate([rng.integers(0, 65536, 500), [0, 255, 32767, 32768, 65535]]).astype(np.uint16)
    values8 = rng.integers(0, 256, 500).astype(np.uint8)
    for raw in (values8, values16):
        expected = (raw.astype(np.float64) - norm.mean) / norm.std
        reference = norm.apply(raw.astype(np.float32))
        assert reference.dtype == np.float32
        np.testing.assert_allclose(reference, expected, rtol=1e-6, atol=1e-6)
        for variant in (raw, raw.astype(np.float32)):
            for value in (variant, torch.from_numpy(variant.copy())):
                out = norm.apply(value)
                if isinstance(value, torch.Tensor):
                    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
                    out = out.numpy()
                assert out.dtype == np.float32
                np.testing.assert_array_equal(out, reference)
    floats = torch.from_numpy(values16.astype(np.float32))
    before = floats.clone()
    norm.apply(floats)
    assert torch.equal(floats, before)  # a float32 input is not normalised in place
    np.testing.assert_allclose(norm.invert(norm.apply(floats)).numpy(), values16, rtol=1e-5, atol=1e-2)


# -- same-padding models: halo + blending ---------------------------------------------------

def test_cosine_window_is_a_partition_of_unity():
    size, overlap = 96, 32
    window = blend_window(size, overlap, "cosine")
    assert isinstance(window, torch.Tensor) and window.shape == (size, size) and window.dtype == torch.float32
    window = window.numpy()
    stride = size - overlap
    total = np.zeros((stride * 5 + size, stride * 5 + size))
    for oy in range(0, total.shape[0] - size + 1, stride):
        for ox in range(0, total.shape[1] - size + 1, stride):
            total[oy : oy + size, ox : ox + size] += window
    interior = total[overlap:-overlap, overlap:-overlap]
    np.testing.assert_allclose(interior, 1.0, atol=1e-6)
    assert window.min() > 0  # every pixel keeps a weight, so normalisation never divides by 0


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
@pytest.mark.parametrize("shape", [(77, 50), (130, 47), (20, 200), (30, 30)])
def test_blended_pointwise_model_is_exact(blend, shape):
    """Every pixel gets its weighted sum divided by its summed weights: overlaps of 2 and 4 tiles,
    last tiles shifted back, the plane's borders, a single tile (what is written without adding,
    and what is scaled along one axis only, must all come out exact)."""
    g = Geometry(margin=0, step=8, min_output=8, halo=6)
    plane = as_plane(np.random.default_rng(0).standard_normal(shape))
    engine = FakeEngine(torch.tanh)
    assert plan_tiles(shape, g, tile=48).n_tiles > 1 or shape == (30, 30)
    out = predict_plane(plane, engine, g, tile=48, batch=3, blend=blend)
    torch.testing.assert_close(out, torch.tanh(plane), atol=1e-6, rtol=0)


def test_tile_must_leave_room_beyond_the_halo():
    g = Geometry(margin=0, step=32, min_output=32, halo=40)
    with pytest.raises(TileSizeError, match="halo"):
        plan_tiles((100, 100), g, tile=96)
    assert plan_tiles((100, 100), g, tile=128).stride == (32, 32)


@pytest.mark.parametrize("name, kwargs", [("fcn8s", {"width": 4, "fc": 16, "halo": 128}),
                                          ("smp:Unet:resnet18", {"halo": 128})])
def test_blended_tiles_close_to_whole_plane(name, kwargs):
    """Same-padding model: blended tiles vs one forward of the padded plane; difference measured."""
    torch.manual_seed(0)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    engine = TorchEngine(model, device="cpu", channel=None)
    plane = as_plane(np.random.default_rng(0).standard_normal((400, 370)))
    plan = plan_tiles((400, 370), model.geometry, tile=512)
    assert plan.n_tiles == 4
    tiled = predict_plane(plane, engine, model.geometry, tile=512, batch=4)
    padded = pad_plane(plane, plan)
    whole = engine(padded[None])[0][:, plan.halo : plan.halo + 400, plan.halo : plan.halo + 370]
    diff = (tiled - whole).abs()
    scale = float(whole.std())
    print(f"{name}: blended vs whole-plane max |diff| {diff.max():.4g}, mean {diff.mean():.4g}, output std {scale:.4g}")
    # Random weights see far (no training has made the receptive field local), so this bounds the
    # worst case; a pointwise model (above) shows the blending itself is exact.
    assert diff.mean() < 0.12 * scale and diff.max() < 0.6 * scale
