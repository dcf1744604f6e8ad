"""Method registry: each method file registers its parameter schema and a factory.

``build(policy)`` turns a validated policy into the rule objects the runtime runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..policy import Policy, RuleSchema, register_rule
from ..runtime import BlockRule, RuleSet, StepRule

_FACTORIES: dict[str, Callable[[Mapping[str, Any]], StepRule | BlockRule]] = {}


def register_method(schema: RuleSchema, factory: Callable[[Mapping[str, Any]], StepRule | BlockRule]) -> None:
    register_rule(schema)
    _FACTORIES[schema.method] = factory


def build(policy: Policy) -> RuleSet:
    built: dict[str, Any] = {}
    for level, rule in policy.rules.items():
        built[level] = _FACTORIES[rule.method](rule.params)
    return RuleSet(step=built.get("step"), block=built.get("block"), guard=policy.guard)


# Importing a method file registers it.
from .step import adams_bashforth, fbcache, fsampler, static_interval, taylorseer  # noqa: E402,F401

__all__ = ["build", "register_method"]
