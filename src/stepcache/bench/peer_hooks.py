"""How the peers attach to a pipeline: diffusers' hook registry and cache-dit, each on the bare
denoiser, with what our pipelines do not give them (a cache context, the step index and timestep),
undone exactly on detach. What each peer method *is* (its knobs, documented setting, sweep and
tuning space) lives in ``bench.peers``.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

# diffusers' hooks keep their state per cache-context name. Our pipelines run CFG as one batch of
# 2N rows per step, so one context covers the whole call (diffusers' own pipelines say "cond" too).
_CONTEXT = "cond"
# Block lists diffusers' block-level hooks look for (diffusers.hooks._common).
_BLOCK_LISTS = (
    "transformer_blocks",
    "blocks",
    "single_transformer_blocks",
    "layers",
    "visual_transformer_blocks",
)
# TaylorSeer's default identifiers (r"^transformer_blocks.*attn", ...) are matched with re.fullmatch,
# so they miss diffusers' "attn1"/"attn2" and U-Net "attentions.N" names; this names every attention.
_ATTENTION_NAMES = r".*\.(attn\d*|attentions\.\d+)"
# denoiser -> name of the peer run attached to it (one at a time)
_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------ shared plumbing


def _denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser, or the module itself when given a bare denoiser."""
    if isinstance(pipe, torch.nn.Module):  # pipelines are not modules
        return pipe
    for attr in ("transformer", "unet"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} holds neither a transformer nor a unet")


def _block_list(denoiser: torch.nn.Module) -> torch.nn.ModuleList | None:
    for name in _BLOCK_LISTS:
        blocks = getattr(denoiser, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and cache-dit's log lines at ERROR only (both announce every enable and disable)."""
    names = ["diffusers", "CACHE_DIT"] + [
        n for n in list(logging.root.manager.loggerDict) if n.startswith(("diffusers.", "cache_dit"))
    ]
    saved = [(lg, lg.level) for lg in map(logging.getLogger, names)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


class _Snapshot:
    """Every module's own attributes, submodule slots and ``forward`` before a peer touched them.

    Both peers leave traces that their own removal keeps: diffusers an empty ``_diffusers_hook``
    registry and a ``forward`` bound on the instance; cache-dit its DiT patch (``forward``,
    ``_is_patched``, and ``_norm1_emb``, which is registered as a submodule and so shows in
    ``state_dict``). ``restore`` puts the module tree back as it was.
    """

    _MISSING = object()

    def __init__(self, root: torch.nn.Module):
        self.modules = [
            (m, set(m.__dict__), dict(m._modules), m.__dict__.get("forward", self._MISSING))
            for m in root.modules()
        ]

    def restore(self) -> None:
        for module, names, submodules, forward in self.modules:
            for name in set(module.__dict__) - names:
                del module.__dict__[name]
            # Order matters too: diffusers' FirstBlockCache takes the first block list it finds as
            # the head, and cache-dit re-adds FLUX's two lists the other way round.
            if list(module._modules.items()) != list(submodules.items()):
                module._modules.clear()
                module._modules.update(submodules)
            if forward is self._MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


def _claim(denoiser: torch.nn.Module, name: str) -> None:
    holder = _ATTACHED.get(denoiser)
    if holder is not None:
        raise RuntimeError(f"{name}: {holder!r} is attached to this pipeline; detach it first")
    _ATTACHED[denoiser] = name


def _release(denoiser: torch.nn.Module) -> None:
    _ATTACHED.pop(denoiser, None)


class _Peer:
    def attach(self, pipe: Any, name: str) -> None:
        raise NotImplementedError

    def detach(self, pipe: Any) -> None:
        raise NotImplementedError

    def generation(self, pipe: Any, name: str) -> AbstractContextManager:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ diffusers


def _diffusers_context_takes_metadata() -> bool:
    from diffusers.models.cache_utils import CacheMixin

    params = inspect.signature(CacheMixin.cache_context).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _StepTracker:
    """Torch hooks on the denoiser that give diffusers' hooks what our pipelines' loops don't.

    Before each call: the step index, step count, timestep and sigma (read from the pipeline's
    scheduler and the call) and, for hooks that need one, a diffusers cache context carrying them
    (``CacheMixin.cache_context``, entered around the call). FasterCache assumes the CFG batch is
    [uncond, cond]; with ``swap_cfg`` the halves of a [cond, uncond] batch are exchanged on the way
    in and back on the way out (the denoisers treat rows independently, so nothing else changes).
    """

    def __init__(
        self,
        pipe: Any,
        denoiser: torch.nn.Module,
        context: bool,
        swap_cfg: bool = False,
        on_call: Callable[[int | None], None] | None = None,
    ):
        self.pipe, self.denoiser = pipe, denoiser
        self.context, self.swap_cfg, self.on_call = context, swap_cfg, on_call
        self.metadata = context and _diffusers_context_takes_metadata()
        self.timestep: float | None = None
        self.calls = 0
        self._entered: AbstractContextManager | None = None
        self._handles: list[Any] = []

    def install(self) -> None:
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._before, with_kwargs=True),
            self.denoiser.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        self._leave()
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self._leave()
        self.timestep, self.calls = None, 0

    def current_timestep(self) -> float:
        """PAB's and FasterCache's ``current_timestep_callback``."""
        if self.timestep is None:
            raise RuntimeError("the current timestep is only known during a denoiser call")
        return self.timestep

    def _leave(self) -> None:
        if self._entered is not None:
            entered, self._entered = self._entered, None
            entered.__exit__(None, None, None)

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sched = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(sched, "timesteps", None)
        steps = len(timesteps) if timesteps is not None else None
        index = getattr(sched, "step_index", None) if sched is not None else None
        if index is None:  # FlowMatch/DDIM-style schedulers set it at the first step() call
            index = 0 if hasattr(sched, "step_index") else self.calls
        t = kwargs.get("timestep")
        if isinstance(t, torch.Tensor):
            t = float(t.reshape(-1)[0])
        elif t is None and timesteps is not None and index < len(timesteps):
            t = float(timesteps[index])
        self.timestep = None if t is None else float(t)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(steps)
        if self.context:
            from diffusers.models.cache_utils import CacheMixin

            self._leave()
            meta: dict[str, Any] = {}
            if self.metadata:
                sigmas = getattr(sched, "sigmas", None)
                if sigmas is not None and index < len(sigmas):
                    sigma = float(sigmas[index])
                elif self.timestep is not None:
                    sigma = self.timestep / float(getattr(sched.config, "num_train_timesteps", 1000))
                else:
                    sigma = None
                meta = {"step_index": index, "num_inference_steps": steps, "timestep": t, "sigma": sigma}
            self._entered = CacheMixin.cache_context(module, _CONTEXT, **meta)
            self._entered.__enter__()
        if self.swap_cfg:
            args, kwargs = self._swap_inputs(args, kwargs)
        return args, kwargs

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self._leave()
        if not self.swap_cfg:
            return output
        if isinstance(output, torch.Tensor):
            return _swap_halves(output)
        if isinstance(output, tuple):
            return (_swap_halves(output[0]), *output[1:])
        output.sample = _swap_halves(output.sample)
        return output

    @staticmethod
    def _swap_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        first = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        rows = first.shape[0] if isinstance(first, torch.Tensor) else 0
        if rows % 2:
            raise RuntimeError("FasterCache needs the CFG batch (an even number of rows); use guidance > 1")

        def swap(x: Any) -> Any:
            return _swap_halves(x) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == rows else x

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]])


@dataclass
class _Attached:
    denoiser: torch.nn.Module
    snapshot: _Snapshot
    tracker: _StepTracker
    hooks_before: dict[torch.nn.Module, set[str]]


def _hook_names(root: torch.nn.Module) -> dict[torch.nn.Module, set[str]]:
    return {m: set(m._diffusers_hook.hooks) for m in root.modules() if hasattr(m, "_diffusers_hook")}


def _remove_added_hooks(root: torch.nn.Module, before: dict[torch.nn.Module, set[str]]) -> None:
    """Remove every diffusers hook registered under ``root`` since ``before``, newest first per module."""
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in reversed(list(registry._hook_order)):
            if name not in before.get(module, set()):
                registry.remove_hook(name, recurse=False)
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


# (denoiser) -> {(steps, guidance): ratios}: one MagCache calibration per model serves every threshold
_MAG_RATIOS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, float], list[float]]] = (
    weakref.WeakKeyDictionary()
)


class _DiffusersPeer(_Peer):
    """One diffusers hook configuration, applied with its ``apply_*`` function to the bare denoiser.

    Our denoisers are not ``CacheMixin``s (no ``enable_cache``/``disable_cache``) and our pipelines
    enter no cache context, so ``_StepTracker`` supplies the context per call, hooks are removed by
    name, and ``generation`` resets every stateful hook (``HookRegistry.reset_stateful_hooks``, what
    ``CacheMixin._reset_stateful_cache`` does at the end of a diffusers pipeline call).
    """

    def __init__(
        self,
        apply_name: str,
        make_config: Callable[[_StepTracker, list[float] | None], Any],
        context: bool = True,
        swap_cfg: bool = False,
        mag_calibration: dict[str, Any] | None = None,
    ):
        self.apply_name, self.make_config = apply_name, make_config
        self.context, self.swap_cfg = context, swap_cfg
        self.mag_calibration = mag_calibration
        self._config: Any = None
        self._mag_base: list[float] | None = None
        self._state: _Attached | None = None

    def attach(self, pipe: Any, name: str) -> None:
        import diffusers.hooks as dh

        if self._state is not None:
            raise RuntimeError(f"{name}: already attached; detach it first")
        denoiser = _denoiser(pipe)
        _claim(denoiser, name)
        on_call = self._on_call if self.mag_calibration is not None else None
        tracker = _StepTracker(pipe, denoiser, self.context, self.swap_cfg, on_call)
        state = _Attached(denoiser, _Snapshot(denoiser), tracker, _hook_names(denoiser))
        try:
            with _quiet():
                ratios = self._calibrate_mag(pipe, denoiser) if self.mag_calibration is not None else None
                self._config = self.make_config(tracker, ratios)
                getattr(dh, self.apply_name)(denoiser, self._config)
            registry = dh.HookRegistry.check_if_exists_or_initialize(denoiser)
            if hasattr(registry, "invalidate_child_registries_cache"):  # stale after new block hooks
                registry.invalidate_child_registries_cache()
            tracker.install()
        except BaseException:
            self._undo(state)
            raise
        self._state = state

    def detach(self, pipe: Any) -> None:
        if self._state is not None:
            state, self._state = self._state, None
            self._undo(state)

    @staticmethod
    def _undo(state: _Attached) -> None:
        try:
            state.tracker.remove()
            _remove_added_hooks(state.denoiser, state.hooks_before)
        finally:
            state.snapshot.restore()
            _release(state.denoiser)

    def generation(self, pipe: Any, name: str) -> AbstractContextManager:
        return self._generation(name)

    @contextlib.contextmanager
    def _generation(self, name: str) -> Iterator[None]:
        from diffusers.hooks import HookRegistry

        state = self._state
        if state is None:
            raise RuntimeError(f"{name}: attach(pipe) before generation(pipe)")
        HookRegistry.check_if_exists_or_initialize(state.denoiser).reset_stateful_hooks(recurse=True)
        state.tracker.reset()
        try:
            yield
        finally:
            state.tracker.reset()

    # MagCache ---------------------------------------------------------------------------------------

    def _on_call(self, steps: int | None) -> None:
        """A run with another step count than calibrated: MagCache's own nearest interpolation."""
        from diffusers.hooks.mag_cache import nearest_interp

        cfg = self._config
        if steps and self._mag_base is not None and steps != cfg.num_inference_steps:
            cfg.mag_ratios = nearest_interp(torch.tensor(self._mag_base), steps)
            cfg.num_inference_steps = steps

    def _calibrate_mag(self, pipe: Any, denoiser: torch.nn.Module) -> list[float]:
        """MagCache's documented calibration: one run with ``calibrate=True``, which prints the ratios."""
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        from ..demo import conditions

        cal = self.mag_calibration or {}
        steps, guidance, n = int(cal["steps"]), float(cal["guidance"]), int(cal["samples"])
        known = _MAG_RATIOS.setdefault(denoiser, {})
        if (steps, guidance) not in known:
            before = _hook_names(denoiser)
            tracker = _StepTracker(pipe, denoiser, context=True)
            printed = io.StringIO()
            try:
                apply_mag_cache(denoiser, MagCacheConfig(calibrate=True, num_inference_steps=steps))
                tracker.install()
                gens = [torch.Generator().manual_seed(s) for s in range(n)]
                with contextlib.redirect_stdout(printed):
                    pipe(
                        **conditions(pipe, n),
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        generator=gens,
                    )
            finally:
                tracker.remove()
                _remove_added_hooks(denoiser, before)
            found = re.search(r"Calibration Complete[^\n]*\n\s*(\[[^\]]*\])", printed.getvalue())
            if found is None:
                raise RuntimeError("MagCache calibration printed no ratios (has diffusers' output changed?)")
            ratios = [float(r) for r in ast.literal_eval(found.group(1))]
            if len(ratios) != steps:
                raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
            known[(steps, guidance)] = ratios
        self._mag_base = known[(steps, guidance)]
        return self._mag_base


def _sea_raw_vision(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """SeaCache's ``raw_vision_callback`` for image latents: each row of (B, C, H, W) as (C, 1, H, W)."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    return [row.unsqueeze(1) for row in x]


def _attention_modules(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in denoiser.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def _block_reason(method: str, denoiser: torch.nn.Module) -> str | None:
    """Why a block-level hook (FirstBlockCache, MagCache, SeaCache) cannot wrap this denoiser."""
    cls = type(denoiser).__name__
    blocks = _block_list(denoiser)
    if blocks is None:
        return (
            f"{method}: {cls} has no list of transformer blocks (a ModuleList child named one of "
            f"{', '.join(_BLOCK_LISTS)}) for the hook to skip; a U-Net's down/mid/up blocks change "
            "resolution and pass skip connections"
        )
    from diffusers.hooks._helpers import TransformerBlockRegistry

    block_cls = type(blocks[0])
    try:
        TransformerBlockRegistry.get(block_cls)
    except ValueError:
        return (
            f"{method}: {cls}'s blocks ({block_cls.__name__}) are not in diffusers' TransformerBlockRegistry"
        )
    return None


# ------------------------------------------------------------------------------------------ cache-dit


class _CacheDitPeer(_Peer):
    """cache-dit's DBCache on the bare denoiser: ``cache_dit.enable_cache(transformer, ...)``.

    The transformer-only path keeps one persistent cache context, so ``generation`` rebuilds it
    (``cache_dit.refresh_context``); without that, the second run would start past the warm-up.
    """

    def __init__(self, config: dict[str, Any], pattern: str | None = None):
        # DBCacheConfig's own keyword arguments, plus ``taylorseer_order`` (0: no calibrator)
        self.config = dict(config)
        # A transformer cache-dit has no adapter for is given as its documented BlockAdapter, with
        # the ForwardPattern its blocks follow (found by _forward_pattern); None: its own adapter.
        self.pattern = pattern
        self._state: tuple[torch.nn.Module, _Snapshot] | None = None

    def _configs(self) -> dict[str, Any]:
        import cache_dit

        db = dict(self.config)
        order = int(db.pop("taylorseer_order", 0))
        configs: dict[str, Any] = {"cache_config": cache_dit.DBCacheConfig(**db)}
        if order > 0:
            configs["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
        return configs

    def attach(self, pipe: Any, name: str) -> None:
        import cache_dit

        if self._state is not None:
            raise RuntimeError(f"{name}: already attached; detach it first")
        denoiser = _denoiser(pipe)
        _claim(denoiser, name)
        snapshot = _Snapshot(denoiser)
        target: Any = denoiser
        if self.pattern is not None:
            target = cache_dit.BlockAdapter(
                transformer=denoiser,
                blocks=_block_list(denoiser),
                forward_pattern=getattr(cache_dit.ForwardPattern, self.pattern),
                check_forward_pattern=True,
            )
        try:
            with _quiet():
                cache_dit.enable_cache(target, **self._configs())
        except BaseException:
            with contextlib.suppress(Exception), _quiet():
                cache_dit.disable_cache(denoiser)
            snapshot.restore()
            _release(denoiser)
            raise
        self._state = (denoiser, snapshot)

    def detach(self, pipe: Any) -> None:
        if self._state is None:
            return
        import cache_dit

        (denoiser, snapshot), self._state = self._state, None
        try:
            with _quiet():
                cache_dit.disable_cache(denoiser)
        finally:
            snapshot.restore()
            _release(denoiser)

    def generation(self, pipe: Any, name: str) -> AbstractContextManager:
        return self._generation(name)

    @contextlib.contextmanager
    def _generation(self, name: str) -> Iterator[None]:
        import cache_dit

        if self._state is None:
            raise RuntimeError(f"{name}: attach(pipe) before generation(pipe)")
        with _quiet():
            cache_dit.refresh_context(self._state[0], **self._configs())
        yield


def _forward_pattern(pipe: Any, blocks: torch.nn.ModuleList) -> str | None:
    """The cache-dit ``ForwardPattern`` that the blocks follow, read from one real call of the
    first block (a one-step generation): whether it takes ``encoder_hidden_states``, and whether it
    returns the hidden states alone, first or second (told apart by their shape). None when the
    block fits no pattern, or the two streams have the same shape and the order cannot be told."""
    from ..demo import conditions

    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.setdefault("hidden", args[0] if args else kwargs.get("hidden_states"))
        seen.setdefault("output", output)

    takes_encoder = "encoder_hidden_states" in inspect.signature(blocks[0].forward).parameters
    handle = blocks[0].register_forward_hook(grab, with_kwargs=True)
    try:
        pipe(**conditions(pipe, 1), num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    except Exception:  # a pipeline that cannot run a one-step probe gets no adapter
        return None
    finally:
        handle.remove()
    hidden, out = seen.get("hidden"), seen.get("output")
    if not isinstance(hidden, torch.Tensor):
        return None
    if isinstance(out, torch.Tensor):
        return "Pattern_2" if takes_encoder else "Pattern_3"
    if not (isinstance(out, tuple) and len(out) == 2):
        return None
    first = [isinstance(o, torch.Tensor) and o.shape == hidden.shape for o in out]
    if first[0] == first[1]:
        return None
    if takes_encoder:
        return "Pattern_0" if first[0] else "Pattern_1"
    return "Pattern_4" if first[0] else "Pattern_5"
