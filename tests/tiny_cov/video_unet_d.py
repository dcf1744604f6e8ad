"""Tiny configs for video transformers (MiniMax-H3, Mochi, Motif-Video, Sana-Video, SANA-WM, Wan Animate /
VACE) and the remaining U-Nets (DreamLite, I2VGen-XL, Kandinsky 3, AnimateDiff motion, Stable Cascade, 1-D,
3-D, spatio-temporal). Video latents are 2 frames of 8x8 with 4 channels unless a class needs otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tiny import wan_shape

# ---- video transformers ---------------------------------------------------------------------------


def _minimax_h3() -> torch.nn.Module:
    from diffusers import MiniMaxH3Transformer3DModel

    return MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        hidden_size=16,
        num_layers=4,
        num_refiner_layers=1,
        ffn_dim=32,
        in_channels=4,
        audio_in_channels=4,
        patch_size=(1, 2, 2),
        text_dim=12,
        freq_dim=16,
        time_embed_hidden_dim=16,
        time_embed_dim=16,
        rope_freq_dim=1,  # 2 * 3 * 1 = 6 of the 8 head channels rotated
    )


def _mochi() -> torch.nn.Module:
    from diffusers import MochiTransformer3DModel

    # The caption pooler has 8 fixed heads: text_embed_dim must divide by 8 (12 gave "unflatten sizes").
    return MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=16,
        max_sequence_length=5,
    )


def _motif_video() -> torch.nn.Module:
    from diffusers import MotifVideoTransformer3DModel

    return MotifVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=3,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
    )


def _sana_video() -> torch.nn.Module:
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        mlp_ratio=2.0,
        sample_size=8,
        patch_size=(1, 2, 2),
        rope_max_seq_len=32,
    )


def _sana_wm() -> torch.nn.Module:
    from diffusers import SanaWMTransformer3DModel

    return SanaWMTransformer3DModel(
        in_channels=4,
        num_layers=4,  # block 3 (every 4th) is the softmax-attention variant
        hidden_size=16,
        num_attention_heads=2,
        patch_size=(1, 2, 2),
        softmax_every_n=4,
        linear_head_dim=8,
        conv_kernel_size=2,
        use_chunk_plucker_post_attn=False,
        chunk_plucker_post_attn_blocks=0,
        caption_channels=12,
        mlp_ratio=2.0,
        image_size=64,
    )


_SANA_WM_REFINER_ROPE = {
    "patch_size": 1,
    "patch_size_t": 1,
    "base_num_frames": 20,
    "base_height": 2048,
    "base_width": 2048,
    "scale_factors": (8, 32, 32),
    "theta": 10000.0,
    "causal_offset": 1,
    "modality": "video",
    "double_precision": True,
    "rope_type": "interleaved",
    "num_attention_heads": 2,
}


def _sana_wm_refiner() -> torch.nn.Module:
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    return SanaWMLTX2RefinerTransformer3DModel(
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


def _wan_vace() -> torch.nn.Module:
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        **wan_shape(),
        vace_layers=[0, 2],
        vace_in_channels=4,
    )


def _wan_animate() -> torch.nn.Module:
    from diffusers import WanAnimateTransformer3DModel

    # The noisy input is [latent | reference | mask] (2 * 4 + 4 = 12 channels); the output is made as wide
    # as the input so that a bare loop can step the whole tensor.
    return WanAnimateTransformer3DModel(
        **wan_shape(in_channels=12, out_channels=12),
        latent_channels=4,
        image_dim=None,
        motion_encoder_channel_sizes={"8": 8, "4": 8},
        motion_encoder_size=8,
        motion_style_dim=16,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
        motion_encoder_batch_size=8,
    )


# ---- U-Nets -----------------------------------------------------------------------------------------


def _dreamlite() -> torch.nn.Module:
    from diffusers import DreamLiteUNetModel

    return DreamLiteUNetModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DreamLiteCrossAttnDownBlock2D", "DreamLiteDownBlock2D"),
        mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
        up_block_types=("DreamLiteUpBlock2D", "DreamLiteCrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,  # (the number of heads, as in UNet2DConditionModel)
        ff_mult=2,
        num_kv_heads=1,
    )


def _i2vgenxl() -> torch.nn.Module:
    from diffusers import I2VGenXLUNet

    return I2VGenXLUNet(
        sample_size=8,
        in_channels=4,  # fixed: the image-latent encoders take 4 channels
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
    )


def _kandinsky3() -> torch.nn.Module:
    from diffusers import Kandinsky3UNet

    return Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=16,
        groups=2,
        attention_head_dim=4,
        layers_per_block=2,  # a 1-layer block drops its out projection (zip over the up resolutions)
        block_out_channels=(8, 16),
        cross_attention_dim=16,
        encoder_hid_dim=12,
    )


def _unet_motion() -> torch.nn.Module:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    adapter = MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=4,
        motion_max_seq_length=8,
    )
    return UNetMotionModel.from_unet2d(unet, adapter)


def _stable_cascade() -> torch.nn.Module:
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=8,
        patch_size=1,
        conditioning_dim=16,
        block_out_channels=(8, 16),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        clip_text_in_channels=12,
        clip_text_pooled_in_channels=12,
        clip_seq=2,
        dropout=(0.0, 0.0),
    )


def _unet1d() -> torch.nn.Module:
    from diffusers import UNet1DModel

    return UNet1DModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        time_embedding_type="positional",
        use_timestep_embedding=True,
        flip_sin_to_cos=False,
        freq_shift=1.0,
        down_block_types=("DownResnetBlock1D", "DownResnetBlock1D"),
        up_block_types=("UpResnetBlock1D", "UpResnetBlock1D"),  # as many as down blocks: a U-Net
        mid_block_type="MidResTemporalBlock1D",
        out_block_type="OutConv1DBlock",
        block_out_channels=(8, 16),
        act_fn="mish",
        norm_num_groups=4,
        layers_per_block=1,
    )


def _unet3d() -> torch.nn.Module:
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=4,
    )


def _unet_svd() -> torch.nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 32),  # its GroupNorms have a fixed 32 groups
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12,
        layers_per_block=1,
        cross_attention_dim=16,
        num_attention_heads=(4, 4),
        num_frames=2,
    )


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "minimax-h3": _minimax_h3,
    "mochi": _mochi,
    "motif-video": _motif_video,
    "sana-video": _sana_video,
    "sana-wm": _sana_wm,
    "sana-wm-refiner": _sana_wm_refiner,
    "wan-vace": _wan_vace,
    "wan-animate": _wan_animate,
    "dreamlite": _dreamlite,
    "i2vgenxl": _i2vgenxl,
    "kandinsky3": _kandinsky3,
    "unet-motion": _unet_motion,
    "stable-cascade": _stable_cascade,
    "unet1d": _unet1d,
    "unet3d": _unet3d,
    "unet-svd": _unet_svd,
}


# ---- inputs -----------------------------------------------------------------------------------------


def _minimax_h3_inputs(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # One packed sequence shared by every batch item: 5 text rows, 32 video rows (2 frames of 4x4 patches
    # of an 8x8 latent), 3 audio rows.
    n_text, n_video, n_audio = 5, 32, 3
    seq = n_text + n_video + n_audio
    text = torch.arange(n_text)
    video = torch.arange(n_text, n_text + n_video)
    audio = torch.arange(n_text + n_video, seq)
    tags = torch.zeros(seq, dtype=torch.long)
    tags[text], tags[audio] = 1, 2
    grid = torch.stack(
        torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij"), -1
    ).reshape(-1, 3)
    position_ids = torch.zeros(seq, 3, dtype=torch.long)
    position_ids[video] = grid
    position_ids[audio, 0] = torch.arange(n_audio)
    kwargs = {
        "audio_hidden_states": r(batch, n_audio, 4),
        "encoder_hidden_states": r(batch, n_text, 12),
        "timestep_indices": torch.zeros(seq, dtype=torch.long),
        "token_tags": tags,
        "position_ids": position_ids,
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
    }
    return "hidden_states", r(batch, n_video, 16), kwargs


def _sana_wm_refiner_inputs(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    from types import SimpleNamespace

    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed

    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=16, **_SANA_WM_REFINER_ROPE)
    # The model's own helper, with batch 1 (broadcast over the batch): a tuple, so never sliced.
    cos_sin = SanaWMLTX2RefinerTransformer3DModel.build_rotary_emb_for_absolute_positions(
        SimpleNamespace(rope=rope), 1, [0, 1], 4, 4, torch.device("cpu"), 24.0
    )
    text = {"encoder_hidden_states": r(batch, 5, 12), "encoder_attention_mask": torch.ones(batch, 5)}
    return "hidden_states", r(batch, 32, 4), {**text, "video_rotary_emb": tuple(cos_sin)}


def _video(batch: int, r: Callable) -> torch.Tensor:
    return r(batch, 4, 2, 8, 8)


INPUTS: dict[str, Callable[[int, Callable], tuple[str, torch.Tensor, dict[str, Any]]]] = {
    "minimax-h3": _minimax_h3_inputs,
    "mochi": lambda b, r: (
        "hidden_states",
        _video(b, r),
        {"encoder_hidden_states": r(b, 5, 16), "encoder_attention_mask": torch.ones(b, 5, dtype=torch.bool)},
    ),
    "motif-video": lambda b, r: (
        "hidden_states",
        _video(b, r),
        {"encoder_hidden_states": r(b, 5, 12), "encoder_attention_mask": torch.ones(b, 5)},
    ),
    "sana-video": lambda b, r: ("hidden_states", _video(b, r), {"encoder_hidden_states": r(b, 5, 12)}),
    "sana-wm": lambda b, r: (
        "hidden_states",
        _video(b, r),
        {"encoder_hidden_states": r(b, 1, 5, 12), "encoder_attention_mask": torch.ones(b, 5)},
    ),
    "sana-wm-refiner": _sana_wm_refiner_inputs,
    "wan-vace": lambda b, r: (
        "hidden_states",
        _video(b, r),
        {"encoder_hidden_states": r(b, 5, 16), "control_hidden_states": r(b, 4, 2, 8, 8)},
    ),
    "wan-animate": lambda b, r: (
        "hidden_states",
        r(b, 12, 2, 8, 8),  # 1 reference frame + 1 generated frame
        {
            "encoder_hidden_states": r(b, 5, 16),
            "pose_hidden_states": r(b, 4, 1, 8, 8),
            "face_pixel_values": r(b, 3, 1, 8, 8),
        },
    ),
    "dreamlite": lambda b, r: ("sample", r(b, 4, 8, 8), {"encoder_hidden_states": r(b, 5, 16)}),
    "i2vgenxl": lambda b, r: (
        "sample",
        _video(b, r),
        {
            "fps": torch.full((b,), 8.0),
            "image_latents": r(b, 4, 2, 8, 8),
            "image_embeddings": r(b, 16),
            "encoder_hidden_states": r(b, 5, 16),
        },
    ),
    "kandinsky3": lambda b, r: (
        "sample",
        r(b, 4, 8, 8),
        {"encoder_hidden_states": r(b, 5, 12), "encoder_attention_mask": torch.ones(b, 5)},
    ),
    # UNetMotionModel takes the text already repeated per frame (batch * frames rows, as the AnimateDiff
    # pipeline does), which a per-sample slice of the batch cannot follow: 1 frame keeps it batch long.
    "unet-motion": lambda b, r: ("sample", r(b, 4, 1, 8, 8), {"encoder_hidden_states": r(b, 5, 16)}),
    "stable-cascade": lambda b, r: (
        "sample",
        r(b, 4, 8, 8),
        {"clip_text_pooled": r(b, 1, 12), "clip_text": r(b, 5, 12)},
    ),
    "unet1d": lambda b, r: ("sample", r(b, 4, 16), {}),
    "unet3d": lambda b, r: ("sample", _video(b, r), {"encoder_hidden_states": r(b, 5, 16)}),
    "unet-svd": lambda b, r: (
        "sample",
        r(b, 2, 4, 8, 8),  # (batch, frames, channels, height, width)
        {"encoder_hidden_states": r(b, 1, 16), "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * b)},
    ),
}

TIMESTEPS: dict[str, Callable[[float, int], Any]] = {
    # the distinct noise levels of the packed sequence, in [0, 1], shared by the batch
    "minimax-h3": lambda t, b: torch.tensor([t / 1000]),
    # per-frame timesteps (batch, 1, frames)
    "sana-wm": lambda t, b: torch.full((b, 1, 2), t),
    "stable-cascade": lambda t, b: torch.full((b,), t / 1000),
}

TIME_ARGS: dict[str, str] = {"stable-cascade": "timestep_ratio"}

UNSUPPORTED: dict[str, str] = {
    "MotionAdapter": "not a denoiser: a container of AnimateDiff motion modules loaded into UNetMotionModel "
    "(UNetMotionModel.from_unet2d(unet, adapter)), which is run here as 'unet-motion'",
    "WanAnimate2Transformer3DModel": "a denoising call (kv_cache_mode='cached') reads a WanAnimate2KVCache "
    "that an earlier 'extract' pass over reference latents fills with batch-shaped K/V (an argument that no "
    "per-sample slice can follow), and builds a flex-attention BlockMask with "
    "create_block_mask(_compile=True) (tried at tiny size: extract + cached run on CPU, but the compile "
    "takes about 50 s per model)",
}

# Block stacks stepcache refuses to skip a span of, with its reason.
BLOCK_REFUSED: dict[str, str] = {
    # VACE hints and Wan Animate's face features join the hidden states after block 0
    "wan-vace": "`hidden_states` changes between one block's output and the next",
    "wan-animate": "`hidden_states` changes between one block's output and the next",
    # down and up blocks are lists the model loops over itself, not one chain
    "stable-cascade": "were not each called once in order",
}
