"""The small interfaces a method implements, and the per-call context the runtime hands it.

Rows: every per-sample cache a rule keeps is indexed by the *full* batch of the call. The
runtime passes ``rows`` as a LongTensor of full-batch row indices, or ``None`` for all rows.
``plan`` returns ``True`` (compute every row), ``False`` (estimate every row) or a bool tensor
over the call's active rows (``ctx.rows``), so decisions can stay per sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Plan = bool | torch.Tensor
Streams = tuple[torch.Tensor | None, ...]


@dataclass
class CallContext:
    """What a rule may know about one denoiser call."""

    step: int  # step index in the generation
    branch: int  # call index within the step (pipelines that run cond and uncond as two calls)
    num_steps: int | None
    batch: int  # full batch of the call
    timestep: Any  # the call's timestep argument as given (tensor or number)
    rows: torch.Tensor | None = None  # full-batch indices of the rows running now; None = all
    _uncond: Callable[[], torch.Tensor | None] | None = field(default=None, repr=False)
    _run_at: Callable[[float, torch.Tensor | None], torch.Tensor] | None = field(default=None, repr=False)
    _run_model: Callable[[Any, torch.Tensor | None], torch.Tensor] | None = field(default=None, repr=False)

    def run_at(self, scale: float, rows: torch.Tensor | None) -> torch.Tensor:
        """The network's real output for ``rows`` on this call's sample resized to ``scale`` times
        its height and width (rounded down to what the model's patches allow): a cheaper call, at
        low resolution. Raises UnsupportedModelError where the model cannot take that size."""
        if self._run_at is None:
            raise RuntimeError("run_at: only a step rule's estimate may run the network")
        return self._run_at(scale, rows)

    def run_model(self, module: Any, rows: torch.Tensor | None) -> torch.Tensor:
        """Another denoiser's output for ``rows``, called with this call's arguments (a smaller
        model of the same class: T-Stitch). Raises UnsupportedModelError if its output has
        another shape."""
        if self._run_model is None:
            raise RuntimeError("run_model: only a step rule's estimate may run another model")
        return self._run_model(module, rows)

    def uncond_rows(self) -> torch.Tensor | None:
        """Bool mask over the full batch: rows that are the unconditional half of batched CFG."""
        return self._uncond() if self._uncond is not None else None

    def timestep_value(self) -> float:
        """The timestep as a Python float (a host sync if it lives on an accelerator)."""
        t = self.timestep
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0].item())
        return float(t)


def take(store: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """The active rows of a full-batch cache tensor."""
    if store is None or rows is None:
        return store
    return store.index_select(0, rows)


def put(
    store: torch.Tensor | None, rows: torch.Tensor | None, value: torch.Tensor, batch: int
) -> torch.Tensor:
    """Write ``value`` into the given rows of a full-batch cache, allocating it on first use."""
    value = value.detach()
    if rows is None:
        return value.clone()
    if store is None or store.shape[1:] != value.shape[1:] or store.dtype != value.dtype:
        store = torch.zeros((batch, *value.shape[1:]), dtype=value.dtype, device=value.device)
    store.index_copy_(0, rows, value)
    return store


def take_streams(store: Streams, rows: torch.Tensor | None) -> Streams:
    """The active rows of each cached stream."""
    return tuple(take(s, rows) for s in store)


def put_streams(store: Streams | None, rows: torch.Tensor | None, value: Streams, batch: int) -> Streams:
    """Write each stream's rows into its full-batch cache (streams that are None stay None)."""
    old = store or (None,) * len(value)
    return tuple(None if v is None else put(o, rows, v, batch) for o, v in zip(old, value, strict=True))


def gather_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The given tokens of each row of ``x`` (rows, all tokens, channels): ``tokens`` holds each
    row's positions, (rows, k)."""
    return x.gather(1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_(x: torch.Tensor, tokens: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write ``value`` (rows, k, channels) at each row's ``tokens`` of ``x``, in place."""
    return x.scatter_(1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]), value.to(x.dtype))


class StepRule(ABC):
    """Decides, per call and per row, whether the whole denoiser runs or its output is estimated."""

    level = "step"
    # Whether estimate needs no earlier output and may answer a generation's first call (it runs
    # another model); otherwise the first call computes.
    answers_first = False

    def new_state(self) -> Any:
        """This rule's state for one branch of one generation, handed to every call: a dict, or
        the rule's own dataclass (typed; the runtime counts the tensors in either)."""
        return {}

    @abstractmethod
    def plan(self, ctx: CallContext, state: Any) -> Plan: ...

    @abstractmethod
    def estimate(self, ctx: CallContext, state: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The denoiser output for ``rows`` without running it, or None to have the step computed
        (a rule that validates its own estimate); the runtime counts that as a fallback."""

    @abstractmethod
    def observe(self, ctx: CallContext, state: Any, output: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Record a real output for ``rows``."""


class SpanRule(ABC):
    """A block-level rule over the middle span of the block stack: head and tail always run."""

    level = "block"

    def new_state(self) -> Any:
        """This rule's state for one branch of one generation, handed to every call: a dict, or
        the rule's own dataclass (typed; the runtime counts the tensors in either)."""
        return {}

    @abstractmethod
    def span(self, num_blocks: int) -> tuple[int, int]:
        """(head_end, tail_start): the middle is blocks[head_end:tail_start]."""

    def span_at(self, num_blocks: int, ctx: CallContext) -> tuple[int, int]:
        """The span for one call; rules whose span moves with the step override this."""
        return self.span(num_blocks)


class BlockRule(SpanRule):
    """Splits the block stack into head / middle / tail and decides when the middle runs.

    Head and tail always run. When the middle is skipped, its input plus an estimated residual
    stands in for its output.
    """

    # With an empty head, whether plan needs the first block's modulated input (computing it
    # costs that block's normalisation once more per call).
    wants_signal = True

    @abstractmethod
    def plan(self, ctx: CallContext, state: Any, head_residual: Streams) -> Plan:
        """Which rows run the middle. ``head_residual``: the head's output minus its input, per
        stream; with an empty head (span starting at 0), a one-tuple holding the first block's
        timestep-modulated input instead (the adapter's ``modulated_input``)."""

    @abstractmethod
    def estimate(self, ctx: CallContext, state: Any, rows: torch.Tensor | None) -> Streams:
        """The middle's residual (output minus input, per stream) for ``rows``.

        Must not change ``state``: with the guard on and a per-row plan, the runtime asks for
        every active row (rows that will compute included, even ones never observed, whose
        values may be anything) and keeps those of the rows that skip."""

    @abstractmethod
    def observe(self, ctx: CallContext, state: Any, residual: Streams, rows: torch.Tensor | None) -> None:
        """Record the middle's real residual for ``rows``."""


class PerBlockRule(ABC):
    """Decides block by block: each block of the stack either runs or answers with its input plus
    a residual the rule estimates (its cached one). Decided for the whole call; calls that run a
    subset of the rows compute every block and leave the caches alone."""

    level = "block"

    def new_state(self) -> Any:
        """This rule's state for one branch of one generation (a dict or the rule's dataclass)."""
        return {}

    @abstractmethod
    def plan(self, ctx: CallContext, state: Any, index: int, block_in: Streams) -> bool:
        """Whether block ``index`` runs, given its input streams."""

    @abstractmethod
    def estimate(self, ctx: CallContext, state: Any, index: int, block_in: Streams) -> Streams:
        """Block ``index``'s residual (output minus input, per stream); must not change ``state``."""

    @abstractmethod
    def observe(self, ctx: CallContext, state: Any, index: int, block_in: Streams, residual: Streams) -> None:
        """Record block ``index``'s real input and residual."""


class TokenRule(SpanRule):
    """Runs the middle span of the block stack on some of the tokens only (per sample), the
    others answering with their input plus the residual they had when they last ran.

    The tokens are those of the first hidden stream ``(batch, tokens, channels)``; other streams
    (a text stream) run in full. Inside the span, self-attention still sees every token: the
    runtime keeps each self-attention layer's keys and values and refreshes the rows of the
    tokens that run, so a running token attends to the others' cached keys and values. The
    guard has nothing to check here: every value a token step uses was computed.
    """

    @abstractmethod
    def plan(self, ctx: CallContext, state: Any, block_in: Streams) -> torch.Tensor | None:
        """None: every token runs. Otherwise a LongTensor ``(active rows, k)``: per row, the
        token positions that run (the same ``k`` for every row)."""

    @abstractmethod
    def estimate(self, ctx: CallContext, state: Any, rows: torch.Tensor | None) -> Streams:
        """The cached residual of every token (full length, per stream) for ``rows``."""

    @abstractmethod
    def observe(
        self,
        ctx: CallContext,
        state: Any,
        block_in: Streams,
        residual: Streams,
        tokens: torch.Tensor | None,
        rows: torch.Tensor | None,
    ) -> None:
        """Record the span's input and real residual: of every token (``tokens`` None), or of
        the tokens that ran (the first stream's residual then holds only those, in order)."""


class BranchRule(ABC):
    """A module-output cache (DeepCache, FORA): on a skipped call, chosen modules return their
    output from the last computed call, and the modules this makes unnecessary return empty
    placeholders of the right shape without running. Decided for the whole call.
    """

    level = "block"

    def new_state(self) -> Any:
        """This rule's state for one branch of one generation, handed to every call: a dict, or
        the rule's own dataclass (typed; the runtime counts the tensors in either)."""
        return {}

    @abstractmethod
    def modules(self, adapter: Any, model: Any) -> tuple[list[Any], list[Any]]:
        """(modules whose output is replayed, modules skipped outright); raise
        UnsupportedModelError when the model has no such modules."""

    @abstractmethod
    def plan(self, ctx: CallContext, state: Any) -> bool:
        """True: run everything (and refresh the cached outputs)."""


class GuidanceRule(ABC):
    """Decides, per step and per sample, whether the unconditional pass of batched CFG runs.

    Works on *pairs*: pair ``k`` is the k-th conditional row and the k-th unconditional row of
    the call (``ctx.batch // 2`` pairs). A skipped unconditional row gets ``estimate``'s value,
    and the pipeline's own ``u + g (c - u)`` then combines it as usual; returning the
    conditional output itself makes the guided output equal the conditional one.
    """

    level = "guidance"

    def new_state(self) -> Any:
        """This rule's state for one branch of one generation, handed to every call: a dict, or
        the rule's own dataclass (typed; the runtime counts the tensors in either)."""
        return {}

    @abstractmethod
    def plan(self, ctx: CallContext, state: Any) -> Plan:
        """True: compute every unconditional row; False: none; or a bool tensor over the pairs."""

    @abstractmethod
    def estimate(
        self, ctx: CallContext, state: Any, cond: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor | None:
        """The unconditional output for ``pairs`` given their conditional output ``cond`` (this
        step's, computed), or None to have them computed (counted as a fallback)."""

    @abstractmethod
    def observe(
        self,
        ctx: CallContext,
        state: Any,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        pairs: torch.Tensor,
    ) -> None:
        """Record real conditional and unconditional outputs of ``pairs``."""


@dataclass(frozen=True)
class RuleSet:
    """The built rules of one policy, as the runtime receives them."""

    step: StepRule | None = None
    block: BlockRule | PerBlockRule | TokenRule | BranchRule | None = None
    guidance: GuidanceRule | None = None
    # Compute instead of using a step or block estimate that is not finite or whose per-row norm
    # exceeds GUARD_RANGE (rows.py) times the largest the rule observed; a guidance estimate
    # only when it is not finite.
    guard: bool = True
