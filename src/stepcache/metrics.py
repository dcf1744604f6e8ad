"""Fidelity metrics against the full-compute reference (torchmetrics underneath)."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio


def psnr_per_image(images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR in dB of each image against its reference; images in [0, 1], shape (N, H, W, C).

    Identical images give +inf.
    """
    a = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    dims = tuple(range(1, a.dim()))
    with np.errstate(divide="ignore"):
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=dims)
    return psnr.reshape(-1).numpy()
