"""The runtime: one wrapper on the denoiser's forward, one per block, one on the pipeline's
progress bar. All are instance attributes (never class patches) and ``disable`` deletes them.

Per call the denoiser wrapper asks the step rule which rows to compute, runs those rows (all,
none, or a gathered subset), and the block wrappers ask the block rule whether the middle of
the stack runs. Every cache lives in a :class:`Generation` made at the start of a generation
and dropped at its end, including when it raises.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import inspect
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter
from ..errors import UnsupportedModelError
from .blocks import BlockDriver, driver_for
from .interfaces import CallContext, RuleSet, Streams
from .levels import GuidanceCall, GuidanceDriver, StepDriver
from .ranks import Agreement, agreement_for
from .rows import _first, _global_rows, _rows_usable, as_batch
from .state import Generation, tensor_bytes

_HANDLES: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()
_CFG_LAYOUTS = (None, "uncond_first", "uncond_last", "separate")


def _halves_equal(sample: torch.Tensor) -> bool:
    """Whether a batch is one sample twice over (``torch.cat([latents] * 2)``): batched CFG."""
    n = sample.shape[0]
    return n % 2 == 0 and n > 0 and torch.equal(sample[: n // 2], sample[n // 2 :])


def _output_tensor(out: Any, model: nn.Module) -> torch.Tensor:
    """The denoiser's output tensor: the output itself, or the first item of a tuple or of a
    diffusers output; anything else is a model stepcache cannot stand in for."""
    try:
        first = _first(out)
    except (TypeError, KeyError, IndexError):
        first = None
    if not isinstance(first, torch.Tensor):
        raise UnsupportedModelError(
            f"{type(model).__name__} returned {type(out).__name__}, not a tensor (or a tuple or diffusers "
            "output whose first item is one), so stepcache cannot stand in for its output; stepcache "
            "was disabled on it"
        )
    return first


def _replace_first(template: Any, tensor: torch.Tensor) -> Any:
    def like(old: Any) -> Any:  # per-sample lists stay lists
        return list(tensor.unbind(0)) if isinstance(old, list) else tensor

    if isinstance(template, (torch.Tensor, list)):
        return like(template)
    if isinstance(template, tuple):
        return (like(template[0]), *template[1:])
    keys = list(template.keys())
    return type(template)(**{k: (like(template[k]) if k == keys[0] else template[k]) for k in keys})


def _settle(gen: Generation, methods: str) -> None:
    """Read what was kept on the device during the generation, in one host sync: whether the
    network's own outputs were finite, and the guard's deferred fallbacks (added to the stats).

    The guard replaces bad estimates, but the network's own non-finite output is left as is,
    and said once per generation with the steps where it happened: blamed on the model only
    when no estimate came before it (otherwise the estimates may have fed it a broken latent)."""
    if not gen.finite and not gen.deferred_fallbacks:
        return
    device = (gen.finite[0][1] if gen.finite else gen.deferred_fallbacks[0]).device
    flags = [flag.to(device, torch.long).reshape(1) for _, flag in gen.finite]
    counts = [n.to(device, torch.long).reshape(1) for n in gen.deferred_fallbacks]
    values = torch.cat(flags + counts).cpu().tolist()  # the one host sync
    ok, fallbacks = values[: len(flags)], values[len(flags) :]
    gen.stats.fallbacks += sum(fallbacks)
    bad = sorted({step for (step, _), fine in zip(gen.finite, ok, strict=True) if not fine})
    gen.finite.clear()
    gen.deferred_fallbacks.clear()
    if bad:
        warnings.warn(_not_finite_message(bad, gen.estimated_steps, methods), RuntimeWarning, stacklevel=3)


def _not_finite_message(bad: list[int], estimated: list[int], methods: str) -> str:
    steps = f"step {bad[0]}" + (f" (and steps {bad[1:]})" if len(bad) > 1 else "")
    before = sorted({s for s in estimated if s < bad[0]})
    if not before:
        return (
            f"stepcache: the model's own output was not finite at {steps}; "
            "stepcache leaves it as it is (it only replaces its own estimates)"
        )
    return (
        f"stepcache: the denoiser's output was not finite at {steps}, after {methods} estimated "
        f"steps {before}: those estimates likely drove the latent out of range (try a shorter "
        "interval or a lower order); stepcache leaves the output as it is"
    )


class Handle:
    """What ``enable`` returns: statistics, a generation scope for bare loops, and ``disable``.

    Enabling the same model again replaces this handle: it then refuses ``stats`` and
    ``generation``, and its ``disable`` leaves the replacement in place. While enabled, a deep
    copy of the pipeline or module is a plain one (stepcache not enabled on it), and pickling
    or a shallow ``copy.copy`` raises TypeError: disable first.
    """

    def __init__(
        self,
        target: Any,
        model: nn.Module,
        adapter: Adapter,
        rules: RuleSet,
        policy: Any,
        agreement: Agreement | None = None,
    ):
        self.target = target
        self.agreement = agreement  # reduces every decision over the ranks of a split model
        self.model = model
        self.adapter = adapter
        self.rules = rules
        self.policy = policy
        self._local = threading.local()
        self._last_stats: dict[str, Any] | None = None
        self._warned_outside = False
        self._installed: list[tuple[Any, str, bool, Any]] = []  # (object, attr, had_own, own_value)
        self._sig = inspect.signature(model.forward)
        self._orig_forward = model.forward
        # the levels' drivers (the block one is set by attach, which finds the blocks)
        self.step = StepDriver(self, rules.step) if rules.step is not None else None
        self.guidance = GuidanceDriver(self, rules.guidance) if rules.guidance is not None else None
        self.blocks: BlockDriver | None = None
        self._compiled = False
        self._replaced = False  # a later enable on the same model took over

    # ---- public -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Statistics of the current generation, or of the last one that ended."""
        self._check_not_replaced("stats()")
        gen = self._current()
        if gen is not None:
            return gen.stats.as_dict()
        if self._last_stats is None:
            return Generation(None, 1, None).stats.as_dict()
        return dict(self._last_stats)

    @contextlib.contextmanager
    def generation(
        self, num_steps: int | None = None, calls_per_step: int = 1, cfg: str | None = None
    ) -> Iterator[Handle]:
        """Scope one sampling run of a bare denoiser in a hand-written loop.

        ``calls_per_step``: denoiser calls per step (2 when conditional and unconditional run as
        separate calls; each keeps its own cache). ``cfg``: where a batched CFG call keeps the
        unconditional half ("uncond_first" or "uncond_last"), "separate" when each step calls
        the conditional pass and then the unconditional one (``calls_per_step=2``), or None.
        """
        if num_steps is not None and (
            isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
            raise ValueError(f"calls_per_step must be a positive integer, got {calls_per_step!r}")
        if cfg not in _CFG_LAYOUTS:
            raise ValueError(f"cfg must be one of {_CFG_LAYOUTS}, got {cfg!r}")
        if cfg == "separate" and calls_per_step != 2:
            raise ValueError(
                f'cfg="separate" runs two calls per step: pass calls_per_step=2, got {calls_per_step}'
            )
        self._check_not_replaced("generation()")
        if cfg == "separate":
            gen = self._begin(Generation(num_steps, calls_per_step, None, "separate"))
        else:
            gen = self._begin(Generation(num_steps, calls_per_step, cfg, "batched" if cfg else None))
        try:
            yield self
        finally:
            self._end(gen)

    def disable(self) -> None:
        """Remove stepcache from the model; a no-op when this handle is no longer the model's
        current one (disabled already, or replaced: the replacement stays, with a warning)."""
        if self.active:
            detach(self.model)
        elif self._replaced:
            warnings.warn(
                "stepcache: this handle was replaced by a later enable() on the same model, so its "
                "disable() does nothing; call stepcache.disable(pipe) (or the new handle's disable()) "
                "to remove stepcache",
                RuntimeWarning,
                stacklevel=2,
            )

    def compile(self, **options: Any) -> Handle:
        """Compile the network with ``torch.compile(**options)``; the runtime itself stays eager.

        Traced, the runtime's per-generation Python state would be guarded on and recompiled
        every generation, and each host read would split the graph. So the runtime's entry points
        are kept out of dynamo, and only what they call is compiled: the denoiser's own forward,
        as one graph, or with a block-level rule each block's (decisions sit between blocks).
        Undone by ``disable``. Returns the handle.
        """
        self._check_not_replaced("compile()")
        if not self.active:
            raise RuntimeError("this handle is disabled; enable stepcache again, then compile")
        if self._compiled:
            raise RuntimeError("this handle is already compiled; disable and enable again to recompile")
        if self.blocks is not None and self.blocks.blocks:
            self.blocks.compile(**options)
        else:
            self._orig_forward = torch.compile(self._orig_forward, **options)
        self._set(self.model, "forward", torch.compiler.disable(self.model.forward))
        self._compiled = True
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model (what a loop over a wrapped plain callable uses)."""
        return self.model(*args, **kwargs)

    @property
    def active(self) -> bool:
        return _HANDLES.get(self.model) is self

    def _check_not_replaced(self, what: str) -> None:
        if self._replaced:
            raise RuntimeError(
                f"stepcache: {what} on a stale handle: a later enable() on the same model replaced "
                "it; use the handle that call returned (or stepcache.runtime.handle_of(model))"
            )

    # ---- generation lifecycle -------------------------------------------------------------
    def _stack(self) -> list[Generation]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current(self) -> Generation | None:
        stack = self._stack()
        return stack[-1] if stack else None

    def _begin(self, gen: Generation) -> Generation:
        self._stack().append(gen)
        return gen

    def _end(self, gen: Generation) -> None:
        stack = self._stack()
        if gen in stack:
            gen.stats.cache_bytes = tensor_bytes(gen.rule_states)
            stack.remove(gen)
            try:
                _settle(gen, self._methods())
            finally:
                self._last_stats = gen.stats.as_dict()
        gen.rule_states.clear()
        gen.templates.clear()
        gen.cond_out = None
        gen.peaks.clear()
        gen.call = None

    def _pipeline_generation(self, num_steps: int | None) -> Generation:
        """The generation a pipeline's progress bar opens, with how its guidance reaches the
        denoiser. A pipeline that says CFG as a property (SD3, Wan) is taken at its word: batched
        in its family's layout, or separate calls where the family has none. Many keep it only as a
        local of ``__call__`` (PixArt, CogVideoX; FLUX's and Qwen-Image's true CFG): there the
        calls of step 0 tell (``Generation.cfg_mode``)."""
        do_cfg = getattr(self.target, "do_classifier_free_guidance", None)
        # A pipeline may declare its own layout (the zoo's class-conditional pipeline puts the
        # unconditional half last even around a U-Net); otherwise the family's convention.
        declared = getattr(type(self.target), "stepcache_cfg_layout", None)
        layout = declared if declared in ("uncond_first", "uncond_last") else self.adapter.pipeline_cfg_layout
        if do_cfg is False:
            gen = Generation(num_steps, None, None, None)
        elif do_cfg is True and (
            declared in ("uncond_first", "uncond_last") or self.adapter.family != "generic"
        ):
            gen = Generation(num_steps, None, layout, "batched" if layout is not None else "separate")
        else:
            gen = Generation(num_steps, None, layout, "auto")
            gen.cfg_said = do_cfg is True
        gen.scheduler_order = int(getattr(getattr(self.target, "scheduler", None), "order", 1) or 1)
        return gen

    # ---- the denoiser call ----------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        gen = self._current()
        if gen is None:
            if self.rules.step is not None or self.rules.block is not None:
                if not self._warned_outside:
                    self._warned_outside = True
                    warnings.warn(
                        "stepcache: denoiser called outside a generation, so it computes in full. "
                        "Enable the pipeline, or wrap a hand-written loop in `with handle.generation(...)`.",
                        stacklevel=2,
                    )
            return self._orig_forward(*args, **kwargs)
        try:
            return self._call(gen, args, kwargs)
        except UnsupportedModelError:
            # The model's call shape is one stepcache cannot handle: leave the model as it was.
            with contextlib.suppress(Exception):
                self._end(gen)
                detach(self.model)
            raise
        except BaseException:
            # A call that raised leaves no cache behind; its own error is the one to see.
            with contextlib.suppress(Exception):
                self._end(gen)
            raise

    def _call(self, gen: Generation, args: tuple, kwargs: dict) -> Any:
        adapter = self.adapter
        try:
            bound = self._sig.bind(*args, **kwargs)
            hidden = as_batch(bound.arguments[adapter.hidden_arg])
        except (TypeError, KeyError):
            # Arguments the model itself will reject: let it raise its own error.
            return self._orig_forward(*args, **kwargs)
        batch = adapter.batch_size(bound)
        if hidden is None:  # a sample that is no batch the adapter knows: the model's own error
            return self._orig_forward(*args, **kwargs)
        if self.blocks is not None and self.blocks.probes and adapter.needs_probe:
            # once per enable: one plain call (the block hooks pass through outside a call)
            adapter.probe(
                self.blocks.blocks,
                self.blocks.sig,
                lambda: self._orig_forward(*bound.args, **bound.kwargs),
                batch,
            )
        step, branch = gen.next_call()
        signature = (tuple(hidden.shape), hidden.dtype, hidden.device)
        if gen.signature.get(branch, signature) != signature:
            gen.reset_branch(branch)  # new shape mid-generation: old caches do not apply
        gen.signature[branch] = signature
        if step == 0:
            gen.step0_calls = max(gen.step0_calls, branch + 1)
            if branch == 0 and gen.cfg_calls == "auto" and gen.cfg_layout is not None:
                gen.halves_equal = _halves_equal(hidden)  # one host read per generation
        mode = gen.cfg_mode(step)
        # an undecided or CFG-free call of a pipeline that did not say has no unconditional half
        layout = gen.cfg_layout if mode == "batched" or gen.cfg_calls != "auto" else None
        ctx = CallContext(
            step=step,
            branch=branch,
            num_steps=gen.num_steps,
            batch=batch,
            timestep=adapter.timestep(bound),
            _uncond=(lambda: adapter.uncond_rows(bound, layout)) if mode in (None, "batched") else None,
        )
        first = branch not in gen.templates  # nothing computed yet: no output to stand in for
        row_actions = ["C"] * batch
        device = hidden.device

        # 1. The step rule: which rows the network answers at all; the others it estimates.
        step_call = self.step.plan(gen, ctx, bound, first, device) if self.step is not None else None
        step_run = step_call.run if step_call is not None else None
        if step_call is not None and step_call.runs_nothing:
            gen.stats.record([step_call.letter] * batch)
            gen.estimated_steps.append(step)
            ran = step_call.ran[-1] if step_call.ran else None
            return _replace_first(gen.templates.get(branch, ran), step_call.est)

        # 2. The guidance rule: which unconditional rows of computed pairs to leave out.
        guide = self.guidance.plan(gen, ctx, mode, step_run) if self.guidance is not None else None
        run = torch.ones(batch, dtype=torch.bool) if step_run is None else step_run.clone()
        if guide is not None:
            run[guide.uncond[guide.dropped]] = False

        # 3. Run the rows that run; the levels then fill in the others and observe.
        out, full = self._run_rows(gen, ctx, bound, run, guide, row_actions, device)
        if step_call is not None:
            self.step.fill(step_call, full, row_actions)
        if guide is not None:
            self.guidance.finish(gen, ctx, bound, guide, full, row_actions)
        if step_call is not None:
            self.step.observe(gen, ctx, step_call, full, device)
        gen.stats.record(row_actions)
        if any(a != "C" for a in row_actions):
            gen.estimated_steps.append(step)
        if mode in ("separate", "undecided") and branch % 2 == 0:  # what the next call pairs with
            answered = torch.tensor([a != "E" for a in row_actions])
            gen.cond_out = (step, branch, full.detach(), answered)
        return out if full is _first(out) else _replace_first(out, full)

    def _run_at(
        self,
        bound: inspect.BoundArguments,
        batch: int,
        scale: float,
        rows: torch.Tensor | None,
        ran: list[bool],
    ) -> torch.Tensor:
        """``CallContext.run_at``: the plain network (block rules pass through) on a resized sample."""
        name = type(self.model).__name__
        hidden = bound.arguments[self.adapter.hidden_arg]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (4, 5):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise UnsupportedModelError(
                f"{name}: its sample is {shape}, not (batch, channels, [frames,] height, width), so it "
                "cannot be run at another resolution here (packed tokens carry positions the pipeline builds)"
            )
        multiple = spatial_multiple(self.model)
        h, w = hidden.shape[-2:]
        size = (int(h * scale) // multiple * multiple, int(w * scale) // multiple * multiple)
        if min(size) < multiple:
            raise UnsupportedModelError(
                f"{name}: a {h}x{w} sample at scale {scale} rounds to {size[0]}x{size[1]} (a multiple of "
                f"its {multiple}-pixel patches); choose a larger scale"
            )
        new = bound if rows is None else self.adapter.slice_rows(bound, rows, batch)
        new = inspect.BoundArguments(new.signature, new.arguments.copy())
        new.arguments[self.adapter.hidden_arg] = resize(new.arguments[self.adapter.hidden_arg], size)
        try:
            out = self._orig_forward(*new.args, **new.kwargs)
        except Exception as e:
            raise UnsupportedModelError(
                f"{name}: refused a {size[0]}x{size[1]} sample ({type(e).__name__}: {e}); running at a "
                "lower resolution needs a model that accepts other sizes"
            ) from e
        ran.append(None)  # its output has another size: no template for this call's answer
        return _output_tensor(out, self.model)

    def _run_model(
        self,
        bound: inspect.BoundArguments,
        batch: int,
        module: Any,
        rows: torch.Tensor | None,
        ran: list[Any],
        template: Any,
    ) -> torch.Tensor:
        """``CallContext.run_model``: ``module`` called with this call's arguments (``rows`` only)."""
        new = bound if rows is None else self.adapter.slice_rows(bound, rows, batch)
        hidden = as_batch(new.arguments[self.adapter.hidden_arg])
        mine, theirs = next(self.model.parameters(), None), next(module.parameters(), None)
        if (
            mine is not None
            and theirs is not None
            and (theirs.device, theirs.dtype) != (mine.device, mine.dtype)
        ):
            module.to(mine.device, mine.dtype)
        try:
            out = module(*new.args, **new.kwargs)
        except Exception as e:
            raise UnsupportedModelError(
                f"{type(module).__name__} (the stand-in model) refused {type(self.model).__name__}'s "
                f"arguments ({type(e).__name__}: {e}); it must take the same inputs"
            ) from e
        tensor = _output_tensor(out, module)
        # Before the model's own first output, the answer must have the sample's shape (a noise or
        # velocity prediction; a stand-in for a model that also predicts variances is refused there).
        want = hidden if template is None else _output_tensor(template, self.model)
        if hidden is None or tensor.shape[0] != len(hidden) or tensor.shape[1:] != want.shape[1:]:
            raise UnsupportedModelError(
                f"{type(module).__name__} answered {tuple(tensor.shape[1:])} per sample where "
                f"{type(self.model).__name__} answers {tuple(want.shape[1:]) if want is not None else None}; "
                "a stand-in model must give the same output shape"
            )
        ran.append(out if rows is None else None)  # a whole-batch answer can serve as the template
        return tensor

    def _usable(self, gen: Generation, key: tuple, est: Streams, rows: torch.Tensor | None) -> bool:
        """Whether every row of an estimate passes the guard: one host sync however many streams."""
        n = next((s.shape[0] for s in est if s is not None), 0)
        return bool(_rows_usable(est, gen.peaks.get(key), rows, n).all())

    def _methods(self) -> str:
        """The policy's methods, as a warning names them."""
        rules = getattr(self.policy, "rules", None)
        if rules:
            return ", ".join(rule.method for rule in rules.values())
        found = (self.rules.step, self.rules.block, self.rules.guidance)
        return ", ".join(type(r).__name__ for r in found if r is not None) or "stepcache"

    def _run_rows(
        self,
        gen: Generation,
        ctx: CallContext,
        bound: inspect.BoundArguments,
        run: torch.Tensor,
        guide: GuidanceCall | None,
        row_actions: list[str],
        device: Any,
    ) -> tuple[Any, torch.Tensor]:
        """The network on the rows that run (all of them, none, or gathered, run and scattered):
        its output object and a full-batch tensor whose other rows are still to be filled."""
        if guide is not None and guide.cond_source is not None and not bool(run.any()):
            # every row is the guidance rule's or the step rule's: the network does not run
            return gen.templates.get(ctx.branch, gen.templates.get(0)), torch.empty_like(guide.cond_source)
        if bool(run.all()):
            out = self._run(gen, ctx, bound, None, row_actions)
            full = part = _output_tensor(out, self.model)
        else:
            rows = _global_rows(None, run, device)
            out = self._run(gen, ctx, self.adapter.slice_rows(bound, rows, ctx.batch), rows, row_actions)
            part = _output_tensor(out, self.model)
            full = torch.empty((ctx.batch, *part.shape[1:]), dtype=part.dtype, device=part.device)
            full.index_copy_(0, rows, part)
        if self.rules.guard:  # on the device, no sync: read at the end
            gen.finite.append((ctx.step, torch.isfinite(part).all()))
        return out, full

    def _run(
        self,
        gen: Generation,
        ctx: CallContext,
        bound: inspect.BoundArguments,
        rows: torch.Tensor | None,
        row_actions: list[str],
    ) -> Any:
        """Run the real denoiser on ``bound`` (the block hooks see this call's scratch)."""
        blocks = self.blocks
        scratch = blocks.scratch(gen, ctx, rows, row_actions) if blocks is not None else None
        gen.call = scratch
        try:
            out = self._orig_forward(*bound.args, **bound.kwargs)
        finally:
            gen.call = None
        if scratch is not None:
            blocks.finish(scratch)
        if rows is None or ctx.branch not in gen.templates:
            gen.templates[ctx.branch] = out
        return out

    # ---- decisions across ranks ------------------------------------------------------------
    def _agreed(self, plan: Any, device: torch.device | None = None) -> Any:
        """The plan every rank of a split model takes (``ranks.Agreement``); as is otherwise."""
        return plan if self.agreement is None else self.agreement.plan(plan, device)

    def _all_ranks(self, ok: bool, device: torch.device | None = None) -> bool:
        return ok if self.agreement is None else self.agreement.every(ok, device)

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        """Install ``value`` as ``obj``'s own ``attr``; ``disable`` restores what was there."""
        had_own = attr in obj.__dict__
        self._installed.append((obj, attr, had_own, obj.__dict__.get(attr)))
        # Straight into the instance dict: bypasses nn.Module / pipeline __setattr__ bookkeeping.
        obj.__dict__[attr] = value


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` with its last two (spatial) dimensions resized: area averaging down, bilinear up."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = x.reshape(x.shape[0], -1, *x.shape[-2:])
    mode = "area" if size[0] <= x.shape[-2] and size[1] <= x.shape[-1] else "bilinear"
    out = torch.nn.functional.interpolate(flat.float(), size=size, mode=mode)
    return out.to(x.dtype).reshape(*x.shape[:-2], *size)


def spatial_multiple(model: nn.Module) -> int:
    """The size a sample's height and width must be a multiple of: the patch size of a
    transformer, the total downsampling of a U-Net (from the model's config; 1 if it says neither)."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[-1]
    if isinstance(patch, int) and patch > 0:
        return patch
    channels = getattr(config, "block_out_channels", None)
    if isinstance(channels, (list, tuple)) and channels:
        return 2 ** (len(channels) - 1)
    return 1


# ---- attach / detach ------------------------------------------------------------------------


class _GenerationBar:
    """Wraps a pipeline's progress bar: its scope is one generation, each ``update`` one step."""

    def __init__(self, handle: Handle, bar: Any, gen: Generation):
        self._handle = handle
        self._bar = bar
        self._gen = gen

    def __enter__(self) -> _GenerationBar:
        self._handle._begin(self._gen)
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        self._handle._end(self._gen)
        return self._bar.__exit__(*exc)

    def update(self, n: int = 1) -> Any:
        self._gen.advance_step()
        return self._bar.update(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def _iterate_generation(handle: Handle, bar: Any, gen: Generation) -> Iterator[Any]:
    handle._begin(gen)
    try:
        for i, item in enumerate(bar):
            gen.advance_step(i)
            yield item
    finally:
        handle._end(gen)


def attach(
    target: Any, model: nn.Module, adapter: Adapter, rules: RuleSet, policy: Any, group: Any = None
) -> Handle:
    """Install the runtime on ``model`` (and on ``target``'s progress bar if it is a pipeline);
    ``group``: whose ranks must agree on every decision (``ranks.agreement_for``)."""
    agreement = agreement_for(model, group)
    previous = _HANDLES.get(model)
    if previous is not None:
        detach(model)
    handle = Handle(target, model, adapter, rules, policy, agreement)
    handle.blocks = driver_for(handle)  # finds the rule's modules; refuses a model without them
    handle._set(model, "forward", handle._forward)
    if handle.blocks is not None:
        handle.blocks.install()
    if target is not model and callable(getattr(target, "progress_bar", None)):
        orig_bar = target.progress_bar

        def progress_bar(iterable: Any = None, total: int | None = None) -> Any:
            bar = orig_bar(iterable=iterable, total=total)
            n = total if iterable is None else (len(iterable) if hasattr(iterable, "__len__") else None)
            gen = handle._pipeline_generation(n)
            if iterable is None:
                return _GenerationBar(handle, bar, gen)
            return _iterate_generation(handle, bar, gen)

        handle._set(target, "progress_bar", progress_bar)
    for obj in _patched_objects(handle):
        _guard_copies(handle, obj)
    _HANDLES[model] = handle
    if previous is not None:
        previous._replaced = True
    return handle


# ---- copies and pickles of patched objects ----------------------------------------------------
# Both hooks are instance attributes (copy.deepcopy looks ``__deepcopy__`` up on the instance,
# and pickle and copy.copy ``__reduce_ex__``), installed and removed like the wrappers.
def _patched_objects(handle: Handle) -> list[Any]:
    seen: dict[int, Any] = {}
    for obj, _, _, _ in handle._installed:
        seen.setdefault(id(obj), obj)
    return list(seen.values())


def _guard_copies(handle: Handle, obj: Any) -> None:
    def deepcopy_plain(memo: dict[int, Any]) -> Any:
        return _plain_deepcopy(handle, obj, memo)

    def refuse_pickle(protocol: int = 2) -> Any:
        raise TypeError(_refusal(obj, "pickled or shallow-copied"))

    handle._set(obj, "__deepcopy__", deepcopy_plain)
    handle._set(obj, "__reduce_ex__", refuse_pickle)


def _refusal(obj: Any, what: str) -> str:
    return (
        f"this {type(obj).__name__} has stepcache enabled and cannot be {what}; "
        "call stepcache.disable(pipe) first (and enable it again afterwards)"
    )


def _own_state(handle: Handle, obj: Any) -> dict[str, tuple[bool, Any]]:
    """attr -> (had its own value, that value) for what stepcache installed on ``obj``; the first
    record wins (``compile`` wraps an installed wrapper again)."""
    own: dict[str, tuple[bool, Any]] = {}
    for o, attr, had_own, value in handle._installed:
        if o is obj:
            own.setdefault(attr, (had_own, value))
    return own


def _plain_deepcopy(handle: Handle, obj: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``obj`` as it was before stepcache: what copy.deepcopy would make of it
    through its class's ``__reduce_ex__``, minus the attributes stepcache installed (submodules
    that stepcache patched strip theirs the same way as the copy reaches them)."""
    rv = type(obj).__reduce_ex__(obj, 4)
    plain = (
        isinstance(rv, tuple)
        and len(rv) >= 3
        and rv[0] is copyreg.__newobj__
        and isinstance(rv[2], dict)
        and all(extra is None for extra in rv[3:])
    )
    if not plain:  # a class with its own reduction: stripping its state is not safe
        raise TypeError(_refusal(obj, "deep-copied"))
    cls, *args = rv[1]
    y = cls.__new__(cls, *copy.deepcopy(args, memo))
    memo[id(obj)] = y
    own = _own_state(handle, obj)
    state = {k: v for k, v in rv[2].items() if k not in own}
    state.update({k: value for k, (had_own, value) in own.items() if had_own})
    state = copy.deepcopy(state, memo)
    if hasattr(y, "__setstate__"):
        y.__setstate__(state)
    else:
        y.__dict__.update(state)
    return y


def detach(model: nn.Module) -> bool:
    handle = _HANDLES.pop(model, None)
    if handle is None:
        return False
    for obj, attr, had_own, own in reversed(handle._installed):
        if had_own:
            obj.__dict__[attr] = own
        else:
            obj.__dict__.pop(attr, None)
    handle._installed.clear()
    return True


class ExpertsHandle:
    """One ``enable`` over a pipeline with several denoisers (Wan 2.2's high- and low-noise
    experts): a handle per denoiser, each counting the pipeline's steps, no cache shared."""

    def __init__(self, handles: dict[str, Handle]):
        self.handles = handles

    def stats(self) -> dict[str, Any]:
        """Counts summed over the experts; ``actions`` in the order the experts ran (one after
        the other); each expert's own under ``experts``."""
        per = {name: h.stats() for name, h in self.handles.items()}
        used = [st for st in per.values() if st["steps"]]
        out: dict[str, Any] = {
            k: sum(st[k] for st in per.values())
            for k in next(iter(per.values()))
            if k not in ("actions", "row_actions")
        }
        out["actions"] = [a for st in used for a in st["actions"]]
        out["row_actions"] = [r for st in used for r in st["row_actions"]]
        out["experts"] = per
        return out

    def disable(self) -> None:
        for h in reversed(list(self.handles.values())):  # each restores what the later one wrapped
            h.disable()

    def compile(self, **options: Any) -> ExpertsHandle:
        for h in self.handles.values():
            h.compile(**options)
        return self

    @property
    def active(self) -> bool:
        return any(h.active for h in self.handles.values())

    @property
    def policy(self) -> Any:
        return next(iter(self.handles.values())).policy


def handle_of(model: nn.Module) -> Handle | None:
    return _HANDLES.get(model)
