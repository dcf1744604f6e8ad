import json

import pytest

import stepcache
from stepcache import Policy, PolicyError, presets

VALID = {
    "schema": "stepcache.policy/1",
    "name": "mine",
    "rules": {
        "step": {"method": "static-interval", "interval": 3, "warmup": 2},
        "block": {"method": "fbcache", "threshold": 0.1},
    },
    "meta": {"model": "digits-dit", "steps": 20, "guidance_scale": 2.0, "calibration": {"psnr": 31.5}},
}


def test_round_trip_fills_defaults_and_is_stable(tmp_path):
    pol = Policy.from_dict(VALID)
    d = pol.to_dict()
    assert d["rules"]["block"] == {"method": "fbcache", "threshold": 0.1, "max_consecutive": 3, "warmup": 1}
    assert d["rules"]["step"]["mask"] is None
    path = pol.save(tmp_path / "p.json")
    assert Policy.load(path).to_dict() == d
    assert json.loads(path.read_text())["schema"] == "stepcache.policy/1"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


def test_save_is_atomic_when_serialisation_fails(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    Policy.from_dict(VALID).save(path)
    before = path.read_text()
    import stepcache._io as io_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        Policy.from_dict({**VALID, "name": "other"}).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def _with(path, value):
    """A copy of VALID with the dotted ``path`` set (or deleted when value is ...)."""
    d = json.loads(json.dumps(VALID))
    keys = path.split(".")
    node = d
    for k in keys[:-1]:
        node = node[k]
    if value is ...:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


BAD = [
    (_with("schema", "stepcache.policy/2"), "schema"),
    (_with("schema", ...), "schema"),
    (_with("schema", 1), "schema"),
    ({**VALID, "extra": 1}, "extra"),
    (_with("name", 5), "name"),
    (_with("rules", ...), "rules"),
    (_with("rules", []), "rules"),
    (_with("rules.video", {"method": "fbcache"}), "rules.video"),
    (_with("rules.step", "static-interval"), "rules.step"),
    (_with("rules.step.method", ...), "rules.step.method"),
    (_with("rules.step.method", "warp-drive"), "rules.step.method"),
    (_with("rules.step.method", "fbcache"), "rules.step.method"),
    (_with("rules.step.interval", 0), "rules.step.interval"),
    (_with("rules.step.interval", 2.5), "rules.step.interval"),
    (_with("rules.step.interval", "2"), "rules.step.interval"),
    (_with("rules.step.interval", True), "rules.step.interval"),
    (_with("rules.step.interval", 10**9), "rules.step.interval"),
    (_with("rules.step.warmup", -1), "rules.step.warmup"),
    (_with("rules.step.mask", [True, 1]), "rules.step.mask[1]"),
    (_with("rules.step.mask", [True] * 10_001), "rules.step.mask"),
    (_with("rules.step.speed", 2), "rules.step.speed"),
    (_with("rules.block.threshold", -0.1), "rules.block.threshold"),
    (_with("rules.block.threshold", float("nan")), "rules.block.threshold"),
    (_with("rules.block.threshold", float("inf")), "rules.block.threshold"),
    (_with("rules.block.threshold", None), "rules.block.threshold"),
    (_with("rules.block.max_consecutive", []), "rules.block.max_consecutive"),
    (_with("meta", "x"), "meta"),
    (_with("meta.colour", "red"), "meta.colour"),
    (_with("meta.steps", "20"), "meta.steps"),
    (
        _with("meta.calibration", {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}),
        "meta.calibration",
    ),
    (_with("guard", "yes"), "guard"),
    ([1, 2], "policy"),
]


@pytest.mark.parametrize(("doc", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_malformed_policy_names_the_field(doc, field):
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(doc)
    assert str(e.value).startswith(field), str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "text", ["", "{not json", "[1, 2", '{"schema": NaN}', "[" * 100_000 + "]" * 100_000, "\x00\x01"]
)
def test_file_that_is_not_a_json_policy(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PolicyError, match="bad.json"):
        Policy.load(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        Policy.load(tmp_path / "absent.json")
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyError):
        Policy.load(path)


def test_presets_registry():
    assert {"static-interval", "fbcache"} <= set(presets.names())
    pol = presets.get("static-interval", interval=4, warmup=0)
    assert pol.rules["step"].params["interval"] == 4
    assert pol.name == "static-interval"
    with pytest.raises(PolicyError, match=r"^static-interval\.interval: must be >= 1"):
        presets.get("static-interval", interval=0)
    with pytest.raises(PolicyError, match=r"^fbcache\.speed: unknown parameter"):
        presets.get("fbcache", speed=3)
    with pytest.raises(PolicyError, match="unknown name 'nope'"):
        presets.get("nope")
    for name in presets.names():
        assert presets.describe(name)
        assert Policy.from_dict(presets.get(name).to_dict()).to_dict() == presets.get(name).to_dict()


def test_compose_holds_one_rule_per_level():
    both = stepcache.compose(presets.get("static-interval"), presets.get("fbcache"))
    assert set(both.rules) == {"step", "block"}
    assert Policy.from_dict(both.to_dict()).to_dict() == both.to_dict()
    with pytest.raises(PolicyError, match="rules.step"):
        stepcache.compose(presets.get("static-interval"), presets.get("static-interval", interval=3))
    with pytest.raises(PolicyError, match="not a Policy"):
        stepcache.compose(presets.get("fbcache"), {"rules": {}})


def test_resolve_policy_forms(tmp_path):
    path = presets.get("fbcache", threshold=0.2).save(tmp_path / "p.json")
    assert stepcache.resolve_policy(path).rules["block"].params["threshold"] == 0.2
    assert stepcache.resolve_policy(str(path)).rules["block"].params["threshold"] == 0.2
    assert stepcache.resolve_policy("fbcache").name == "fbcache"
    assert stepcache.resolve_policy(VALID).name == "mine"
    assert stepcache.resolve_policy(None).rules == {}
    with pytest.raises(PolicyError, match="neither a preset"):
        stepcache.resolve_policy("fb-cache")
    with pytest.raises(PolicyError, match="expected a Policy"):
        stepcache.resolve_policy(3.5)
