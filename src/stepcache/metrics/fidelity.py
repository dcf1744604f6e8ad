"""Fidelity to the full-compute reference, per image (torchmetrics underneath), with intervals."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _pair(
    images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {tuple(a.shape)}")
    return a, b


def psnr_per_image(images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR in dB of each image (N, H, W, C) in [0, 1] against its reference; identical gives +inf."""
    a, b = _pair(images, reference)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return psnr.reshape(-1).numpy()


PSNR_CAP = 100.0  # dB given to an image identical to its reference, so means stay finite


def capped_psnr_per_image(
    images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor
) -> np.ndarray:
    """``psnr_per_image`` with identical images at ``PSNR_CAP`` instead of +inf: what a search or a
    calibration averages."""
    return np.minimum(psnr_per_image(images, reference), PSNR_CAP)


def ssim_per_image(images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray:
    """SSIM of each image (N, H, W, C) in [0, 1] against its reference (Gaussian window 7, or smaller)."""
    a, b = _pair(images, reference)
    a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    kernel = min(7, a.shape[-1], a.shape[-2])
    kernel -= 1 - kernel % 2  # odd
    ssim = structural_similarity_index_measure(
        a, b, data_range=1.0, reduction="none", kernel_size=kernel, sigma=1.5 * kernel / 11
    )
    return ssim.reshape(-1).numpy()


def bootstrap_ci(
    values: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (infinite values, from identical images, dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(resamples, v.size), replace=True).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(lo), float(hi)
