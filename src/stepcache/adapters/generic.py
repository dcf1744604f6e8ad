"""Any denoiser module or callable: what step- and guidance-level rules need, and nothing more.

A step rule sees a call's output, its batch rows and its step index; a guidance rule also needs
which rows are unconditional. None of that depends on the family, so a model without a family
adapter gets this one: the sample argument and the timestep are found by name in its signature
(or named by the user).

Block rules need the block stack and how each block carries its hidden streams. The stack is
the model's longest list of same-class blocks; how its blocks take and return the streams is read
from one real call (``probe``, once per enable): which of ``hidden_states`` and
``encoder_hidden_states`` a block takes, and where each sits in what it returns. The probe also
proves the list is a chain (each block's output is the next block's input), so that leaving out
the middle of it is the same as leaving out those blocks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, BlockIO

# Names diffusers denoisers and k-diffusion style loops give the noisy sample and the time.
SAMPLE_NAMES = ("hidden_states", "sample", "x", "latents", "latent_model_input", "z", "img", "input")
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time")


def _parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    from ..runtime import handle_of

    handle = handle_of(model)  # enabled already: its forward is stepcache's (*args, **kwargs)
    try:
        params = (handle._sig if handle is not None else inspect.signature(model.forward)).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    return {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _named(model: nn.Module, given: str | None, names: tuple[str, ...], keyword: str) -> str | None:
    params = _parameters(model)
    if given is not None:
        if not isinstance(given, str) or given not in params:
            raise UnsupportedModelError(
                f"{keyword}={given!r}: {type(model).__name__}.forward has no such argument "
                f"(its arguments: {', '.join(params) or 'none by name'})"
            )
        return given
    return next((n for n in names if n in params), None)


class GenericAdapter(Adapter):
    """A denoiser of any class: step and guidance rules, no block stack."""

    family = "generic"
    # diffusers pipelines that batch CFG put the unconditional half first
    pipeline_cfg_layout = "uncond_first"

    def __init__(self, model: nn.Module, sample_arg: str | None = None, timestep_arg: str | None = None):
        super().__init__(model)
        sample = _named(model, sample_arg, SAMPLE_NAMES, "sample_arg")
        if sample is None:
            params = _parameters(model)
            positional = [n for n, p in params.items() if p.kind != p.KEYWORD_ONLY]
            if not positional:
                raise UnsupportedModelError(
                    f"cannot tell which argument of {type(model).__name__}.forward is the noisy sample "
                    f"(arguments: {', '.join(params) or 'none by name'}); name it with "
                    "enable(..., sample_arg='NAME')"
                )
            sample = positional[0]
        self.hidden_arg = sample
        self.timestep_arg = _named(model, timestep_arg, TIMESTEP_NAMES, "timestep_arg") or ""
        self._block_io: BlockIO | None = None

    @classmethod
    def matches(cls, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def batch_size(self, bound: inspect.BoundArguments) -> int:
        sample = bound.arguments.get(self.hidden_arg)
        if isinstance(sample, list) and sample and all(isinstance(v, torch.Tensor) for v in sample):
            if len({(v.shape, v.dtype, v.device) for v in sample}) > 1:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__}: its argument {self.hidden_arg!r} is a list of "
                    "samples of different shapes; stepcache caches a batch of one shape (generate "
                    "each size in its own call)"
                )
            return len(sample)  # per-sample tensors (Z-Image): the runtime stacks them
        if not isinstance(sample, torch.Tensor) or sample.dim() == 0:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: its argument {self.hidden_arg!r} is "
                f"{type(sample).__name__}, not a batched tensor or a list of per-sample tensors; name "
                "the noisy sample with enable(..., sample_arg='NAME')"
            )
        return int(sample.shape[0])

    def timestep(self, bound: inspect.BoundArguments) -> Any:
        return bound.arguments.get(self.timestep_arg) if self.timestep_arg else None

    # ---- blocks: the longest same-class list, its streams read from one call ---------------
    def blocks(self) -> list[nn.Module] | None:
        stacks = [
            (name, list(child))
            for name, child in self.model.named_children()
            if isinstance(child, nn.ModuleList)
            and len(child) >= 2
            and len({type(b) for b in child}) == 1
            and _first_tensor_param(child[0]) is not None
        ]
        if not stacks:
            return None
        # The longest list of blocks that take the hidden states (not, say, one caption
        # projection per block); the first of equals.
        self.stack_name, blocks = max(stacks, key=lambda s: (_takes_hidden(s[1][0]), len(s[1])))
        return blocks

    @property
    def needs_probe(self) -> bool:
        return self._block_io is None

    @property
    def block_io(self) -> BlockIO:  # type: ignore[override]
        if self._block_io is None:
            raise RuntimeError("the block stack's streams are read from the first call (probe)")
        return self._block_io

    def probe(
        self, blocks: list[nn.Module], signatures: list[inspect.Signature], run: Callable[[], Any], batch: int
    ) -> None:
        """Run the model once (``run``) with hooks on ``blocks`` (whose own forward signatures are
        ``signatures``) and read how they carry streams; UnsupportedModelError (naming the stack)
        where they are not a chain this can skip."""
        calls: list[tuple[int, dict[str, Any], Any]] = []
        hooks = [
            b.register_forward_hook(_recorder(i, sig, calls), with_kwargs=True)
            for i, (b, sig) in enumerate(zip(blocks, signatures, strict=True))
        ]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        where = f"{type(self.model).__name__}.{getattr(self, 'stack_name', 'blocks')}"
        order = [i for i, _, _ in calls]
        if order != list(range(len(blocks))):
            raise UnsupportedModelError(
                f"{where}: its blocks were not each called once in order in one forward (calls: "
                f"{order[:12]}), so block-level rules cannot skip a span of them"
            )
        io = _stream_layout(where, calls)
        rows = calls[0][1][io.streams[0]].shape[0]  # the first block's hidden stream
        if rows != batch:
            raise UnsupportedModelError(
                f"{where}: its blocks run on {rows} rows for a call of {batch} samples (frames or "
                "positions folded into the batch), so a per-sample skip of the middle cannot be told "
                "apart; block-level rules need the blocks to keep the call's batch"
            )
        self._block_io = io


def _takes_hidden(block: nn.Module) -> bool:
    params = inspect.signature(type(block).forward.__get__(block)).parameters
    return "hidden_states" in params or "x" in params


def _first_tensor_param(block: nn.Module) -> str | None:
    # the class's forward: an enabled block's own is stepcache's (*args, **kwargs)
    params = inspect.signature(type(block).forward.__get__(block)).parameters
    if "hidden_states" in params:
        return "hidden_states"
    return next(iter(params), None)


def _recorder(index: int, sig: inspect.Signature, calls: list) -> Callable[..., None]:
    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            bound = None
        calls.append((index, dict(bound.arguments) if bound is not None else {}, output))

    return record


def _stream_layout(where: str, calls: list[tuple[int, dict[str, Any], Any]]) -> BlockIO:
    """Which hidden streams the blocks take and where each sits in their output, checked on every
    block of the probe call: each block's output streams are the next block's inputs."""
    _, args, out = calls[0]
    names = [n for n in ("hidden_states", "encoder_hidden_states") if isinstance(args.get(n), torch.Tensor)]
    if not names:  # another name for the one stream (Z-Image's `x`): the first tensor argument
        names = [n for n, v in args.items() if isinstance(v, torch.Tensor)][:1]
    if not names:
        raise UnsupportedModelError(f"{where}: its blocks take no tensor")
    if isinstance(out, torch.Tensor):
        # one stream out: the text stream (if any) passes every block unchanged, so only the
        # hidden stream is carried
        io = BlockIO(streams=(names[0],), out_index=None)
    elif isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out[: len(names)]):
        io = BlockIO(streams=tuple(names), out_index=_positions(where, names, args, out), out_len=len(out))
        for _, _, each in calls:  # what a skipped span cannot give back must be nothing at all
            extra = [i for i, o in enumerate(each) if i not in io.out_index and o is not None]
            if extra:
                raise UnsupportedModelError(
                    f"{where}: its blocks return more than the streams they take (output {extra[0]} "
                    f"is {type(each[extra[0]]).__name__}), so a skipped span could not give it back"
                )
    else:
        raise UnsupportedModelError(f"{where}: its blocks return {type(out).__name__}, not tensors")
    for (_, _, prev_out), (_, nxt_args, _) in zip(calls, calls[1:], strict=False):
        carried = io.read_out(prev_out)
        for name, value in zip(io.streams, carried, strict=True):
            given = nxt_args.get(name)
            if not (
                isinstance(given, torch.Tensor) and given.shape == value.shape and torch.equal(given, value)
            ):
                raise UnsupportedModelError(
                    f"{where}: `{name}` changes between one block's output and the next block's input "
                    "(another module runs in between), so block-level rules cannot skip a span of them"
                )
    return io


def _positions(where: str, names: list[str], args: dict[str, Any], out: tuple) -> tuple[int, ...]:
    """Where each input stream sits in a block's output, told apart by shape."""
    positions = []
    for name in names:
        fits = [i for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.shape == args[name].shape]
        if len(fits) != 1:
            raise UnsupportedModelError(
                f"{where}: cannot tell where `{name}` is in the blocks' output (outputs of shapes "
                f"{[tuple(o.shape) for o in out if isinstance(o, torch.Tensor)]}); a family adapter is needed"
            )
        positions.append(fits[0])
    return tuple(positions)


class CallableDenoiser(nn.Module):
    """A plain ``model(x, sigma, **extra)`` callable as a module, so the runtime can wrap it."""

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self.fn = fn
        self.forward = self._forward_like(fn)

    def _forward_like(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        # the signature the runtime binds arguments against, so it can find the sample by name
        try:
            forward.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            pass
        return forward
