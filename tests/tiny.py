"""Tiny random-weight models of every supported family, their inputs, and a bare sampling loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    CogView4Transformer2DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    SkyReelsV2Transformer3DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)


def _dit() -> torch.nn.Module:
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    )


def _pixart() -> torch.nn.Module:
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        norm_num_groups=4,
    )


def _sd3() -> torch.nn.Module:
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _flux() -> torch.nn.Module:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )


def _unet() -> torch.nn.Module:
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def _unet_cond() -> torch.nn.Module:
    return UNet2DConditionModel(
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


def wan_shape(**changes: Any) -> dict[str, Any]:
    """The tiny Wan-family configuration (Wan, SkyReels-V2, AnyFlow, ChronoEdit, VACE, Animate)."""
    shape = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4}
    shape |= {"out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 4}
    return {**shape, "rope_max_seq_len": 32, **changes}


def _wan() -> torch.nn.Module:
    return WanTransformer3DModel(**wan_shape(num_layers=3))


# Families without a hand-written adapter: the generic one finds their stack and streams.
def _sana() -> torch.nn.Module:
    return SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=1,
    )


def _cogvideox() -> torch.nn.Module:
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=12,
        num_layers=4,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=5,
    )


def _qwenimage() -> torch.nn.Module:
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    )


def _ltx() -> torch.nn.Module:
    return LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=4,
        caption_channels=12,
    )


def _cogview4() -> torch.nn.Module:
    return CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=12,
        time_embed_dim=8,
        condition_dim=4,
        pos_embed_max_size=16,
        sample_size=8,
        rope_axes_dim=(4, 4),
    )


def _lumina2() -> torch.nn.Module:
    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=4,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 32, 32),
        cap_feat_dim=12,
    )


def _skyreels() -> torch.nn.Module:
    return SkyReelsV2Transformer3DModel(**wan_shape())


def _chroma() -> torch.nn.Module:
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    )


def _flux2() -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=8,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    )


def _hunyuanvideo() -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=False,
        text_embed_dim=16,
        pooled_projection_dim=12,
        rope_axes_dim=(2, 2, 4),
    )


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "dit": _dit,
    "pixart": _pixart,
    "sd3": _sd3,
    "flux": _flux,
    "unet": _unet,
    "unet-cond": _unet_cond,
    "wan": _wan,
    "sana": _sana,
    "cogvideox": _cogvideox,
    "qwenimage": _qwenimage,
    "ltx": _ltx,
    "cogview4": _cogview4,
    "lumina2": _lumina2,
    "skyreels": _skyreels,
    "chroma": _chroma,
    "flux2": _flux2,
    "hunyuanvideo": _hunyuanvideo,
}
TRANSFORMERS = ["dit", "pixart", "sd3", "flux", "wan"]
GENERIC = [
    "sana",
    "cogvideox",
    "qwenimage",
    "ltx",
    "cogview4",
    "lumina2",
    "skyreels",
    "chroma",
    "flux2",
    "hunyuanvideo",
]


# More classes without an adapter, one module per group in tests/tiny_cov/ (so that groups can be
# added independently). Each module defines FACTORIES (name -> builder) and INPUTS (name ->
# fn(batch, randn) -> (hidden argument name, latent, other kwargs)), and may define TIMESTEPS
# (name -> fn(t in [0, 1000], batch) -> the model's time argument), TIME_ARGS (name -> the name of
# that argument when it is not ``timestep``), ENABLE_ARGS (name -> keywords a user passes to
# ``enable`` for it: sample_arg/timestep_arg), BLOCK_REFUSED (name -> words of stepcache's refusal
# of block rules on it, where its blocks cannot be skipped as a span) and UNSUPPORTED (class name
# -> why no tiny run).
MORE_INPUTS: dict[str, Callable[..., tuple[str, torch.Tensor, dict[str, Any]]]] = {}
MORE_TIMESTEPS: dict[str, Callable[[float, int], Any]] = {}
TIME_ARGS: dict[str, str] = {}
ENABLE_ARGS: dict[str, dict[str, str]] = {}
BLOCK_REFUSED: dict[str, str] = {}
UNSUPPORTED: dict[str, str] = {}


def _load_more() -> None:
    import importlib.util
    from pathlib import Path

    for path in sorted((Path(__file__).parent / "tiny_cov").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"tiny_cov_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        FACTORIES.update(module.FACTORIES)
        GENERIC.extend(module.FACTORIES)
        MORE_INPUTS.update(module.INPUTS)
        MORE_TIMESTEPS.update(getattr(module, "TIMESTEPS", {}))
        TIME_ARGS.update(getattr(module, "TIME_ARGS", {}))
        ENABLE_ARGS.update(getattr(module, "ENABLE_ARGS", {}))
        BLOCK_REFUSED.update(getattr(module, "BLOCK_REFUSED", {}))
        UNSUPPORTED.update(getattr(module, "UNSUPPORTED", {}))


CORE = list(FACTORIES)  # the families the runtime and fuzz tests run every rule on
_load_more()


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FACTORIES[name]().eval()
    # Random init leaves some output layers at zero; nudge every parameter so outputs and
    # residuals are non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def inputs(name: str, batch: int, seed: int = 0) -> tuple[str, torch.Tensor, dict[str, Any]]:
    """(hidden argument name, initial latent, other keyword arguments) for a call."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name in MORE_INPUTS:
        return MORE_INPUTS[name](batch, r)
    if name == "dit":
        return "hidden_states", r(batch, 4, 8, 8), {"class_labels": torch.arange(batch) % 10}
    if name == "pixart":
        return (
            "hidden_states",
            r(batch, 4, 8, 8),
            {
                "encoder_hidden_states": r(batch, 5, 12),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            },
        )
    if name == "sd3":
        return (
            "hidden_states",
            r(batch, 4, 8, 8),
            {"encoder_hidden_states": r(batch, 5, 16), "pooled_projections": r(batch, 12)},
        )
    if name == "flux":
        img_ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3)
        return (
            "hidden_states",
            r(batch, 16, 8),
            {
                "encoder_hidden_states": r(batch, 5, 16),
                "pooled_projections": r(batch, 12),
                "img_ids": img_ids,
                "txt_ids": torch.zeros(5, 3),
            },
        )
    if name == "unet":
        return "sample", r(batch, 3, 8, 8), {}
    if name == "unet-cond":
        return "sample", r(batch, 4, 8, 8), {"encoder_hidden_states": r(batch, 5, 16)}
    if name == "wan":
        return "hidden_states", r(batch, 4, 2, 8, 8), {"encoder_hidden_states": r(batch, 5, 16)}
    if name == "sana":
        return "hidden_states", r(batch, 4, 8, 8), {"encoder_hidden_states": r(batch, 5, 12)}
    if name == "cogvideox":
        return "hidden_states", r(batch, 3, 4, 8, 8), {"encoder_hidden_states": r(batch, 5, 12)}
    if name == "qwenimage":
        text = {"encoder_hidden_states": r(batch, 5, 12), "encoder_hidden_states_mask": torch.ones(batch, 5)}
        return "hidden_states", r(batch, 16, 16), {**text, "img_shapes": [(1, 4, 4)] * batch}
    if name == "ltx":
        text = {"encoder_hidden_states": r(batch, 5, 12), "encoder_attention_mask": torch.ones(batch, 5)}
        return "hidden_states", r(batch, 32, 8), {**text, "num_frames": 2, "height": 4, "width": 4}
    if name == "cogview4":
        size = torch.tensor([[8, 8]] * batch)
        extra = {"original_size": size, "target_size": size, "crop_coords": torch.zeros(batch, 2)}
        return "hidden_states", r(batch, 4, 8, 8), {"encoder_hidden_states": r(batch, 5, 12), **extra}
    if name == "lumina2":
        mask = torch.ones(batch, 5, dtype=torch.bool)
        return (
            "hidden_states",
            r(batch, 4, 8, 8),
            {"encoder_hidden_states": r(batch, 5, 12), "encoder_attention_mask": mask},
        )
    if name == "skyreels":
        return "hidden_states", r(batch, 4, 2, 8, 8), {"encoder_hidden_states": r(batch, 5, 16)}
    if name == "chroma":
        ids = {"img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)}
        return "hidden_states", r(batch, 16, 8), {"encoder_hidden_states": r(batch, 5, 16), **ids}
    if name == "flux2":  # ids are (t, h, w, l) per token, batched
        img = torch.stack(
            torch.meshgrid(
                torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1), indexing="ij"
            ),
            -1,
        ).reshape(1, -1, 4)
        ids = {"img_ids": img.expand(batch, -1, -1), "txt_ids": torch.zeros(batch, 5, 4)}
        return "hidden_states", r(batch, 16, 8), {"encoder_hidden_states": r(batch, 5, 16), **ids}
    if name == "hunyuanvideo":
        text = {"encoder_hidden_states": r(batch, 5, 16), "encoder_attention_mask": torch.ones(batch, 5)}
        return "hidden_states", r(batch, 4, 2, 8, 8), {**text, "pooled_projections": r(batch, 12)}
    raise KeyError(name)


def timestep_for(name: str, t: float, batch: int) -> Any:
    if name in MORE_TIMESTEPS:
        return MORE_TIMESTEPS[name](t, batch)
    value = t / 1000 if name == "flux" else t
    return torch.full((batch,), value)


@torch.no_grad()
def sample(name: str, model: torch.nn.Module, batch: int = 2, steps: int = 6, seed: int = 0) -> torch.Tensor:
    """A plain Euler-like loop over a bare denoiser."""
    hidden_arg, x, kwargs = inputs(name, batch, seed)
    for i in range(steps):
        t = 1000.0 * (1 - i / steps)
        x = euler(x, call(name, model, hidden_arg, x, t, kwargs), steps)
    return torch.stack(x) if isinstance(x, list) else x


def euler(x: Any, out: Any, steps: int) -> Any:
    """x - out / steps, on a batch tensor or on a list of per-sample tensors (Z-Image)."""
    out = out if isinstance(out, torch.Tensor) or isinstance(x, list) and isinstance(out, list) else out[0]
    if isinstance(x, list):
        return [a - o / steps for a, o in zip(x, out, strict=True)]
    return x - out / steps


def call(name: str, model: Any, hidden_arg: str, x: torch.Tensor, t: float, kwargs: dict[str, Any]) -> Any:
    """One denoiser call at time ``t`` (0..1000) with the class's own argument names."""
    time = {TIME_ARGS.get(name, "timestep"): timestep_for(name, t, len(x))}
    return model(**{hidden_arg: x}, **time, **kwargs)


def make_vae() -> torch.nn.Module:
    """A one-level 4-channel AutoencoderKL for tiny pipelines at 8x8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def sd_pipeline(scheduler: str = "dpm") -> Any:
    """A tiny Stable-Diffusion-1.5-style pipeline with a real (tiny, random) CLIP text encoder and
    a character-level CLIP tokenizer written here, so prompts reach the U-Net without downloads.
    ``scheduler``: dpm (DPM-Solver++ 2M), unipc, ddim, euler or ancestral."""
    import json
    import string
    import tempfile

    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
        UniPCMultistepScheduler,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{d}/merges.txt", "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=16)
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = make_vae()
    schedulers = {
        "dpm": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "ancestral": EulerAncestralDiscreteScheduler,
    }
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=schedulers[scheduler](steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
