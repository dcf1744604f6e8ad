"""Tiny configs, group misc_b: image transformers without an adapter (Nucleus-MoE, OmniGen, Ovis-Image, PRX,
Qwen-Image 2.1, the legacy Transformer2DModel), and denoisers of other things run in the same bare loop: the
unCLIP prior (image embeddings), the spectrogram T5-FiLM decoder, the RFD4 protein backbone, a temporal
transformer layer, and audio/music DiTs (ACE-Step, LongCat-Audio, MiniMax-Music-3, Stable Audio 1 and 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AceStepTransformer1DModel,
    LongCatAudioDiTTransformer,
    MiniMaxMusic3Transformer1DModel,
    NucleusMoEImageTransformer2DModel,
    OmniGenTransformer2DModel,
    OvisImageTransformer2DModel,
    PriorTransformer,
    PRXTransformer2DModel,
    QwenImage21Transformer2DModel,
    RFD4ProteinaTransformer,
    StableAudio3DiTModel,
    StableAudioDiTModel,
    T5FilmDecoder,
    Transformer2DModel,
    TransformerTemporalModel,
)


def _nucleusmoe() -> torch.nn.Module:
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # a packed 2x2 patch of 4 channels per token
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
        mlp_ratio=12.0,  # the dense FFN width is rounded down to a multiple of 128: 16 * 12 * 2/3 -> 128
        dense_moe_strategy="leave_first_block_dense",  # blocks 1-3 route through 4 experts
        num_experts=4,
        moe_intermediate_dim=16,
        capacity_factors=2.0,
    )
    # The packed expert weights are created with torch.empty and left to the checkpoint: give them values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, 0.2)
    return model


def _omnigen() -> torch.nn.Module:
    return OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        num_layers=4,
        pad_token_id=0,
        vocab_size=32,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        rope_scaling={"short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
        pos_embed_max_size=8,
        time_step_dim=16,
    )


def _ovisimage() -> torch.nn.Module:
    return OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=8,
        out_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    )


def _prx() -> torch.nn.Module:
    return PRXTransformer2DModel(
        in_channels=4,
        patch_size=2,
        context_in_dim=12,
        hidden_size=16,
        mlp_ratio=2.0,
        num_heads=2,
        depth=4,
        axes_dim=[4, 4],
    )


def _qwenimage21() -> torch.nn.Module:
    return QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        context_in_dim=12,
        mlp_ratio=2,
        axes_dims_rope=(2, 2, 4),
    )


def _transformer2d() -> torch.nn.Module:
    # Continuous input (not the patched DiT/PixArt forms tests/tiny.py already has), cross-attention to
    # text, and AdaLayerNorm so that the blocks see the time.
    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=3,
        norm_num_groups=4,
        cross_attention_dim=12,
        norm_type="ada_norm",
        num_embeds_ada_norm=1000,
    )


def _prior() -> torch.nn.Module:
    return PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        embedding_dim=16,
        num_embeddings=5,
        additional_embeddings=4,
    )


def _t5film() -> torch.nn.Module:
    return T5FilmDecoder(
        input_dims=8,
        targets_length=16,
        d_model=16,
        num_layers=4,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        dropout_rate=0.0,
    )


_RFD4_FEATURES = {
    "feats_seq": ("xt_bb_ca", "xt_local_latents", "token_type"),
    "feats_cond_seq": ("time_emb_bb_ca", "time_emb_local_latents"),
    "feats_pair_repr": ("xt_bb_ca_pair_dists",),
    "feats_pair_cond": ("time_emb_bb_ca", "time_emb_local_latents"),
}


def _rfd4proteina() -> torch.nn.Module:
    return RFD4ProteinaTransformer(
        nlayers=3,
        token_dim=16,
        nheads=2,
        dim_cond=16,
        pair_repr_dim=8,
        latent_dim=4,
        token_type_emb_dim=4,
        t_emb_dim=16,
        seq_sep_dim=8,
        xt_pair_dist_dim=8,
        update_pair_repr_every_n=2,
        tri_mult_c=8,
        num_sequence_classes=8,
        **_RFD4_FEATURES,
    )


def _temporal() -> torch.nn.Module:
    return TransformerTemporalModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=3,
        norm_num_groups=4,
    )


def _acestep() -> torch.nn.Module:
    return AceStepTransformer1DModel(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        in_channels=12,  # 4 context channels + 8 noisy ones, concatenated before the patchify conv
        audio_acoustic_hidden_dim=8,
        patch_size=2,
        sliding_window=4,
        encoder_hidden_size=12,
    )


def _longcataudio() -> torch.nn.Module:
    return LongCatAudioDiTTransformer(
        dit_dim=16,
        dit_depth=4,
        dit_heads=2,
        dit_text_dim=12,
        latent_dim=8,
        ff_mult=2.0,
    )


def _minimaxmusic3() -> torch.nn.Module:
    return MiniMaxMusic3Transformer1DModel(
        in_channels=8,
        condition_dim=12,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=8,
        ff_inner_dim=32,
        rotary_dim=4,
        fourier_embedding_dim=16,
    )


def _stableaudio3() -> torch.nn.Module:
    return StableAudio3DiTModel(
        io_channels=8,
        patch_size=1,
        embed_dim=16,
        depth=4,
        num_heads=2,
        cond_token_dim=12,
        global_cond_dim=12,
        local_add_cond_dim=4,
        timestep_features_dim=16,
        ff_mult=2.0,
        num_memory_tokens=2,
    )


def _stableaudio() -> torch.nn.Module:
    return StableAudioDiTModel(
        sample_size=16,
        in_channels=8,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=8,
        cross_attention_dim=16,
        time_proj_dim=16,
        global_states_input_dim=12,
        cross_attention_input_dim=12,
    )


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "nucleusmoe": _nucleusmoe,
    "omnigen": _omnigen,
    "ovisimage": _ovisimage,
    "prx": _prx,
    "qwenimage21": _qwenimage21,
    "transformer2d": _transformer2d,
    "prior": _prior,
    "t5film": _t5film,
    "rfd4proteina": _rfd4proteina,
    "temporal": _temporal,
    "acestep": _acestep,
    "longcataudio": _longcataudio,
    "minimaxmusic3": _minimaxmusic3,
    "stableaudio3": _stableaudio3,
    "stableaudio": _stableaudio,
}


class _EncoderPairs(list):
    """T5FilmDecoder's ``encodings_and_masks``: one ``(encoding, mask)`` pair per upstream encoder (two in
    the spectrogram pipeline: notes and continuous context), each batch-first. The list has one entry per
    encoder, not per sample, so slicing it (as the batch-vs-singles test does to lists as long as the
    batch) slices the batch inside every pair."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _EncoderPairs((e[index], m[index]) for e, m in list.__iter__(self))
        return list.__getitem__(self, index)


def _grid_ids(h: int, w: int) -> torch.Tensor:
    """(h*w, 3) FLUX-style (t, y, x) position ids."""
    ids = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    return torch.stack(ids, -1).reshape(-1, 3)


def _inputs_nucleusmoe(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    text = {"encoder_hidden_states": r(batch, 5, 12), "encoder_hidden_states_mask": torch.ones(batch, 5)}
    return "hidden_states", r(batch, 16, 16), {**text, "img_shapes": [(1, 4, 4)] * batch}


def _inputs_omnigen(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # 5 text tokens, the time token, then 16 image tokens (8x8 latent, patch 2); no input images.
    seq = 5 + 1 + 16
    ids = (torch.arange(batch * 5).reshape(batch, 5) % 31) + 1
    extra = {
        "input_ids": ids,
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(batch, seq, seq),
        "position_ids": torch.arange(seq)[None],  # shared: one row, used for every sample
    }
    return "hidden_states", r(batch, 4, 8, 8), extra


def _inputs_ovisimage(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    ids = {"img_ids": _grid_ids(4, 4), "txt_ids": torch.zeros(5, 3)}
    return "hidden_states", r(batch, 16, 8), {"encoder_hidden_states": r(batch, 5, 12), **ids}


def _inputs_prx(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    return "hidden_states", r(batch, 4, 8, 8), {"encoder_hidden_states": r(batch, 5, 12)}


def _inputs_qwenimage21(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # The output covers the whole joint sequence (text, condition images, target), and the pipeline keeps
    # its last tokens; with no text and no condition image the joint sequence is the 4x4 target itself.
    extra = {
        "encoder_hidden_states": r(batch, 0, 12),
        "img_shapes": ([(1, 4, 4)],),  # one layout for every sample
        "img_mask": torch.ones(batch, 4, dtype=torch.bool),  # 4 slots of 2x2 latent tokens
    }
    return "hidden_states", r(batch, 16, 4), extra


def _inputs_transformer2d(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    return "hidden_states", r(batch, 4, 8, 8), {"encoder_hidden_states": r(batch, 5, 12)}


def _inputs_prior(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    extra = {
        "proj_embedding": r(batch, 16),
        "encoder_hidden_states": r(batch, 5, 16),
        "attention_mask": torch.ones(batch, 5, dtype=torch.bool),
    }
    return "hidden_states", r(batch, 16), extra


def _inputs_t5film(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    pairs = _EncoderPairs([(r(batch, 5, 16), torch.ones(batch, 5)), (r(batch, 3, 16), torch.ones(batch, 3))])
    return "decoder_input_tokens", r(batch, 16, 8), {"encodings_and_masks": pairs}


def _inputs_rfd4proteina(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # The loop denoises the backbone (CA coordinates); the local latents stay at a fixed noise level.
    extra = {
        "local_latents": r(batch, 16, 4),
        "local_latents_time": torch.full((batch,), 0.5),
        "padding_mask": torch.ones(batch, 16, dtype=torch.bool),
        "token_type": torch.zeros(batch, 16, dtype=torch.long),
        "conditioning": {  # per-token flags, shared by every sample (one row, broadcast)
            "is_in_context_conditioning": torch.zeros(1, 16, dtype=torch.bool),
            "supports_local_latent": torch.ones(1, 16, dtype=torch.bool),
        },
    }
    return "bb_ca", r(batch, 16, 3), extra


def _inputs_temporal(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # The layer's batch axis is batch * frames; one frame per sample keeps it the batch.
    return "hidden_states", r(batch, 4, 8, 8), {"num_frames": 1}


def _inputs_acestep(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    extra = {
        "timestep_r": torch.zeros(batch),  # mean-flow reference time: t - r is the time itself
        "encoder_hidden_states": r(batch, 5, 12),
        "context_latents": r(batch, 16, 4),
    }
    return "hidden_states", r(batch, 16, 8), extra


def _inputs_longcataudio(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    extra = {
        "encoder_hidden_states": r(batch, 5, 12),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.bool),
    }
    return "hidden_states", r(batch, 16, 8), extra


def _inputs_minimaxmusic3(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    return "hidden_states", r(batch, 8, 16), {"encoder_hidden_states": r(batch, 16, 12)}


def _inputs_stableaudio3(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    extra = {
        "encoder_hidden_states": r(batch, 5, 12),
        "global_hidden_states": r(batch, 12),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.bool),
    }
    return "hidden_states", r(batch, 8, 16), extra


def _inputs_stableaudio(batch: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    # Partial rotary over half of each 8-wide head, for the global token + 16 audio frames (a shared tuple).
    rope = get_1d_rotary_pos_embed(4, 17, use_real=True, repeat_interleave_real=False)
    extra = {
        "encoder_hidden_states": r(batch, 5, 12),
        "global_hidden_states": r(batch, 1, 12),
        "rotary_embedding": tuple(rope),
    }
    return "hidden_states", r(batch, 8, 16), extra


INPUTS: dict[str, Callable[[int, Callable], tuple[str, torch.Tensor, dict[str, Any]]]] = {
    "nucleusmoe": _inputs_nucleusmoe,
    "omnigen": _inputs_omnigen,
    "ovisimage": _inputs_ovisimage,
    "prx": _inputs_prx,
    "qwenimage21": _inputs_qwenimage21,
    "transformer2d": _inputs_transformer2d,
    "prior": _inputs_prior,
    "t5film": _inputs_t5film,
    "rfd4proteina": _inputs_rfd4proteina,
    "temporal": _inputs_temporal,
    "acestep": _inputs_acestep,
    "longcataudio": _inputs_longcataudio,
    "minimaxmusic3": _inputs_minimaxmusic3,
    "stableaudio3": _inputs_stableaudio3,
    "stableaudio": _inputs_stableaudio,
}


def _unit(t: float, batch: int) -> torch.Tensor:
    """Time in [0, 1], 1 = noise."""
    return torch.full((batch,), t / 1000)


TIMESTEPS: dict[str, Callable[[float, int], Any]] = {
    "ovisimage": _unit,  # scaled by 1000 inside
    "prx": _unit,  # time_factor 1000
    "qwenimage21": _unit,  # the pipeline passes t / 1000
    # AdaLayerNorm: one time for the whole batch, an index into its embedding table
    "transformer2d": lambda t, batch: torch.tensor(min(int(t), 999)),
    "t5film": _unit,  # decoder_noise_time in [0, 1)
    "rfd4proteina": lambda t, batch: torch.full((batch,), 1 - t / 1000),  # 0 = noise, 1 = data
    "acestep": _unit,
    "longcataudio": _unit,
    "minimaxmusic3": lambda t, batch: torch.full((batch,), 1 - t / 1000),  # 0 = noise, 1 = data
    "stableaudio3": _unit,
    "stableaudio": _unit,
}

TIME_ARGS: dict[str, str] = {
    "t5film": "decoder_noise_time",
    "rfd4proteina": "bb_ca_time",
}

UNSUPPORTED: dict[str, str] = {
    "UVit2DModel": (
        "not a continuous denoiser: aMUSEd's masked-token model takes integer VQ token ids (no noisy sample, "
        "no time argument) and returns codebook logits (batch, codebook_size, h, w)"
    ),
    "MiniMaxMusic3RVQDepthDecoder": (
        "not a denoiser: the autoregressive depth language model of MiniMax Music 3 (forward(inputs_embeds) "
        "has no time argument; it predicts RVQ codebooks within a frame for the flow transformer's condition)"
    ),
}

# Names the runtime cannot guess: what a user passes to enable.
ENABLE_ARGS: dict[str, dict[str, str]] = {
    "t5film": {"sample_arg": "decoder_input_tokens", "timestep_arg": "decoder_noise_time"},
}

# Block stacks stepcache refuses to skip a span of, with its reason.
BLOCK_REFUSED: dict[str, str] = {
    # the decoder layers return one tensor of the hidden stream's shape and take the encoder's
    # stream too: where it went cannot be read
    "t5film": "cannot tell where `encoder_hidden_states` is",
    # blocks run on (batch x height x width) rows
    "temporal": "rows for a call of 2 samples",
}
