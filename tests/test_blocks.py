"""Block-level methods: which blocks run, per policy, counted with hooks on every block."""

import numpy as np
import pytest
import torch

import stepcache
from stepcache import presets
from stepcache.errors import PolicyError


def _run(pipe, steps=12, labels=(2, 9)):
    return pipe(
        class_labels=list(labels), num_inference_steps=steps, generator=torch.Generator().manual_seed(3)
    ).images


def _count_blocks(model):
    """Real computations per block: a skipped block is still called by the model's loop (and
    passes its input through), so count on its feed-forward, which only a real forward reaches."""
    counts = [0] * len(model.transformer_blocks)
    hooks = [
        blk.ff.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, blk in enumerate(model.transformer_blocks)
    ]
    return counts, hooks


def test_dbcache_runs_fn_and_bn_blocks_always_and_the_middle_when_computing(digits_pipe):
    model = digits_pipe.transformer
    counts, hooks = _count_blocks(model)
    pol = presets.get("dbcache", fn=2, bn=1, threshold=10.0, max_consecutive=2, warmup=1)
    handle = stepcache.enable(digits_pipe, pol)
    try:
        _run(digits_pipe)
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    stats = handle.stats()
    # Threshold never met by change: the cap decides. Step 0 computes, then reuse twice, compute.
    assert "".join(stats["actions"]) == "CPPCPPCPPCPP"
    assert counts[:2] == [12, 12] and counts[5] == 12
    assert counts[2:5] == [stats["computed"]] * 3 == [4] * 3


@pytest.mark.parametrize(("fn", "bn"), [(6, 0), (3, 3), (9, 2)])
def test_dbcache_with_no_middle_is_bit_exact(digits_pipe, fn, bn):
    reference = _run(digits_pipe)
    handle = stepcache.enable(digits_pipe, presets.get("dbcache", fn=fn, bn=bn, threshold=10.0))
    out = _run(digits_pipe)
    stepcache.disable(digits_pipe)
    assert (out == reference).all()
    assert handle.stats()["computed"] == 12


def test_dbcache_mask_forces_the_middle(digits_pipe):
    mask = [False] * 12
    mask[2] = mask[3] = True
    handle = stepcache.enable(
        digits_pipe, presets.get("dbcache", threshold=10.0, max_consecutive=5, mask=mask)
    )
    _run(digits_pipe)
    stepcache.disable(digits_pipe)
    # Forced steps compute and reset the consecutive count.
    assert "".join(handle.stats()["actions"]) == "CPCCPPPPPCPP"


def test_dbcache_reuse_with_bn_is_closer_than_fbcache_at_the_same_schedule(digits_pipe):
    """With the same forced schedule, running the last block live corrects part of the reuse."""
    reference = _run(digits_pipe, labels=tuple(range(10)))
    psnr = {}
    for name, pol in {
        "fbcache": presets.get("fbcache", threshold=10.0, max_consecutive=2),
        "dbcache": presets.get("dbcache", fn=1, bn=1, threshold=10.0, max_consecutive=2),
    }.items():
        stepcache.enable(digits_pipe, pol)
        out = _run(digits_pipe, labels=tuple(range(10)))
        stepcache.disable(digits_pipe)
        psnr[name] = stepcache.metrics.psnr_per_image(out, reference).mean()
    assert psnr["dbcache"] > psnr["fbcache"]


def test_dbcache_bad_fields_name_the_field():
    with pytest.raises(PolicyError, match=r"dbcache\.fn: must be >= 1"):
        presets.get("dbcache", fn=0)
    with pytest.raises(PolicyError, match=r"dbcache\.mask\[1\]"):
        presets.get("dbcache", mask=[True, 3])


def test_delta_dit_caches_back_blocks_early_and_front_blocks_late(digits_pipe):
    model = digits_pipe.transformer
    counts_per_step = []
    counts, hooks = _count_blocks(model)

    # One denoiser call per step: snapshot the per-block counts after each.
    hooks.append(model.register_forward_hook(lambda m, a, o: counts_per_step.append(list(counts))))
    handle = stepcache.enable(
        digits_pipe, presets.get("delta-dit", blocks=2, interval=2, boundary=0.5, warmup=0)
    )
    try:
        images = digits_pipe(
            class_labels=[4, 5], num_inference_steps=8, generator=torch.Generator().manual_seed(0)
        ).images
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    ran = [
        [b - a for a, b in zip([0] * 6 if i == 0 else counts_per_step[i - 1], c, strict=True)]
        for i, c in enumerate(counts_per_step)
    ]
    full, back_cached, front_cached = [1] * 6, [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]
    # Steps 0-3: outline stage (back span); 4-7: detail stage (front span), whose first step
    # computes to fill its own cache.
    assert ran == [full, back_cached, full, back_cached, full, front_cached, full, front_cached]
    assert "".join(handle.stats()["actions"]) == "CPCPCPCP"
    assert images.shape == (2, 8, 8, 1)


def _deep_counter(model):
    """Real computations of the deepest down block (its resnet only runs in a real forward)."""
    calls = []
    hook = model.down_blocks[-1].resnets[0].register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, hook


@pytest.mark.parametrize("family", ["unet", "unet-cond"])
def test_deepcache_skips_the_deep_branch_between_full_steps(family):
    import tiny

    model = tiny.make(family)
    reference = tiny.sample(family, model, steps=7)
    deep, hook = _deep_counter(model)
    shallow = []
    hook2 = model.down_blocks[0].resnets[0].register_forward_hook(lambda m, a, o: shallow.append(1))
    handle = stepcache.enable(model, presets.get("deepcache", interval=3, warmup=1))
    with handle.generation(num_steps=7):
        out = tiny.sample(family, model, steps=7)
    stepcache.disable(model)
    hook.remove()
    hook2.remove()
    stats = handle.stats()
    # Steps 0 (warm-up), 1, 4 compute in full; the others run only the shallow branch.
    assert "".join(stats["actions"]) == "CCPPCPP"
    assert len(deep) == 3 and len(shallow) == 7
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert torch.equal(tiny.sample(family, model, steps=7), reference)  # disable restores


@pytest.mark.parametrize(
    "params", [{"interval": 1}, {"interval": 3, "branch": 1}, {"interval": 2, "branch": 5}]
)
def test_deepcache_that_skips_nothing_is_bit_exact(params):
    import tiny

    model = tiny.make("unet")
    reference = tiny.sample("unet", model, steps=5)
    handle = stepcache.enable(model, presets.get("deepcache", **params))
    with handle.generation(num_steps=5):
        out = tiny.sample("unet", model, steps=5)
    stepcache.disable(model)
    assert torch.equal(out, reference)


def test_deepcache_in_a_real_ddpm_pipeline_keeps_only_the_deep_feature():
    import tiny
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=tiny.make("unet"), scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            batch_size=2, num_inference_steps=9, generator=torch.Generator().manual_seed(0), output_type="np"
        )

    reference = run().images
    deep, hook = _deep_counter(pipe.unet)
    handle = stepcache.enable(pipe, presets.get("deepcache", interval=4, warmup=1))
    images = run().images
    stepcache.disable(pipe)
    hook.remove()
    assert handle.stats()["computed"] == len(deep) == 3  # steps 0, 1, 5
    assert np.isfinite(images).all() and not np.array_equal(images, reference)


def test_quadratic_deepcache_schedule_is_denser_around_its_center():
    from stepcache.methods.block.deepcache import quadratic_steps

    steps = sorted(quadratic_steps(20, 3, 0.5))
    assert steps[0] == 0 and 5 <= len(steps) <= 7
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert min(gaps) < max(gaps)
    middle = [s for s in steps if 7 <= s <= 12]
    assert len(middle) >= 2


def test_deepcache_needs_a_unet_and_block_caches_need_a_stack(digits_pipe):
    import tiny

    with pytest.raises(stepcache.UnsupportedModelError, match="not a U-Net"):
        stepcache.enable(digits_pipe, "deepcache")
    with pytest.raises(stepcache.UnsupportedModelError, match="linear block stack"):
        stepcache.enable(tiny.make("unet"), "dbcache")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_feature_taylorseer_forecasts_polynomial_residuals_exactly(order):
    from stepcache.methods.block.taylorseer_feature import TaylorSeerFeature
    from stepcache.runtime import CallContext

    g = torch.Generator().manual_seed(order)
    coeffs = [
        (
            torch.randn(2, 4, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 8, generator=g, dtype=torch.float64),
        )
        for _ in range(order + 1)
    ]

    def residual(s):  # two streams, each a polynomial of degree `order` in the step
        return tuple(sum(c[k] * float(s) ** i for i, c in enumerate(coeffs)) for k in range(2))

    rule = TaylorSeerFeature(interval=3, order=order, warmup=order + 1, fn=1, bn=1)
    state, errors = rule.new_state(), []
    for s in range(15):
        ctx = CallContext(step=s, branch=0, num_steps=15, batch=2, timestep=0)
        if rule.plan(ctx, state, ()):
            rule.observe(ctx, state, residual(s), None)
        else:
            est = rule.estimate(ctx, state, None)
            errors += [float((e - t).abs().max()) for e, t in zip(est, residual(s), strict=True)]
    assert len(errors) >= 8 and max(errors) < 1e-8


def test_feature_taylorseer_beats_reusing_the_middle_at_equal_compute(digits_pipe):
    reference = _run(digits_pipe, steps=20, labels=tuple(range(10)))
    counts, hooks = _count_blocks(digits_pipe.transformer)
    results = {}
    for name, pol in {
        "reuse": presets.get("taylorseer-feature", order=0, interval=3, warmup=3),
        "forecast": presets.get("taylorseer-feature", order=2, interval=3, warmup=3),
    }.items():
        counts[:] = [0] * 6
        stepcache.enable(digits_pipe, pol)
        out = _run(digits_pipe, steps=20, labels=tuple(range(10)))
        stepcache.disable(digits_pipe)
        results[name] = (stepcache.metrics.psnr_per_image(out, reference).mean(), list(counts))
    for h in hooks:
        h.remove()
    assert results["reuse"][1] == results["forecast"][1]
    assert results["forecast"][1][0] < 20  # the middle (all 6 blocks here) ran on fewer steps
    assert results["forecast"][0] > results["reuse"][0]


def test_feature_taylorseer_mask_says_which_steps_run_the_middle(digits_pipe):
    mask = [True, False, True, True, False, False, True, False]
    counts, hooks = _count_blocks(digits_pipe.transformer)
    try:
        stepcache.enable(digits_pipe, presets.get("taylorseer-feature", mask=mask, fn=1, bn=1, order=1))
        _run(digits_pipe, steps=8)
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    # the span's ends run every step; the middle on the masked ones only (interval/warm-up ignored)
    assert counts == [8] + [sum(mask)] * 4 + [8]


def test_cache_memory_is_one_residual_per_span_not_per_block(digits_pipe):
    def cache_bytes(policy, n):
        handle = stepcache.enable(digits_pipe, policy)
        _run(digits_pipe, steps=6, labels=tuple(range(n)))
        stepcache.disable(digits_pipe)
        return handle.stats()["cache_bytes"]

    # One (2n, 16 tokens, 64 channels) float32 residual is 2n * 16 * 64 * 4 bytes.
    residual = 16 * 64 * 4
    for n in (1, 3):
        reuse = cache_bytes(presets.get("taylorseer-feature", order=0, interval=2), n)
        assert reuse == 2 * n * residual  # the middle's one residual (order 0 keeps one point)
        forecast = cache_bytes(presets.get("taylorseer-feature", order=2, interval=2), n)
        assert forecast == 3 * 2 * n * residual  # order + 1 residuals, not one per block
    assert cache_bytes(None, 2) == 0


def test_fora_replays_attention_and_mlp_outputs_between_full_steps(digits_pipe):
    model = digits_pipe.transformer
    q_calls, ff_calls, norm_calls = [], [], []
    blk = model.transformer_blocks[3]
    # Sub-layers only a real forward reaches; the block's own norm runs on every step.
    hooks = [
        blk.attn1.to_q.register_forward_hook(lambda m, a, o: q_calls.append(1)),
        blk.ff.net[-1].register_forward_hook(lambda m, a, o: ff_calls.append(1)),
        blk.norm3.register_forward_hook(lambda m, a, o: norm_calls.append(1)),
    ]
    reference = _run(digits_pipe)
    q_calls.clear(), ff_calls.clear(), norm_calls.clear()
    handle = stepcache.enable(digits_pipe, presets.get("fora", interval=3, warmup=1))
    out = _run(digits_pipe)
    stepcache.disable(digits_pipe)
    for h in hooks:
        h.remove()
    assert "".join(handle.stats()["actions"]) == "CCPPCPPCPPCP"
    assert len(q_calls) == len(ff_calls) == 5 and len(norm_calls) == 12
    assert np.isfinite(out).all() and not np.array_equal(out, reference)
    assert stepcache.metrics.psnr_per_image(out, reference).mean() > 25


def test_fora_interval_one_is_bit_exact_and_unets_are_refused(digits_pipe):
    import tiny

    reference = _run(digits_pipe)
    stepcache.enable(digits_pipe, presets.get("fora", interval=1))
    out = _run(digits_pipe)
    stepcache.disable(digits_pipe)
    assert (out == reference).all()
    with pytest.raises(stepcache.UnsupportedModelError, match="attention and MLP"):
        stepcache.enable(tiny.make("unet"), "fora")


@pytest.mark.parametrize("order", [1, 2])
def test_dbcache_forecast_is_exact_on_polynomial_residuals_per_row(order):
    from stepcache.methods.block.dbcache import DBCache
    from stepcache.runtime import CallContext

    gen = torch.Generator().manual_seed(order)
    coeffs = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(order + 1)]

    def residual(step: float) -> torch.Tensor:
        return sum(c * step**i for i, c in enumerate(coeffs))

    rule = DBCache(1, 1, 0.1, 3, 0, None, forecast=order)
    state: dict = {}

    def observe(step: int, rows: torch.Tensor | None) -> None:
        ctx = CallContext(step=step, branch=0, num_steps=10, batch=3, timestep=step, rows=rows)
        value = residual(step) if rows is None else residual(step).index_select(0, rows)
        rule.plan(ctx, state, (value,))  # records the head residual observe keeps
        rule.observe(ctx, state, (value,), rows)

    for step in range(order + 1):  # every row, steps 0..order
        observe(step, None)
    observe(order + 2, torch.tensor([0]))  # row 0 alone once more, as a per-sample cache would
    ctx = CallContext(step=7, branch=0, num_steps=10, batch=3, timestep=7)
    forecast = rule.estimate(ctx, state, None)[0]
    assert torch.allclose(forecast, residual(7.0), atol=1e-8)
    assert state["history"][0].shape[0] == order + 1  # memory: order + 1 residuals per span
    reuse = DBCache(1, 1, 0.1, 3, 0, None, forecast=0)
    assert reuse.forecast == 0 and "forecast" in stepcache.presets.get("dbcache").rules["block"].params


def test_cg_taylor_forecasts_where_its_probe_is_predictable_per_sample():
    from stepcache.methods.block.cg_taylor import CGTaylor
    from stepcache.runtime import CallContext

    g = torch.Generator().manual_seed(0)
    base, slope = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    jolt = torch.randn(1, 4, 8, generator=g)

    def head(s):  # sample 0 moves on a line; sample 1 jumps every step after step 4
        h = base + 0.1 * s * slope
        if s > 4:
            h[1:] += (-1) ** s * jolt
        return h

    def middle(s):  # the middle's residual: a line in the step for both samples
        return (2.0 * base + 0.3 * s * slope,)

    rule = CGTaylor(fn=1, bn=1, threshold=0.05, order=1, max_consecutive=100, warmup=3)
    state, plans, errors = rule.new_state(), [], []
    for s in range(12):
        ctx = CallContext(step=s, branch=0, num_steps=12, batch=2, timestep=0)
        plan = rule.plan(ctx, state, (head(s),))
        run = torch.ones(2, dtype=torch.bool) if plan is True else plan.reshape(-1)
        plans.append("".join("C" if r else "F" for r in run.tolist()))
        skip = torch.nonzero(~run).reshape(-1)
        if skip.numel():
            est = rule.estimate(ctx, state, skip)[0]
            errors.append(float((est - middle(s)[0][skip]).abs().max()))
        if run.any():
            rows = torch.nonzero(run).reshape(-1)
            rule.observe(ctx, state, (middle(s)[0][rows],), None if run.all() else rows)
    # warm-up computes; then sample 0 (predictable) is forecast, sample 1 (jumping) computes
    assert plans[:3] == ["CC"] * 3
    assert all(p[0] == "F" for p in plans[5:]) and all(p[1] == "C" for p in plans[5:])
    assert errors and max(errors) < 1e-5  # a line forecast from a line is exact
    with pytest.raises(stepcache.PolicyError, match="order"):
        stepcache.presets.get("cg-taylor", order=3)
