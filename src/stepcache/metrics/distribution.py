"""Distribution metrics on feature vectors: Fréchet distance and KID (torchmetrics' machinery).

The features come from our own domain classifier (reported as ``FD-domain``), never Inception,
so the numbers are not FID. Always report the real-vs-real floor beside a model's FD.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _Precomputed(nn.Module):
    """Feature 'extractor' for torchmetrics that receives features already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected two (N, D) feature sets of equal D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("need at least 2 samples per set")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    _check(real, fake)
    fd = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=True)
    fd.update(real.double(), real=True)
    fd.update(fake.double(), real=False)
    return float(fd.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 500
) -> tuple[float, float]:
    """KID (polynomial-kernel MMD), mean and std over random subsets."""
    _check(real, fake)
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    mean, std = kid.compute()
    return float(mean), float(std)
