"""Metrics that judge an acceleration: fidelity to full compute and distribution distance."""

from .distribution import frechet_distance, kernel_distance
from .effnet import effnet_lite0_features
from .fidelity import PSNR_CAP, bootstrap_ci, capped_psnr_per_image, psnr_per_image, ssim_per_image

__all__ = [
    "PSNR_CAP",
    "bootstrap_ci",
    "capped_psnr_per_image",
    "effnet_lite0_features",
    "frechet_distance",
    "kernel_distance",
    "psnr_per_image",
    "ssim_per_image",
]
