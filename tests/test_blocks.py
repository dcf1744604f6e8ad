"""Block-level methods: which blocks run, per policy, counted with hooks on every block."""

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
