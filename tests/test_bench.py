"""The harness: result schema, reference vs itself, the report in a real browser, bad arguments."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepcache.bench import ResultError, bench, policies_from, validate_result, write_report
from stepcache.bench.report import pareto_front
from stepcache.cli import app


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    bench(
        "digits-dit", policies_from(["adams-bashforth", "fbcache"], None), out, seeds=4, repeats=2, steps=10
    )
    return out


def test_result_follows_schema_and_reference_matches_itself(bench_dir: Path) -> None:
    doc = json.loads((bench_dir / "result.json").read_text())
    validate_result(doc)
    assert [r["name"] for r in doc["runs"]] == ["reference", "adams-bashforth", "fbcache"]
    ref = doc["runs"][0]
    assert ref["kind"] == "reference" and math.isinf(ref["psnr"]) and ref["psnr_identical"] == 4
    assert ref["flop_fraction"] == 1.0 and ref["nfe_fraction"] == 1.0 and ref["actions"] == "C" * 10
    assert 0.5 < ref["speedup"] < 2.0  # timed against itself: 1 up to the machine's noise
    ab = doc["runs"][1]
    assert ab["actions"].count("E") > 0 and ab["flop_fraction"] < 0.8 and math.isfinite(ab["psnr"])
    assert ab["efficiency"] == pytest.approx(ab["speedup"] * ab["flop_fraction"])
    assert ab["deterministic"] is True and ab["class_acc"] is not None
    assert doc["protocol"]["seeds"] == [10_000, 10_003] and doc["protocol"]["repeats"] == 2
    for key in ("model", "device", "torch", "diffusers", "command", "commit"):
        assert key in doc


def test_validate_result_names_the_bad_field(bench_dir: Path) -> None:
    doc = json.loads((bench_dir / "result.json").read_text())
    cases = [
        (lambda d: d.pop("device"), "device"),
        (lambda d: d["runs"][1].pop("speedup"), r"runs\[1\]\.speedup"),
        (lambda d: d["runs"][1].update(kind="magic"), r"runs\[1\]\.kind"),
        (lambda d: d["runs"].reverse(), r"runs\[0\]\.kind"),
        (lambda d: d["runs"][2].update(name="reference"), "appears twice"),
        (lambda d: d["runs"][1].update(psnr=float("nan")), "NaN"),
        (lambda d: d.update(schema="other/1"), "schema"),
        (lambda d: d.update(runs=[]), "runs"),
    ]
    for edit, pattern in cases:
        bad = copy.deepcopy(doc)
        edit(bad)
        with pytest.raises(ResultError, match=pattern):
            validate_result(bad)


def test_report_has_plots_heatmap_and_grids(bench_dir: Path) -> None:
    page = (bench_dir / "report.html").read_text()
    assert 'alt="Speed vs fidelity"' in page and 'alt="What each run did per step"' in page
    assert page.count('class="grid"') == 2  # one sample grid per accelerated run
    # Self-contained: nothing fetched (images are inline data, whose base64 may spell anything).
    assert "http" not in re.sub(r'"data:[^"]*"', '""', page).replace("http-equiv", "")


def test_report_command_regenerates_and_rejects_bad_dirs(bench_dir: Path, tmp_path: Path) -> None:
    (bench_dir / "report.html").unlink()
    figure = tmp_path / "fig.png"
    res = CliRunner().invoke(app, ["report", str(bench_dir), "--figure", str(figure)])
    assert res.exit_code == 0, res.output
    assert (bench_dir / "report.html").is_file()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "result.json" in res.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "result.json").write_text('{"schema": "stepcache.bench/1"}')
    with pytest.raises(ResultError, match="model"):
        write_report(broken)
    assert not (broken / "report.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium not installed (scripts/setup-test.sh installs it)"
)
def test_report_renders_in_headless_chromium(bench_dir: Path, tmp_path: Path) -> None:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (bench_dir / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded is not None, "the page's load handler did not run"
    # Every image decoded with a real size: the PSNR plot and the heatmap (digits-dit has no
    # FD-domain plot) and one sample grid per accelerated run.
    assert int(loaded.group(1)) == dom.count("<img") == 4


def test_pareto_front_keeps_only_undominated_points() -> None:
    pts = [(1.0, 40.0), (2.0, 35.0), (1.5, 30.0), (3.0, 20.0), (2.0, 36.0), (0.9, 50.0)]
    front = pareto_front(pts)
    assert [pts[i] for i in front] == [(0.9, 50.0), (1.0, 40.0), (2.0, 36.0), (3.0, 20.0)]
    lower = pareto_front([(1.0, 5.0), (2.0, 4.0), (2.5, 9.0)], higher_is_better=False)
    assert lower == [1, 2]  # (2, 4) is faster and better than (1, 5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "no-such-model", "--preset", "fbcache"], "is not a zoo key"),
        (["bench", "digits-dit", "--preset", "no-such-preset"], "unknown preset"),
        (["bench", "digits-dit", "--preset", "fbcache", "--seeds", "0"], "seeds"),
        (["bench", "digits-dit"], "--preset or --policy"),
        (["bench", "digits-dit", "--policy", "missing.json"], "missing.json"),
        (["compare", "digits-dit", "--peers", "nobody"], "unknown peer"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code != 0
    assert message in " ".join(res.output.split()).replace("│", "")
    assert not (out / "result.json").exists() and not (out / "report.html").exists()


def test_bench_into_a_log_prints_a_line_per_run(tmp_path: Path) -> None:
    # CliRunner's output is not a terminal, as with `nohup ... > log`: no live bar, so one line
    # per stage is what tells a user how far a long compare has got.
    args = ["bench", "digits-dit", "--preset", "fbcache", "--seeds", "2", "--steps", "4", "--repeats", "1"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("[")]
    assert [line.split("  ")[0] for line in lines] == ["[1/2] measuring reference", "[2/2] measuring fbcache"]


def test_unwritable_out_dir_is_refused_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="out: "):
        bench("digits-dit", policies_from(["fbcache"], None), blocker / "sub", seeds=1, repeats=1)
    with pytest.raises(ValueError, match="not a directory"):
        bench("digits-dit", policies_from(["fbcache"], None), blocker, seeds=1, repeats=1)


def test_missing_peer_is_reported_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stepcache.bench.compare import compare

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit now raises ImportError
    doc = compare(
        "digits-dit",
        tmp_path,
        peers=["cache-dit"],
        sweep=[("adams-bashforth", {})],
        seeds=2,
        repeats=1,
        steps=6,
    )
    assert [r["name"] for r in doc["runs"]] == ["reference", "adams-bashforth"]
    assert doc["unavailable"] and all("stepcache[peers]" in u["reason"] for u in doc["unavailable"])
    assert "stepcache[peers]" in (tmp_path / "report.html").read_text()


def test_a_peer_that_fails_on_the_model_is_reported_not_fatal(tmp_path: Path) -> None:
    """A peer's own error on a model (diffusers' FirstBlockCache on SD3's last joint block, say)
    lands in ``unavailable`` with the error; stepcache's runs are still measured."""
    from stepcache.bench.harness import Candidate, policy_candidate

    class Broken(RuntimeError):
        pass

    def attach(pipe):
        def boom(*args, **kwargs):
            raise Broken("unsupported operand type(s) for -: 'NoneType' and 'Tensor'")

        pipe.transformer.forward = boom

    def detach(pipe):
        pipe.transformer.__dict__.pop("forward", None)

    peer = Candidate("some peer", "peer", {"x": 1}, attach=attach, detach=detach, peer="diffusers")
    doc = bench(
        "digits-dit", [policy_candidate("fora", "fora"), peer], tmp_path / "r", seeds=2, repeats=1, steps=4
    )
    assert [r["name"] for r in doc["runs"]] == ["reference", "fora"]
    (gone,) = doc["unavailable"]
    assert gone["name"] == "some peer" and "Broken" in gone["reason"] and "NoneType" in gone["reason"]
    assert json.loads((tmp_path / "r" / "result.json").read_text())["unavailable"] == doc["unavailable"]


def test_speedup_interval_and_the_flop_ideal() -> None:
    from stepcache.bench.harness import beyond_ideal, speedup_interval

    assert speedup_interval([1.0, 1.0], [0.5, 0.5]) is None  # too few pairs for an interval
    lo, hi = speedup_interval([1.0, 1.1, 0.9, 1.0, 1.05], [0.5, 0.52, 0.48, 0.5, 0.51])
    assert lo <= 2.0 <= hi and lo > 1.5
    assert beyond_ideal([1.0] * 5, [0.4] * 5, ideal=2.0)  # 2.5x measured where 2x is the most
    assert not beyond_ideal([1.0] * 5, [0.5] * 5, ideal=2.0)
    # noise that straddles the ideal is not called an error
    assert not beyond_ideal([1.0, 1.4, 0.7, 1.3, 0.8], [0.5, 0.5, 0.5, 0.5, 0.5], ideal=2.2)


def test_a_speedup_above_what_its_flops_allow_is_remeasured_then_flagged(tmp_path: Path) -> None:
    """A run that computes everything (FLOP ideal 1x) timed against references slowed by a busy
    machine (a hook that repeats the work while detached) reads as a large speedup: it is
    re-measured, flagged, and the report and the CLI table do not show it as a number."""
    from stepcache.bench.harness import Candidate
    from stepcache.bench.report import render

    hooks: list = []

    def work_again(module, args, kwargs) -> None:  # the busy machine: 5x the work, whatever the load
        for _ in range(4):
            module.forward(*args, **kwargs)

    def busy(pipe) -> None:  # detached: the reference runs, slowed down
        hooks.append(pipe.transformer.register_forward_pre_hook(work_again, with_kwargs=True))

    def idle(pipe) -> None:  # attached: the same network, at full speed
        while hooks:
            hooks.pop().remove()

    rigged = Candidate("rigged", "peer", {}, attach=idle, detach=busy, peer="test")
    doc = bench("digits-dit", [rigged], tmp_path / "r", seeds=1, repeats=3, steps=2)
    (run,) = [r for r in doc["runs"] if r["name"] == "rigged"]
    assert run["flop_ideal"] == pytest.approx(1.0)
    assert run["speedup"] > 2 and run["speedup_status"] == "above_flop_ideal"
    assert len(run["latency_s"]["all"]) == 3 + 6  # the first attempt, then a twice-as-long one
    assert run["speedup_ci"][0] > 1.0
    assert "not shown" in render(doc, {})
    # the reference row is timed against itself: noise may ask for a re-measure, never a result
    assert doc["runs"][0]["speedup_status"] in ("ok", "remeasured", "above_flop_ideal")


def test_band_table_matches_runs_by_flops_and_names_the_lead() -> None:
    from stepcache.bench.bands import band_table

    def run(name, kind, fraction, psnr, peer=None):
        return {"name": name, "kind": kind, "peer": peer, "flop_fraction": fraction, "psnr": psnr}

    runs = [
        run("reference", "reference", 1.0, math.inf),
        run("ours-slow", "stepcache", 0.8, 40.0),
        run("ours-fast", "stepcache", 0.45, 31.0),
        run("fbc", "peer", 0.7, 38.0, "diffusers"),
        run("dbc", "peer", 0.5, 33.5, "cache-dit"),
        run("dbc-fast", "peer", 0.3, 25.0, "cache-dit"),
    ]
    table = {row["band"]: row for row in band_table(runs, bands=(1.25, 2.0, 3.0, 4.0))}
    assert table[1.25]["best"]["stepcache"]["name"] == "ours-slow"
    assert table[1.25]["top_peer"]["name"] == "fbc" and table[1.25]["lead"] == pytest.approx(2.0)
    # at >= 2x only ours-fast (2.22x) and dbc (2.0x), dbc-fast (3.33x) qualify
    assert table[2.0]["best"]["stepcache"]["name"] == "ours-fast"
    assert table[2.0]["top_peer"]["name"] == "dbc" and table[2.0]["lead"] == pytest.approx(-2.5)
    assert table[3.0]["best"].get("stepcache") is None and table[3.0]["lead"] is None
    assert table[4.0]["best"] == {} and table[4.0]["top_peer"] is None
