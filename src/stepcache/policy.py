"""The policy: versioned, strictly validated JSON data describing what to run at each step.

A policy holds at most one rule per decision level (``step``, ``block``, ``guidance``). Each rule
names a method and its parameters. Methods publish their parameter schema here with
:func:`register_rule`, so this module validates every field without importing any method.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._io import UnreadableFileError, atomic_write_json, read_limited
from ._limits import MAX_JSON_INT, MAX_POLICY_BYTES
from .errors import PolicyError

SCHEMA = "stepcache.policy/1"
LEVELS = ("step", "block", "guidance")
MAX_LIST_LEN = 10_000
MAX_DEPTH = 8
MAX_NAME_LEN = 200
# Run names the benchmark gives itself: "reference" is the full-compute run, and "__..." keys
# (such as "__reference__") are its own entries in samples.safetensors.
RESERVED_NAMES = ("reference",)
RESERVED_PREFIX = "__"


@dataclass(frozen=True)
class Param:
    """One rule parameter: its type, default, bounds and a one-line meaning."""

    kind: str  # "int" | "float" | "bool" | "str" | "bool_list" | "int_list" | "float_list"
    default: Any
    doc: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False


@dataclass(frozen=True)
class RuleSchema:
    method: str
    level: str
    summary: str
    params: Mapping[str, Param]
    # Cross-field check: returns (field, problem) or None.
    check: Callable[[Mapping[str, Any]], tuple[str, str] | None] | None = None


_RULES: dict[str, RuleSchema] = {}


def register_rule(schema: RuleSchema) -> RuleSchema:
    if schema.level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {schema.level!r}")
    _RULES[schema.method] = schema
    return schema


def rule_schema(method: str) -> RuleSchema:
    try:
        return _RULES[method]
    except KeyError:
        raise PolicyError(f"unknown method {method!r}; known: {', '.join(sorted(_RULES))}") from None


def known_methods() -> list[str]:
    return sorted(_RULES)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    """A short repr: a field's value in an error message, never megabytes of it."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {value.bit_length()} bits"  # repr() of a 5000-digit int raises
    return reprlib.repr(value)


def _check_unicode(path: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PolicyError(f"{path}: not valid Unicode (a lone surrogate such as {_show(text)})") from None
    return text


def check_name(name: Any, path: str = "name") -> str:
    """A run or policy name that is safe to print, store and use as a key in result files."""
    if not isinstance(name, str):
        raise PolicyError(f"{path}: expected a string, got {_type_name(name)}")
    if not 1 <= len(name) <= MAX_NAME_LEN:
        raise PolicyError(f"{path}: must be 1 to {MAX_NAME_LEN} characters, got {len(name)}")
    _check_unicode(path, name)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise PolicyError(f"{path}: must not contain control characters, got {_show(name)}")
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIX):
        raise PolicyError(
            f"{path}: {name!r} is reserved for the benchmark's own runs "
            f"({', '.join(RESERVED_NAMES)} and names starting with {RESERVED_PREFIX!r})"
        )
    return name


def _check_number(path: str, value: Any, p: Param, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        want = "an integer" if integer else "a number"
        raise PolicyError(f"{path}: expected {want}, got {_type_name(value)} {_show(value)}")
    if isinstance(value, int) and abs(value) > MAX_JSON_INT:
        raise PolicyError(f"{path}: must be within +-2**53, got {_show(value)}")
    if not integer and not math.isfinite(value):
        raise PolicyError(f"{path}: expected a finite number, got {value!r}")
    if p.min is not None and value < p.min:
        raise PolicyError(f"{path}: must be >= {p.min}, got {_show(value)}")
    if p.max is not None and value > p.max:
        raise PolicyError(f"{path}: must be <= {p.max}, got {_show(value)}")
    return int(value) if integer else float(value)


def _check_param(path: str, value: Any, p: Param) -> Any:
    if value is None:
        if p.nullable:
            return None
        raise PolicyError(f"{path}: must not be null")
    if p.kind == "int":
        return _check_number(path, value, p, integer=True)
    if p.kind == "float":
        return _check_number(path, value, p, integer=False)
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise PolicyError(f"{path}: expected true/false, got {_type_name(value)} {_show(value)}")
        return value
    if p.kind == "str":
        if not isinstance(value, str):
            raise PolicyError(f"{path}: expected a string, got {_type_name(value)}")
        if p.choices and value not in p.choices:
            raise PolicyError(f"{path}: must be one of {list(p.choices)}, got {_show(value)}")
        return _check_unicode(path, value)
    if p.kind in ("bool_list", "int_list", "float_list"):
        if not isinstance(value, list):
            raise PolicyError(f"{path}: expected a list, got {_type_name(value)}")
        if len(value) > MAX_LIST_LEN:
            raise PolicyError(f"{path}: list too long ({len(value)} > {MAX_LIST_LEN})")
        inner = Param(p.kind.removesuffix("_list"), None, "", p.min, p.max)
        return [_check_param(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    raise AssertionError(f"unknown param kind {p.kind}")


def validate_params(method: str, params: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Check ``params`` against the method's schema and fill in defaults."""
    schema = rule_schema(method)
    unknown = sorted(set(params) - set(schema.params))
    if unknown:
        raise PolicyError(
            f"{path}.{unknown[0]}: unknown field for method {method!r}; "
            f"known fields: {', '.join(sorted(schema.params)) or '(none)'}"
        )
    out = {}
    for name, p in schema.params.items():
        out[name] = _check_param(f"{path}.{name}", params[name], p) if name in params else p.default
    if schema.check is not None:
        problem = schema.check(out)
        if problem is not None:
            raise PolicyError(f"{path}.{problem[0]}: {problem[1]}")
    return out


def _check_json_value(path: str, value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise PolicyError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _check_unicode(path, value)
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise PolicyError(f"{path}: must be within +-2**53, got {_show(value)}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PolicyError(f"{path}: expected a finite number, got {value!r}")
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST_LEN:
            raise PolicyError(f"{path}: list too long ({len(value)} > {MAX_LIST_LEN})")
        return [_check_json_value(f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if len(value) > MAX_LIST_LEN:
            raise PolicyError(f"{path}: too many keys ({len(value)})")
        for k in value:
            if not isinstance(k, str):
                raise PolicyError(f"{path}: keys must be strings, got {_show(k)}")
            _check_unicode(f"{path} key", k)
        return {k: _check_json_value(f"{path}.{k}", v, depth + 1) for k, v in value.items()}
    raise PolicyError(f"{path}: not JSON data ({_type_name(value)})")


# meta: what the policy was made for and how it was found. Free-form values are JSON data.
_META_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "model_hash": (str,),
    "scheduler": (str, type(None)),
    "steps": (int,),
    "guidance_scale": (int, float, type(None)),  # None: a pipeline without a guidance scale
    "resolution": (int, list),
    "found_by": (str,),
    "target": (dict,),
    "budget_used": (int, float),
    "calibration": (dict,),
    "heldout": (dict,),
    "pareto": (list,),
    "oracle": (dict,),
    "search": (dict,),
    "notes": (str,),
    "workload": (dict,),  # what the user's pipeline generated (stepcache.Workload.to_dict())
}

_TOP_FIELDS = ("schema", "name", "rules", "meta", "guard")


@dataclass(frozen=True)
class Rule:
    method: str
    params: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: _plain(v) for k, v in self.params.items()}}

    def __reduce__(self) -> tuple[Callable[..., Rule], tuple[str, dict[str, Any]]]:
        return (_make_rule, (self.method, {k: _plain(v) for k, v in self.params.items()}))


def _make_rule(method: str, params: dict[str, Any]) -> Rule:
    return Rule(method, MappingProxyType(params))


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build one with :meth:`from_dict`, :meth:`load` or ``presets.get``."""

    rules: Mapping[str, Rule]
    name: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    guard: bool = True

    def __post_init__(self) -> None:
        if self.name is not None:
            check_name(self.name)

    def __reduce__(self) -> tuple[Callable[[Any], Policy], tuple[dict[str, Any]]]:
        # The mapping proxies do not pickle; plain data does, and unpickling revalidates it.
        return (_policy_from_dict, (self.to_dict(),))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy: expected a JSON object, got {_type_name(data)}")
        unknown = sorted(set(data) - set(_TOP_FIELDS))
        if unknown:
            raise PolicyError(f"{unknown[0]}: unknown field; known fields: {', '.join(_TOP_FIELDS)}")
        if "schema" not in data:
            raise PolicyError(f"schema: missing; expected {SCHEMA!r}")
        if data["schema"] != SCHEMA:
            raise PolicyError(
                f"schema: unsupported version {data['schema']!r}; this stepcache reads {SCHEMA!r}"
            )
        name = data.get("name")
        if name is not None:
            check_name(name)
        guard = data.get("guard", True)
        if not isinstance(guard, bool):
            raise PolicyError(f"guard: expected true/false, got {_type_name(guard)}")
        if "rules" not in data:
            raise PolicyError('rules: missing; expected an object such as {"step": {"method": ...}}')
        raw_rules = data["rules"]
        if not isinstance(raw_rules, Mapping):
            raise PolicyError(f"rules: expected an object, got {_type_name(raw_rules)}")
        rules: dict[str, Rule] = {}
        for level, raw in raw_rules.items():
            path = f"rules.{level}"
            if level not in LEVELS:
                raise PolicyError(f"{path}: unknown level; levels are {', '.join(LEVELS)}")
            if not isinstance(raw, Mapping):
                raise PolicyError(f"{path}: expected an object, got {_type_name(raw)}")
            method = raw.get("method")
            if not isinstance(method, str):
                raise PolicyError(f"{path}.method: expected a method name, got {_type_name(method)}")
            try:
                schema = rule_schema(method)
            except PolicyError as e:
                raise PolicyError(f"{path}.method: {e}") from None
            if schema.level != level:
                raise PolicyError(f"{path}.method: {method!r} is a {schema.level}-level method, not {level}")
            params = {k: v for k, v in raw.items() if k != "method"}
            rules[level] = Rule(method, MappingProxyType(validate_params(method, params, path)))
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise PolicyError(f"meta: expected an object, got {_type_name(meta)}")
        for key, value in meta.items():
            if key not in _META_FIELDS:
                raise PolicyError(f"meta.{key}: unknown field; known fields: {', '.join(_META_FIELDS)}")
            types = _META_FIELDS[key]
            if isinstance(value, bool) or not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise PolicyError(f"meta.{key}: expected {want}, got {_type_name(value)}")
            _check_json_value(f"meta.{key}", value)
        return cls(rules=MappingProxyType(rules), name=name, meta=MappingProxyType(dict(meta)), guard=guard)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        p = Path(path)
        try:
            # Bounded and non-blocking: a FIFO or /dev/zero given as a policy must not hang.
            text = read_limited(p, MAX_POLICY_BYTES, "policy file").decode("utf-8")
        except UnreadableFileError as e:
            raise PolicyError(str(e)) from None
        except (ValueError, UnicodeDecodeError) as e:  # e.g. a NUL byte in the path
            raise PolicyError(f"{p}: cannot read policy file ({e})") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise PolicyError(f"{p}: not a JSON policy file ({e})") from None
        return cls.from_dict(data)

    # ---- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA}
        if self.name is not None:
            out["name"] = self.name
        out["rules"] = {level: self.rules[level].to_dict() for level in LEVELS if level in self.rules}
        if not self.guard:
            out["guard"] = False
        if self.meta:
            out["meta"] = json.loads(json.dumps(dict(self.meta)))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    def with_meta(self, **meta: Any) -> Policy:
        merged = {**self.meta, **meta}
        return Policy.from_dict({**self.to_dict(), "meta": merged})

    def __repr__(self) -> str:
        rules = ", ".join(f"{lvl}={r.method}" for lvl, r in self.rules.items())
        return f"Policy(name={self.name!r}, {rules or 'always compute'})"


def _policy_from_dict(data: Any) -> Policy:
    return Policy.from_dict(data)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def compose(*policies: Policy, name: str | None = None) -> Policy:
    """One policy holding the rules of several; at most one rule per level."""
    rules: dict[str, Rule] = {}
    owner: dict[str, str] = {}
    for i, pol in enumerate(policies):
        if not isinstance(pol, Policy):
            raise PolicyError(f"compose: argument {i} is a {_type_name(pol)}, not a Policy")
        for level, rule in pol.rules.items():
            if level in rules:
                raise PolicyError(
                    f"rules.{level}: both {owner[level]!r} and {rule.method!r} are {level}-level rules; "
                    "a policy holds one rule per level"
                )
            rules[level] = rule
            owner[level] = rule.method
    name = name or "+".join(p.name or "policy" for p in policies)
    return Policy(rules=MappingProxyType(rules), name=name, guard=all(p.guard for p in policies))
