"""Method registry. A method is one file in ``methods/step``, ``methods/block`` or
``methods/guidance`` that defines ``METHOD = Method(...)``: its parameters, its rule, its default
preset, the settings ``compare`` sweeps and, if it has coefficients or a threshold to fit, how
calibration fits them (``methods/threshold.py`` for thresholds).
The registry imports every module of those folders and registers the ``METHOD`` it finds, so
dropping a file in is all it takes (files starting with ``_`` are skipped).

``build(policy)`` turns a validated policy into the rule objects the runtime runs.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..policy import LEVELS, Policy, RuleSchema, register_rule
from ..runtime import RuleSet


@dataclass(frozen=True)
class Method:
    """Everything the library knows about one method, declared beside its code.

    ``rule`` is called with the policy rule's parameters as keywords (its signature must name
    exactly the schema's parameters). The default preset is named after the method and uses the
    schema's defaults, except for ``preset_params``. ``sweep``: the settings ``compare`` runs, as
    overrides of the preset ({} is the preset itself). ``calibrate(pipe, run, params)`` returns the
    value of the parameter ``fits`` from full-compute generations ``run()`` of ``pipe``; ``params``
    are the rule's other parameters (preset and overrides), for fits that depend on them.
    """

    schema: RuleSchema
    rule: Callable[..., Any]
    preset: str
    preset_params: Mapping[str, Any] = field(default_factory=dict)
    sweep: tuple[Mapping[str, Any], ...] = ({},)
    fits: str = ""
    calibrate: Callable[[Any, Callable[[], Any], Mapping[str, Any]], Any] | None = None

    @property
    def name(self) -> str:
        return self.schema.method

    @property
    def level(self) -> str:
        return self.schema.level

    def defaults(self) -> dict[str, Any]:
        """The default preset's parameters."""
        params = {**{k: p.default for k, p in self.schema.params.items()}, **self.preset_params}
        return copy.deepcopy(params)


_METHODS: dict[str, Method] = {}
_SOURCES: dict[str, str] = {}


def register(method: Method, source: str = "") -> Method:
    """Register a method (the discovery below calls this for every method file)."""
    if not isinstance(method, Method):
        raise TypeError(f"{source or 'register'}: METHOD must be a stepcache.methods.Method")
    name = method.name
    params = set(inspect.signature(method.rule).parameters)
    if params != set(method.schema.params):
        raise TypeError(
            f"method {name!r}: its rule takes {sorted(params)} but its schema declares "
            f"{sorted(method.schema.params)}; they must be the same names"
        )
    unknown = set(method.preset_params).union(*method.sweep) - set(method.schema.params)
    if unknown:
        raise TypeError(f"method {name!r}: preset or sweep names unknown parameter(s) {sorted(unknown)}")
    if bool(method.fits) != (method.calibrate is not None) or (
        method.fits and method.fits not in method.schema.params
    ):
        raise TypeError(f"method {name!r}: `fits` must name the parameter `calibrate` returns")
    if name in _METHODS and _SOURCES.get(name) != source:
        raise ValueError(f"method {name!r} is declared twice: in {_SOURCES[name]} and in {source}")
    register_rule(method.schema)
    _METHODS[name] = method
    _SOURCES[name] = source
    return method


def methods() -> Mapping[str, Method]:
    """Every registered method by name, in level order (step, block, guidance), then by name."""
    order = sorted(_METHODS.values(), key=lambda m: (LEVELS.index(m.level), m.name))
    return MappingProxyType({m.name: m for m in order})


def method(name: str) -> Method:
    from ..policy import rule_schema

    rule_schema(name)  # PolicyError naming the known methods
    return _METHODS[name]


def build(policy: Policy) -> RuleSet:
    built: dict[str, Any] = {}
    for level, rule in policy.rules.items():
        built[level] = _METHODS[rule.method].rule(**rule.params)
    return RuleSet(
        step=built.get("step"), block=built.get("block"), guidance=built.get("guidance"), guard=policy.guard
    )


def _discover() -> None:
    for level in LEVELS:
        package = importlib.import_module(f"{__name__}.{level}")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            declared = getattr(module, "METHOD", None)
            if declared is None:
                continue  # a helper module
            if isinstance(declared, Method) and declared.level != level:
                raise TypeError(
                    f"{module.__name__}: declares a {declared.level}-level method in methods/{level}/"
                )
            register(declared, source=module.__name__)


_discover()

__all__ = ["Method", "build", "method", "methods", "register"]
