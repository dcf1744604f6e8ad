"""Per-block rules (BWCache): each block of the stack decides for itself whether it runs."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
from test_blocks import _count_blocks, _run

import stepcache
from stepcache import presets
from stepcache.adapters import adapter_for
from stepcache.errors import PolicyError
from stepcache.runtime import PerBlockRule, RuleSet, attach, detach


class OddBlocksReuse(PerBlockRule):
    """After step 0, odd blocks answer with their input plus their step-0 residual."""

    def new_state(self) -> dict:
        return {}

    def plan(self, ctx, state, index, block_in):
        return ctx.step == 0 or index % 2 == 0

    def estimate(self, ctx, state, index, block_in):
        return state[index]

    def observe(self, ctx, state, index, block_in, residual):
        state[index] = residual


def test_each_block_takes_its_own_decision(digits_pipe):
    model = digits_pipe.transformer
    reference = _run(digits_pipe, steps=6)
    counts, hooks = _count_blocks(model)
    handle = attach(digits_pipe, model, adapter_for(model), RuleSet(block=OddBlocksReuse()), None)
    try:
        out = _run(digits_pipe, steps=6)
    finally:
        detach(model)
        for h in hooks:
            h.remove()
    assert counts == [6, 1, 6, 1, 6, 1]
    assert handle.stats()["actions"] == ["C"] + ["P"] * 5
    assert not np.array_equal(out, reference) and np.isfinite(out).all()


def test_a_zero_threshold_never_reuses_and_is_bit_exact(digits_pipe):
    reference = _run(digits_pipe, steps=8)
    counts, hooks = _count_blocks(digits_pipe.transformer)
    handle = stepcache.enable(digits_pipe, presets.get("bwcache", threshold=0.0, warmup=0))
    try:
        out = _run(digits_pipe, steps=8)
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    assert np.array_equal(out, reference)
    assert counts == [8] * 6 and handle.stats()["actions"] == ["C"] * 8


def test_reuse_is_capped_per_block_and_runs_fewer_blocks(digits_pipe):
    counts, hooks = _count_blocks(digits_pipe.transformer)
    handle = stepcache.enable(
        digits_pipe, presets.get("bwcache", threshold=10.0, max_consecutive=2, warmup=1)
    )
    try:
        _run(digits_pipe, steps=10)
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    # step 0 runs (warm-up), then every block: 2 reuses, 1 run, ... -> steps 0, 3, 6, 9
    assert counts == [4] * 6
    assert handle.stats()["actions"] == list("CPPCPPCPPC")


def test_a_video_transformer_caches_one_input_and_residual_per_block():
    model = tiny.make("wan")
    reference = tiny.sample("wan", model, batch=2, steps=10)
    shapes = []
    hook = model.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: shapes.append(a[0].shape), with_kwargs=True
    )
    handle = stepcache.enable(model, presets.get("bwcache", threshold=0.3))
    try:
        with handle.generation(num_steps=10):
            out = tiny.sample("wan", model, batch=2, steps=10)
    finally:
        stepcache.disable(model)
        hook.remove()
    stats = handle.stats()
    assert stats["actions"].count("P") >= 4
    assert float((out - reference).norm() / reference.norm()) < 0.05
    # one float32 input and one residual per block, for the whole batch
    assert stats["cache_bytes"] == len(model.blocks) * 2 * shapes[0].numel() * 4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"threshold": -0.1}, "bwcache.threshold: must be >= 0"),
        ({"max_consecutive": 1.5}, "bwcache.max_consecutive: expected an integer"),
        ({"warmup": -1}, "bwcache.warmup: must be >= 0"),
        ({"interval": 2}, "bwcache.interval: unknown parameter"),
    ],
)
def test_bad_parameters_are_policy_errors(params, message):
    with pytest.raises(PolicyError, match=message):
        presets.get("bwcache", **params)
