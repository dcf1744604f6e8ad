"""The zoo's model specifications: architecture, data, recipe defaults, sampling defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DModel,
    WanTransformer3DModel,
)

from . import data


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 192
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    cfg_dropout: float = 0.1
    seed: int = 0
    limit_images: int | None = None  # train on the first N images (tests, smoke runs)
    checkpoint_every: int = 500


@dataclass(frozen=True)
class ZooModel:
    key: str
    summary: str
    # "dit" (DiTTransformer2DModel), "unet" (UNet2DModel + class table), "pixart" (text),
    # "sd3" (SD3Transformer2DModel, captions), "wan" (WanTransformer3DModel, captioned video)
    family: str
    config: dict[str, Any]
    load_data: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    default_steps: int
    default_guidance: float
    train: TrainConfig = field(default_factory=TrainConfig)
    # "class": labels, null label = num_classes; "text": one sentence embedding, null = 0;
    # "tokens": per-token and pooled caption embeddings (zoo.captions), null = 0
    conditioning: str = "class"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"num_train_timesteps": 1000, "shift": 1.0})
    sample_shape: tuple[int, ...] | None = None  # (C, H, W) or (C, F, H, W) of caption models
    world: str | None = None  # "shapes": captions of zoo.shapes, judged by zoo.shapes.judge


def _load_emoji() -> tuple[torch.Tensor, torch.Tensor]:
    from .text import load_emoji

    return load_emoji()


def _load_shapes_images() -> tuple[Any, Any]:
    from .captions import load_shapes_images

    return load_shapes_images()


def _load_shapes_video() -> tuple[Any, Any]:
    from .captions import load_shapes_video

    return load_shapes_video()


FAMILIES: dict[str, type[torch.nn.Module]] = {
    "dit": DiTTransformer2DModel,
    "unet": UNet2DModel,
    "pixart": PixArtTransformer2DModel,
    "sd3": SD3Transformer2DModel,
    "wan": WanTransformer3DModel,
}


def build(family: str, config: dict[str, Any]) -> torch.nn.Module:
    if family not in FAMILIES:
        raise ValueError(f"unknown zoo model family {family!r}")
    return FAMILIES[family](**config)


_FMNIST_DIT = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 28,
    "patch_size": 4,
    "num_embeds_ada_norm": 10,
    "norm_num_groups": 1,
}
_FMNIST_DIT_RECIPE = TrainConfig(
    steps=3000, batch_size=128, lr=1e-3, warmup=200, ema=0.998, checkpoint_every=250
)

MODELS: dict[str, ZooModel] = {
    m.key: m
    for m in [
        ZooModel(
            key="digits-dit",
            summary="class-conditional DiT on scikit-learn's 8x8 digits; flow matching; the unit-test model",
            family="dit",
            config={
                "num_attention_heads": 4,
                "attention_head_dim": 16,
                "in_channels": 1,
                "out_channels": 1,
                "num_layers": 6,
                "sample_size": 8,
                "patch_size": 2,
                "num_embeds_ada_norm": 10,
                "norm_num_groups": 1,
            },
            load_data=data.load_digits,
            num_classes=10,
            default_steps=20,
            default_guidance=2.0,
            train=TrainConfig(steps=1000, batch_size=192, lr=2e-3, warmup=100, ema=0.995),
        ),
        ZooModel(
            key="fmnist-dit",
            summary="class-conditional DiT on Fashion-MNIST 28x28 (patch 4); the main quality benchmark",
            family="dit",
            config=_FMNIST_DIT,
            load_data=lambda: data.load_fashion_mnist("train"),
            num_classes=10,
            default_steps=20,
            default_guidance=3.0,
            train=_FMNIST_DIT_RECIPE,
        ),
        ZooModel(
            key="fmnist-dit-s",
            summary="fmnist-dit's small sibling (4 blocks, width 64: 1/6 of its FLOPs), for T-Stitch",
            family="dit",
            config={**_FMNIST_DIT, "num_attention_heads": 2, "num_layers": 4},
            load_data=lambda: data.load_fashion_mnist("train"),
            num_classes=10,
            default_steps=20,
            default_guidance=3.0,
            train=_FMNIST_DIT_RECIPE,  # the same recipe: T-Stitch's small sibling
        ),
        ZooModel(
            key="fmnist-unet",
            summary="class-conditional UNet2DModel on Fashion-MNIST 28x28; for the U-Net methods",
            family="unet",
            config={
                "sample_size": 28,
                "in_channels": 1,
                "out_channels": 1,
                "block_out_channels": [32, 64, 64],
                "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
                "num_class_embeds": 11,
                "norm_num_groups": 8,
            },
            load_data=lambda: data.load_fashion_mnist("train"),
            num_classes=10,
            default_steps=20,
            default_guidance=3.0,
            train=TrainConfig(
                steps=1500, batch_size=128, lr=1e-3, warmup=100, ema=0.998, checkpoint_every=250
            ),
        ),
        ZooModel(
            key="emoji-dit",
            summary="text-conditioned PixArt transformer on 32x32 emoji; captions are emoji names (MiniLM)",
            family="pixart",
            config={
                "num_attention_heads": 4,
                "attention_head_dim": 32,
                "in_channels": 3,
                "out_channels": 3,
                "num_layers": 6,
                "sample_size": 32,
                "patch_size": 4,
                "cross_attention_dim": 128,
                "caption_channels": 384,
                "norm_type": "ada_norm_single",
                "use_additional_conditions": False,
            },
            load_data=_load_emoji,
            num_classes=0,
            default_steps=20,
            default_guidance=4.0,
            conditioning="text",
            train=TrainConfig(
                steps=4000, batch_size=128, lr=1e-3, warmup=100, ema=0.998, checkpoint_every=250
            ),
        ),
        ZooModel(
            key="shapes-dit",
            summary="text-to-image SD3 (MMDiT), shapes world 32x32; prompt-following judged (weak: pairs)",
            family="sd3",
            config={
                "sample_size": 32,
                "patch_size": 4,
                "in_channels": 3,
                "out_channels": 3,
                "num_layers": 6,
                "attention_head_dim": 32,
                "num_attention_heads": 4,
                "joint_attention_dim": 384,
                "caption_projection_dim": 128,
                "pooled_projection_dim": 384,
                "pos_embed_max_size": 8,
                "qk_norm": "rms_norm",
            },
            load_data=_load_shapes_images,
            num_classes=0,
            default_steps=20,
            default_guidance=4.0,
            conditioning="tokens",
            sample_shape=(3, 32, 32),
            world="shapes",
            train=TrainConfig(
                steps=8000, batch_size=64, lr=1e-3, warmup=200, ema=0.999, checkpoint_every=250
            ),
        ),
        ZooModel(
            key="shapes-video",
            summary="text-to-video Wan transformer, shapes world, 8 frames of 32x32; motion judged (weak)",
            family="wan",
            config={
                "patch_size": [2, 4, 4],
                "num_attention_heads": 4,
                "attention_head_dim": 32,
                "in_channels": 3,
                "out_channels": 3,
                "text_dim": 384,
                "freq_dim": 64,
                "ffn_dim": 512,
                "num_layers": 4,
                "rope_max_seq_len": 64,
                "qk_norm": "rms_norm_across_heads",
            },
            load_data=_load_shapes_video,
            num_classes=0,
            default_steps=20,
            default_guidance=4.0,
            conditioning="tokens",
            sample_shape=(3, 8, 32, 32),
            world="shapes",
            train=TrainConfig(
                steps=5000, batch_size=32, lr=1e-3, warmup=200, ema=0.999, checkpoint_every=250
            ),
        ),
    ]
}
