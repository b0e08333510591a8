"""augment_batch: exact geometry (masks follow the image), exact parity of the elastic field and warp
with albumentations/OpenCV, and the same distributions as build_augmentation's CPU pipeline."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("albumentations")

from segkit.training.augment_device import (  # noqa: E402
    augment_batch,
    elastic_displacement,
    gaussian_kernel_size,
    warp_batch,
)
from segkit.training.patches import build_augmentation  # noqa: E402

OFF = {"elastic": False, "elastic_alpha": 34.0, "elastic_sigma": 4.0, "flips": False, "rot90": False,
       "brightness_contrast": 0.0, "noise_std": 0.0}


def settings(**changes: object) -> dict:
    return {**OFF, **changes}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinates(n: int, size: int) -> torch.Tensor:
    """(n, 2, size, size): channel 0 holds each pixel's x, channel 1 its y."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs, ys])[None].repeat(n, 1, 1, 1)


def test_flips_rot90_masks_follow_image_exactly():
    n, size = 64, 12
    image = coordinates(n, size)
    labels = (image[:, 1] * size + image[:, 0]).long()  # a unique integer per pixel
    weights = image[:, 0] * 0.5 + image[:, 1] * 0.25
    out, (out_labels, out_weights) = augment_batch(image, [labels, weights], settings(flips=True, rot90=True),
                                                   generator(0))
    assert out_labels.dtype == torch.long and out_weights.dtype == torch.float32
    assert torch.equal(out_labels, (out[:, 1] * size + out[:, 0]).long())
    assert torch.equal(out_weights, out[:, 0] * 0.5 + out[:, 1] * 0.25)
    group = [torch.rot90(m, k, (-2, -1)) for m in (image[0], image[0].flip(-1)) for k in range(4)]
    seen = set()
    for sample in out:
        matches = [i for i, g in enumerate(group) if torch.equal(sample, g)]
        assert len(matches) == 1  # every sample is one of the 8 flips/rotations of the input
        seen.add(matches[0])
    assert seen == set(range(8))


def test_rot90_needs_square_patches():
    with pytest.raises(ValueError, match="square"):
        augment_batch(torch.zeros(2, 1, 8, 10), [], settings(rot90=True), generator(0))
    out, _ = augment_batch(torch.rand(4, 1, 8, 10), [], settings(flips=True), generator(0))
    assert out.shape == (4, 1, 8, 10)


def test_elastic_with_alpha_zero_is_identity():
    image = torch.rand(8, 2, 40, 48, generator=generator(1))
    labels = torch.randint(0, 5, (8, 40, 48), generator=generator(2), dtype=torch.uint8)
    weights = torch.rand(8, 40, 48, generator=generator(3))
    out, (out_labels, out_weights) = augment_batch(image, [labels, weights],
                                                   settings(elastic=True, elastic_alpha=0.0), generator(0))
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    assert torch.equal(out_labels, labels)
    torch.testing.assert_close(out_weights, weights, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_nearest_masks_keep_only_input_values(dtype):
    values = torch.tensor([0, 3, 7, 255]) if dtype != torch.bool else torch.tensor([0, 1])
    labels = values[torch.randint(0, len(values), (6, 48, 48), generator=generator(4))].to(dtype)
    image = torch.rand(6, 1, 48, 48, generator=generator(5))
    recipe = settings(elastic=True, elastic_alpha=400.0, elastic_sigma=4.0, flips=True, rot90=True)
    _, (out,) = augment_batch(image, [labels], recipe, generator(0))
    assert out.dtype == dtype
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    assert not torch.equal(out, labels)


def test_deterministic_for_a_seeded_generator():
    recipe = settings(elastic=True, flips=True, rot90=True, brightness_contrast=0.2, noise_std=0.03)
    image = torch.rand(4, 1, 64, 64, generator=generator(6))
    masks = [torch.randint(0, 2, (4, 64, 64), generator=generator(7)), torch.rand(4, 64, 64, generator=generator(8))]
    first = augment_batch(image, masks, recipe, generator(11))
    second = augment_batch(image, masks, recipe, generator(11))
    other = augment_batch(image, masks, recipe, generator(12))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert not torch.equal(first[0], other[0])
    assert float(first[0].min()) >= 0.0 and float(first[0].max()) <= 1.0  # noise is clipped, as in albumentations


def test_generator_on_another_device_is_refused():
    class Elsewhere:
        device = torch.device("meta")

    with pytest.raises(ValueError, match="generator"):
        augment_batch(torch.zeros(1, 1, 4, 4), [], settings(flips=True), Elsewhere())  # type: ignore[arg-type]


@pytest.mark.parametrize("shape, alpha, sigma", [((96, 96), 34.0, 4.0), ((64, 80), 10.0, 7.3), ((40, 40), 50.0, 12.0)])
def test_displacement_field_is_albumentations_field(shape, alpha, sigma):
    """Same standard-normal draws in, the same displacement out (max-abs scaling, OpenCV's kernel
    size and taps, replicated border, dx stacked above dy for one blur, alpha in pixels)."""
    from albumentations.augmentations.geometric.functional import generate_displacement_fields

    dx, dy = generate_displacement_fields(shape, alpha, sigma, False, (0, 0), np.random.default_rng(1), "gaussian")
    noise = np.random.default_rng(1).standard_normal((2, *shape), dtype=np.float32)
    field = elastic_displacement(torch.from_numpy(noise)[None], alpha, sigma)[0].numpy()
    np.testing.assert_allclose(field[0], dx, atol=1e-5 * max(alpha, 1))
    np.testing.assert_allclose(field[1], dy, atol=1e-5 * max(alpha, 1))
    assert gaussian_kernel_size(4.0) == 33 and gaussian_kernel_size(7.3) == 59


def test_blur_paths_agree():
    """The CUDA path (conv2d) and the CPU path (shifted multiply-adds) compute the same blur."""
    from segkit.training.augment_device import _blur_replicate

    field = torch.randn(2, 1, 50, 30, generator=generator(9))
    torch.testing.assert_close(_blur_replicate(field, 4.0, use_conv=True), _blur_replicate(field, 4.0, use_conv=False),
                               atol=1e-6, rtol=0)


def test_warp_matches_cv2_remap():
    """The warp is cv2.remap(INTER_CUBIC, BORDER_REFLECT_101) for the image, INTER_NEAREST for labels,
    including displacements that leave the patch."""
    from albumentations.augmentations.geometric.functional import generate_displacement_fields

    size = 64
    rng = np.random.default_rng(2)
    dx, dy = generate_displacement_fields((size, size), 300.0, 4.0, False, (0, 0), rng, "gaussian")
    image = rng.random((size, size), dtype=np.float32)
    labels = rng.integers(0, 9, (size, size)).astype(np.uint8)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    maps = np.stack([xs + dx, ys + dy], -1)
    assert ((maps < 0) | (maps > size - 1)).any()
    expected = cv2.remap(image, maps, None, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    expected_labels = cv2.remap(labels, maps, None, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    displacement = torch.from_numpy(np.stack([dx, dy]))[None]
    out, (out_labels,) = warp_batch(torch.from_numpy(image)[None, None], [torch.from_numpy(labels)[None]],
                                    displacement)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-4)
    assert (out_labels[0].numpy() == expected_labels).mean() > 0.999


# ---- the same distributions as the albumentations pipeline -------------------------------------

def albumentations_batch(image: torch.Tensor, recipe: dict, seed: int) -> torch.Tensor:
    """build_augmentation applied per sample to (N, C, H, W), as DataLoader workers do."""
    augment = build_augmentation(recipe, seed=seed)
    out = [augment(image=np.ascontiguousarray(sample.permute(1, 2, 0).numpy()))["image"] for sample in image]
    return torch.from_numpy(np.stack([o.reshape(o.shape[0], o.shape[1], -1) for o in out])).permute(0, 3, 1, 2)


def displacement_stats(warped: torch.Tensor, size: int) -> dict[str, float]:
    """Fraction of deformed samples; mean and 90th percentile of |displacement| of their interior pixels."""
    border = 16  # the blur radius for sigma 4: replicated-border effects stay outside
    shift = (warped - coordinates(len(warped), size))[:, :, border:-border, border:-border]
    magnitude = shift.pow(2).sum(1).sqrt().flatten(1)
    deformed = magnitude.amax(1) > 1e-3
    values = magnitude[deformed].flatten()
    return {"deformed": float(deformed.float().mean()), "mean": float(values.mean()),
            "p90": float(values.quantile(0.9))}


def same_displacement(a: dict[str, float], b: dict[str, float]) -> bool:
    return (abs(a["deformed"] - b["deformed"]) < 0.15 and abs(a["mean"] / b["mean"] - 1) < 0.15
            and abs(a["p90"] / b["p90"] - 1) < 0.15)


def test_elastic_matches_albumentations_in_distribution():
    n, size = 128, 96
    recipe = settings(elastic=True, elastic_alpha=34.0, elastic_sigma=4.0)
    image = coordinates(n, size)
    reference = displacement_stats(albumentations_batch(image, recipe, seed=0), size)
    ours = displacement_stats(augment_batch(image, [], recipe, generator(0))[0], size)
    assert 0.2 < reference["mean"] < 2.0  # about 0.75 px: alpha and sigma in pixels, field scaled to [-1, 1]
    assert same_displacement(ours, reference), (ours, reference)
    # the comparison is sharp enough to catch alpha or sigma taken differently on one side
    for wrong in (settings(elastic=True, elastic_alpha=68.0, elastic_sigma=4.0),
                  settings(elastic=True, elastic_alpha=34.0, elastic_sigma=8.0),
                  settings(elastic=True, elastic_alpha=34.0, elastic_sigma=2.0)):
        stats = displacement_stats(augment_batch(image, [], wrong, generator(0))[0], size)
        assert not same_displacement(stats, reference), (wrong, stats, reference)


def pattern(n: int, size: int, low: float, high: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 6, size), torch.linspace(0, 6, size), indexing="ij")
    plane = (torch.sin(xs) * torch.cos(1.3 * ys) + 1) / 2
    return (low + (high - low) * plane)[None, None].repeat(n, 1, 1, 1)


def intensity_stats(out: torch.Tensor, image: torch.Tensor) -> dict[str, np.ndarray]:
    """Per sample: image mean and std, and the contrast factor a and shift b of out = a * image + b."""
    x, y = image.flatten(1).double(), out.flatten(1).double()
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    a = (xc * yc).sum(1) / (xc * xc).sum(1)
    b = y.mean(1) - a * x.mean(1)
    return {"mean": y.mean(1).numpy(), "std": y.std(1).numpy(), "a": a.numpy(), "b": b.numpy()}


def same_intensity(s: dict[str, np.ndarray], r: dict[str, np.ndarray]) -> bool:
    from scipy.stats import ks_2samp

    changed_s = float((np.abs(s["a"] - 1) + np.abs(s["b"]) > 1e-4).mean())
    changed_r = float((np.abs(r["a"] - 1) + np.abs(r["b"]) > 1e-4).mean())
    return (abs(changed_s - changed_r) < 0.1
            and abs(s["mean"].mean() - r["mean"].mean()) < 0.03 and abs(s["std"].mean() / r["std"].mean() - 1) < 0.05
            and abs(s["mean"].std() / r["mean"].std() - 1) < 0.15 and abs(s["std"].std() / r["std"].std() - 1) < 0.15
            and ks_2samp(s["a"], r["a"]).pvalue > 0.01 and ks_2samp(s["b"], r["b"]).pvalue > 0.01)


def test_brightness_contrast_matches_albumentations_in_distribution():
    image = pattern(256, 32, 0.3, 0.6)  # no clipping for limit 0.2: 0.3 * 0.8 - 0.2 > 0, 0.6 * 1.2 + 0.2 < 1
    recipe = settings(brightness_contrast=0.2)
    reference = intensity_stats(albumentations_batch(image, recipe, seed=0), image)
    ours = intensity_stats(augment_batch(image, [], recipe, generator(0))[0], image)
    assert same_intensity(ours, reference)
    assert np.abs(ours["a"] - 1).max() <= 0.2 + 1e-4 and np.abs(ours["b"]).max() <= 0.2 + 1e-4
    wrong = intensity_stats(augment_batch(image, [], settings(brightness_contrast=0.4), generator(0))[0], image)
    assert not same_intensity(wrong, reference)


def noise_stats(out: torch.Tensor) -> dict[str, float | np.ndarray]:
    """Fraction of noisy samples and the per-sample noise std of the noisy ones."""
    std = (out - 0.5).flatten(1).std(1).numpy()
    noisy = std > 1e-6
    return {"noisy": float(noisy.mean()), "std": std[noisy]}


def same_noise(s: dict, r: dict) -> bool:
    from scipy.stats import ks_2samp

    return (abs(s["noisy"] - r["noisy"]) < 0.1 and abs(s["std"].mean() / r["std"].mean() - 1) < 0.15
            and abs(np.quantile(s["std"], 0.9) / np.quantile(r["std"], 0.9) - 1) < 0.15
            and ks_2samp(s["std"], r["std"]).pvalue > 0.01)


def test_noise_matches_albumentations_in_distribution():
    image = torch.full((512, 1, 32, 32), 0.5)  # std at most 0.03: clipping at 0 and 1 is 16 sigma away
    recipe = settings(noise_std=0.03)
    reference = noise_stats(albumentations_batch(image, recipe, seed=0))
    ours = noise_stats(augment_batch(image, [], recipe, generator(0))[0])
    assert same_noise(ours, reference), (ours["noisy"], reference["noisy"])
    assert ours["std"].max() < 0.03 * 1.1
    assert not same_noise(noise_stats(augment_batch(image, [], settings(noise_std=0.06), generator(0))[0]), reference)
