"""bench.peers on digits-dit: every diffusers hook runs (or says why not), skips work, resets between
generations and detaches to bit-identical output; cache-dit is optional and reports its install hint."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from stepcache import zoo
from stepcache.bench.peers import METHODS, PEERS, Knob, PeerRun, Unavailable, peer_methods, peer_runs

# FasterCache's frequency split calls torch.meshgrid without indexing=
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")

N = 4  # samples per generation
# the loosest setting of each method, where skipping must show
LOOSE_BLOCK_SKIP = {"FirstBlockCache": 0.4, "MagCache": 0.24, "SeaCache": 1.0}
LOOSE_ATTENTION_SKIP = {"TaylorSeerCache": 2, "PyramidAttentionBroadcast": 2, "FasterCache": 2}

DIFFUSERS_NAMES = [r.name for r in peer_runs(zoo.load("digits-dit"), ["diffusers"])]


@pytest.fixture(scope="module")
def pipe():
    return zoo.load("digits-dit")  # its own copy: the session's digits_pipe stays untouched


def generate(pipe) -> np.ndarray:
    gens = [torch.Generator().manual_seed(s) for s in range(N)]
    out = pipe(
        class_labels=list(range(N)),
        num_inference_steps=pipe.default_steps,
        guidance_scale=pipe.default_guidance,
        generator=gens,
    )
    return np.asarray(out.images)


class Counter:
    """Calls that really computed: the last block's feed-forward, and every attention's query."""

    def __init__(self, pipe):
        blocks = pipe.transformer.transformer_blocks
        self.last = self.attn = 0
        self.handles = [blocks[-1].ff.register_forward_hook(self._last)]
        self.handles += [b.attn1.to_q.register_forward_hook(self._attn) for b in blocks]

    def _last(self, *_):
        self.last += 1

    def _attn(self, *_):
        self.attn += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def reference(pipe):
    with Counter(pipe) as c:
        images = generate(pipe)
    return images, c.attn


def by_name(pipe, peer: str, name: str) -> PeerRun | Unavailable:
    return next(r for r in peer_runs(pipe, [peer]) if r.name == name)


def two_generations(pipe, run: PeerRun) -> tuple[Counter, np.ndarray, np.ndarray]:
    """Attach ``run``, generate twice (counting calls in the first), detach whatever happens."""
    run.attach(pipe)
    try:
        with Counter(pipe) as c, run.generation(pipe):
            first = generate(pipe)
        with run.generation(pipe):
            second = generate(pipe)
    finally:
        run.detach(pipe)
    return c, first, second


def test_unknown_peer_is_an_error(pipe):
    with pytest.raises(ValueError, match=r"'nope'.*cache-dit, diffusers"):
        peer_runs(pipe, ["diffusers", "nope"])
    assert PEERS == ("cache-dit", "diffusers")
    assert peer_runs(pipe, []) == []


def test_one_method_of_a_peer_can_be_named():
    def labels(peers):
        return [m.label for m in peer_methods(peers)]

    assert labels(["diffusers:FasterCache"]) == ["diffusers FasterCache"]
    both = labels(["diffusers:FasterCache", "diffusers:MagCache"])  # in the peer's own order
    assert both == [m for m in labels(["diffusers"]) if m in ("diffusers MagCache", "diffusers FasterCache")]
    assert len(both) == 2
    assert labels(["diffusers:MagCache", "diffusers"]) == labels(["diffusers"])  # the whole peer wins
    with pytest.raises(ValueError, match=r"diffusers has no method 'Nope'; its methods: FirstBlockCache"):
        peer_methods(["diffusers:Nope"])
    with pytest.raises(ValueError, match=r"'nope:MagCache'"):
        peer_methods(["nope:MagCache"])


def test_compare_refuses_an_unknown_peer_method_before_loading_the_model(tmp_path):
    from stepcache.bench.compare import compare

    with pytest.raises(ValueError, match=r"peers: diffusers has no method 'Nope'"):
        compare("digits-dit", tmp_path / "out", peers=["diffusers:Nope"])
    assert not (tmp_path / "out").exists()


def test_faster_cache_splits_sd3s_pooled_embedding_with_the_batch():
    """SD3 takes a pooled text embedding per batch row: FasterCache must halve it with the other
    CFG inputs when it skips the unconditional half, or the batches disagree (16 vs 32 rows)."""
    shapes = zoo.load("shapes-dit")
    (run,) = [r for r in peer_runs(shapes, "diffusers:FasterCache") if r.params.get("peer_default")]
    assert "pooled_projections" in run.params["_unconditional_conditional_input_kwargs_identifiers"]
    prompts = ["a red circle", "a blue square on the left of a green circle"]

    def draw():
        gen = torch.Generator().manual_seed(0)
        return shapes(prompt=prompts, num_inference_steps=10, generator=gen).images

    full = draw()
    run.attach(shapes)
    try:
        with run.generation(shapes):
            fast = draw()
    finally:
        run.detach(shapes)
    assert fast.shape == full.shape and np.isfinite(fast).all()
    assert not np.array_equal(fast, full)  # it skipped work
    np.testing.assert_array_equal(draw(), full)  # and left nothing behind
    digits = peer_runs(zoo.load("digits-dit"), "diffusers:FasterCache")[0]
    assert "pooled_projections" not in digits.params["_unconditional_conditional_input_kwargs_identifiers"]


def test_settings_are_named_uniquely_and_serialisable(pipe):
    runs = peer_runs(pipe, list(PEERS))
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert {r.peer for r in runs} == set(PEERS)
    for r in runs:
        if isinstance(r, PeerRun):
            json.dumps(r.params)
            assert r.params["method"] in r.name
    defaults = [r.name for r in runs if isinstance(r, PeerRun) and r.params.get("peer_default")]
    assert "diffusers FirstBlockCache threshold=0.05" in defaults


@pytest.mark.parametrize("name", DIFFUSERS_NAMES)
def test_diffusers_run(pipe, reference, name):
    ref, ref_attn = reference
    run = by_name(pipe, "diffusers", name)
    if isinstance(run, Unavailable):
        assert run.reason.strip()
        return
    method = run.params["method"]
    c, first, second = two_generations(pipe, run)
    after = generate(pipe)

    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)  # each generation starts from a fresh state
    np.testing.assert_array_equal(after, ref)  # detach leaves nothing behind
    assert c.last <= pipe.default_steps and c.attn <= ref_attn
    if method in LOOSE_BLOCK_SKIP and run.params["threshold"] == LOOSE_BLOCK_SKIP[method]:
        assert c.last < pipe.default_steps
    knob = run.params.get("cache_interval", run.params.get("spatial_attention_block_skip_range"))
    if method in LOOSE_ATTENTION_SKIP and knob == LOOSE_ATTENTION_SKIP[method]:
        assert c.attn < ref_attn


def test_attach_is_exclusive_and_generation_needs_it(pipe, reference):
    fbc, pab = (by_name(pipe, "diffusers", n) for n in DIFFUSERS_NAMES[:1] + DIFFUSERS_NAMES[-1:])
    with pytest.raises(RuntimeError, match="attach"):
        with fbc.generation(pipe):
            pass
    fbc.attach(pipe)
    try:
        with pytest.raises(RuntimeError, match="attached"):
            pab.attach(pipe)
        with pytest.raises(RuntimeError, match="already attached"):
            fbc.attach(pipe)
    finally:
        fbc.detach(pipe)
    fbc.detach(pipe)  # a second detach is a no-op
    np.testing.assert_array_equal(generate(pipe), reference[0])


def test_cache_dit_missing_reports_install_hint(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit -> ImportError
    runs = peer_runs(pipe, ["cache-dit"])
    assert runs
    for r in runs:
        assert isinstance(r, Unavailable) and r.peer == "cache-dit"
        assert "stepcache[peers]" in r.reason


def test_cache_dit_dbcache_runs_and_skips(pipe, reference):
    pytest.importorskip("cache_dit")
    ref, _ = reference
    keys_before = set(pipe.transformer.state_dict())
    run = by_name(pipe, "cache-dit", "cache-dit DBCache F1B0 rdt=0.24")
    assert isinstance(run, PeerRun), getattr(run, "reason", "")
    c, first, second = two_generations(pipe, run)
    assert np.isfinite(first).all()
    assert c.last < pipe.default_steps
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(generate(pipe), ref)
    assert set(pipe.transformer.state_dict()) == keys_before  # cache-dit's DiT patch is undone


def test_cache_dit_detach_restores_the_order_of_flux_block_lists():
    # cache-dit re-adds FLUX's two block lists the other way round; diffusers' FirstBlockCache
    # then took a single-stream block as its head and failed on the next generation.
    pytest.importorskip("cache_dit")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import tiny

    from stepcache.bench.peer_hooks import _CacheDitPeer

    model = tiny.make("flux")
    hidden_arg, x, kw = tiny.inputs("flux", 1)
    order = list(model._modules)
    peer = _CacheDitPeer(
        {
            "Fn_compute_blocks": 1,
            "Bn_compute_blocks": 0,
            "residual_diff_threshold": 1e9,
            "max_warmup_steps": 1,
        }
    )
    peer.attach(model, "cache-dit")
    with torch.no_grad(), peer.generation(model, "cache-dit"):
        for t in (1.0, 0.5):
            model(**{hidden_arg: x}, timestep=torch.full((1,), t), **kw)
    peer.detach(model)
    assert list(model._modules) == order


# ------------------------------------------------------------------------- peers as data, tuned peers


def _built_config(run: PeerRun):
    """The library's config object a run was built with (read back after attach)."""
    impl = run._impl
    return impl._config if hasattr(impl, "_config") else impl._configs()["cache_config"]


@pytest.mark.parametrize("method", [m for m in METHODS if m.peer == "diffusers"], ids=lambda m: m.method)
def test_recorded_parameters_are_the_built_configuration(pipe, method):
    config = method.documented(pipe)
    run = method.run(pipe, config)
    assert {k: v for k, v in run.params.items() if k not in ("method", "diffusers")} == config
    run.attach(pipe)
    try:
        built = _built_config(run)
        for key, value in config.items():
            if hasattr(built, key) and not callable(getattr(built, key)):
                got = getattr(built, key)
                got = str(got).removeprefix("torch.") if isinstance(got, torch.dtype) else got
                assert list(got) == value if isinstance(got, tuple) else got == value, key
    finally:
        run.detach(pipe)


def test_cache_dit_recorded_parameters_are_the_built_configuration(pipe):
    pytest.importorskip("cache_dit")
    (method,) = peer_methods("cache-dit")
    config = {**method.documented(pipe), "residual_diff_threshold": 0.3, "taylorseer_order": 1}
    run = method.run(pipe, config)
    built = run._impl._configs()
    for key, value in config.items():
        if key != "taylorseer_order":
            assert getattr(built["cache_config"], key) == value, key
    assert built["calibrator_config"].taylorseer_order == 1


def test_knobs_suggest_values_inside_their_space():
    import optuna

    knobs = (
        Knob("t", 0.01, 1.0, log=True),
        Knob("k", 2, 5, integer=True),
        Knob("ids", choices=(["a"], [1, 2])),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        t, k, ids = (knob.suggest(trial) for knob in knobs)
        study.tell(trial, 0.0)
        assert 0.01 <= t <= 1.0 and k in range(2, 6) and isinstance(k, int) and ids in (["a"], [1, 2])


@pytest.fixture(scope="module")
def calibration(pipe):
    from stepcache.bench.harness import make_batch
    from stepcache.bench.tune import Calibration

    return Calibration.measure(pipe, make_batch(pipe, "digits-dit", None, None, [0, 1, 2, 3]))


def test_tuning_stays_in_its_budget_and_is_reproducible(pipe, calibration):
    from stepcache.bench.tune import tune

    (fbc,) = [m for m in METHODS if m.method == "FirstBlockCache"]
    band, budget = 1.5, 3.0
    first = tune(pipe, fbc, calibration, band, budget, seed=0)
    again = tune(pipe, fbc, calibration, band, budget, seed=0)
    # a trial starts only while the budget covers one at the band's edge
    assert budget - 1 / band < first.used <= budget + 1 - 1 / band
    assert abs(first.used - sum(t.cost for t in first.trials)) < 1e-9
    assert len(first.trials) >= 3
    assert first.config is not None and first.flop_speedup >= band
    assert first.psnr == max(t.psnr for t in first.trials if t.flop_speedup >= band)
    assert (again.config, again.psnr, again.used) == (first.config, first.psnr, first.used)


def test_trials_known_from_another_band_cost_nothing(pipe, calibration):
    from stepcache.bench.tune import tune

    (fbc,) = [m for m in METHODS if m.method == "FirstBlockCache"]
    known: dict = {}
    low = tune(pipe, fbc, calibration, 1.25, 2.0, known=known)
    high = tune(pipe, fbc, calibration, 2.0, 2.0, known=known)
    assert len(known) == len(low.trials) + len(high.trials)
    keys = {json.dumps(t.config, sort_keys=True) for t in low.trials}
    assert not keys & {json.dumps(t.config, sort_keys=True) for t in high.trials}  # none paid twice


def test_tuned_runs_are_named_by_band_and_record_their_tuning(pipe, calibration):
    from stepcache.bench.tune import tuned_runs

    (fbc,) = [m for m in METHODS if m.method == "FirstBlockCache"]
    refused = dataclasses.replace(fbc, method="Refused", why_not=lambda pipe: "Refused: not on this model")
    runs, tunings = tuned_runs(pipe, [fbc, refused], calibration, (1.25, 50.0), 3.0)
    fbc = [r for r in runs if isinstance(r, PeerRun)]
    assert fbc and all(r.name.startswith("diffusers FirstBlockCache tuned >=") for r in fbc)
    for r in fbc:
        for rec in r.params["tuned"]:
            assert rec["band"] == 1.25 and rec["calib_flop_speedup"] >= 1.25 and rec["budget"] == 3.0
    # nothing reaches 50x: said so, not silently dropped; a method that cannot run says why
    assert [t.band for t in tunings if t.config is None] == [50.0]
    missing = {r.name: r.reason for r in runs if isinstance(r, Unavailable)}
    assert missing == {"diffusers Refused tuned": "Refused: not on this model"}


def test_compare_refuses_a_bad_tuning_budget():
    from stepcache.bench.compare import compare

    for bad in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(ValueError, match="tune_peers"):
            compare("digits-dit", None, tune_peers=bad)
    with pytest.raises(ValueError, match="tune_peers: no peer"):
        compare("digits-dit", None, peers=[], tune_peers=1.0)
