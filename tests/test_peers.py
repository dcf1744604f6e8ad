"""bench.peers on digits-dit: every diffusers hook runs (or says why not), skips work, resets between
generations and detaches to bit-identical output; cache-dit is optional and reports its install hint."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from stepcache import zoo
from stepcache.bench.peers import PEERS, PeerRun, Unavailable, peer_runs

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
    knob = run.params.get("cache_interval", run.params.get("spatial_skip"))
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

    from stepcache.bench.peers import _CacheDitPeer

    model = tiny.make("flux")
    hidden_arg, x, kw = tiny.inputs("flux", 1)
    order = list(model._modules)
    peer = _CacheDitPeer(1, 0, 1e9, taylorseer=False, warmup=1)
    peer.attach(model, "cache-dit")
    with torch.no_grad(), peer.generation(model, "cache-dit"):
        for t in (1.0, 0.5):
            model(**{hidden_arg: x}, timestep=torch.full((1,), t), **kw)
    peer.detach(model)
    assert list(model._modules) == order
