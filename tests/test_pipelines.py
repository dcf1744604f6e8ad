"""Real diffusers text-to-image/video pipelines (text encoders bypassed with embeddings).

PixArt and SD3 batch CFG in one call (unconditional first); FLUX (true CFG) and Wan run the
conditional and unconditional passes as two calls per step, which the runtime keeps apart.
"""

import numpy as np
import pytest
import tiny
import torch

import stepcache
from stepcache import presets
from stepcache.adapters import adapter_for
from stepcache.runtime import RuleSet, StepRule, attach

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)


def _vae(channels=4, levels=1):
    return AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=channels,
        norm_num_groups=4,
        sample_size=8,
        shift_factor=0.0,
    ).eval()


def _gen():
    return torch.Generator().manual_seed(0)


def _pixart():
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(),
        transformer=tiny.make("pixart"),
        scheduler=DPMSolverMultistepScheduler(),
    )
    emb, mask = torch.randn(1, 5, 12, generator=_gen()), torch.ones(1, 5)
    return (
        pipe,
        lambda: (
            pipe(
                prompt=None,
                prompt_embeds=emb,
                prompt_attention_mask=mask,
                negative_prompt=None,
                negative_prompt_embeds=emb * 0.5,
                negative_prompt_attention_mask=mask,
                num_inference_steps=4,
                height=64,
                width=64,
                guidance_scale=3.0,
                generator=_gen(),
                output_type="np",
                use_resolution_binning=False,
            ).images
        ),
    )


def _embeds():
    g = _gen()
    return torch.randn(1, 5, 16, generator=g), torch.randn(1, 12, generator=g)


def _sd3():
    pipe = StableDiffusion3Pipeline(
        transformer=tiny.make("sd3"),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pe, pp = _embeds()
    return (
        pipe,
        lambda: (
            pipe(
                prompt_embeds=pe,
                pooled_prompt_embeds=pp,
                negative_prompt_embeds=pe * 0.5,
                negative_pooled_prompt_embeds=pp * 0.5,
                num_inference_steps=4,
                height=16,
                width=16,
                guidance_scale=3.0,
                generator=_gen(),
                output_type="np",
            ).images
        ),
    )


def _flux():
    pipe = FluxPipeline(
        transformer=tiny.make("flux"),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(2, 2),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pe, pp = _embeds()
    return (
        pipe,
        lambda: (
            pipe(
                prompt_embeds=pe,
                pooled_prompt_embeds=pp,
                negative_prompt_embeds=pe * 0.5,
                negative_pooled_prompt_embeds=pp * 0.5,
                true_cfg_scale=2.0,
                num_inference_steps=4,
                height=32,
                width=32,
                generator=_gen(),
                output_type="np",
            ).images
        ),
    )


def _wan():
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=tiny.make("wan"),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pe, _ = _embeds()
    return (
        pipe,
        lambda: (
            pipe(
                prompt_embeds=pe,
                negative_prompt_embeds=pe * 0.5,
                num_inference_steps=4,
                height=16,
                width=16,
                num_frames=5,
                guidance_scale=3.0,
                generator=_gen(),
                output_type="np",
            ).frames
        ),
    )


PIPELINES = {"pixart": (_pixart, 1), "sd3": (_sd3, 1), "flux": (_flux, 2), "wan": (_wan, 2)}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_off_means_off_and_steps_are_learned(name):
    build, calls_per_step = PIPELINES[name]
    pipe, run = build()
    pipe.set_progress_bar_config(disable=True)
    reference = run()
    for policy in (None, presets.get("static-interval", interval=1), presets.get("fbcache", threshold=0.0)):
        handle = stepcache.enable(pipe, policy)
        assert np.array_equal(run(), reference)
        assert handle.stats()["computed"] == 4 * calls_per_step
    handle = stepcache.enable(pipe, "static-interval")
    assert not np.array_equal(run(), reference)
    # Step 2 is estimated: with two calls per step, both the conditional and unconditional call.
    want = {1: "CCEC", 2: "CCCCEECC"}[calls_per_step]
    assert "".join(handle.stats()["actions"]) == want
    stepcache.disable(pipe)
    assert np.array_equal(run(), reference)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_context_knows_step_branch_and_unconditional_rows(name):
    build, calls_per_step = PIPELINES[name]
    pipe, run = build()
    pipe.set_progress_bar_config(disable=True)
    seen = []

    class Spy(StepRule):
        def plan(self, ctx, state):
            rows = ctx.uncond_rows()
            seen.append((ctx.step, ctx.branch, ctx.num_steps, None if rows is None else rows.tolist()))
            return True

        def estimate(self, ctx, state, rows):
            raise AssertionError("never asked")

        def observe(self, ctx, state, output, rows):
            pass

    attach(pipe, pipe.transformer, adapter_for(pipe.transformer), RuleSet(step=Spy()), None)
    run()
    stepcache.disable(pipe)
    if calls_per_step == 1:  # one batched call per step, unconditional half first
        assert seen == [(s, 0, 4, [True, False]) for s in range(4)]
    else:  # conditional then unconditional call, each its own branch
        assert seen == [(s, b, 4, None) for s in range(4) for b in range(2)]
