"""The runtime under hostile use: runaway extrapolation, stale handles, copies and pickles."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import tiny
import torch
from diffusers import DDIMScheduler, DiTPipeline

import stepcache
from stepcache import Policy, presets
from stepcache.runtime import handle_of

_INSTALLED = ("forward", "progress_bar", "__deepcopy__", "__reduce_ex__")


def _unguarded(policy: Policy) -> Policy:
    return Policy.from_dict({**policy.to_dict(), "guard": False})


def _dit_pipeline(dtype: torch.dtype = torch.float32) -> DiTPipeline:
    """A tiny DiT with a real scheduler that does not clip (so nothing hides a runaway latent)."""
    vae = tiny.make_vae()
    pipe = DiTPipeline(
        transformer=tiny.make("dit").to(dtype), vae=vae.to(dtype), scheduler=DDIMScheduler(clip_sample=False)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _final_latent(pipe: DiTPipeline, steps: int = 50) -> tuple[torch.Tensor, list[str]]:
    """The latent the pipeline hands its VAE, and the stepcache warnings raised on the way."""
    seen: list[torch.Tensor] = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe(
                class_labels=[1, 2],
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
    finally:
        hook.remove()
    return seen[-1], [str(w.message) for w in caught if "stepcache" in str(w.message)]


# ---- the guard's range check -------------------------------------------------------------------
RUNAWAY = {
    "taylorseer-order-3-interval-10": presets.get("taylorseer", interval=10, order=3),
    "adams-bashforth-order-4-interval-10": presets.get("adams-bashforth", interval=10, order=4),
    # Without the range check this one overflows the half-precision latent to inf.
    "taylorseer-order-3-interval-30": presets.get("taylorseer", interval=30, order=3),
    "taylorseer-feature-order-3-interval-10": presets.get("taylorseer-feature", interval=10, order=3),
}


@pytest.mark.parametrize("name", list(RUNAWAY))
def test_guard_recomputes_runaway_extrapolation_instead_of_blaming_the_model(name):
    pipe = _dit_pipeline(torch.float16)
    reference, _ = _final_latent(pipe)
    handle = stepcache.enable(pipe, RUNAWAY[name])
    try:
        latent, said = _final_latent(pipe)
    finally:
        stepcache.disable(pipe)
    stats = handle.stats()
    assert torch.isfinite(latent).all()
    # On the plain sampler's scale (unguarded, taylorseer ends 4x off it at interval 10 and at
    # interval 30 overflows; the others stray less at the end, but only by luck).
    assert latent.abs().max() <= 1.1 * reference.abs().max()
    assert stats["fallbacks"] > 0
    assert said == []  # in particular nothing says the model's own output broke


def test_sound_estimates_pass_the_guard_untouched(digits_pipe):
    """No false positives: a trained model under the presets' own parameters falls back nowhere,
    and its images are bit-identical to the same policy without the guard."""

    def run(policy):
        handle = stepcache.enable(digits_pipe, policy)
        try:
            images = digits_pipe(
                class_labels=[3, 8], num_inference_steps=20, generator=torch.Generator().manual_seed(0)
            ).images
        finally:
            stepcache.disable(digits_pipe)
        return np.asarray(images), handle.stats()

    sound = ("taylorseer", "adams-bashforth", "static-interval", "magcache", "taylorseer-feature", "dbcache")
    for name in sound:
        guarded, stats = run(presets.get(name))
        plain, _ = run(_unguarded(presets.get(name)))
        assert stats["fallbacks"] == 0, name
        assert set(stats["actions"]) != {"C"}, name  # the policy did estimate
        assert np.array_equal(guarded, plain), name


def test_a_non_finite_output_after_estimates_names_the_estimates():
    pipe = _dit_pipeline()
    real_calls = []

    def poison(module, args, output):  # the network's 6th real computation turns NaN
        real_calls.append(1)
        return torch.full_like(output, float("nan")) if len(real_calls) == 6 else output

    hook = pipe.transformer.proj_out_2.register_forward_hook(poison)
    stepcache.enable(pipe, presets.get("static-interval", interval=2))
    try:
        _, said = _final_latent(pipe, steps=12)
    finally:
        hook.remove()
        stepcache.disable(pipe)
    # static-interval computes steps 0, 1, 3, 5, 7, 9: the 6th is step 9, after 2, 4, 6 and 8
    assert len(said) == 1
    assert "not finite at step 9" in said[0]
    assert "static-interval estimated steps [2, 4, 6, 8]" in said[0]
    assert "model's own output" not in said[0]


# ---- handles -------------------------------------------------------------------------------------
def test_a_replaced_handle_leaves_its_replacement_alone():
    model = tiny.make("dit")
    first = stepcache.enable(model, "fbcache")
    second = stepcache.enable(model, "static-interval")
    with pytest.warns(RuntimeWarning, match="replaced by a later enable"):
        first.disable()
    assert second.active and handle_of(model) is second
    with torch.no_grad(), second.generation(num_steps=4):
        tiny.sample("dit", model, steps=4)
    assert second.stats()["actions"] == ["C", "C", "E", "C"]
    for call in (first.stats, lambda: first.generation(num_steps=4).__enter__(), first.compile):
        with pytest.raises(RuntimeError, match="replaced"):
            call()
    second.disable()
    assert not second.active and "forward" not in model.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.disable()  # disabled, not replaced: a silent no-op
    assert second.stats()["actions"] == ["C", "C", "E", "C"]  # the last generation's, still readable


# ---- copies and pickles --------------------------------------------------------------------------
def _leftovers(obj) -> list[str]:
    """stepcache attributes left on ``obj`` or any of its modules."""
    found = [f"{type(obj).__name__}.{a}" for a in _INSTALLED if a in vars(obj)]
    modules = obj.modules() if isinstance(obj, torch.nn.Module) else ()
    return found + [f"{type(m).__name__}.{a}" for m in modules for a in _INSTALLED if a in vars(m)]


def _images(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 2], num_inference_steps=8, generator=generator, output_type="np").images


@pytest.mark.parametrize(
    "policy", [presets.get("static-interval"), presets.get("fbcache", threshold=10.0)], ids=["step", "block"]
)
def test_deep_copy_of_an_enabled_pipeline_is_plain_and_independent(policy):
    pipe = _dit_pipeline()
    plain = _images(pipe)
    handle = stepcache.enable(pipe, policy)
    accelerated = _images(pipe)
    assert not np.array_equal(accelerated, plain)

    clone = copy.deepcopy(pipe)
    assert _leftovers(clone) == [] and _leftovers(clone.transformer) == []
    assert handle_of(clone.transformer) is None
    assert clone.transformer is not pipe.transformer
    assert np.array_equal(_images(clone), plain)
    assert handle.active and np.array_equal(_images(pipe), accelerated)  # the original is untouched

    clone_handle = stepcache.enable(clone, policy)
    assert np.array_equal(_images(clone), accelerated)
    assert clone_handle is not handle and handle.active and clone_handle.active
    stepcache.disable(pipe)
    assert clone_handle.active and np.array_equal(_images(clone), accelerated)
    stepcache.disable(clone)
    assert _leftovers(pipe) == [] and _leftovers(pipe.transformer) == [] and _leftovers(clone) == []


def test_deep_copy_of_an_enabled_module_keeps_what_was_its_own():
    model = tiny.make("dit")
    reference = tiny.sample("dit", model)
    model.forward = model.forward  # an instance forward of its own (as accelerate's hooks install)
    stepcache.enable(model, "fbcache")
    clone = copy.deepcopy(model)
    stepcache.disable(model)
    assert clone.__dict__["forward"].__self__ is clone  # its own forward, bound to the copy
    assert [a for a in _INSTALLED if a in vars(clone)] == ["forward"]
    assert [a for m in clone.transformer_blocks for a in _INSTALLED if a in vars(m)] == []
    assert handle_of(clone) is None
    assert torch.equal(tiny.sample("dit", clone), reference)


def test_pickling_or_shallow_copying_an_enabled_object_says_to_disable_first():
    pipe = _dit_pipeline()
    stepcache.enable(pipe, "fbcache")
    try:
        for obj in (pipe, pipe.transformer, pipe.transformer.transformer_blocks[1]):
            for attempt in (pickle.dumps, copy.copy):
                with pytest.raises(TypeError, match=r"stepcache enabled.*stepcache\.disable\(pipe\) first"):
                    attempt(obj)
    finally:
        stepcache.disable(pipe)
    model = pickle.loads(pickle.dumps(pipe.transformer))  # disabled: an ordinary module again
    assert torch.equal(tiny.sample("dit", model), tiny.sample("dit", pipe.transformer))
