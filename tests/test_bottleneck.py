"""Bottleneck sampling: the middle steps run the network at a lower resolution; models that cannot
take another size are refused with the reason and left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from test_blocks import _run
from torch.utils.flop_counter import FlopCounterMode

import stepcache
from stepcache import presets
from stepcache.errors import PolicyError


def _shapes_seen(model, fn):
    """The latent sizes the network really ran on (its patch embedding's input)."""
    seen = []
    hook = model.pos_embed.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        out = fn()
    finally:
        hook.remove()
    return out, seen


def test_the_middle_steps_run_at_low_resolution_and_cost_less(digits_pipe):
    model = digits_pipe.transformer  # 8x8 latent, 2-pixel patches
    with FlopCounterMode(display=False) as full_count:
        reference = _run(digits_pipe, steps=10)
    handle = stepcache.enable(digits_pipe, presets.get("bottleneck", scale=0.5, start=0.3, end=0.8))
    try:
        with FlopCounterMode(display=False) as count:
            out, seen = _shapes_seen(model, lambda: _run(digits_pipe, steps=10))
    finally:
        stepcache.disable(digits_pipe)
    # steps 3..7 (30%..80% of 10) answer from a 4x4 sample; the others at 8x8
    assert seen == [(8, 8)] * 3 + [(4, 4)] * 5 + [(8, 8)] * 2
    assert handle.stats()["actions"] == ["C"] * 3 + ["P"] * 5 + ["C"] * 2
    assert count.get_total_flops() < 0.75 * full_count.get_total_flops()
    assert np.isfinite(out).all() and not np.array_equal(out, reference)


def test_detail_carries_the_high_frequencies_of_the_last_full_output(digits_pipe):
    reference = _run(digits_pipe, steps=10)
    psnr = {}
    for detail in (False, True):
        stepcache.enable(digits_pipe, presets.get("bottleneck", start=0.3, end=0.6, detail=detail))
        try:
            psnr[detail] = float(
                stepcache.metrics.psnr_per_image(_run(digits_pipe, steps=10), reference).mean()
            )
        finally:
            stepcache.disable(digits_pipe)
    assert psnr[True] > psnr[False] + 1


@pytest.mark.parametrize("family", ["unet", "wan", "hunyuanvideo"])
def test_u_nets_and_video_models_take_the_low_resolution(family):
    model = tiny.make(family)
    hidden_arg, x, _ = tiny.inputs(family, 2)
    handle = stepcache.enable(model, presets.get("bottleneck", start=0.25, end=0.75))
    try:
        with handle.generation(num_steps=8):
            out = tiny.sample(family, model, batch=2, steps=8)
    finally:
        stepcache.disable(model)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert handle.stats()["actions"].count("P") == 4


@pytest.mark.parametrize(
    ("family", "policy", "message"),
    [
        ("flux", {}, r"its sample is \(2, 16, 8\), not \(batch, channels, \[frames,\] height, width\)"),
        (
            "dit",
            {"scale": 0.2},
            r"a 8x8 sample at scale 0.2 rounds to 0x0 \(a multiple of its 2-pixel patches\)",
        ),
    ],
)
def test_models_or_scales_that_cannot_run_smaller_are_refused_and_left_as_they_were(family, policy, message):
    model = tiny.make(family)
    reference = tiny.sample(family, model, batch=2, steps=6)
    handle = stepcache.enable(model, presets.get("bottleneck", **policy))
    try:
        with pytest.raises(stepcache.UnsupportedModelError, match=message), handle.generation(num_steps=6):
            tiny.sample(family, model, batch=2, steps=6)
    finally:
        stepcache.disable(model)
    assert torch.equal(tiny.sample(family, model, batch=2, steps=6), reference)


def test_a_model_that_refuses_the_size_is_named():
    class FixedSize(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            if hidden_states.shape[-1] != 8:
                raise ValueError("expected width 8")
            return hidden_states * 0.5

    model = FixedSize()
    handle = stepcache.enable(model, presets.get("bottleneck", start=0.0, end=0.5))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        stepcache.UnsupportedModelError, match=r"FixedSize: refused a 4x4 sample .*expected width 8"
    ):
        with handle.generation(num_steps=4):
            for i in range(4):
                x = x - model(hidden_states=x, timestep=torch.tensor(1000.0 - 250 * i)) / 4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start": 0.8, "end": 0.3}, "bottleneck.end: must be greater than start"),
        ({"scale": 1.0}, r"bottleneck.scale: must be <= 0.95"),
        ({"scale": 0.0}, r"bottleneck.scale: must be >= 0.05"),
        ({"detail": "yes"}, "bottleneck.detail: expected true/false"),
    ],
)
def test_bad_parameters_are_policy_errors(params, message):
    with pytest.raises(PolicyError, match=message):
        presets.get("bottleneck", **params)
