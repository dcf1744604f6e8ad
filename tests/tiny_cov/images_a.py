"""Tiny random-weight configs for image denoisers without a family adapter (group images_a).

Loaded by tests/tiny.py: FACTORIES (key -> builder), INPUTS (key -> fn(batch, r) -> (hidden
argument name, latent, other kwargs)), TIMESTEPS (key -> fn(t in [0, 1000], batch) -> the model's
time argument), TIME_ARGS (key -> that argument's name when not ``timestep``) and UNSUPPORTED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AuraFlowTransformer2DModel,
    BriaFibo2Transformer2DModel,
    BriaFiboTransformer2DModel,
    BriaTransformer2DModel,
    CogView3PlusTransformer2DModel,
    DreamLiteTransformer2DModel,
    ErnieImageTransformer2DModel,
    Flux3Transformer2DModel,
    GlmImageTransformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanImageTransformer2DModel,
    Ideogram4Transformer2DModel,
    Krea2Transformer2DModel,
    LongCatImageTransformer2DModel,
    LuminaNextDiT2DModel,
    ZImageTransformer2DModel,
)


class _PerLayer(list):
    """Per-layer text features, each batch first (BriaFibo's ``text_encoder_layers``, HiDream's
    Llama states). ``len()`` is the batch size and a slice takes those rows of every layer, so the
    tests' batch slicing (``v[rows]`` when ``len(v) == batch``) cuts each sample's features out
    of all layers; integer indexing and iteration see the layers."""

    def __len__(self) -> int:
        return len(list.__getitem__(self, 0))

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return _PerLayer(t[i] for t in list.__iter__(self))
        return list.__getitem__(self, i)


def _grid(h: int, w: int, lead: int = 1, tail: int = 0) -> torch.Tensor:
    """(h*w, lead + 2 + tail) position ids: ``lead`` zero columns, row, column, ``tail`` zeros."""
    rows, cols = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    cols_ = [torch.zeros(h, w)] * lead + [rows, cols] + [torch.zeros(h, w)] * tail
    return torch.stack(cols_, -1).reshape(h * w, -1)


# ---- builders --------------------------------------------------------------------------------
def _auraflow() -> torch.nn.Module:
    return AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _bria() -> torch.nn.Module:
    return BriaTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=[2, 2, 4],
    )


def _briafibo() -> torch.nn.Module:
    return BriaFiboTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=[2, 2, 4],
        text_encoder_dim=12,
    )


def _briafibo2() -> torch.nn.Module:
    return BriaFibo2Transformer2DModel(
        in_channels=4,
        patch_size=2,
        dim=16,
        n_layers=4,
        n_refiner_layers=1,
        n_heads=2,
        cap_feat_dim=12,
        injection_layer_ids=(1,),
        perceiver_num_layers=1,
        min_num_gist_tokens=4,
        max_num_gist_tokens=4,
        gist_step=4,
        gist_min_text_len=4,
        gist_max_text_len=8,
        axes_dims=(2, 2, 4),
        axes_lens=(32, 16, 16),
    )


def _cogview3plus() -> torch.nn.Module:
    return CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=12,
        time_embed_dim=8,
        condition_dim=4,
        pos_embed_max_size=16,
        sample_size=8,
    )


def _dreamlite() -> torch.nn.Module:
    return DreamLiteTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        norm_num_groups=4,
        cross_attention_dim=12,
        norm_type="ada_norm",  # the U-Net's blocks use layer_norm and no timestep; ada_norm takes one
        num_embeds_ada_norm=1000,
    )


def _ernieimage() -> torch.nn.Module:
    return ErnieImageTransformer2DModel(
        hidden_size=16,
        num_attention_heads=2,
        num_layers=4,
        ffn_hidden_size=32,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        text_in_dim=12,
        rope_axes_dim=(2, 2, 4),
    )


def _flux3() -> torch.nn.Module:
    return Flux3Transformer2DModel(
        in_channels=8,
        cond_in_channels=8,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        timestep_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
    )


def _glmimage() -> torch.nn.Module:
    return GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=12,
        time_embed_dim=8,
        condition_dim=4,
        prior_vq_quantizer_codebook_size=16,
    )


def _hidream() -> torch.nn.Module:
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[12, 12],
        text_emb_dim=12,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(8, 8),
        llama_layers=list(range(6)),
    )


def _hunyuandit() -> torch.nn.Module:
    return HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=4,
        learn_sigma=False,
        cross_attention_dim=16,
        cross_attention_dim_t5=16,
        pooled_projection_dim=16,
        text_len=5,
        text_len_t5=5,
        use_style_cond_and_image_meta_size=False,
    )


def _hunyuanimage() -> torch.nn.Module:
    return HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=4,
        num_refiner_layers=1,
        patch_size=(2, 2),
        text_embed_dim=12,
        rope_axes_dim=(4, 4),
    )


def _ideogram4() -> torch.nn.Module:
    return Ideogram4Transformer2DModel(
        in_channels=8,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        intermediate_size=32,
        adaln_dim=16,
        llm_features_dim=12,
        rope_theta=10000,
        mrope_section=(2, 1, 1),
    )


def _krea2() -> torch.nn.Module:
    return Krea2Transformer2DModel(
        in_channels=8,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        timestep_embed_dim=16,
        text_hidden_dim=16,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=32,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4),
    )


def _longcatimage() -> torch.nn.Module:
    return LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=12,
        axes_dims_rope=[2, 2, 4],
    )


def _luminanext() -> torch.nn.Module:
    return LuminaNextDiT2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=4,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        learn_sigma=False,
        cross_attention_dim=12,
    )


def _zimage() -> torch.nn.Module:
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=4,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=12,
        axes_dims=[2, 2, 4],
        axes_lens=[64, 16, 16],
    )


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "auraflow": _auraflow,
    "bria": _bria,
    "briafibo": _briafibo,
    "briafibo2": _briafibo2,
    "cogview3plus": _cogview3plus,
    "dreamlite-2d": _dreamlite,
    "ernieimage": _ernieimage,
    "flux3": _flux3,
    "glmimage": _glmimage,
    "hidream": _hidream,
    "hunyuandit": _hunyuandit,
    "hunyuanimage": _hunyuanimage,
    "ideogram4": _ideogram4,
    "krea2": _krea2,
    "longcatimage": _longcatimage,
    "luminanext": _luminanext,
    "zimage": _zimage,
}


# ---- inputs ----------------------------------------------------------------------------------
def _in_auraflow(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    return "hidden_states", r(b, 4, 8, 8), {"encoder_hidden_states": r(b, 5, 12)}


def _in_bria(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    ids = {"img_ids": _grid(4, 4), "txt_ids": torch.zeros(5, 3)}
    return "hidden_states", r(b, 16, 8), {"encoder_hidden_states": r(b, 5, 12), **ids}


def _in_briafibo(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    name, x, kwargs = _in_bria(b, r)
    return name, x, {**kwargs, "text_encoder_layers": _PerLayer(r(b, 5, 12) for _ in range(6))}


def _in_briafibo2(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # text: the Perceiver's bundle, then one per injection layer
    return "hidden_states", r(b, 4, 8, 8), {"encoder_hidden_states": r(b, 2, 5, 12)}


def _in_cogview3plus(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    size = torch.tensor([[8.0, 8.0]] * b)
    extra = {"original_size": size, "target_size": size, "crop_coords": torch.zeros(b, 2)}
    return "hidden_states", r(b, 4, 8, 8), {"encoder_hidden_states": r(b, 5, 12), **extra}


def _in_dreamlite(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    return "hidden_states", r(b, 4, 8, 8), {"encoder_hidden_states": r(b, 5, 12)}


def _in_ernieimage(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    return "hidden_states", r(b, 4, 8, 8), {"text_bth": r(b, 5, 12), "text_lens": torch.full((b,), 5)}


def _in_flux3(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:  # ids (t, h, w, l), shared
    ids = {"img_ids": _grid(4, 4, tail=1), "txt_ids": torch.zeros(5, 4)}
    return "hidden_states", r(b, 16, 8), {"encoder_hidden_states": r(b, 5, 12), **ids}


def _in_glmimage(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    prior = {
        "prior_token_id": torch.randint(0, 16, (b, 16), generator=g),
        "prior_token_drop": torch.zeros(b, 16, dtype=torch.bool),
    }
    size = {"target_size": torch.tensor([[8.0, 8.0]] * b), "crop_coords": torch.zeros(b, 2)}
    return "hidden_states", r(b, 4, 8, 8), {"encoder_hidden_states": r(b, 5, 12), **prior, **size}


def _in_hidream(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    text = {
        "encoder_hidden_states_t5": r(b, 5, 12),
        "encoder_hidden_states_llama3": _PerLayer(r(b, 5, 12) for _ in range(6)),
        "pooled_embeds": r(b, 12),
    }
    return "hidden_states", r(b, 4, 8, 8), text


def _in_hunyuandit(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    text = {
        "encoder_hidden_states": r(b, 5, 16),
        "text_embedding_mask": torch.ones(b, 5),
        "encoder_hidden_states_t5": r(b, 5, 16),
        "text_embedding_mask_t5": torch.ones(b, 5),
    }
    return "hidden_states", r(b, 4, 8, 8), {**text, "image_rotary_emb": tuple(rope)}


def _in_hunyuanimage(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    text = {"encoder_hidden_states": r(b, 5, 12), "encoder_attention_mask": torch.ones(b, 5)}
    return "hidden_states", r(b, 4, 8, 8), text


def _in_ideogram4(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    # one packed sequence per sample: 5 text tokens, then 16 image tokens
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    text_pos = torch.arange(5).view(5, 1).expand(5, 3)
    image_pos = _grid(4, 4).long() + IMAGE_POSITION_OFFSET  # (t=0, h, w), offset past the text
    position_ids = torch.cat([text_pos, image_pos]).unsqueeze(0).expand(b, -1, -1)
    indicator = torch.tensor([LLM_TOKEN_INDICATOR] * 5 + [OUTPUT_IMAGE_INDICATOR] * 16).expand(b, -1)
    segment_ids = torch.ones(b, 21, dtype=torch.long)  # one segment per row: attend within the sample
    extra = {"position_ids": position_ids, "segment_ids": segment_ids, "indicator": indicator}
    return "hidden_states", r(b, 21, 8), {"encoder_hidden_states": r(b, 21, 12), **extra}


def _in_krea2(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    position_ids = torch.cat([torch.zeros(5, 3), _grid(4, 4)])  # text rows zero, then the image grid
    text = r(b, 5, 3, 16)  # (batch, text length, tapped text-encoder layers, dim)
    return "hidden_states", r(b, 16, 8), {"encoder_hidden_states": text, "position_ids": position_ids}


def _in_longcatimage(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    ids = {"img_ids": _grid(4, 4), "txt_ids": torch.zeros(5, 3)}
    return "hidden_states", r(b, 16, 8), {"encoder_hidden_states": r(b, 5, 12), **ids}


def _in_luminanext(b: int, r: Callable) -> tuple[str, torch.Tensor, dict[str, Any]]:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    rope = get_2d_rotary_pos_embed_lumina(8, 8, 8)  # (8, 8, 4) complex, shared
    text = {"encoder_hidden_states": r(b, 5, 12), "encoder_mask": torch.ones(b, 5)}
    extra = {"image_rotary_emb": rope, "cross_attention_kwargs": {}}  # forward spreads it with **
    return "hidden_states", r(b, 4, 8, 8), {**text, **extra}


def _in_zimage(b: int, r: Callable) -> tuple[str, list[torch.Tensor], dict[str, Any]]:
    # per-sample lists: latents (C, F, H, W) and caption features (text length, dim); the
    # prediction comes back as a list too
    return "x", list(r(b, 4, 1, 8, 8)), {"cap_feats": list(r(b, 5, 12))}


INPUTS: dict[str, Callable[[int, Callable], tuple[str, torch.Tensor, dict[str, Any]]]] = {
    "auraflow": _in_auraflow,
    "bria": _in_bria,
    "briafibo": _in_briafibo,
    "briafibo2": _in_briafibo2,
    "cogview3plus": _in_cogview3plus,
    "dreamlite-2d": _in_dreamlite,
    "ernieimage": _in_ernieimage,
    "flux3": _in_flux3,
    "glmimage": _in_glmimage,
    "hidream": _in_hidream,
    "hunyuandit": _in_hunyuandit,
    "hunyuanimage": _in_hunyuanimage,
    "ideogram4": _in_ideogram4,
    "krea2": _in_krea2,
    "longcatimage": _in_longcatimage,
    "luminanext": _in_luminanext,
    "zimage": _in_zimage,
}


def _unit(t: float, b: int) -> torch.Tensor:  # flow time in [0, 1], 1 = noise
    return torch.full((b,), t / 1000)


def _unit_flipped(t: float, b: int) -> torch.Tensor:  # flow time in [0, 1], 0 = noise
    return torch.full((b,), 1 - t / 1000)


def _step_index(t: float, b: int) -> torch.Tensor:
    # one integer step for the whole batch: ada_norm's AdaLayerNorm splits its embedding on dim 0,
    # so it takes a scalar timestep (a (batch,) one would be split across the batch)
    return torch.tensor(min(int(t), 999))


TIMESTEPS: dict[str, Callable[[float, int], Any]] = {
    "auraflow": _unit,
    "briafibo2": _unit,
    "dreamlite-2d": _step_index,
    "flux3": _unit,
    "ideogram4": _unit_flipped,
    "krea2": _unit,
    "longcatimage": _unit,
    "luminanext": _unit_flipped,
    "zimage": _unit_flipped,
}
TIME_ARGS: dict[str, str] = {"hidream": "timesteps", "zimage": "t"}
UNSUPPORTED: dict[str, str] = {}

# Block stacks stepcache refuses to skip a span of, with its reason.
BLOCK_REFUSED: dict[str, str] = {
    # a per-layer caption projection joins the hidden states between blocks
    "briafibo": "`hidden_states` changes between one block's output and the next",
    "hidream": "`hidden_states` changes between one block's output and the next",
    # its blocks run sequence-first: (tokens, batch, dim)
    "ernieimage": "rows for a call of 2 samples",
}
