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
from stepcache.runtime import GuidanceRule, RuleSet, StepRule, attach

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
    QwenImagePipeline,
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


def _pixart(guidance_scale: float = 3.0, images: int = 1):
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
                guidance_scale=guidance_scale,
                num_images_per_prompt=images,
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


# Wan and Qwen-Image share their VAE's design: a tiny one of each.
VIDEO_VAE = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False],
    "latents_mean": [0.0] * 4,
    "latents_std": [1.0] * 4,
}


def _wan():
    vae = AutoencoderKLWan(**VIDEO_VAE).eval()
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


def _qwenimage():
    """Qwen-Image: no family adapter (the generic one), true CFG as a second call per step."""
    vae = AutoencoderKLQwenImage(**VIDEO_VAE).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny.make("qwenimage"),
    )
    pe = torch.randn(1, 5, 12, generator=_gen())
    mask = torch.ones(1, 5, dtype=torch.long)
    return (
        pipe,
        lambda: (
            pipe(
                prompt_embeds=pe,
                prompt_embeds_mask=mask,
                negative_prompt_embeds=pe * 0.5,
                negative_prompt_embeds_mask=mask,
                true_cfg_scale=2.0,
                num_inference_steps=4,
                height=16,
                width=16,
                generator=_gen(),
                output_type="np",
            ).images
        ),
    )


PIPELINES = {
    "pixart": (_pixart, 1),
    "sd3": (_sd3, 1),
    "flux": (_flux, 2),
    "wan": (_wan, 2),
    "qwenimage": (_qwenimage, 2),
}


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


def unconditional_rows(pipe, run) -> list:
    """What a step rule sees of each call's unconditional rows over one run of the pipeline."""
    seen = []

    class Spy(StepRule):
        def plan(self, ctx, state):
            rows = ctx.uncond_rows()
            seen.append(None if rows is None else rows.tolist())
            return True

        def estimate(self, ctx, state, rows):
            raise AssertionError("never asked")

        def observe(self, ctx, state, output, rows):
            pass

    pipe.set_progress_bar_config(disable=True)
    attach(pipe, pipe.transformer, adapter_for(pipe.transformer), RuleSet(step=Spy()), None)
    run()
    stepcache.disable(pipe)
    return seen


def test_guidance_kept_as_a_local_is_told_by_the_calls():
    """PixArt keeps ``do_classifier_free_guidance`` as a local of ``__call__``, FLUX its
    ``do_true_cfg``: the runtime reads neither. Batched CFG shows as one sample twice in a call;
    two samples without CFG, or one call per step, have no unconditional rows."""

    assert unconditional_rows(*_pixart(3.0, images=2)) == [[True, True, False, False]] * 4
    assert unconditional_rows(*_pixart(1.0, images=2)) == [None] * 4  # two different samples
    pipe, _ = _flux()
    pe, pp = _embeds()
    single = lambda: pipe(  # noqa: E731  (no negative prompt: no true CFG, one call per step)
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        num_inference_steps=4,
        height=32,
        width=32,
        generator=_gen(),
        output_type="np",
    )
    assert unconditional_rows(pipe, single) == [None] * 4
    handle = stepcache.enable(
        pipe, presets.get("guidance-interval", **GUIDANCE_ON_FOUR_STEPS["guidance-interval"])
    )
    single()
    assert handle.stats()["cfg_skipped"] == 0 and handle.stats()["computed"] == 4


def test_true_cfg_is_paired_from_step_0_and_same_noise_is_no_cfg():
    """FLUX says nothing of its true CFG: its second call of step 0 is already paired with the
    first. Two samples of the same noise without CFG stay two samples (FLUX batches no CFG)."""
    pipe, run = _flux()
    pipe.set_progress_bar_config(disable=True)
    planned = []

    class Keep(GuidanceRule):
        def plan(self, ctx, state):
            planned.append((ctx.step, ctx.batch))
            return True

        def estimate(self, ctx, state, cond, pairs):
            raise AssertionError("never asked")

        def observe(self, ctx, state, cond, uncond, pairs):
            pass

    attach(pipe, pipe.transformer, adapter_for(pipe.transformer), RuleSet(guidance=Keep()), None)
    run()
    stepcache.disable(pipe)
    assert planned == [(s, 2) for s in range(4)]  # each step's pair, as batched CFG would see it

    pe, pp = _embeds()
    same_noise = lambda: pipe(  # noqa: E731
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        num_images_per_prompt=2,
        num_inference_steps=4,
        height=32,
        width=32,
        generator=[_gen(), _gen()],  # the same noise twice
        output_type="np",
    )
    assert unconditional_rows(pipe, same_noise) == [None] * 4


@pytest.mark.parametrize("name", ["flux", "wan", "qwenimage"])
@pytest.mark.parametrize("guidance", ["guidance-interval", "cfg-cache"])
def test_guidance_rules_pair_separate_unconditional_calls(name, guidance):
    """FLUX true CFG and Wan call the conditional pass, then the unconditional one: a guidance
    rule leaves out the second call of a step (the network does not run it) and answers it."""
    build, _ = PIPELINES[name]
    pipe, run = build()
    pipe.set_progress_bar_config(disable=True)
    reference = run()
    handle = stepcache.enable(pipe, presets.get(guidance, **GUIDANCE_ON_FOUR_STEPS[guidance]))
    model = pipe.transformer
    first_block = (model.blocks if name == "wan" else model.transformer_blocks)[0]
    calls = []
    hook = first_block.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = run()
    hook.remove()
    stats = handle.stats()
    stepcache.disable(pipe)
    actions = stats["actions"]
    assert actions[0::2] == ["C"] * 4  # the conditional call always runs
    assert "G" in actions[1::2] and stats["cfg_skipped"] == actions.count("G")
    assert np.isfinite(out).all() and not np.array_equal(out, reference)
    assert len(calls) == 8 - actions.count("G")  # the network did not run the left-out calls


GUIDANCE_ON_FOUR_STEPS = {
    "guidance-interval": {"start": 0.0, "end": 0.5},
    "cfg-cache": {"interval": 2, "warmup": 1},
}


def test_two_experts_one_enable_pipeline_steps_and_separate_caches():
    """Wan 2.2: ``transformer`` answers the high-noise steps, ``transformer_2`` the low-noise ones.
    One enable covers both; each counts the pipeline's steps; no cache crosses experts."""
    pipe, _ = _wan()
    pipe.register_modules(transformer_2=tiny.make("wan", seed=1))
    pipe.register_to_config(boundary_ratio=0.6)  # 6 steps: t >= 600 on steps 0-2
    pipe.set_progress_bar_config(disable=True)
    pe, _ = _embeds()

    def run():
        return pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=pe * 0.5,
            num_inference_steps=6,
            height=16,
            width=16,
            num_frames=5,
            guidance_scale=3.0,
            generator=_gen(),
            output_type="np",
        ).frames

    reference = run()
    assert np.array_equal(run(), reference) and stepcache.enable(pipe, None).stats()["steps"] == 0
    assert np.array_equal(run(), reference)
    handle = stepcache.enable(pipe, "static-interval")  # by step index: C C E C E C
    out = run()
    stats = handle.stats()
    high, low = stats["experts"]["transformer"], stats["experts"]["transformer_2"]
    assert high["actions"] == ["C", "C", "C", "C", "E", "E"]  # steps 0-2, cond and uncond call
    # steps 3-5: step 3 is the low-noise expert's first (nothing of the other's to reuse), and
    # step 4 is estimated by the pipeline's step index (its own count would say step 1)
    assert low["actions"] == ["C", "C", "E", "E", "C", "C"]
    assert stats["steps"] == 12 and stats["actions"] == high["actions"] + low["actions"]
    assert np.isfinite(out).all() and not np.array_equal(out, reference)
    stepcache.disable(pipe)
    assert not handle.active and "progress_bar" not in vars(pipe)
    assert all("forward" not in vars(m) for m in (pipe.transformer, pipe.transformer_2))
    assert np.array_equal(run(), reference)
