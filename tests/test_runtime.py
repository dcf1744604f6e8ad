"""The runtime on every family: off means off, counts match the policy, state never leaks."""

import threading
import warnings

import numpy as np
import pytest
import tiny
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline

import stepcache
from stepcache import UnsupportedModelError, presets
from stepcache.adapters import adapter_for

ALWAYS_COMPUTE = [None, "always-interval-1", "fbcache-threshold-0", "teacache-threshold-0"]


def _policy(kind):
    if kind == "always-interval-1":
        return presets.get("static-interval", interval=1)
    if kind == "fbcache-threshold-0":
        return presets.get("fbcache", threshold=0.0)
    if kind == "teacache-threshold-0":
        return presets.get("teacache", threshold=0.0)
    return None


@pytest.mark.parametrize("family", tiny.CORE)
def test_off_means_off_in_a_bare_loop(family):
    model = tiny.make(family)
    reference = tiny.sample(family, model, batch=2, steps=5)
    kinds = ALWAYS_COMPUTE if family in tiny.TRANSFORMERS else ALWAYS_COMPUTE[:2]
    for kind in kinds:
        handle = stepcache.enable(model, _policy(kind))
        with handle.generation(num_steps=5):
            out = tiny.sample(family, model, batch=2, steps=5)
        assert torch.equal(out, reference), kind
        assert handle.stats()["computed"] == 5
        stepcache.disable(model)
    assert "forward" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(tiny.sample(family, model, batch=2, steps=5), reference)


@pytest.mark.parametrize("family", tiny.TRANSFORMERS)
def test_caching_policies_change_the_output_then_disable_restores_it(family):
    model = tiny.make(family)
    reference = tiny.sample(family, model, steps=6)
    policies = [
        "static-interval",
        presets.get("fbcache", threshold=10.0),
        presets.get("teacache", threshold=10.0),
        presets.get("dbcache", threshold=10.0),
        presets.get("delta-dit", blocks=1, warmup=0),
        presets.get("taylorseer-feature", interval=2, warmup=2),
        presets.get("fora", interval=2),
    ]
    for pol in policies:
        handle = stepcache.enable(model, pol)
        with handle.generation(num_steps=6):
            out = tiny.sample(family, model, steps=6)
        assert not torch.equal(out, reference)
        assert torch.isfinite(out).all()
        stats = handle.stats()
        assert stats["computed"] + stats["estimated"] + stats["partial"] == stats["steps"] == 6
        assert stats["computed"] < 6
    stepcache.disable(model)
    assert torch.equal(tiny.sample(family, model, steps=6), reference)


def _tiny_dit_pipeline():
    vae = tiny.make_vae()
    pipe = DiTPipeline(transformer=tiny.make("dit"), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_dit(pipe, steps=6):
    return pipe(
        class_labels=[1, 2],
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_off_means_off_in_diffusers_pipelines():
    pipe = _tiny_dit_pipeline()
    reference = _run_dit(pipe)
    for kind in ALWAYS_COMPUTE:
        handle = stepcache.enable(pipe, _policy(kind))
        assert np.array_equal(_run_dit(pipe), reference)
        assert handle.stats()["steps"] == 6
        stepcache.disable(pipe)
    assert "progress_bar" not in pipe.__dict__
    assert np.array_equal(_run_dit(pipe), reference)

    unet_pipe = DDPMPipeline(unet=tiny.make("unet"), scheduler=DDPMScheduler(num_train_timesteps=50))
    unet_pipe.set_progress_bar_config(disable=True)

    def run_unet():
        return unet_pipe(
            batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    reference = run_unet()
    handle = stepcache.enable(unet_pipe, presets.get("static-interval", interval=1))
    assert np.array_equal(run_unet(), reference)
    assert handle.stats()["computed"] == 8
    stepcache.enable(unet_pipe, "static-interval")
    assert not np.array_equal(run_unet(), reference)
    stepcache.disable(unet_pipe)
    assert np.array_equal(run_unet(), reference)


def test_pipeline_learns_steps_and_cfg_rows():
    pipe = _tiny_dit_pipeline()
    seen = []

    class Spy(stepcache.runtime.StepRule):
        def plan(self, ctx, state):
            seen.append(
                (ctx.step, ctx.num_steps, ctx.branch, ctx.uncond_rows().tolist(), ctx.timestep_value())
            )
            return True

        def estimate(self, ctx, state, rows):
            raise AssertionError

        def observe(self, ctx, state, output, rows):
            pass

    from stepcache.runtime import RuleSet, attach

    attach(pipe, pipe.transformer, adapter_for(pipe.transformer), RuleSet(step=Spy()), None)
    _run_dit(pipe, steps=4)
    stepcache.disable(pipe)
    assert [s[:3] for s in seen] == [(i, 4, 0) for i in range(4)]
    # DiTPipeline batches [cond, uncond]; the null label marks the unconditional rows.
    assert all(s[3] == [False, False, True, True] for s in seen)
    assert [s[4] for s in seen] == [float(t) for t in pipe.scheduler.timesteps]


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


@pytest.mark.parametrize(("interval", "warmup", "expected"), [(2, 1, 11), (2, 0, 10), (3, 2, 8), (1, 0, 20)])
def test_static_interval_runs_the_computations_the_policy_says(digits_pipe, interval, warmup, expected):
    model = digits_pipe.transformer
    last = _count_calls(model.transformer_blocks[-1])
    handle = stepcache.enable(digits_pipe, presets.get("static-interval", interval=interval, warmup=warmup))
    digits_pipe(
        class_labels=[3],
        num_inference_steps=20,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    model._forward_hooks.clear()
    model.transformer_blocks[-1]._forward_hooks.clear()
    assert len(last) == expected
    assert stats["steps"] == 20
    assert stats["computed"] == expected
    assert stats["estimated"] == 20 - expected
    want = ["C" if (s < warmup or (s - warmup) % interval == 0) else "E" for s in range(20)]
    assert stats["actions"] == want


def test_fbcache_runs_first_block_always_and_rest_only_when_computing(digits_pipe):
    blocks = digits_pipe.transformer.transformer_blocks
    # Skipped blocks are still called by the model's loop (and pass their input through), so
    # count real computations on a sub-module that only the real forward reaches.
    first, last = _count_calls(blocks[0].ff), _count_calls(blocks[-1].ff)
    handle = stepcache.enable(digits_pipe, presets.get("fbcache", threshold=0.5, max_consecutive=2))
    digits_pipe(
        class_labels=[7],
        num_inference_steps=20,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    for b in blocks:
        b.ff._forward_hooks.clear()
    assert len(first) == 20
    assert len(last) == stats["computed"]
    assert 0 < stats["computed"] < 20
    assert stats["partial"] == 20 - stats["computed"]
    run = 0
    for a in stats["actions"]:  # never more than max_consecutive reuses in a row
        run = run + 1 if a == "P" else 0
        assert run <= 2


def test_fbcache_cap_pattern_with_threshold_never_met(digits_pipe):
    handle = stepcache.enable(
        digits_pipe, presets.get("fbcache", threshold=10.0, max_consecutive=2, warmup=2)
    )
    digits_pipe(
        class_labels=[0],
        num_inference_steps=9,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    stepcache.disable(digits_pipe)
    assert "".join(handle.stats()["actions"]) == "CCPPCPPCP"


def _digits_loop(model, labels, seeds, steps=12):
    """Flow-matching Euler loop over the bare digits model; per-sample noise from per-sample seeds."""
    x = torch.cat([torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    labels = torch.tensor(labels)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), float(sigmas[i] * 1000))
            v = model(x, timestep=t, class_labels=labels).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@pytest.mark.parametrize(
    ("preset", "params"),
    [
        ("fbcache", {"threshold": 0.4, "max_consecutive": 3}),
        ("teacache", {"threshold": 0.6}),
        ("dbcache", {"threshold": 0.4, "forecast": 1}),
        ("magcache", {"threshold": 0.06, "max_consecutive": 3, "warmup": 1}),
    ],
)
def test_batch_equals_singles_for_per_sample_decisions(digits_pipe, preset, params):
    model = digits_pipe.transformer
    labels, seeds = [0, 1, 7, 8], [10, 11, 12, 13]
    handle = stepcache.enable(model, presets.get(preset, **params))
    with handle.generation(num_steps=12):
        batch = _digits_loop(model, labels, seeds)
    batch_rows = handle.stats()["row_actions"]
    singles, single_rows = [], []
    for lab, seed in zip(labels, seeds, strict=True):
        with handle.generation(num_steps=12):
            singles.append(_digits_loop(model, [lab], [seed]))
        single_rows.append("".join(r for r in handle.stats()["row_actions"]))
    stepcache.disable(model)
    per_row = ["".join(step[i] for step in batch_rows) for i in range(4)]
    assert per_row == single_rows
    assert len(set(per_row)) > 1, "rows should decide differently for this test to mean something"
    # Different batch sizes take different matmul paths: equal to float32 rounding, not bit-exact.
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-4, rtol=1e-4)


def test_two_pipelines_with_different_policies_share_no_state():
    from stepcache import zoo

    a, b = zoo.load("digits-dit"), zoo.load("digits-dit")

    def run(pipe, seed):
        return pipe(
            class_labels=[1, 5], num_inference_steps=10, generator=torch.Generator().manual_seed(seed)
        ).images

    stepcache.enable(a, "fbcache")
    stepcache.enable(b, "static-interval")
    alone_a, alone_b = run(a, 0), run(b, 1)
    # Interleave the two pipelines' steps by running them in two threads, repeatedly.
    results = {}

    def worker(name, pipe, seed):
        results[name] = [run(pipe, seed) for _ in range(3)]

    threads = [
        threading.Thread(target=worker, args=("a", a, 0)),
        threading.Thread(target=worker, args=("b", b, 1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, alone_a) for r in results["a"])
    assert all(np.array_equal(r, alone_b) for r in results["b"])
    assert not np.array_equal(alone_a, run(b, 0))


class Boom(RuntimeError):
    pass


def test_generation_that_raises_leaves_no_state(digits_pipe):
    def run():
        return digits_pipe(
            class_labels=[2, 4], num_inference_steps=10, generator=torch.Generator().manual_seed(3)
        ).images

    handle = stepcache.enable(digits_pipe, "fbcache")
    expected = run()
    expected_stats = handle.stats()

    # 1. raised inside the denoiser (a block fails at step 4)
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == 4:
            raise Boom("block failed")

    hook = digits_pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail)
    with pytest.raises(Boom):
        run()
    hook.remove()
    assert handle._current() is None
    assert np.array_equal(run(), expected)
    assert handle.stats() == expected_stats

    # 2. raised between steps, outside the denoiser (the scheduler, a KeyboardInterrupt)
    original_step = digits_pipe.scheduler.step
    count = []

    def step(*a, **k):
        count.append(1)
        if len(count) == 3:
            raise KeyboardInterrupt
        return original_step(*a, **k)

    digits_pipe.scheduler.step = step
    with pytest.raises(KeyboardInterrupt):
        run()
    del digits_pipe.scheduler.step
    assert handle._current() is None
    assert np.array_equal(run(), expected)

    # 3. raised inside a bare-loop generation
    model = digits_pipe.transformer
    stepcache.disable(digits_pipe)
    handle = stepcache.enable(model, "fbcache")
    reference = None
    with handle.generation(num_steps=12):
        reference = _digits_loop(model, [3], [5])
    with pytest.raises(Boom), handle.generation(num_steps=12):
        _digits_loop(model, [3], [5], steps=6)
        raise Boom
    assert handle._current() is None
    with handle.generation(num_steps=12):
        assert torch.equal(_digits_loop(model, [3], [5]), reference)
    stepcache.disable(model)


def test_calls_outside_a_generation_compute_in_full_and_warn_once(digits_pipe):
    model = digits_pipe.transformer
    reference = _digits_loop(model, [1], [0], steps=4)
    stepcache.enable(model, presets.get("static-interval", interval=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _digits_loop(model, [1], [0], steps=4)
        _digits_loop(model, [1], [0], steps=4)
    stepcache.disable(model)
    assert torch.equal(out, reference)
    assert sum("outside a generation" in str(w.message) for w in caught) == 1


def test_guard_replaces_a_non_finite_estimate(digits_pipe, monkeypatch):
    from stepcache.methods.step.static_interval import StaticInterval

    reference = digits_pipe(
        class_labels=[6], num_inference_steps=8, generator=torch.Generator().manual_seed(0)
    ).images
    monkeypatch.setattr(
        StaticInterval, "estimate", lambda self, ctx, state, rows: torch.full_like(state["out"], float("nan"))
    )
    handle = stepcache.enable(digits_pipe, "static-interval")
    out = digits_pipe(
        class_labels=[6], num_inference_steps=8, generator=torch.Generator().manual_seed(0)
    ).images
    stepcache.disable(digits_pipe)
    stats = handle.stats()
    assert stats["fallbacks"] == 3  # steps 2, 4, 6 would have been estimated
    assert stats["computed"] == 8
    assert np.array_equal(out, reference)


def test_enable_again_replaces_the_policy(digits_pipe):
    first = stepcache.enable(digits_pipe, "fbcache")
    second = stepcache.enable(digits_pipe, "static-interval")
    assert not first.active and second.active
    digits_pipe(class_labels=[1], num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    assert second.stats()["actions"] == ["C", "C", "E", "C", "E", "C"]
    stepcache.disable(digits_pipe)
    stepcache.disable(digits_pipe)  # disabling twice is a no-op
    assert not second.active


def test_unsupported_models_name_the_supported_families():
    for obj in (object(), "a string"):
        with pytest.raises(UnsupportedModelError, match="block-level support: DiT") as e:
            stepcache.enable(obj, "fbcache")
        assert isinstance(e.value, TypeError)
    for model in (torch.nn.Linear(2, 2), tiny.make("unet")):  # step rules yes, this block rule no
        with pytest.raises(UnsupportedModelError, match="linear block stack"):
            stepcache.enable(model, "fbcache")


def test_generation_arguments_are_checked(digits_pipe):
    handle = stepcache.enable(digits_pipe.transformer, "fbcache")
    for kwargs in ({"num_steps": 0}, {"calls_per_step": 0}, {"cfg": "middle"}, {"num_steps": "20"}):
        with pytest.raises(ValueError), handle.generation(**kwargs):
            pass
    stepcache.disable(digits_pipe.transformer)


def test_separate_cfg_calls_keep_separate_caches(digits_pipe):
    """Pipelines such as Wan run cond and uncond as two calls per step; each branch has its own cache."""
    model = digits_pipe.transformer
    handle = stepcache.enable(model, "static-interval")
    seen = []
    with handle.generation(num_steps=4, calls_per_step=2):
        x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        for i in range(4):
            t = torch.full((1,), 1000.0 * (1 - i / 4))
            cond = model(x, timestep=t, class_labels=torch.tensor([3])).sample
            uncond = model(x, timestep=t, class_labels=torch.tensor([10])).sample
            seen.append((cond, uncond))
    stepcache.disable(model)
    assert handle.stats()["actions"] == ["C", "C", "C", "C", "E", "E", "C", "C"]
    assert torch.equal(seen[2][0], seen[1][0]) and torch.equal(seen[2][1], seen[1][1])
    assert not torch.equal(seen[2][0], seen[2][1])


class FirstRowOnly(stepcache.runtime.StepRule):
    """Row 0 computes every step; the other rows only at step 0 and then reuse their output."""

    def plan(self, ctx, state):
        if ctx.step == 0:
            return True
        return torch.arange(ctx.batch) == 0

    def estimate(self, ctx, state, rows):
        return stepcache.runtime.take(state["out"], rows).clone()

    def observe(self, ctx, state, output, rows):
        state["out"] = stepcache.runtime.put(state.get("out"), rows, output, ctx.batch)


def test_per_row_step_decisions_gather_run_and_scatter(digits_pipe):
    from stepcache.runtime import RuleSet, attach

    model = digits_pipe.transformer
    handle = attach(model, model, adapter_for(model), RuleSet(step=FirstRowOnly()), None)
    with handle.generation(num_steps=6):
        both = _digits_loop(model, [2, 9], [0, 1], steps=6)
    stats = handle.stats()
    stepcache.disable(model)
    assert stats["row_actions"] == ["CC"] + ["CE"] * 5
    assert stats["actions"] == ["C"] + ["P"] * 5
    assert stats["partial"] == 5 and stats["computed"] == 1
    full_row0 = _digits_loop(model, [2], [0], steps=6)
    stepcache.enable(model, presets.get("static-interval", interval=1000, warmup=0))
    with stepcache.runtime.handle_of(model).generation(num_steps=6):
        reuse_row1 = _digits_loop(model, [9], [1], steps=6)
    stepcache.disable(model)
    torch.testing.assert_close(both[0:1], full_row0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:2], reuse_row1, atol=1e-5, rtol=1e-5)


def test_step_and_block_rules_compose(digits_pipe):
    pol = stepcache.compose(
        presets.get("static-interval"), presets.get("fbcache", threshold=0.5, max_consecutive=1)
    )
    handle = stepcache.enable(digits_pipe, pol)
    images = digits_pipe(
        class_labels=[4, 5], num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    ).images
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    assert np.isfinite(images).all()
    assert stats["actions"][0] == "C"
    # static-interval estimates steps 2, 4, 6, 8; fbcache decides inside the computed ones.
    assert [stats["actions"][i] for i in (2, 4, 6, 8)] == ["E"] * 4
    assert "P" in [stats["actions"][i] for i in (3, 5, 7, 9)]
    assert stats["computed"] + stats["estimated"] + stats["partial"] == 10


def test_guard_replaces_a_non_finite_block_estimate(digits_pipe, monkeypatch):
    from stepcache.methods.block.fbcache import FBCache

    def run():
        return digits_pipe(
            class_labels=[6, 2], num_inference_steps=8, generator=torch.Generator().manual_seed(0)
        ).images

    reference = run()
    pol = presets.get("fbcache", threshold=10.0)
    handle = stepcache.enable(digits_pipe, pol)
    assert not np.array_equal(run(), reference)  # without the injected fault it does skip
    monkeypatch.setattr(
        FBCache,
        "estimate",
        lambda self, ctx, state, rows: tuple(torch.full_like(r, float("inf")) for r in state["residual"]),
    )
    out = run()
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    assert stats["fallbacks"] > 0
    assert stats["computed"] == 8
    assert np.array_equal(out, reference)


def test_guard_recomputes_only_the_rows_whose_block_estimate_is_bad(digits_pipe, monkeypatch):
    from stepcache.methods.block.fbcache import FBCache

    honest = FBCache.estimate

    def poisoned(self, ctx, state, rows):  # batch row 0's estimate is infinite, the others fine
        streams = honest(self, ctx, state, rows)
        local = torch.arange(ctx.batch) if rows is None else rows
        bad = (local == 0).reshape(-1, *[1] * (streams[0].dim() - 1))
        return tuple(torch.where(bad, float("inf"), s) for s in streams)

    monkeypatch.setattr(FBCache, "estimate", poisoned)
    handle = stepcache.enable(digits_pipe, presets.get("fbcache", threshold=10.0))
    out = digits_pipe(class_labels=[6, 2], num_inference_steps=8, generator=torch.Generator().manual_seed(0))
    stats = handle.stats()
    stepcache.disable(digits_pipe)
    per_row = ["".join(step[r] for step in stats["row_actions"]) for r in range(4)]  # 2 samples x CFG
    assert np.isfinite(out.images).all()
    assert "P" not in per_row[0] and all("P" in r for r in per_row[1:])  # only row 0 fell back
    assert stats["fallbacks"] == per_row[1].count("P")  # once per call where row 0 wanted to skip


def test_model_that_itself_gives_nan_is_left_alone_and_named(digits_pipe):
    calls = {"n": 0}

    def poison(module, args, output):  # the network's own output turns NaN at step 3
        calls["n"] += 1
        return torch.full_like(output, float("nan")) if calls["n"] == 4 else output

    hook = digits_pipe.transformer.proj_out_2.register_forward_hook(poison)
    handle = stepcache.enable(digits_pipe, stepcache.presets.get("static-interval", interval=1))
    try:
        with pytest.warns(RuntimeWarning, match="not finite at step 3"):
            out = digits_pipe(
                class_labels=[3], num_inference_steps=6, generator=torch.Generator().manual_seed(0)
            ).images
    finally:
        hook.remove()
        stepcache.disable(digits_pipe)
    assert np.isnan(out).all()  # not masked: the model's own failure shows
    assert handle.stats()["fallbacks"] == 0


def test_no_state_survives_a_change_of_steps_batch_guidance_or_scheduler(digits_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    original = digits_pipe.scheduler
    shifted = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=3.0)
    runs = [
        ({"class_labels": [1, 2], "num_inference_steps": 8, "guidance_scale": 2.0}, original),
        ({"class_labels": [3, 4, 5], "num_inference_steps": 6, "guidance_scale": 2.0}, original),
        ({"class_labels": [1, 2], "num_inference_steps": 8, "guidance_scale": 4.0}, original),
        ({"class_labels": [1, 2], "num_inference_steps": 8, "guidance_scale": 2.0}, shifted),
        ({"class_labels": [7], "num_inference_steps": 5, "guidance_scale": 1.0}, original),
    ]
    policy = stepcache.compose(
        stepcache.presets.get("fbcache", threshold=0.2), stepcache.presets.get("cfg-cache")
    )

    def generate(kwargs, scheduler):
        digits_pipe.scheduler = scheduler
        return digits_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    try:
        alone = []
        for kwargs, scheduler in runs:  # each on a freshly enabled policy
            stepcache.enable(digits_pipe, policy)
            alone.append(generate(kwargs, scheduler))
            stepcache.disable(digits_pipe)
        stepcache.enable(digits_pipe, policy)  # now one after the other on one handle, twice over
        for _ in range(2):
            for (kwargs, scheduler), expected in zip(runs, alone, strict=True):
                assert np.array_equal(generate(kwargs, scheduler), expected)
    finally:
        stepcache.disable(digits_pipe)
        digits_pipe.scheduler = original


def test_no_state_survives_a_change_of_resolution():
    import tiny

    model = tiny.make("unet")

    @torch.no_grad()
    def generate(size: int) -> torch.Tensor:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with handle.generation(num_steps=6):
            for i in range(6):
                x = x - model(x, timestep=torch.full((2,), 1000.0 * (1 - i / 6))).sample / 6
        return x

    policy = stepcache.presets.get("deepcache", interval=3)
    handle = stepcache.enable(model, policy)
    alone = {size: generate(size) for size in (16,)}
    stepcache.disable(model)
    handle = stepcache.enable(model, policy)
    generate(8)  # a generation at another resolution first: its deep features must not leak
    assert torch.equal(generate(16), alone[16])
    assert handle.stats()["actions"] == ["C", "C", "P", "P", "C", "P"]  # the cache really worked
    stepcache.disable(model)


@pytest.mark.parametrize(
    ("preset", "params"),
    [
        ("fbcache", {"threshold": 0.4, "max_consecutive": 3}),
        ("teacache", {"threshold": 0.3}),
        ("magcache", {"threshold": 0.06, "max_consecutive": 3, "warmup": 1}),
    ],
)
def test_the_two_cfg_rows_of_a_sample_take_one_decision(digits_pipe, preset, params):
    # A split pair (one row fresh, the other stale) scales the stale row's error by the guidance.
    handle = stepcache.enable(digits_pipe, presets.get(preset, **params))
    digits_pipe(
        class_labels=[0, 1, 7, 8],
        num_inference_steps=12,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12, 13)],
    )
    stepcache.disable(digits_pipe)
    rows = ["".join(step[i] for step in handle.stats()["row_actions"]) for i in range(8)]
    assert rows[:4] == rows[4:]  # the zoo pipeline batches [cond, uncond]: row k pairs with row k + 4
    assert len(set(rows)) > 1, "samples should decide differently for this test to mean something"
