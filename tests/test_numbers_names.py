"""Hostile numbers, names and files: refused before any model loads, naming what is wrong.

Numbers past what the machine holds or torch takes, non-finite floats, policy names that would
break printing or collide with the benchmark's own runs, and policy "files" that never end.
"""

import copy
import json
import os
import pickle
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stepcache import presets
from stepcache._limits import MAX_POLICY_BYTES, MAX_SEED
from stepcache.api import resolve_policy
from stepcache.bench.harness import check_args, policies_from
from stepcache.calibration import calibrate
from stepcache.cli import app
from stepcache.demo import run_demo
from stepcache.errors import PolicyError
from stepcache.policy import SCHEMA, Policy, compose

runner = CliRunner()
HUGE = "9" * 400  # past float's range; json reads it as an int


def _flat(output: str) -> str:
    """The error text with rich's box and wrapping removed."""
    return " ".join(output.replace("│", " ").split())


def _usage_error(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    for needle in needles:
        assert needle in text, text
    return text


def _within(seconds: float, fn: Any) -> Any:
    """fn() in a daemon thread: a call that blocks forever fails the test instead of hanging it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _policy(**top: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "rules": {"step": {"method": "static-interval"}}, **top}


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---- numbers on the command line ------------------------------------------------------------

BIG = "99999999999999999999"  # 20 digits: past int64, and bench grew to 24 GB on it


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["demo", "--seed", "1e23"], "--seed"),
        (["demo", "--seed", BIG], "--seed"),
        (["demo", "--seed", str(MAX_SEED + 1)], "--seed"),
        (["demo", "--seed", "-1"], "--seed"),
        (["demo", "--steps", "1e20"], "--steps"),
        (["demo", "--steps", BIG], "--steps"),
        (["demo", "--steps", "10001"], "--steps"),
        (["demo", "--guidance", "inf"], "--guidance"),
        (["demo", "--guidance", "nan"], "--guidance"),
        (["demo", "--guidance", "1e400"], "--guidance"),
        (["demo", "--guidance", "1001"], "--guidance"),
        (["demo", "--guidance", "-1"], "--guidance"),
        (["demo", "--repeats", "101"], "--repeats"),
        (["demo", "--samples", BIG], "--samples"),
    ],
)
def test_demo_refuses_numbers_it_cannot_run(args, option, tmp_path):
    out = tmp_path / "o"
    _usage_error([*args, "--model", "digits-dit", "--out", str(out)], option)
    assert not out.exists()


@pytest.mark.parametrize("command", ["bench", "compare"])
@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--seeds", BIG], "--seeds"),
        (["--seeds", "4097"], "--seeds"),
        (["--seeds", "0"], "--seeds"),
        (["--repeats", "101"], "--repeats"),
        (["--repeats", BIG], "--repeats"),
        (["--steps", "1e20"], "--steps"),
        (["--steps", "10001"], "--steps"),
        (["--guidance", "nan"], "--guidance"),
        (["--guidance", "inf"], "--guidance"),
    ],
)
def test_bench_and_compare_refuse_numbers_they_cannot_run(command, args, option, tmp_path):
    out = tmp_path / "o"
    extra = ["--preset", "fbcache"] if command == "bench" else ["--peers", ""]
    _usage_error([command, "digits-dit", "--out", str(out), *extra, *args], option)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--budget", "1e308"], "--budget"),
        (["--budget", "inf"], "--budget"),
        (["--budget", "nan"], "--budget"),
        (["--budget", "0"], "--budget"),
        (["--speedup", "inf"], "--speedup"),
        (["--speedup", "nan"], "--speedup"),
        (["--min-psnr", "nan"], "--min-psnr"),
        (["--calib-seeds", "10001"], "--calib-seeds"),
        (["--heldout-seeds", BIG], "--heldout-seeds"),
        (["--heldout-seeds", "4097"], "--heldout-seeds"),
        (["--seed", BIG], "--seed"),
        (["--workers", "0"], "--workers"),
        (["--workers", BIG], "--workers"),
        (["--steps", "1e20"], "--steps"),
        (["--guidance", "nan"], "--guidance"),
    ],
)
def test_search_refuses_numbers_it_cannot_run(args, option, tmp_path):
    out = tmp_path / "p.json"
    target = [] if "--speedup" in args or "--min-psnr" in args else ["--speedup", "1.5"]
    _usage_error(["search", "digits-dit", "--out", str(out), *target, *args], option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--guidance", "nan"], "--guidance"),
        (["--guidance", "inf"], "--guidance"),
        (["--steps", BIG], "--steps"),
        (["--samples", BIG], "--samples"),
    ],
)
def test_calibrate_refuses_numbers_it_cannot_run(args, option, tmp_path):
    out = tmp_path / "p.json"
    _usage_error(["calibrate", "magcache", "--model", "digits-dit", "--out", str(out), *args], option)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "11"], "--lr"),
        (["--steps", BIG], "--steps"),
        (["--limit-images", BIG], "--limit-images"),
    ],
)
def test_zoo_train_refuses_numbers_it_cannot_run(args, option, tmp_path):
    out = tmp_path / "w"
    _usage_error(["zoo", "train", "digits-dit", "--out", str(out), *args], option)
    assert not out.exists()


def test_a_param_value_past_pythons_digit_limit_is_a_usage_error(tmp_path):
    out = tmp_path / "o"
    args = ["demo", "--model", "digits-dit", "--out", str(out), "--preset", "static-interval"]
    _usage_error([*args, "-p", "interval=" + "9" * 5000], "--param", "interval")
    _usage_error([*args, "-p", "interval=" + "[" * 100_000], "--param", "interval")
    assert not out.exists()


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"method": "fbcache", "threshold": int(HUGE)}, "rules.block.threshold"),
        ({"method": "static-interval", "interval": int(HUGE)}, "rules.step.interval"),
        ({"method": "magcache", "ratios": [1.0, int(HUGE)]}, "rules.step.ratios[1]"),
    ],
)
def test_a_policy_number_past_float_range_is_refused(rule, field, tmp_path):
    level = "block" if rule["method"] == "fbcache" else "step"
    data = {"schema": SCHEMA, "rules": {level: rule}}
    with pytest.raises(PolicyError, match=f"^{re.escape(field)}: "):
        Policy.from_dict(data)
    path = _write(tmp_path / "p.json", data)
    out = tmp_path / "o"
    _usage_error(["demo", "--policy", str(path), "--model", "digits-dit", "--out", str(out)], field)
    assert not out.exists()


@pytest.mark.parametrize(
    "meta",
    [
        {"steps": int(HUGE)},
        {"budget_used": int(HUGE)},
        {"search": {"evaluated": int(HUGE)}},
        {"pareto": [[1.0, -int(HUGE)]]},
    ],
)
def test_meta_integers_past_json_range_are_refused(meta):
    key = next(iter(meta))
    with pytest.raises(PolicyError, match=rf"^meta\.{key}"):
        Policy.from_dict(_policy(meta=meta))


# ---- numbers through the API -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seeds": 10**20}, "seeds"),
        ({"seeds": 4097}, "seeds"),
        ({"repeats": 101}, "repeats"),
        ({"steps": 10**20}, "steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"guidance": float("inf")}, "guidance"),
        ({"guidance": 10**400}, "guidance"),
    ],
)
def test_bench_check_args_bounds_every_number(kwargs, name, tmp_path):
    args = {"model": "digits-dit", "out_dir": tmp_path / "o", "steps": None, "seeds": 4, "repeats": 1}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        check_args(**{**args, **kwargs})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": 10**23}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1e23}, "seed"),
        ({"steps": 10**20}, "steps"),
        ({"steps": 1e20}, "steps"),
        ({"guidance": float("inf")}, "guidance"),
        ({"guidance": float("nan")}, "guidance"),
        ({"samples": 257}, "samples"),
        ({"samples": 0}, "samples"),
        ({"repeats": 10**6}, "repeats"),
        ({"model": "nope"}, "model"),
    ],
)
def test_run_demo_refuses_numbers_before_loading(kwargs, name, tmp_path):
    args = {"model": "digits-dit", "policy": "fbcache", "out_dir": tmp_path / "o"}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        run_demo(**{**args, **kwargs})
    assert not (tmp_path / "o").exists()


def test_calibrate_refuses_bad_arguments_before_recording():
    def run() -> None:
        raise AssertionError("nothing may be generated")

    with pytest.raises(ValueError, match=r"^linear-ag\.coefficients"):
        calibrate("linear-ag", None, run, coefficients=[1.0, -1.0, 1.0])
    with pytest.raises(PolicyError, match=r"^magcache\.threshold"):
        calibrate("magcache", None, run, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"^run: "):
        calibrate("magcache", None, 42)
    with pytest.raises(ValueError, match="nothing to fit"):
        calibrate(["magcache"], None, run)


# ---- policy files that are not files ---------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_policy_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "p.json"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file") as info:
        _within(10, lambda: Policy.load(fifo))
    assert str(fifo) in str(info.value)
    with pytest.raises(PolicyError, match="not a regular file"):
        _within(10, lambda: resolve_policy(str(fifo)))
    out = tmp_path / "o"
    args = ["demo", "--policy", str(fifo), "--model", "digits-dit", "--out", str(out)]
    _within(30, lambda: _usage_error(args, "--policy", "not a regular file"))
    assert not out.exists()


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_device_is_refused():
    with pytest.raises(PolicyError, match="not a regular file"):
        _within(10, lambda: Policy.load("/dev/zero"))


def test_a_policy_file_past_the_size_cap_is_refused_unread(tmp_path):
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(MAX_POLICY_BYTES + 1)  # sparse: nothing to read if the cap works
    with pytest.raises(PolicyError, match=str(MAX_POLICY_BYTES)):
        Policy.load(big)
    with pytest.raises(PolicyError, match="directory"):
        Policy.load(tmp_path)


# ---- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("\udcff", "Unicode"),
        ("ok\ud800", "Unicode"),
        ("reference", "reserved"),
        ("__reference__", "reserved"),
        ("__anything", "reserved"),
        ("", "1 to 200"),
        ("x" * 201, "1 to 200"),
        ("two\nlines", "control"),
        ("bell\x07", "control"),
    ],
)
def test_bad_policy_names_are_refused_on_load(name, problem):
    with pytest.raises(PolicyError, match=rf"^name: .*{problem}"):
        Policy.from_dict(_policy(name=name))


def test_fine_names_are_kept():
    for name in ("fbcache", "searched tpe 1.25x", "a $x^2$ policy", "référence ✓", "x" * 200, "Reference"):
        assert Policy.from_dict(_policy(name=name)).name == name


def test_a_surrogate_name_from_a_json_escape_is_refused_before_output(tmp_path):
    text = json.dumps(_policy(name="NAME")).replace("NAME", "\\udcff")  # the JSON escape itself
    path = _write(tmp_path / "p.json", text)
    for command in (["demo", "--model", "digits-dit"], ["bench", "digits-dit", "--seeds", "2"]):
        out = tmp_path / "o"
        _usage_error([*command, "--policy", str(path), "--out", str(out)], "--policy", "name:")
        assert not out.exists()


@pytest.mark.parametrize("name", ["reference", "__reference__"])
def test_reserved_names_are_refused_before_the_bench(name, tmp_path):
    path = _write(tmp_path / "p.json", _policy(name=name))
    out = tmp_path / "o"
    args = ["--policy", str(path), "--out", str(out), "--seeds", "2", "--repeats", "1"]
    _usage_error(["bench", "digits-dit", *args], "--policy", "reserved")
    _usage_error(["compare", "digits-dit", "--peers", "", *args], "--policy", "reserved")
    assert not out.exists()


def test_policies_from_checks_the_run_names_it_makes(tmp_path):
    unnamed = _write(tmp_path / "two\nlines.json", _policy())
    with pytest.raises(ValueError, match="control"):
        policies_from(None, [str(unnamed)])
    named = _write(tmp_path / "p.json", _policy(name="mine"))
    cands = policies_from(["fbcache"], [str(named), str(named)])  # the second is named by its path
    assert [c.name for c in cands] == ["fbcache", "mine", str(named)]
    with pytest.raises(ValueError, match="unique"):
        policies_from(["fbcache", "fbcache"], None)


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"notes": "\udcff"}, "meta.notes"),
        ({"model": "ok\ud800"}, "meta.model"),
        ({"search": {"\udcff": 1}}, "meta.search"),
        ({"pareto": [["\udcff"]]}, "meta.pareto[0][0]"),
    ],
)
def test_meta_strings_must_be_valid_unicode(meta, field):
    with pytest.raises(PolicyError, match=f"^{re.escape(field)}.*Unicode"):
        Policy.from_dict(_policy(meta=meta))


def test_names_are_checked_however_a_policy_is_made():
    rules = presets.get("fbcache").rules
    with pytest.raises(PolicyError, match="^name: .*reserved"):
        Policy(rules=rules, name="reference")
    with pytest.raises(PolicyError, match="^name: .*reserved"):
        compose(presets.get("fbcache"), name="__x")
    with pytest.raises(PolicyError, match="^name: .*Unicode"):
        Policy.from_dict({**presets.get("fbcache").to_dict(), "name": "\udcff"})


# ---- pickle and deepcopy ---------------------------------------------------------------------


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_pickles_and_deep_copies_as_equal_data(name):
    pol = presets.get(name).with_meta(model="digits-dit", steps=20, search={"evaluated": 3, "x": [1.5]})
    assert pickle.loads(pickle.dumps(pol)) == pol
    assert copy.deepcopy(pol) == pol
    assert copy.copy(pol) == pol
    again = pickle.loads(pickle.dumps(pol))
    assert again.to_dict() == pol.to_dict() and again.name == name


def test_a_composed_policy_pickles_and_its_rules_too():
    pol = compose(presets.get("fbcache"), presets.get("cfg-cache"))
    assert pickle.loads(pickle.dumps(pol)) == pol
    rule = presets.get("schedule").rules["step"]
    assert pickle.loads(pickle.dumps(rule)) == rule and copy.deepcopy(rule) == rule


def test_undecodable_command_line_bytes_never_reach_a_policys_meta(tmp_path, monkeypatch):
    from stepcache.cli import _command

    monkeypatch.setattr("sys.argv", ["stepcache", "search", "--out", "\udcff.json"])
    line = _command()
    assert "\\udcff" in line
    Policy.from_dict(_policy(meta={"found_by": line}))  # accepted as it is
    out = tmp_path / "p.json"
    args = ["search", "digits-dit", "--out", str(out), "--speedup", "1.5", "--study", "s\udcff"]
    _usage_error(args, "--study", "UTF-8")
    assert list(tmp_path.iterdir()) == []
