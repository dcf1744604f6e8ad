"""Guidance-level methods: which unconditional rows run, what stands in for the others."""

import pytest
import torch

import stepcache
from stepcache import presets
from stepcache.errors import PolicyError

GUIDANCE = ["adaptive-guidance", "guidance-interval", "cfg-cache", "linear-ag"]
NULL = 10  # digits-dit's null label


def _rows_seen(module):
    """Batch sizes the module really ran on, one entry per call."""
    seen = []
    module.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    return seen


def _cfg_loop(model, labels, seeds, steps=12, g=3.0, capture=None):
    """Batched-CFG Euler loop on the bare digits model (unconditional rows last)."""
    x = torch.cat([torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    n = len(labels)
    lab = torch.tensor(list(labels) + [NULL] * n)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2 * n,), float(sigmas[i] * 1000))
            out = model(torch.cat([x, x]), timestep=t, class_labels=lab).sample
            if capture is not None:
                capture.append(out.clone())
            cond, uncond = out[:n], out[n:]
            x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + g * (cond - uncond))
    return x


def _run_pipe(pipe, labels=(3, 5), steps=20, seed=0):
    return pipe(
        class_labels=list(labels),
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


@pytest.mark.parametrize("name", GUIDANCE)
def test_each_guidance_preset_skips_unconditional_passes_on_digits(digits_pipe, name):
    block = digits_pipe.transformer.transformer_blocks[-1]
    seen = _rows_seen(block)
    policy = (
        presets.get(name, threshold=0.9, max_gap=1e9) if name == "adaptive-guidance" else presets.get(name)
    )
    handle = stepcache.enable(digits_pipe, policy)
    try:
        images = _run_pipe(digits_pipe)
    finally:
        stepcache.disable(digits_pipe)
        block._forward_hooks.clear()
    stats = handle.stats()
    assert stats["steps"] == 20 and stats["estimated"] == 0
    assert 0 < stats["cfg_skipped"] < 2 * 20
    # The network ran on 2 fewer rows (two samples) exactly where the stats say "G".
    assert sum(seen) == 4 * 20 - stats["cfg_skipped"]
    assert [a == "G" for a in stats["actions"]] == [rows < 4 for rows in seen]
    assert stats["actions"][0] == "C"
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1


def test_adaptive_guidance_hands_back_the_conditional_output_for_skipped_rows(digits_pipe):
    model = digits_pipe.transformer
    seen = _rows_seen(model.transformer_blocks[-1])
    outs = []
    handle = stepcache.enable(model, presets.get("adaptive-guidance", threshold=-1.0, warmup=1, max_gap=1e9))
    with handle.generation(num_steps=8, cfg="uncond_last"):
        _cfg_loop(model, [2, 7], [1, 2], steps=8, capture=outs)
    stepcache.disable(model)
    model.transformer_blocks[-1]._forward_hooks.clear()
    # Step 0 runs guidance and sees similarity > -1 for both samples; from step 1 on only the
    # conditional rows run and the unconditional rows equal them (guided output = conditional).
    assert seen == [4] + [2] * 7
    assert handle.stats()["cfg_skipped"] == 2 * 7
    assert not torch.equal(outs[0][:2], outs[0][2:])
    for out in outs[1:]:
        assert torch.equal(out[:2], out[2:])


def test_adaptive_guidance_keeps_guidance_while_cond_and_uncond_differ_in_size(digits_pipe):
    model = digits_pipe.transformer
    skipped = {}
    for gap in (1e9, 0.5, 0.0):
        # the cosine gate always passes (threshold -1): only the size gate can hold guidance on
        handle = stepcache.enable(
            model, presets.get("adaptive-guidance", threshold=-1.0, warmup=1, max_gap=gap)
        )
        with handle.generation(num_steps=8, cfg="uncond_last"):
            _cfg_loop(model, [2, 7], [1, 2], steps=8)
        skipped[gap] = handle.stats()["cfg_skipped"]
    stepcache.disable(model)
    assert skipped[1e9] == 2 * 7  # the paper's rule: both samples stop after step 0
    assert skipped[0.0] == 0  # no pair's |c - u| / |c| is below 0
    assert skipped[0.0] <= skipped[0.5] <= skipped[1e9]


def test_guidance_that_never_skips_is_bit_exact(digits_pipe):
    reference = _run_pipe(digits_pipe)
    for policy in [
        presets.get("adaptive-guidance", threshold=1.0),  # cosine never exceeds 1
        presets.get("guidance-interval", start=0.0, end=1.0),
        presets.get("cfg-cache", interval=1),
    ]:
        handle = stepcache.enable(digits_pipe, policy)
        try:
            out = _run_pipe(digits_pipe)
        finally:
            stepcache.disable(digits_pipe)
        assert handle.stats()["cfg_skipped"] == 0
        assert (out == reference).all(), policy.rules["guidance"].method


def test_guidance_interval_follows_the_schedule(digits_pipe):
    handle = stepcache.enable(digits_pipe, presets.get("guidance-interval", start=0.25, end=0.75))
    _run_pipe(digits_pipe, steps=20)
    stepcache.disable(digits_pipe)
    assert "".join(handle.stats()["actions"]) == "G" * 5 + "C" * 10 + "G" * 5


def test_cfg_cache_adds_the_cached_difference(digits_pipe):
    model = digits_pipe.transformer
    outs = []
    handle = stepcache.enable(model, presets.get("cfg-cache", interval=2, warmup=1))
    with handle.generation(num_steps=6, cfg="uncond_last"):
        _cfg_loop(model, [4], [3], steps=6, capture=outs)
    stepcache.disable(model)
    assert "".join(handle.stats()["actions"]) == "CCGCGC"
    # A skipped step's unconditional row is its conditional row minus the last computed c - u.
    delta = outs[1][:1] - outs[1][1:]
    torch.testing.assert_close(outs[2][1:], outs[2][:1] - delta)


def test_cfg_cache_refreshes_a_sample_that_drifted(digits_pipe):
    model = digits_pipe.transformer
    patterns = []
    for drift in [None, 0.0]:
        handle = stepcache.enable(model, presets.get("cfg-cache", interval=100, warmup=1, max_drift=drift))
        with handle.generation(num_steps=6, cfg="uncond_last"):
            _cfg_loop(model, [4], [3], steps=6)
        patterns.append("".join(handle.stats()["actions"]))
    stepcache.disable(model)
    # Steps 0 and 1 are warm-up and the first scheduled refresh. Without a drift limit the cache
    # serves the rest; with limit 0 any drift marks the sample stale on the step that used the
    # cache, so it refreshes on the next.
    assert patterns == ["CCGGGG", "CCGCGC"]


def test_guidance_batch_equals_singles(digits_pipe):
    model = digits_pipe.transformer
    labels, seeds = [0, 1, 7, 8], [10, 11, 12, 13]
    policy = presets.get("adaptive-guidance", threshold=0.94, warmup=1, max_gap=1e9)
    handle = stepcache.enable(model, policy)
    with handle.generation(num_steps=12, cfg="uncond_last"):
        batch = _cfg_loop(model, labels, seeds)
    skipped = ["".join(step[4 + i] for step in handle.stats()["row_actions"]) for i in range(4)]
    singles, single_rows = [], []
    for lab, seed in zip(labels, seeds, strict=True):
        with handle.generation(num_steps=12, cfg="uncond_last"):
            singles.append(_cfg_loop(model, [lab], [seed]))
        single_rows.append("".join(step[1] for step in handle.stats()["row_actions"]))
    stepcache.disable(model)
    assert skipped == single_rows
    assert len(set(skipped)) > 1, "samples should switch guidance off at different steps"
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-4, rtol=1e-4)


def test_taylorseer_and_adaptive_guidance_compose(digits_pipe):
    policy = stepcache.compose(
        presets.get("taylorseer"), presets.get("adaptive-guidance", threshold=0.9, max_gap=1e9)
    )
    block = digits_pipe.transformer.transformer_blocks[-1]
    seen = _rows_seen(block)
    handle = stepcache.enable(digits_pipe, policy)
    try:
        images = _run_pipe(digits_pipe)
    finally:
        stepcache.disable(digits_pipe)
        block._forward_hooks.clear()
    stats = handle.stats()
    actions = "".join(stats["actions"])
    assert stats["estimated"] > 0 and stats["cfg_skipped"] > 0
    assert set(actions) == {"C", "E", "G"}
    # Estimated steps run nothing; guided steps run the conditional rows only.
    assert seen == [4 if a == "C" else 2 for a in actions if a != "E"]
    assert images.shape == (2, 8, 8, 1) and bool(torch.isfinite(torch.as_tensor(images)).all())


def test_guard_computes_a_non_finite_unconditional_estimate(digits_pipe, monkeypatch):
    from stepcache.methods.guidance.guidance_interval import GuidanceInterval

    monkeypatch.setattr(
        GuidanceInterval, "estimate", lambda self, ctx, state, cond, pairs: cond * float("nan")
    )
    reference = _run_pipe(digits_pipe)
    handle = stepcache.enable(digits_pipe, presets.get("guidance-interval", end=0.5))
    out = _run_pipe(digits_pipe)
    stepcache.disable(digits_pipe)
    stats = handle.stats()
    assert stats["fallbacks"] == 10 and stats["cfg_skipped"] == 0
    # The fallback reruns the unconditional rows on their own: equal up to batch-size rounding.
    assert abs(out - reference).max() < 1e-4


def test_guidance_without_batched_cfg_computes_everything(digits_pipe):
    model = digits_pipe.transformer
    handle = stepcache.enable(model, presets.get("guidance-interval", end=0.1))
    with handle.generation(num_steps=6):  # no cfg layout and no null labels: nothing to skip
        x = torch.randn(2, 1, 8, 8)
        for i in range(6):
            model(x, timestep=torch.full((2,), 1000.0 - 150 * i), class_labels=torch.tensor([1, 2]))
    stepcache.disable(model)
    assert handle.stats()["actions"] == ["C"] * 6


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("guidance-interval", {"start": 0.6, "end": 0.4}, "guidance-interval.end"),
        ("guidance-interval", {"end": 1.5}, "guidance-interval.end"),
        ("adaptive-guidance", {"threshold": "high"}, "adaptive-guidance.threshold"),
        ("cfg-cache", {"interval": 0}, "cfg-cache.interval"),
        ("cfg-cache", {"max_drift": -1.0}, "cfg-cache.max_drift"),
    ],
)
def test_bad_guidance_parameters_name_the_field(name, overrides, field):
    with pytest.raises(PolicyError, match=field.replace(".", r"\.")):
        presets.get(name, **overrides)


def test_two_guidance_rules_do_not_compose():
    with pytest.raises(PolicyError, match=r"rules\.guidance"):
        stepcache.compose(presets.get("cfg-cache"), presets.get("adaptive-guidance"))


def test_linear_ag_fit_recovers_known_coefficients():
    from stepcache.methods.guidance.linear_ag import fit_coefficients as fit_linear_ag

    g = torch.Generator().manual_seed(0)
    truth = {1: (0.7, -0.4, 0.9), 2: (1.2, -1.0, 0.5)}
    c = [torch.randn(3, 1, 4, 4, generator=g) for _ in range(3)]
    u = [torch.randn(3, 1, 4, 4, generator=g)]
    for i in (1, 2):
        a, b, gg = truth[i]
        u.append(a * c[i] + b * c[i - 1] + gg * u[i - 1])
    # Two calls per step (e.g. two batches) are pooled.
    pairs = {i: [(c[i][:2], u[i][:2]), (c[i][2:], u[i][2:])] for i in range(3)}
    coeffs = fit_linear_ag(pairs)
    assert coeffs[:3] == [1.0, -1.0, 1.0]  # step 0 has no past
    for i in (1, 2):
        assert coeffs[3 * i : 3 * i + 3] == pytest.approx(truth[i], abs=1e-5)


def test_linear_ag_estimate_uses_its_coefficients(digits_pipe):
    model = digits_pipe.transformer
    coeffs = [1.0, -1.0, 1.0] + [0.5, -0.25, 0.75] * 5
    outs = []
    handle = stepcache.enable(model, presets.get("linear-ag", coefficients=coeffs, end=1.0, warmup=2))
    with handle.generation(num_steps=6, cfg="uncond_last"):
        _cfg_loop(model, [6], [5], steps=6, capture=outs)
    stepcache.disable(model)
    assert "".join(handle.stats()["actions"]) == "CCCGCG"
    for i in (3, 5):
        want = 0.5 * outs[i][:1] - 0.25 * outs[i - 1][:1] + 0.75 * outs[i - 1][1:]
        torch.testing.assert_close(outs[i][1:], want)


def test_linear_ag_coefficients_come_in_threes():
    with pytest.raises(PolicyError, match=r"linear-ag\.coefficients: needs 3 numbers per step"):
        presets.get("linear-ag", coefficients=[1.0, 2.0])


def test_calibrated_magcache_ratios_have_one_per_step(digits_pipe):
    from stepcache.calibration import calibrate

    def run():
        digits_pipe(class_labels=[1, 2], num_inference_steps=7, generator=torch.Generator().manual_seed(0))

    pol = calibrate("magcache", digits_pipe, run)
    ratios = pol.rules["step"].params["ratios"]
    assert len(ratios) == 7 and ratios[0] == 1.0 and all(0.2 < r < 5 for r in ratios)
    with pytest.raises(ValueError, match="nothing to fit"):
        calibrate("static-interval", digits_pipe, run)
    with pytest.raises(ValueError, match=r"^run: returned nothing"):  # a threshold fit needs images
        calibrate("fbcache", digits_pipe, run)


def test_guidance_on_the_zoo_unet_pipeline_finds_its_unconditional_half():
    """The zoo's class pipeline puts the null label last around a U-Net too (diffusers' U-Net
    pipelines put it first): the runtime must take the layout the pipeline declares."""
    import numpy as np

    from stepcache import zoo

    pipe = zoo.load("fmnist-unet")
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    reference = pipe(class_labels=[3, 8], num_inference_steps=6, generator=gens).images
    handle = stepcache.enable(pipe, presets.get("guidance-interval", end=0.5))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = pipe(class_labels=[3, 8], num_inference_steps=6, generator=gens).images
    stepcache.disable(pipe)
    assert "".join(handle.stats()["actions"]) == "CCCGGG"
    assert [r for r in handle.stats()["row_actions"][3:]] == ["CCGG"] * 3  # rows 2, 3 are the null label
    assert not np.array_equal(out, reference) and np.isfinite(out).all()
