"""Named default policies, one per method, declared in the method's file. ``get(name, **overrides)``
returns a Policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import methods
from .errors import PolicyError
from .policy import SCHEMA, Policy, rule_schema


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    description: str
    params: dict[str, Any]


def _presets() -> dict[str, Preset]:
    """Each method's default preset, as its file declares it (``methods.Method``)."""
    return {name: Preset(name, name, m.preset, m.defaults()) for name, m in methods.methods().items()}


def names() -> list[str]:
    return list(_presets())


def describe(name: str) -> str:
    return _lookup(name).description


def _lookup(name: str) -> Preset:
    known = _presets()
    if not isinstance(name, str) or name not in known:
        raise PolicyError(f"preset: unknown name {name!r}; known presets: {', '.join(known)}")
    return known[name]


def get(name: str, **overrides: Any) -> Policy:
    """The preset's policy, with any parameter overridden (validated like a policy file)."""
    preset = _lookup(name)
    level = rule_schema(preset.method).level
    unknown = sorted(set(overrides) - set(rule_schema(preset.method).params))
    if unknown:
        known = ", ".join(sorted(rule_schema(preset.method).params))
        raise PolicyError(f"{name}.{unknown[0]}: unknown parameter for preset {name!r}; known: {known}")
    rule = {"method": preset.method, **preset.params, **overrides}
    try:
        return Policy.from_dict({"schema": SCHEMA, "name": name, "rules": {level: rule}})
    except PolicyError as e:
        # Name the preset parameter rather than the internal rule path.
        raise PolicyError(str(e).replace(f"rules.{level}.", f"{name}.", 1)) from None
