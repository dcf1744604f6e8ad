"""Token-wise caching (ToCa): the span runs on each sample's fastest-changing tokens, attention
still sees every token through the kept keys and values, and models it cannot serve are refused."""

from __future__ import annotations

import pytest
import tiny
import torch

import stepcache
from stepcache import presets
from stepcache.errors import PolicyError
from stepcache.methods.block.toca import TokenCache, TokenCaches
from stepcache.runtime import CallContext, handle_of

MODELS = {name: tiny.make(name) for name in ("dit", "pixart", "sd3")}


def _tokens_per_block(model):
    """Tokens each call of each block's feed-forward saw (only a real run reaches it)."""
    seen: list[list[int]] = [[] for _ in model.transformer_blocks]
    hooks = [
        blk.ff.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0].shape[1]))
        for i, blk in enumerate(model.transformer_blocks)
    ]
    return seen, hooks


def _calls(name, model, xs, t=500.0):
    """The model on each latent in ``xs`` in turn, one generation of len(xs) steps."""
    hidden_arg, _, kwargs = tiny.inputs(name, len(xs[0]))
    handle = handle_of(model)
    with handle.generation(num_steps=len(xs)):
        return [tiny.call(name, model, hidden_arg, x, t, kwargs)[0] for x in xs], handle.stats()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_unchanged_input_gives_the_full_answer_on_a_token_step(name):
    """Step 1 repeats step 0's input: the running tokens attend to keys and values that equal
    the ones a full run would make, the others reuse a residual that is still right, so the
    answer is step 0's. Attention over the running tokens alone would not give it."""
    model = MODELS[name]
    _, x, _ = tiny.inputs(name, 2)
    stepcache.enable(model, presets.get("toca", ratio=0.5, warmup=0, interval=100))
    try:
        (first, second), stats = _calls(name, model, [x, x.clone()])
    finally:
        stepcache.disable(model)
    assert stats["actions"] == ["C", "P"]
    torch.testing.assert_close(second, first, rtol=1e-4, atol=1e-5)


def test_rows_left_out_by_guidance_keep_their_caches_and_the_others_run_their_tokens():
    """Batched CFG, the unconditional rows dropped at step 1 by a guidance rule: the conditional
    rows run a token step on their own rows of every cache, and (input unchanged) answer exactly
    as at step 0."""
    model = MODELS["dit"]
    hidden_arg, x, kwargs = tiny.inputs("dit", 4)
    null = model.config.num_embeds_ada_norm  # DiT's unconditional class: rows 2 and 3
    kwargs = {**kwargs, "class_labels": torch.tensor([3, 5, null, null])}
    policy = stepcache.compose(
        presets.get("toca", ratio=0.5, warmup=0, interval=100), presets.get("guidance-interval", end=0.1)
    )
    handle = stepcache.enable(model, policy)
    try:
        with handle.generation(num_steps=2, cfg="uncond_last"):
            outs = [tiny.call("dit", model, hidden_arg, x.clone(), 500.0, kwargs)[0] for _ in range(2)]
        stats = handle.stats()
    finally:
        stepcache.disable(model)
    assert stats["row_actions"] == ["CCCC", "PPGG"]
    torch.testing.assert_close(outs[1][:2], outs[0][:2], rtol=1e-4, atol=1e-5)


def test_fused_projections_are_refused_at_the_first_call():
    """Fused key and value projections (to_qkv) bypass the wrapped to_k and to_v: whether fused
    before enable or after, the first call says so instead of answering with partial attention."""
    model = tiny.make("pixart")
    for fuse_first in (True, False):
        if fuse_first:
            model.fuse_qkv_projections()
        handle = stepcache.enable(model, presets.get("toca", ratio=0.5, warmup=0, interval=100))
        if not fuse_first:
            model.fuse_qkv_projections()
        try:
            with pytest.raises(stepcache.UnsupportedModelError, match="did not call its to_k"):
                with handle.generation(num_steps=2):
                    tiny.sample("pixart", model, steps=2)
        finally:
            stepcache.disable(model)
            model.unfuse_qkv_projections()
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_token_steps_run_the_chosen_share_of_tokens_through_every_block():
    model = MODELS["dit"]
    _, x, _ = tiny.inputs("dit", 2)
    seen, hooks = _tokens_per_block(model)
    stepcache.enable(model, presets.get("toca", ratio=0.25, warmup=0, interval=3, fn=1))
    try:
        xs = [x + 0.1 * i * torch.randn_like(x) for i in range(6)]
        _, stats = _calls("dit", model, xs)
    finally:
        stepcache.disable(model)
        for h in hooks:
            h.remove()
    assert stats["actions"] == ["C", "P", "P", "C", "P", "P"]
    assert seen[0] == [16] * 6  # fn=1: the first block runs every token
    for counts in seen[1:]:  # 8x8 latent, patch 2: 16 tokens; a quarter is 4
        assert counts == [16, 4, 4, 16, 4, 4]


def test_ratio_one_is_bit_exact_with_stepcache_off():
    model = MODELS["pixart"]
    reference = tiny.sample("pixart", model, steps=6)
    handle = stepcache.enable(model, presets.get("toca", ratio=1.0, warmup=0))
    try:
        with handle.generation(num_steps=6):
            out = tiny.sample("pixart", model, steps=6)
    finally:
        stepcache.disable(model)
    assert torch.equal(out, reference)


def test_each_sample_picks_its_own_tokens_and_a_batch_equals_its_singles():
    model = MODELS["sd3"]
    _, x, _ = tiny.inputs("sd3", 2)
    noise = torch.randn(6, *x.shape, generator=torch.Generator().manual_seed(1))
    xs = [x + 0.2 * i * noise[i] for i in range(6)]
    stepcache.enable(model, presets.get("toca", ratio=0.5, warmup=0, interval=4))
    try:
        batched, stats = _calls("sd3", model, xs)
        singles = []
        for row in range(2):
            hidden_arg, _, kwargs = tiny.inputs("sd3", 2)
            one = {k: v[row : row + 1] for k, v in kwargs.items()}
            with handle_of(model).generation(num_steps=6):
                singles.append(
                    [tiny.call("sd3", model, hidden_arg, s[row : row + 1], 500.0, one)[0] for s in xs]
                )
    finally:
        stepcache.disable(model)
    assert "P" in stats["actions"]
    for step in range(6):
        torch.testing.assert_close(
            batched[step], torch.cat([singles[0][step], singles[1][step]]), rtol=1e-4, atol=1e-5
        )


def test_the_plan_ranks_tokens_per_row_by_their_change():
    rule = TokenCache(ratio=0.25, interval=100, warmup=0, fn=0, bn=0)
    state = TokenCaches()
    before = torch.ones(2, 8, 4)
    ctx = CallContext(step=0, branch=0, num_steps=4, batch=2, timestep=1.0)
    rule.observe(ctx, state, (before,), (torch.zeros(2, 8, 4),), None, None)
    now = before.clone()
    now[0, 6] += 1.0  # row 0 moves most at tokens 6 and 1, row 1 at tokens 2 and 5
    now[0, 1] += 0.5
    now[1, 2] += 2.0
    now[1, 5] += 0.1
    tokens = rule.plan(CallContext(step=1, branch=0, num_steps=4, batch=2, timestep=0.5), state, (now,))
    assert tokens.tolist() == [[1, 6], [2, 5]]
    # Observing those tokens refreshes only their cached inputs.
    rule.observe(ctx, state, (now,), (torch.ones(2, 2, 4),), tokens, None)
    assert torch.equal(state.inputs[0, 6], now[0, 6]) and torch.equal(state.inputs[0, 2], before[0, 2])
    assert torch.equal(state.residuals[0][1, 5], torch.ones(4)) and state.residuals[0][1, 0].abs().sum() == 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("flux", "image_rotary_emb"),
        ("sana", "height, width"),
        ("unet", "linear block stack"),
        ("cogvideox", "mixed into its keys"),
    ],
)
def test_models_it_cannot_serve_are_refused_by_name(name, reason):
    model = tiny.make(name)
    with pytest.raises(stepcache.UnsupportedModelError, match=reason):
        handle = stepcache.enable(model, presets.get("toca", ratio=0.5, warmup=1, interval=100))
        with handle.generation(num_steps=3):
            tiny.sample(name, model, steps=3)
    stepcache.disable(model)
    assert not [m for m in model.modules() if "forward" in m.__dict__]  # every wrapper removed
    assert torch.equal(tiny.sample(name, model, steps=2), tiny.sample(name, tiny.make(name), steps=2))


@pytest.mark.parametrize("params", [{"ratio": 1.5}, {"ratio": -0.1}, {"interval": 0}, {"fn": -1}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(PolicyError):
        presets.get("toca", **params)
