import numpy as np
import pytest

from segkit.training.corruption import blind_spot, corrupt, gaussian, masking, poisson_gaussian, psnr, salt_pepper, ssim


def image():
    return np.random.default_rng(0).random((64, 64)).astype(np.float32)


def test_gaussian_has_the_asked_sigma():
    noisy = gaussian(np.zeros((400, 400), np.float32), np.random.default_rng(1), sigma=0.1)
    assert noisy.std() == pytest.approx(0.1, rel=0.02) and abs(noisy.mean()) < 0.002


def test_poisson_gaussian_variance():
    clean = np.full((400, 400), 0.5, np.float32)
    noisy = poisson_gaussian(clean, np.random.default_rng(1), gain=100.0, sigma=0.01)
    # var = signal / gain + sigma^2 = 0.005 + 0.0001
    assert noisy.var() == pytest.approx(0.0051, rel=0.05) and noisy.mean() == pytest.approx(0.5, abs=0.002)


def test_masking_and_salt_pepper_fractions():
    clean = np.full((300, 300), 0.5, np.float32)
    assert np.mean(masking(clean, np.random.default_rng(1), fraction=0.3) == 0) == pytest.approx(0.3, abs=0.01)
    sp = salt_pepper(clean, np.random.default_rng(1), fraction=0.2)
    assert np.mean(sp != 0.5) == pytest.approx(0.2, abs=0.01) and set(np.unique(sp)) == {0.0, 0.5, 1.0}


def test_corrupt_is_reproducible_and_none_is_identity():
    settings = {"noise": "gaussian", "sigma": 0.1, "gain": 1.0, "fraction": 0.1}
    a = corrupt(image(), np.random.default_rng(5), settings)
    np.testing.assert_array_equal(a, corrupt(image(), np.random.default_rng(5), settings))
    np.testing.assert_array_equal(corrupt(image(), np.random.default_rng(5), {**settings, "noise": "none"}), image())


def test_blind_spot_replaces_only_masked_pixels_by_neighbours():
    clean = image()
    masked, mask = blind_spot(clean, np.random.default_rng(3), fraction=0.05, radius=2,
                              region=(slice(10, 50), slice(10, 50)))
    assert 0.03 < mask[10:50, 10:50].mean() < 0.07 and not mask[:10].any() and not mask[:, 50:].any()
    np.testing.assert_array_equal(masked[~mask], clean[~mask])
    ys, xs = np.nonzero(mask)
    for y, x in zip(ys[:50], xs[:50]):
        neighbours = clean[y - 2 : y + 3, x - 2 : x + 3]
        assert masked[y, x] in neighbours


def test_psnr_and_ssim():
    clean = image()
    assert psnr(clean + 0.1, clean) == pytest.approx(20.0, abs=1e-6)
    assert ssim(clean, clean) == pytest.approx(1.0) and ssim(np.full_like(clean, 0.5), clean) < 0.1
