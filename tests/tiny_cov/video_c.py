"""Tiny configs for video denoisers, group C (Allegro ... Latte). Loaded by tests/tiny.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tiny import wan_shape


def _allegro() -> torch.nn.Module:
    from diffusers import AllegroTransformer3DModel

    return AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        cross_attention_dim=16,
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=12,
    )


def _anyflow() -> torch.nn.Module:
    from diffusers import AnyFlowTransformer3DModel

    return AnyFlowTransformer3DModel(**wan_shape())


def _anyflow_far() -> torch.nn.Module:
    from diffusers import AnyFlowFARTransformer3DModel

    return AnyFlowFARTransformer3DModel(
        **wan_shape(num_layers=3),  # 3: flex attention runs eagerly on CPU (slow), once per block
        compressed_patch_size=(1, 4, 4),
        chunk_partition=(1, 1),
    )


def _chronoedit() -> torch.nn.Module:
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(**wan_shape())


def _consisid() -> torch.nn.Module:
    from diffusers import ConsisIDTransformer3DModel

    return ConsisIDTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=12,
        num_layers=4,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=5,
        is_train_face=False,
    )


def _cosmos() -> torch.nn.Module:
    from diffusers import CosmosTransformer3DModel

    # head dim 16: the RoPE splits it as 8/4/4 and divides by (dim_h - 2), so 8 would fail
    return CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=4,
        mlp_ratio=2.0,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 16, 16),
        patch_size=(1, 2, 2),
        concat_padding_mask=False,  # True resizes the mask with torchvision
        extra_pos_embed_type="learnable",
    )


def _easyanimate() -> torch.nn.Module:
    from diffusers import EasyAnimateTransformer3DModel

    # head dim 16: its 3D RoPE gives 3/8 of the head to each spatial axis (must be even)
    return EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=8,
        sample_height=8,
        num_layers=4,
        mmdit_layers=4,
        time_embed_dim=8,
        text_embed_dim=12,
    )


def _helios() -> torch.nn.Module:
    from diffusers import HeliosTransformer3DModel

    return HeliosTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=4,
        rope_dim=(4, 2, 2),
        has_multi_term_memory_patch=False,
    )


def _hunyuanvideo15() -> torch.nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=12,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
    )


def _framepack() -> torch.nn.Module:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=3,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=False,
        text_embed_dim=16,
        pooled_projection_dim=12,
        rope_axes_dim=(2, 2, 4),
        has_image_proj=True,
        image_proj_dim=12,
        has_clean_x_embedder=True,
    )


# JoyImage Edit and Edit Plus take the same configuration.
JOYIMAGE = {"patch_size": [1, 2, 2], "in_channels": 4, "out_channels": 4, "hidden_size": 16}
JOYIMAGE |= {"num_attention_heads": 2, "text_dim": 12, "mlp_width_ratio": 2.0, "num_layers": 4}
JOYIMAGE |= {"rope_dim_list": [2, 2, 4]}


def _joyimage_edit() -> torch.nn.Module:
    from diffusers import JoyImageEditTransformer3DModel

    return JoyImageEditTransformer3DModel(**JOYIMAGE)


def _joyimage_edit_plus() -> torch.nn.Module:
    from diffusers import JoyImageEditPlusTransformer3DModel

    return JoyImageEditPlusTransformer3DModel(**JOYIMAGE)


def _kandinsky5() -> torch.nn.Module:
    from diffusers import Kandinsky5Transformer3DModel

    return Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=12,
        in_text_dim2=12,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=4,
        axes_dims=(2, 2, 4),
    )


def _kandinsky6() -> torch.nn.Module:
    from diffusers import Kandinsky6Transformer3DModel

    return Kandinsky6Transformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=12,
        in_text_dim2=12,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=4,
        axes_dims=(2, 2, 4),
        visual_cond=False,  # True takes 2 * 4 + 1 input channels for 4 output channels
        in_audio_dim=4,
        out_audio_dim=4,
    )


def _kandinsky6sr() -> torch.nn.Module:
    from diffusers import Kandinsky6SRTransformer3DModel

    # The input is [noisy, anchor, mask] (2 * 4 + 1 channels); out_visual_dim matches it so that the
    # prediction has the sample's shape.
    return Kandinsky6SRTransformer3DModel(
        in_visual_dim=4,
        out_visual_dim=9,
        time_dim=16,
        patch_size=(1, 1, 1),
        model_dim=16,
        ff_dim=32,
        num_visual_blocks=3,  # 3: NABLA's flex attention runs eagerly on CPU (slow), once per block
        axes_dims=(2, 2, 4),
        nabla_window=(3, 3, 3),
    )


def _ltx2() -> torch.nn.Module:
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=4,
        caption_channels=12,
    )


def _latte() -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        caption_channels=12,
        video_length=2,
    )


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "allegro": _allegro,
    "anyflow": _anyflow,
    "anyflow-far": _anyflow_far,
    "chronoedit": _chronoedit,
    "consisid": _consisid,
    "cosmos": _cosmos,
    "easyanimate": _easyanimate,
    "helios": _helios,
    "hunyuanvideo15": _hunyuanvideo15,
    "hunyuanvideo-framepack": _framepack,
    "joyimage-edit": _joyimage_edit,
    "joyimage-edit-plus": _joyimage_edit_plus,
    "kandinsky5": _kandinsky5,
    "kandinsky6": _kandinsky6,
    "kandinsky6-sr": _kandinsky6sr,
    "ltx2": _ltx2,
    "latte": _latte,
}


def _text(batch: int, r: Callable, dim: int) -> dict[str, Any]:
    return {"encoder_hidden_states": r(batch, 5, dim)}


def _framepack_inputs(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # The forward packs clean/2x/4x history unconditionally (it reads their RoPE even when absent),
    # so one frame of each is given. Frame indices are 1-D and shared: 3 latent frames keep them
    # from looking like a batch of 2.
    kwargs = {
        "encoder_hidden_states": r(batch, 5, 16),
        "encoder_attention_mask": torch.ones(batch, 5),
        "pooled_projections": r(batch, 12),
        "image_embeds": r(batch, 3, 12),
        "indices_latents": torch.arange(1, 4),
        "latents_clean": r(batch, 4, 1, 8, 8),
        "indices_latents_clean": torch.tensor([0]),
        "latents_history_2x": r(batch, 4, 1, 8, 8),
        "indices_latents_history_2x": torch.tensor([4]),
        "latents_history_4x": r(batch, 4, 1, 8, 8),
        "indices_latents_history_4x": torch.tensor([5]),
    }
    return "hidden_states", r(batch, 4, 3, 8, 8), kwargs


INPUTS: dict[str, Callable[[int, Callable], tuple[str, torch.Tensor, dict[str, Any]]]] = {
    "allegro": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 12)),
    # (B, F, C, H, W); r_timestep is the flow map's target time (0: all the way to clean)
    "anyflow": lambda b, r: (
        "hidden_states",
        r(b, 2, 4, 8, 8),
        {**_text(b, r, 16), "r_timestep": torch.zeros(b, 2)},
    ),
    # the causal (FAR) training path, two chunks of one frame; chunk_partition is shared (a tuple)
    "anyflow-far": lambda b, r: (
        "hidden_states",
        r(b, 2, 4, 8, 8),
        {**_text(b, r, 16), "r_timestep": torch.zeros(b, 2), "chunk_partition": (1, 1)},
    ),
    "chronoedit": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 16)),
    # (B, F, C, H, W)
    "consisid": lambda b, r: ("hidden_states", r(b, 2, 4, 8, 8), _text(b, r, 12)),
    "cosmos": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 16)),
    "easyanimate": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 12)),
    "helios": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 16)),
    "hunyuanvideo15": lambda b, r: (
        "hidden_states",
        r(b, 4, 2, 8, 8),
        {
            "encoder_hidden_states": r(b, 5, 16),
            "encoder_attention_mask": torch.ones(b, 5),
            "encoder_hidden_states_2": r(b, 3, 12),
            "encoder_attention_mask_2": torch.ones(b, 3),
            "image_embeds": r(b, 3, 12),
        },
    ),
    "hunyuanvideo-framepack": _framepack_inputs,
    "joyimage-edit": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 12)),
    # patchified: (B, patches, C, pt, ph, pw), a 1x4x4 grid of 1x2x2 patches; shape_list is per sample
    "joyimage-edit-plus": lambda b, r: (
        "hidden_states",
        r(b, 16, 4, 1, 2, 2),
        {
            **_text(b, r, 12),
            "encoder_hidden_states_mask": torch.ones(b, 5),
            "shape_list": [[(1, 4, 4)] for _ in range(b)],
        },
    ),
    # (B, T, H, W, C)
    "kandinsky5": lambda b, r: (
        "hidden_states",
        r(b, 2, 8, 8, 4),
        {
            **_text(b, r, 12),
            "pooled_projections": r(b, 12),
            "visual_rope_pos": (torch.arange(2), torch.arange(4), torch.arange(4)),
            "text_rope_pos": torch.arange(5),
        },
    ),
    "kandinsky6": lambda b, r: (
        "hidden_states",
        r(b, 2, 8, 8, 4),
        {**_text(b, r, 12), "pooled_projections": r(b, 12)},
    ),
    # (B, T, H, W, 2 * 4 + 1): NABLA attention wants the token grid in 8x8 tiles
    "kandinsky6-sr": lambda b, r: ("hidden_states", r(b, 2, 8, 8, 9), {}),
    # packed tokens: 2 frames of 4x4 at patch 1; the audio stream (3 latent frames) rides along
    "ltx2": lambda b, r: (
        "hidden_states",
        r(b, 32, 4),
        {
            "audio_hidden_states": r(b, 3, 4),
            "encoder_hidden_states": r(b, 5, 12),
            "audio_encoder_hidden_states": r(b, 5, 12),
            "encoder_attention_mask": torch.ones(b, 5),
            "audio_encoder_attention_mask": torch.ones(b, 5),
            "num_frames": 2,
            "height": 4,
            "width": 4,
            "audio_num_frames": 3,
        },
    ),
    "latte": lambda b, r: ("hidden_states", r(b, 4, 2, 8, 8), _text(b, r, 12)),
}

TIMESTEPS: dict[str, Callable[[float, int], Any]] = {
    # per-frame source time t, (B, F)
    "anyflow": lambda t, b: torch.full((b, 2), t),
    "anyflow-far": lambda t, b: torch.full((b, 2), t),
}

UNSUPPORTED: dict[str, str] = {
    # tried at tiny size (2 heads of 8, 3 layers, one 2x8x8 clip packed after 5 text tokens): it runs,
    # but returns a list of per-item predictions
    "Cosmos3OmniTransformer": (
        "a packed multi-modal sequence model: it takes `vision_tokens` as a list of per-item latents "
        "packed into one unbatched token sequence (with text/sound/action indexes, per-patch timesteps) "
        "and returns a list of per-item predictions, not a batched tensor of the latent's shape"
    ),
}

# Block stacks stepcache refuses to skip a span of, with its reason.
BLOCK_REFUSED: dict[str, str] = {
    # blocks return (video, audio) and take the text stream, which does not come back out
    "ltx2": "cannot tell where `encoder_hidden_states` is",
    # spatial and temporal blocks alternate with reshapes between them
    "latte": "`hidden_states` changes between one block's output and the next",
}
