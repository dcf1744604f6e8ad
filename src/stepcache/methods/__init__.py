"""Method registry: each method file registers its parameter schema and a factory.

``build(policy)`` turns a validated policy into the rule objects the runtime runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..policy import Policy, RuleSchema, register_rule
from ..runtime import BlockRule, GuidanceRule, RuleSet, StepRule

_FACTORIES: dict[str, Callable[[Mapping[str, Any]], StepRule | BlockRule | GuidanceRule]] = {}


def register_method(
    schema: RuleSchema, factory: Callable[[Mapping[str, Any]], StepRule | BlockRule | GuidanceRule]
) -> None:
    register_rule(schema)
    _FACTORIES[schema.method] = factory


def build(policy: Policy) -> RuleSet:
    built: dict[str, Any] = {}
    for level, rule in policy.rules.items():
        built[level] = _FACTORIES[rule.method](rule.params)
    return RuleSet(
        step=built.get("step"), block=built.get("block"), guidance=built.get("guidance"), guard=policy.guard
    )


# Importing a method file registers it.
from .block import dbcache, deepcache, delta_dit, fbcache, fora, taylorseer_feature, teacache  # noqa: E402,F401
from .guidance import adaptive_guidance, cfg_cache, guidance_interval, linear_ag  # noqa: E402,F401
from .step import adams_bashforth, fsampler, magcache, schedule, static_interval, taylorseer  # noqa: E402,F401

__all__ = ["build", "register_method"]
