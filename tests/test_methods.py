"""Each method on its own: exact where the maths says so, and fewer computations on digits-dit."""

import numpy as np
import pytest
import torch

import stepcache
from stepcache import presets
from stepcache.errors import PolicyError
from stepcache.methods.maths import extrapolate, lagrange_weights
from stepcache.methods.step.adams_bashforth import AdamsBashforth
from stepcache.methods.step.taylorseer import TaylorSeer
from stepcache.runtime import CallContext


def _poly(coeffs, x):
    return sum(c * x**i for i, c in enumerate(coeffs))


def _drive(rule, steps, timesteps, truth):
    """Run a rule against a synthetic denoiser whose output is truth(step, t); return forecast errors."""
    state, errors = rule.new_state(), []
    for s in range(steps):
        ctx = CallContext(step=s, branch=0, num_steps=steps, batch=2, timestep=torch.tensor(timesteps[s]))
        if rule.plan(ctx, state) or s == 0:
            rule.observe(ctx, state, truth(s, timesteps[s]), None)
        else:
            errors.append(float((rule.estimate(ctx, state, None) - truth(s, timesteps[s])).abs().max()))
    return errors


def _coeffs(degree, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(degree + 1)]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_is_exact_on_polynomials_of_its_order_in_step(order):
    coeffs = _coeffs(order)
    timesteps = list(np.linspace(1000, 50, 16))
    rule = TaylorSeer(interval=3, order=order, warmup=order + 1, variable="step")
    errors = _drive(rule, 16, timesteps, lambda s, t: _poly(coeffs, float(s)))
    assert len(errors) >= 6 and max(errors) < 1e-8
    # One degree higher is no longer exact: the test can fail.
    higher = _coeffs(order + 1)
    assert max(_drive(rule, 16, timesteps, lambda s, t: _poly(higher, float(s)))) > 1e-3


def test_taylorseer_in_timestep_on_a_nonuniform_schedule():
    coeffs = _coeffs(2)
    timesteps = list(1000 * (1 - np.linspace(0, 1, 13) ** 1.7) + 1)
    rule = TaylorSeer(interval=2, order=2, warmup=3, variable="timestep")
    errors = _drive(rule, 13, timesteps, lambda s, t: _poly(coeffs, t / 1000))
    assert max(errors) < 1e-8
    # In step index the same trajectory is not a polynomial: forecasts miss.
    by_step = TaylorSeer(interval=2, order=2, warmup=3, variable="step")
    assert max(_drive(by_step, 13, timesteps, lambda s, t: _poly(coeffs, t / 1000))) > 1e-4


@pytest.mark.parametrize("order", [2, 3, 4])
def test_adams_bashforth_is_exact_on_polynomials_of_degree_order_minus_one(order):
    coeffs = _coeffs(order - 1)
    timesteps = list(1000 * (1 - np.linspace(0, 1, 17) ** 1.5) + 1)
    rule = AdamsBashforth(interval=2, order=order, warmup=order + 1)
    assert max(_drive(rule, 17, timesteps, lambda s, t: _poly(coeffs, t / 1000))) < 1e-8


def test_ab_order_2_on_a_uniform_grid_is_two_o_k_minus_o_k_minus_1():
    assert lagrange_weights([0.0, 1.0], 2.0) == [-1.0, 2.0]
    a, b = torch.full((2,), 3.0), torch.full((2,), 5.0)
    assert torch.equal(extrapolate([a, b], [0.0, 1.0], 2.0), 2 * b - a)


STEP_PRESETS = ["static-interval", "magcache", "taylorseer", "adams-bashforth", "fsampler"]


@pytest.mark.parametrize("name", STEP_PRESETS)
def test_each_step_preset_computes_fewer_steps_and_warmup_is_exact(digits_pipe, name):
    def run(steps):
        return digits_pipe(
            class_labels=[1, 7], num_inference_steps=steps, generator=torch.Generator().manual_seed(4)
        ).images

    reference = run(20)
    handle = stepcache.enable(digits_pipe, name)
    images = run(20)
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    warmup = presets.get(name).rules["step"].params["warmup"]
    # Per-sample rules (magcache) may compute some rows of a step: "P" steps.
    assert stats["computed"] < 20 and stats["computed"] + stats["estimated"] + stats["partial"] == 20
    assert "".join(stats["row_actions"]).count("C") < 20 * 4
    assert stats["actions"][: max(warmup, 1)] == ["C"] * max(warmup, 1)
    assert np.isfinite(images).all()
    psnr = stepcache.metrics.psnr_per_image(images, reference)
    assert (psnr > 20).all()


def test_forecasting_beats_reuse_at_equal_compute(digits_pipe):
    """TaylorSeer's claim on our model: same computed steps as plain reuse, higher PSNR."""

    def run(policy):
        handle = stepcache.enable(digits_pipe, policy)
        out = digits_pipe(
            class_labels=list(range(10)), num_inference_steps=20, generator=torch.Generator().manual_seed(0)
        ).images
        computed = handle.stats()["computed"]
        stepcache.disable(digits_pipe)
        return out, computed

    reference, _ = run(None)
    reuse, n_reuse = run(presets.get("static-interval", interval=3, warmup=3))
    taylor, n_taylor = run(presets.get("taylorseer", interval=3, order=2, warmup=3))
    assert n_reuse == n_taylor < 20
    psnr = stepcache.metrics.psnr_per_image
    assert psnr(taylor, reference).mean() > psnr(reuse, reference).mean()


def test_fsampler_is_exact_undamped_and_validates():
    from stepcache.methods.step.fsampler import FSampler

    coeffs = _coeffs(2)
    timesteps = list(np.linspace(1000, 50, 15))
    rule = FSampler(interval=2, history=3, warmup=3, damping=1.0, max_norm_ratio=100.0)
    assert max(_drive(rule, 15, timesteps, lambda s, t: _poly(coeffs, float(s)))) < 1e-8
    # Damping moves the forecast towards the last real prediction.
    damped = FSampler(interval=2, history=3, warmup=3, damping=0.5, max_norm_ratio=100.0)
    assert max(_drive(damped, 15, timesteps, lambda s, t: _poly(coeffs, float(s)))) > 1e-3
    # A trajectory whose norm explodes fails validation: no estimate, the runtime computes.
    strict = FSampler(interval=2, history=2, warmup=2, damping=1.0, max_norm_ratio=1.1)
    state = strict.new_state()
    for s in range(3):
        ctx = CallContext(step=s, branch=0, num_steps=4, batch=1, timestep=1.0)
        if s < 2:
            strict.observe(ctx, state, torch.full((1, 4), 10.0**s), None)
        else:
            assert strict.estimate(ctx, state, None) is None


def test_a_rejected_estimate_is_computed_and_counted(digits_pipe):
    pol = presets.get("fsampler", max_norm_ratio=1.0)  # only an exactly equal norm would pass
    reference = digits_pipe(
        class_labels=[5], num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    ).images
    handle = stepcache.enable(digits_pipe, pol)
    images = digits_pipe(
        class_labels=[5], num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    ).images
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    assert stats["computed"] == 10 and stats["fallbacks"] == 3  # steps 4, 6, 8
    assert np.array_equal(images, reference)


def _geometric(rate, steps, seed=0):
    base = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [base * rate**i for i in range(steps)]


@pytest.mark.parametrize("calibrated", [False, True])
def test_magcache_scaled_reuse_is_exact_on_a_geometric_trajectory(calibrated):
    from stepcache.methods.step.magcache import MagCache, calibrate

    outs = _geometric(0.97, 14)
    ratios = calibrate(outs) if calibrated else None
    if calibrated:
        assert ratios[0] == 1.0 and all(abs(r - 0.97) < 1e-6 for r in ratios[1:])
    rule = MagCache(threshold=0.2, max_consecutive=2, warmup=2, ratios=ratios)
    errors = _drive_rows(rule, outs)
    assert len(errors) >= 6 and max(errors) < 1e-5
    # Plain reuse (ratio 1) of the same trajectory is not exact: the scaling is doing the work.
    flat = MagCache(threshold=0.2, max_consecutive=2, warmup=2, ratios=[1.0] * 14)
    assert max(_drive_rows(flat, outs)) > 1e-3


def _drive_rows(rule, outs):
    """Like _drive for a rule whose plan may be a per-row tensor (all rows decide alike here)."""
    state, errors = rule.new_state(), []
    for s, truth in enumerate(outs):
        ctx = CallContext(step=s, branch=0, num_steps=len(outs), batch=2, timestep=1000 - 60 * s)
        plan = rule.plan(ctx, state)
        if s == 0 or (plan if isinstance(plan, bool) else bool(plan.all())):
            rule.observe(ctx, state, truth, None)
        else:
            errors.append(float((rule.estimate(ctx, state, None) - truth).abs().max()))
    return errors


def test_magcache_budget_and_cap_decide_per_sample():
    from stepcache.methods.step.magcache import MagCache

    # Row 0 shrinks slowly (small error per skip), row 1 fast: row 1 must compute more often.
    base = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    rates = torch.tensor([0.99, 0.8], dtype=torch.float64).view(2, 1, 1, 1)
    rule = MagCache(threshold=0.1, max_consecutive=3, warmup=2, ratios=None)
    state, computed = rule.new_state(), torch.zeros(2)
    for s in range(16):
        ctx = CallContext(step=s, branch=0, num_steps=16, batch=2, timestep=1000 - 60 * s)
        plan = rule.plan(ctx, state)
        run = torch.ones(2, dtype=torch.bool) if plan is True else plan
        computed += run.float()
        rows = torch.nonzero(run).reshape(-1)
        if rows.numel():
            rule.observe(ctx, state, (base * rates**s).index_select(0, rows), rows)
    assert computed[0] < computed[1]
    assert computed[0] >= 2 + (16 - 2) // 4  # never more than 3 skips in a row


@pytest.mark.parametrize(("coefficients", "pattern"), [(None, "CEECEECEE"), ([2.0, 0.0], "CECECECEC")])
def test_teacache_accumulates_the_rescaled_change(coefficients, pattern):
    from stepcache.methods.block.teacache import TeaCache

    # Modulated inputs whose relative L1 change is exactly 0.04 per step.
    rule = TeaCache(threshold=0.1, warmup=1, max_consecutive=None, coefficients=coefficients)
    state, actions = rule.new_state(), []
    for s in range(9):
        ctx = CallContext(step=s, branch=0, num_steps=9, batch=1, timestep=0)
        mod = torch.full((1, 4), 1.04**s, dtype=torch.float64)
        plan = rule.plan(ctx, state, (mod,))
        run = plan if isinstance(plan, bool) else bool(plan.all())
        actions.append("C" if run else "E")
        if run:
            rule.observe(ctx, state, (torch.zeros(1, 4),), None)
    # Identity: 0.04 + 0.04 stays under 0.1, the third change reaches 0.12. Doubled: 0.08, 0.16.
    assert "".join(actions) == pattern


def test_modulated_input_is_what_the_first_dit_block_normalises(digits_pipe):
    model = digits_pipe.transformer
    seen = []
    hook = model.transformer_blocks[0].norm1.register_forward_hook(lambda m, a, o: seen.append(o[0]))
    captured = []

    class Spy(stepcache.runtime.BlockRule):
        def span(self, n):
            return 0, n

        def plan(self, ctx, state, signal):
            captured.append(signal[0])
            return True

        def estimate(self, ctx, state, rows):
            raise AssertionError

        def observe(self, ctx, state, residual, rows):
            pass

    from stepcache.adapters import adapter_for
    from stepcache.runtime import RuleSet, attach, detach

    attach(model, model, adapter_for(model), RuleSet(block=Spy()), None)
    handle = stepcache.runtime.handle_of(model)
    with handle.generation(num_steps=1):
        model(
            torch.randn(2, 1, 8, 8), timestep=torch.tensor([500.0, 500.0]), class_labels=torch.tensor([1, 10])
        )
    detach(model)
    hook.remove()
    # The adapter computes the same tensor the block's own norm1 produces (the spy's call comes first).
    assert len(captured) == 1 and torch.equal(captured[0], seen[-1])


def test_taylor_expansion_is_taylorseers_own_form() -> None:
    from stepcache.methods.maths import taylor

    xs = [0.0, 2.0, 4.0]
    f = [torch.tensor([x**2]) for x in xs]
    # factors 16, (16-4)/2 = 6, (6-2)/2 = 2 at x = 4: 16 + 6*2 + 2*2^2/2 = 32 (the polynomial: 36)
    assert float(taylor(f, xs, 6.0)) == 32.0 and float(extrapolate(f, xs, 6.0)) == 36.0
    line = [torch.tensor([3.0 * x + 1.0]) for x in xs]
    assert float(taylor(line, xs, 7.0)) == float(extrapolate(line, xs, 7.0)) == 22.0
    # the rules take it; an unknown form is refused by the schema
    rule = TaylorSeer(interval=2, order=2, warmup=3, variable="step", expansion="taylor")
    errors = _drive(rule, 9, [1000.0 - 100 * s for s in range(9)], lambda s, t: torch.full((1, 2), float(s)))
    assert max(errors) < 1e-5  # exact on a line
    with pytest.raises(PolicyError, match="expansion"):
        presets.get("taylorseer", expansion="newton")


@pytest.mark.parametrize("method", ["fbcache", "dbcache"])
def test_a_calibrated_threshold_is_the_largest_that_keeps_the_fidelity_floor(method, digits_pipe):
    from stepcache.bench.harness import make_batch
    from stepcache.methods.threshold import GRID, SAFE_PSNR_DB, threshold_fit
    from stepcache.metrics import capped_psnr_per_image

    batch = make_batch(digits_pipe, "digits-dit", 8, None, [0, 1, 2, 3])
    runs = []

    def run():
        runs.append(1)
        return batch.generate(digits_pipe)

    params = presets.get(method).rules["block"].params
    chosen = threshold_fit(method)(digits_pipe, run, params)
    assert chosen in GRID and len(runs) <= 2 + int(np.ceil(np.log2(len(GRID))))  # bisection, not a sweep
    reference = batch.generate(digits_pipe)

    def psnr(threshold: float) -> tuple[float, bool]:
        handle = stepcache.enable(digits_pipe, presets.get(method, threshold=threshold))
        try:
            images = batch.generate(digits_pipe)
            skipped = handle.stats()["actions"].count("C") < len(handle.stats()["actions"])
        finally:
            stepcache.disable(digits_pipe)
        return float(capped_psnr_per_image(images, reference).mean()), skipped

    kept, _ = psnr(chosen)
    assert kept >= SAFE_PSNR_DB
    if chosen != GRID[-1]:
        above, skipped = psnr(GRID[GRID.index(chosen) + 1])
        assert above < SAFE_PSNR_DB and skipped
