"""The command line: demo, presets, zoo; bad arguments are usage errors, not tracebacks."""

import json

import pytest
import torch
from typer.testing import CliRunner

from stepcache import presets
from stepcache.cli import app

runner = CliRunner()


def test_presets_lists_every_preset():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    for name in presets.names():
        assert name in result.output


def test_demo_writes_grid_and_json_and_prints_their_paths_last(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(
        app,
        [
            "demo",
            "--model",
            "digits-dit",
            "--preset",
            "static-interval",
            "--samples",
            "4",
            "--steps",
            "8",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-2:] == [str(out / "grid.png"), str(out / "result.json")]
    data = json.loads((out / "result.json").read_text())
    assert data["denoiser_calls"] == 8 and data["computed"] == 5 and data["estimated"] == 3
    assert data["speedup"] > 0 and 10 < data["psnr_db_mean"] < 100
    assert data["policy"]["rules"]["step"]["method"] == "static-interval"
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "measured speedup" in result.output


def test_demo_with_overrides_and_policy_file(tmp_path):
    out = tmp_path / "o"
    args = ["--model", "digits-dit", "--samples", "2", "--steps", "6", "--repeats", "1", "--out", str(out)]
    result = runner.invoke(app, ["demo", "--preset", "static-interval", "-p", "interval=3", *args])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "result.json").read_text())["computed"] == 3
    policy = presets.get("fbcache", threshold=0.0).save(tmp_path / "p.json")
    result = runner.invoke(app, ["demo", "--policy", str(policy), *args])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert data["computed"] == 6 and data["psnr_db_mean"] is None and data["psnr_identical_images"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--preset", "warp"], "unknown name 'warp'"),
        (["demo", "-p", "interval=0", "--preset", "static-interval"], "interval: must be >= 1"),
        (["demo", "-p", "interval"], "expected KEY=VALUE"),
        (["demo", "--model", "mnist"], "unknown model 'mnist'"),
        (["demo", "--samples", "0"], "samples"),
        (["demo", "--steps", "-3"], "steps"),
        (["zoo", "info", "nope"], "unknown model 'nope'"),
        (["zoo", "train", "digits-dit"], "--out"),
        (["compare", "digits-dit", "--out", "cmp", "--tune-peers", "0"], "tune-peers"),
        (["compare", "digits-dit", "--out", "cmp", "--tune-peers", "nan"], "tune-peers"),
        (["compare", "digits-dit", "--out", "cmp", "--peers", "", "--tune-peers", "2"], "no peer to tune"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message, tmp_path):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert (
        message in result.output.replace("\n", " ").replace("│", " ").replace("  ", " ")
        or message in result.output
    )


def test_demo_with_a_broken_policy_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"schema": "stepcache.policy/1", "rules": {"step": {"method": "static-interval", "interval": -1}}}'
    )
    result = runner.invoke(app, ["demo", "--policy", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "rules.step.interval" in result.output
    assert not (tmp_path / "o").exists()


def test_zoo_list_info_and_tiny_train(tmp_path):
    result = runner.invoke(app, ["zoo", "list"])
    assert result.exit_code == 0 and "digits-dit" in result.output and "shipped" in result.output
    result = runner.invoke(app, ["zoo", "info", "digits-dit"])
    assert result.exit_code == 0 and "scikit-learn" in result.output
    out = tmp_path / "w"
    result = runner.invoke(
        app, ["zoo", "train", "digits-dit", "--out", str(out), "--steps", "3", "--limit-images", "32"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out / "model.safetensors")
    assert json.loads((out / "train.json").read_text())["train"]["steps"] == 3


def test_calibrate_writes_a_policy_that_loads_and_runs(tmp_path, digits_pipe):
    import torch

    import stepcache

    out = tmp_path / "lag.json"
    args = ["calibrate", "linear-ag", "--model", "digits-dit", "--samples", "4", "--steps", "8"]
    result = runner.invoke(app, [*args, "--out", str(out), "-p", "end=1.0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    pol = stepcache.Policy.load(out)
    rule = pol.rules["guidance"]
    assert rule.method == "linear-ag" and rule.params["end"] == 1.0
    assert len(rule.params["coefficients"]) == 3 * 8
    assert pol.meta["model"] == "digits-dit" and pol.meta["calibration"]["samples"] == 4
    handle = stepcache.enable(digits_pipe, pol)
    digits_pipe(class_labels=[1, 2], num_inference_steps=8, generator=torch.Generator().manual_seed(1))
    stepcache.disable(digits_pipe)
    assert handle.stats()["cfg_skipped"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calibrate", "static-interval"], "no coefficients or threshold to fit"),
        (["calibrate", "magcache", "--model", "nope"], "is not a zoo key"),
        (["calibrate", "linear-ag", "-p", "end=2"], "linear-ag.end"),
        (
            ["calibrate", "teacache", "--model", "fmnist-unet", "--samples", "1", "--steps", "2"],
            "block stack",
        ),
    ],
)
def test_calibrate_bad_arguments_write_nothing(tmp_path, args, message):
    out = tmp_path / "p.json"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_calibrate_teacache_fits_a_polynomial(tmp_path):
    import stepcache

    out = tmp_path / "tea.json"
    args = [
        "calibrate",
        "teacache",
        "--model",
        "digits-dit",
        "--samples",
        "4",
        "--steps",
        "10",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rule = stepcache.Policy.load(out).rules["block"]
    assert rule.method == "teacache" and len(rule.params["coefficients"]) == 5


def test_zoo_train_continues_from_the_shipped_weights(tmp_path):
    from safetensors.torch import load_file

    from stepcache import zoo

    out = tmp_path / "w"
    args = ["zoo", "train", "digits-dit", "--out", str(out), "--steps", "1", "--limit-images", "32"]
    result = runner.invoke(app, [*args, "--init-from", "shipped", "--lr", "0"])
    assert result.exit_code == 0, result.output
    shipped = load_file(str(zoo.model_dir("digits-dit") / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(shipped[k], trained[k]) for k in shipped)
    result = runner.invoke(app, [*args, "--init-from", str(tmp_path / "nowhere")])
    flat = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "no model.safetensors" in flat, flat
    assert "loss nan" not in flat  # refused before the progress bar started


def test_the_package_exposes_its_parts_and_runs_as_a_module():
    """In a fresh interpreter: ``stepcache.zoo`` and ``stepcache.search(...)`` without their own
    imports, and ``python -m stepcache`` runs the command line."""
    import subprocess
    import sys

    code = (
        "import stepcache\n"
        "assert 'digits-dit' in stepcache.zoo.names()\n"
        "assert stepcache.search.Target(speedup=2.0).speedup == 2.0\n"
        "assert stepcache.Workload(steps=4).steps == 4\n"
        "import stepcache.tools as t\n"
        "assert stepcache.compare is t.compare and stepcache.calibrate is t.calibrate\n"
        "assert callable(stepcache.bench) and stepcache.bench.bench is not t.bench\n"
        "try:\n"
        "    stepcache.search('no-such-model', speedup=2.0)\n"
        "except stepcache.search.SearchError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: model: 'no-such-model' is not a zoo key" in out.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "stepcache", "zoo", "list"], capture_output=True, text=True, timeout=300
    )
    assert cli.returncode == 0, cli.stderr
    assert "fmnist-dit" in cli.stdout


def test_calibrate_fits_an_adaptive_threshold_and_refuses_one_given(tmp_path):
    import stepcache
    from stepcache.methods.threshold import GRID

    out = tmp_path / "fb.json"
    args = ["calibrate", "fbcache", "--model", "digits-dit", "--samples", "4", "--steps", "8"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rule = stepcache.Policy.load(out).rules["block"]
    assert rule.method == "fbcache" and rule.params["threshold"] in GRID
    given = tmp_path / "given.json"
    result = runner.invoke(app, [*args, "--out", str(given), "-p", "threshold=0.2"])
    assert result.exit_code == 2 and "fbcache.threshold" in result.output and not given.exists()
