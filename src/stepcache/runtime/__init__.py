"""The policy runtime: hooks on module instances, per-generation state, the rule interfaces."""

from .engine import Handle, attach, detach, handle_of
from .interfaces import (
    BlockRule,
    BranchRule,
    CallContext,
    GuidanceRule,
    PerBlockRule,
    RuleSet,
    StepRule,
    TokenRule,
    gather_tokens,
    put,
    put_streams,
    scatter_tokens_,
    take,
    take_streams,
)

__all__ = [
    "BlockRule",
    "BranchRule",
    "CallContext",
    "GuidanceRule",
    "Handle",
    "PerBlockRule",
    "RuleSet",
    "StepRule",
    "TokenRule",
    "attach",
    "detach",
    "gather_tokens",
    "handle_of",
    "put",
    "put_streams",
    "scatter_tokens_",
    "take",
    "take_streams",
]
