"""Property-based fuzzing: random valid policies on every tiny family never crash, stay finite
and account for every call; random invalid documents only ever raise PolicyError."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import stepcache
from stepcache.errors import PolicyError
from stepcache.policy import SCHEMA, Param, Policy, known_methods, rule_schema

MODELS = {name: tiny.make(name) for name in tiny.CORE}
UNETS = {"unet", "unet-cond"}
TOKEN_FAMILIES = {"dit", "pixart", "sd3"}  # positions added before the blocks: token caching runs


def _param_value(p: Param, steps: int) -> st.SearchStrategy:
    if p.kind == "int":
        lo = int(p.min) if p.min is not None else 0
        return st.integers(lo, min(int(p.max) if p.max is not None else lo + 8, lo + 8))
    if p.kind == "float":
        lo = p.min if p.min is not None else -1.0
        hi = p.max if p.max is not None else lo + 2.0
        return st.floats(lo, min(hi, lo + 2.0), allow_nan=False)
    if p.kind == "bool":
        return st.booleans()
    if p.kind == "str":  # a free string (a model's name) keeps its default
        return st.sampled_from(p.choices) if p.choices else st.just(p.default)
    if p.kind == "bool_list":
        return st.lists(st.booleans(), max_size=steps + 2)
    if p.kind == "int_list":  # per-channel assignments: mostly of another width (refused by name)
        return st.lists(st.integers(int(p.min or 0), int(p.max if p.max is not None else 3)), max_size=40)
    lo = p.min if p.min is not None else -2.0
    return st.lists(st.floats(lo, lo + 3.0, allow_nan=False), max_size=3 * steps + 3)


@st.composite
def rules(draw, level: str, steps: int, unet: bool):
    methods = [m for m in known_methods() if rule_schema(m).level == level]
    if level == "block":
        methods = ["deepcache"] if unet else [m for m in methods if m != "deepcache"]
    method = draw(st.sampled_from(methods))
    params = {}
    for name, p in rule_schema(method).params.items():
        if draw(st.booleans()):  # leave about half at their defaults
            value = draw(st.none() if p.nullable and draw(st.booleans()) else _param_value(p, steps))
            params[name] = value
    return {"method": method, **params}


@st.composite
def cases(draw):
    family = draw(st.sampled_from(sorted(MODELS)))
    steps = draw(st.integers(1, 12))
    doc_rules = {}
    for level in ("step", "block", "guidance"):
        if draw(st.booleans()):
            doc_rules[level] = draw(rules(level, steps, family in UNETS))
    doc = {"schema": SCHEMA, "rules": doc_rules, "guard": draw(st.booleans())}
    return family, steps, draw(st.integers(1, 3)), draw(st.booleans()), doc


def _generate(model, family, policy, steps, batch, cfg):
    handle = stepcache.enable(model, policy)
    try:
        rows = 2 * batch if cfg else batch
        with handle.generation(num_steps=steps, cfg="uncond_last" if cfg else None):
            out = tiny.sample(family, model, batch=rows, steps=steps)
        return out, handle.stats()
    finally:
        stepcache.disable(model)


@settings(
    max_examples=1100,  # spread over the core tiny families; sized to keep the suite under ~15 min
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_random_valid_policies_run_on_every_family(case):
    family, steps, batch, cfg, doc = case
    try:
        policy = Policy.from_dict(doc)
    except PolicyError:
        assume(False)  # a cross-field check (start < end, coefficients in threes) rejected it
    model = MODELS[family]
    try:
        out, stats = _generate(model, family, policy, steps, batch, cfg)
    except stepcache.UnsupportedModelError:  # no lower resolution, or a stand-in model of another shape
        used = {r.method for r in policy.rules.values()}
        assume(not {"bottleneck", "t-stitch"} & used)
        assume("toca" not in used or family in TOKEN_FAMILIES)  # rotary positions and the like
        raise
    except ValueError as e:  # a per-channel list fitted to another width; anything else fails
        assume("fitted on another model" not in str(e))
        raise
    assert torch.isfinite(out).all()
    assert stats["steps"] == steps
    assert stats["computed"] + stats["estimated"] + stats["partial"] == steps
    assert len(stats["row_actions"]) == steps and all(len(r) == out.shape[0] for r in stats["row_actions"])
    assert stats["cfg_skipped"] <= steps * batch
    again, stats_again = _generate(model, family, policy, steps, batch, cfg)
    assert stats_again["row_actions"] == stats["row_actions"]
    assert torch.equal(again, out)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@st.composite
def broken_documents(draw):
    """Near-valid documents with one part replaced by arbitrary JSON."""
    method = draw(st.sampled_from(known_methods()))
    level = rule_schema(method).level
    doc = {"schema": SCHEMA, "rules": {level: {"method": method}}}
    where = draw(st.sampled_from(["top", "rules", "rule", "param", "schema", "meta"]))
    junk = draw(JSON)
    if where == "top":
        return junk
    if where == "rules":
        doc["rules"] = junk
    elif where == "rule":
        doc["rules"][level] = junk
    elif where == "param":
        name = draw(st.sampled_from([*rule_schema(method).params, "unknown_field"]))
        doc["rules"][level][name] = junk
    elif where == "schema":
        doc["schema"] = junk
    else:
        doc["meta"] = junk
    return doc


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(broken_documents())
def test_invalid_documents_only_raise_policy_error(doc):
    try:
        policy = Policy.from_dict(doc)
    except PolicyError:
        return
    # Accepted: it must then round-trip through JSON exactly.
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


@pytest.mark.parametrize("depth", [50, 5000])
def test_deep_nesting_and_huge_arrays_are_policy_errors(depth):
    nested: object = 1
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(PolicyError):
        Policy.from_dict({"schema": SCHEMA, "rules": {}, "meta": {"notes": nested}})
    with pytest.raises(PolicyError):
        Policy.from_dict(
            {"schema": SCHEMA, "rules": {"step": {"method": "static-interval", "mask": [True] * 20_000}}}
        )
