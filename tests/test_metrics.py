"""Metrics agree with cases computable by hand."""

import numpy as np
import pytest
import torch

from stepcache.metrics import bootstrap_ci, frechet_distance, kernel_distance, psnr_per_image, ssim_per_image


def _images(n=6, size=16, seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=(n, size, size, 1))


def test_identical_images():
    x = _images()
    assert np.isinf(psnr_per_image(x, x)).all()
    np.testing.assert_allclose(ssim_per_image(x, x), 1.0, atol=1e-9)


@pytest.mark.parametrize("shift", [0.1, 0.01, 0.05])
def test_a_known_shift_gives_the_known_psnr(shift):
    x = _images()
    np.testing.assert_allclose(psnr_per_image(x + shift, x), 10 * np.log10(1 / shift**2), atol=1e-9)
    assert (ssim_per_image(x + shift, x) < 1).all()


def test_ssim_orders_degradations():
    x = _images(size=28)
    noise = np.random.default_rng(1).normal(size=x.shape)
    mild, strong = ssim_per_image(x + 0.02 * noise, x), ssim_per_image(x + 0.2 * noise, x)
    assert (mild > strong).all() and (mild < 1).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr_per_image(_images(n=2), _images(n=3))


def test_frechet_distance_hand_cases():
    a = torch.randn(2000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    # Same covariance, mean shifted by 1 in each of 6 dimensions: FD = |mu_a - mu_b|^2 = 6.
    assert frechet_distance(a, a + 1) == pytest.approx(6.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :3])


def test_kernel_distance_self_is_near_zero_and_shift_is_not():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 6, generator=g), torch.randn(800, 6, generator=g)
    same_mean, same_std = kernel_distance(a, b, subset_size=400)
    shifted, _ = kernel_distance(a, b + 1, subset_size=400)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted > 0.5


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(30, 2, size=400)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert 0.2 < hi - lo < 0.6  # about 2 * 1.96 * 2 / sqrt(400) = 0.39
    lo_inf, hi_inf = bootstrap_ci(np.array([np.inf, 31.0, 31.0]))
    assert lo_inf == hi_inf == 31.0
    assert all(np.isnan(bootstrap_ci(np.array([np.inf]))))
