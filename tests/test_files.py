"""Files stepcache reads and writes: hostile result folders and checkpoints, and output paths that
cannot be written, refused with a usage error (exit 2) that names the problem, before any work,
with nothing written."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import save_file
from typer.testing import CliRunner

import stepcache.zoo
import stepcache.zoo.train
from stepcache._io import atomic_write_many
from stepcache.bench import bench, policies_from
from stepcache.cli import app
from stepcache.zoo.models import TrainConfig
from stepcache.zoo.train import train

SCRIPT = "<script>alert(1)</script>"


def invoke(args: list[str]) -> Any:
    # A wide console keeps rich from folding a path or a message across lines.
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


def said(res: Any) -> str:
    return " ".join(res.output.replace("│", " ").split())


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a hash of each regular file's bytes, the kind of anything else."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(folder) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p.relative_to(root))] = "dir" if stat.S_ISDIR(mode) else "special"
    return out


def refused(res: Any, *words: str) -> None:
    """A usage error whose message has every one of ``words``."""
    assert res.exit_code == 2, res.output
    text = said(res)
    for word in words:
        assert word in text, (word, text)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model or training fails the test: every check here must come before the work."""

    def work(*_: Any, **__: Any) -> Any:
        raise AssertionError("the work started before the bad path was refused")

    monkeypatch.setattr(stepcache.zoo, "load", work)
    monkeypatch.setattr(stepcache.zoo.train, "train", work)


# ---- output paths ------------------------------------------------------------------------------
def _file(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("keep me\n")
    return p


def _dir(p: Path) -> Path:
    p.mkdir(parents=True)
    (p / "inside.txt").write_text("keep me too\n")
    return p


def _folder_with_dir(p: Path, child: str) -> Path:
    _dir(p / child)
    return p


DEMO = ["demo", "--model", "digits-dit", "--preset", "static-interval", "--samples", "2", "--steps", "4"]
CALIBRATE = ["calibrate", "magcache", "--model", "digits-dit", "--samples", "2", "--steps", "4"]
BENCH = [
    "bench",
    "digits-dit",
    "--preset",
    "static-interval",
    "--seeds",
    "2",
    "--repeats",
    "1",
    "--steps",
    "4",
]
COMPARE = ["compare", "digits-dit", "--peers", "", "--seeds", "2", "--repeats", "1", "--steps", "4"]
SEARCH = ["search", "digits-dit", "--speedup", "2", "--searcher", "planner", "--steps", "4"]
TRAIN = ["zoo", "train", "digits-dit", "--steps", "1", "--limit-images", "8"]

# (argv before the path, the option, how to make the bad path under tmp, words of the message)
OUT_CASES: list[tuple[list[str], str, Callable[[Path], Any], list[str]]] = [
    (DEMO, "--out", lambda t: _file(t / "f"), ["not a directory"]),
    (DEMO, "--out", lambda t: _folder_with_dir(t / "d", "grid.png"), ["grid.png", "is a directory"]),
    (DEMO, "--out", lambda t: _folder_with_dir(t / "d", "result.json"), ["result.json", "is a directory"]),
    (DEMO, "--out", lambda t: _file(t / "f") / "sub", ["is a file, not a directory"]),
    (DEMO, "--out", lambda t: "/proc/stepcache-test/out", ["cannot write"]),
    (CALIBRATE, "--out", lambda t: _dir(t / "d"), ["is a directory"]),
    (CALIBRATE, "--out", lambda t: "/dev/full", ["/dev/full", "not a regular file"]),
    (CALIBRATE, "--out", lambda t: _file(t / "f") / "p.json", ["is a file, not a directory"]),
    (CALIBRATE, "--out", lambda t: "/proc/stepcache-test.json", ["cannot write"]),
    (BENCH, "--out", lambda t: _file(t / "f"), ["not a directory"]),
    (BENCH, "--out", lambda t: _folder_with_dir(t / "d", "result.json"), ["result.json", "is a directory"]),
    (
        BENCH,
        "--out",
        lambda t: _folder_with_dir(t / "d", "samples.safetensors"),
        ["samples.safetensors", "is a directory"],
    ),
    (BENCH, "--out", lambda t: _folder_with_dir(t / "d", "report.html"), ["report.html", "is a directory"]),
    (COMPARE, "--out", lambda t: _folder_with_dir(t / "d", "report.html"), ["report.html", "is a directory"]),
    (SEARCH, "--out", lambda t: _dir(t / "d"), ["is a directory"]),
    (SEARCH, "--out", lambda t: "/dev/full", ["not a regular file"]),
    (
        SEARCH,
        "--out",
        lambda t: (_dir(t / "p.optuna.db"), t / "p.json")[1],
        ["p.optuna.db", "is a directory"],
    ),
    (TRAIN, "--out", lambda t: _file(t / "f"), ["not a directory"]),
    (
        TRAIN,
        "--out",
        lambda t: _folder_with_dir(t / "d", "model.safetensors"),
        ["model.safetensors", "is a directory"],
    ),
    (["report", "."], "--figure", lambda t: "/dev/full", ["not a regular file"]),
    (["report", "."], "--figure", lambda t: _dir(t / "d"), ["is a directory"]),
]


@pytest.mark.parametrize(("argv", "option", "make", "words"), OUT_CASES)
def test_output_paths_are_refused_before_any_work(
    argv: list[str], option: str, make: Callable[[Path], Any], words: list[str], tmp_path: Path, no_work: None
) -> None:
    path = make(tmp_path)
    before = tree(tmp_path)
    res = invoke([*argv, option, path])
    refused(res, option, *words)
    assert tree(tmp_path) == before  # nothing written, nothing created, nothing changed


def test_search_report_folder_is_checked_before_the_search(tmp_path: Path, no_work: None) -> None:
    report = _folder_with_dir(tmp_path / "rep", "result.json")
    before = tree(tmp_path)
    res = invoke([*SEARCH, "--out", tmp_path / "p.json", "--report", report])
    refused(res, "--report", "result.json", "is a directory")
    assert tree(tmp_path) == before


def test_several_files_are_staged_before_any_replaces_its_old_one(tmp_path: Path) -> None:
    first, second = _file(tmp_path / "a.bin"), _file(tmp_path / "b.bin")
    blocker = _file(tmp_path / "blocker")
    with pytest.raises(OSError):
        atomic_write_many([(first, b"new"), (second, b"new"), (blocker / "c.bin", b"new")])
    assert first.read_text() == second.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "blocker"]  # no temporaries


# ---- report: hostile result folders -------------------------------------------------------------
@pytest.fixture(scope="module")
def result_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "res"
    bench("digits-dit", policies_from(["static-interval"], None), out, seeds=2, repeats=1, steps=4)
    # One timed repeat on a busy machine can land above the FLOP ideal and be flagged (left out of
    # plots); these tests are about hostile files, so the timing noise must not decide what they see.
    doc = json.loads((out / "result.json").read_text())
    for run in doc["runs"]:
        run["speedup_status"] = "ok"
    (out / "result.json").write_text(json.dumps(doc))
    return out


def _copy(result_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "res"
    shutil.copytree(result_dir, dst)
    return dst


def _edit(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    doc = json.loads((folder / "result.json").read_text())
    edit(doc)
    (folder / "result.json").write_text(json.dumps(doc, allow_nan=True))


def _nested(depth: int) -> Any:
    node: Any = {}
    for _ in range(depth):
        node = {"x": node}
    return node


def _text(folder: Path, old: str, new: str) -> None:
    text = (folder / "result.json").read_text()
    assert old in text
    (folder / "result.json").write_text(text.replace(old, new, 1))


DOC_CASES: list[tuple[Callable[[Path], Any], list[str]]] = [
    (lambda f: _edit(f, lambda d: d["protocol"].update(steps=SCRIPT)), ["protocol.steps"]),
    (lambda f: _edit(f, lambda d: d.update(protocol=None)), ["protocol", "expected an object"]),
    (lambda f: _edit(f, lambda d: d["protocol"].pop("repeats")), ["protocol.repeats"]),
    (lambda f: _edit(f, lambda d: d["protocol"].update(guidance="high")), ["protocol.guidance"]),
    (lambda f: _edit(f, lambda d: d["protocol"].update(guidance=float("nan"))), ["protocol.guidance", "NaN"]),
    (lambda f: _edit(f, lambda d: d["protocol"].update(num_seeds=[2])), ["protocol.num_seeds"]),
    (lambda f: _edit(f, lambda d: d["runs"][1].update(speedup=float("inf"))), ["runs[1].speedup", "finite"]),
    (lambda f: _edit(f, lambda d: d["runs"][1].update(psnr_ci=["a", "b"])), ["runs[1].psnr_ci[0]"]),
    (lambda f: _edit(f, lambda d: d["runs"][1].update(peer=["x"])), ["runs[1].peer"]),
    (lambda f: _edit(f, lambda d: d["runs"][1].update(actions="C<b>")), ["runs[1].actions"]),
    (lambda f: _edit(f, lambda d: d["runs"][0]["latency_s"].update(median=10**400)), ["latency_s.median"]),
    (lambda f: _edit(f, lambda d: d["runs"][1].update(params=_nested(100))), ["nested more than"]),
    (lambda f: _edit(f, lambda d: d.update(unavailable=5)), ["unavailable"]),
    (lambda f: _edit(f, lambda d: d.update(unavailable=[{"name": "x", "reason": 5}])), ["unavailable[0]"]),
    (lambda f: _text(f, '"ssim": 1.0', '"ssim": NaN'), ["runs[0].ssim", "NaN"]),
    (lambda f: (f / "result.json").write_bytes(b"\xff\xfe{garbage"), ["result.json", "not UTF-8"]),
    (lambda f: (f / "result.json").write_text("[" * 100_000), ["result.json"]),
    (lambda f: os.truncate(f / "result.json", 65 * 1024 * 1024), ["result.json", "allowed"]),
    (lambda f: ((f / "result.json").unlink(), (f / "result.json").mkdir()), ["result.json", "directory"]),
    (
        lambda f: ((f / "result.json").unlink(), os.mkfifo(f / "result.json")),
        ["result.json", "not a regular"],
    ),
]


@pytest.mark.parametrize(("mutate", "words"), DOC_CASES)
def test_report_refuses_a_malformed_result_and_writes_nothing(
    mutate: Callable[[Path], Any], words: list[str], result_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(result_dir, tmp_path)
    mutate(folder)
    figure = tmp_path / "fig.png"
    before = tree(tmp_path)
    res = invoke(["report", folder, "--figure", figure])
    refused(res, "DIR", *words)
    assert tree(tmp_path) == before  # report.html as it was, no figure


def _samples(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    (folder / "samples.safetensors").write_bytes(save_numpy(tensors))


SAMPLE_CASES: list[tuple[Callable[[Path], Any], list[str]]] = [
    (lambda f: (f / "samples.safetensors").write_bytes(os.urandom(500)), ["not a safetensors file"]),
    (lambda f: (f / "samples.safetensors").write_bytes(pickle.dumps({"a": 1})), ["not a safetensors file"]),
    (
        lambda f: _samples(f, {"__reference__": np.zeros((2, 8, 8, 1), np.float32)}),
        ["'__reference__'", "uint8"],
    ),
    (lambda f: _samples(f, {"static-interval": np.zeros((8, 8), np.uint8)}), ["'static-interval'", "shape"]),
    (
        lambda f: _samples(
            f,
            {
                "__reference__": np.zeros((2, 8, 8, 1), np.uint8),
                "static-interval": np.zeros((2, 9, 9, 1), np.uint8),
            },
        ),
        ["differs"],
    ),
    (
        lambda f: ((f / "samples.safetensors").unlink(), os.mkfifo(f / "samples.safetensors")),
        ["not a regular file"],
    ),
]


@pytest.mark.parametrize(("mutate", "words"), SAMPLE_CASES)
def test_report_refuses_bad_samples_naming_the_file_and_tensor(
    mutate: Callable[[Path], Any], words: list[str], result_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(result_dir, tmp_path)
    mutate(folder)
    before = tree(tmp_path)
    res = invoke(["report", folder])
    refused(res, "samples.safetensors", *words)
    assert tree(tmp_path) == before


def test_report_html_that_is_a_directory_is_refused(result_dir: Path, tmp_path: Path) -> None:
    folder = _copy(result_dir, tmp_path)
    (folder / "report.html").unlink()
    _dir(folder / "report.html")
    before = tree(tmp_path)
    refused(invoke(["report", folder]), "report.html", "is a directory")
    assert tree(tmp_path) == before


def test_report_escapes_every_string_from_the_file(result_dir: Path, tmp_path: Path) -> None:
    # A guard: the string fields were escaped before; the numbers of the protocol were not, and
    # are now refused unless they are numbers (the protocol.steps case above).
    folder = _copy(result_dir, tmp_path)

    def hostile(doc: dict[str, Any]) -> None:
        doc.update(model=SCRIPT, device=f'"><img src=x onerror=alert(1)>{SCRIPT}', command=SCRIPT)
        doc["protocol"]["timing"] = SCRIPT
        doc["runs"][1]["name"] = f"{SCRIPT} $x$"
        doc["unavailable"] = [{"name": SCRIPT, "reason": SCRIPT}]

    _edit(folder, hostile)
    res = invoke(["report", folder])
    assert res.exit_code == 0, res.output
    page = (folder / "report.html").read_text()
    assert page.count("<script>") == 1  # the page's own image counter, nothing from the file
    assert "<img src=x" not in page and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_plots_draw_run_names_with_dollars_and_backslashes_as_text(result_dir: Path, tmp_path: Path) -> None:
    folder = _copy(result_dir, tmp_path)
    # Unbalanced or invalid TeX: matplotlib's mathtext would fail on these when drawing.
    _edit(folder, lambda d: (d["runs"][1].update(name="$\\frac{1}{0}$ a$b"), d.update(model="$\\x$")))
    figure = tmp_path / "fig.png"
    res = invoke(["report", folder, "--figure", figure])
    assert res.exit_code == 0, res.output
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "$\\frac{1}{0}$ a$b" in (folder / "report.html").read_text()


def test_bench_table_prints_names_that_look_like_markup(
    result_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from stepcache.cli import _print_bench

    doc = json.loads((result_dir / "result.json").read_text())
    doc = copy.deepcopy(doc)
    doc["runs"][1]["name"] = "[/x] policy"
    doc["unavailable"] = [{"name": "[/y]", "reason": "[bold"}]
    _print_bench(doc, result_dir)
    out = capsys.readouterr().out
    assert "[/x] policy" in out and "[/y]" in out


# ---- zoo train: init weights and checkpoints ----------------------------------------------------
def _init_dir(tmp_path: Path, weights: Callable[[Path], Any], config: str | None) -> Path:
    d = tmp_path / "init"
    d.mkdir()
    weights(d / "model.safetensors")
    if config is not None:  # config.json is optional; without it the weights alone are checked
        (d / "config.json").write_text(config)
    return d


INIT_CASES: list[tuple[Callable[[Path], Any], str | None, list[str]]] = [
    (lambda p: p.write_bytes(pickle.dumps({"w": 1})), None, ["model.safetensors", "not a safetensors file"]),
    (lambda p: torch.save({"w": torch.zeros(2)}, p), None, ["model.safetensors", "not a safetensors file"]),
    (lambda p: save_file({"w": torch.zeros(2)}, str(p)), None, ["model.safetensors", "do not fit"]),
    (lambda p: p.write_bytes(b""), "[]", ["config.json", "expected a JSON object"]),
    (lambda p: p.write_bytes(b""), "{not json", ["config.json", "not valid JSON"]),
]


@pytest.mark.parametrize(("weights", "config", "words"), INIT_CASES)
def test_zoo_train_refuses_unusable_init_weights(
    weights: Callable[[Path], Any], config: str | None, words: list[str], tmp_path: Path, no_work: None
) -> None:
    init = _init_dir(tmp_path, weights, config)
    before = tree(tmp_path)
    res = invoke([*TRAIN, "--out", tmp_path / "out", "--init-from", init])
    refused(res, "--init-from", *words)
    assert tree(tmp_path) == before


def test_zoo_train_refuses_a_corrupt_checkpoint_before_training(tmp_path: Path, no_work: None) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(pickle.dumps({"step": 3}))
    before = tree(tmp_path)
    res = invoke([*TRAIN, "--out", out])
    refused(res, "--resume", "checkpoint.safetensors", "not a usable checkpoint")
    assert tree(tmp_path) == before


def test_train_refuses_a_checkpoint_of_another_model_and_overwrites_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cfg = TrainConfig(steps=2, batch_size=8, limit_images=16, warmup=1)
    meta = {"step": "1", "elapsed": "0.5", "train": json.dumps({}), "init_from": ""}
    tensors = {"model.nope": torch.zeros(3), "rng": torch.Generator().get_state()}
    save_file(tensors, str(out / "checkpoint.safetensors"), metadata=meta)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="checkpoint.safetensors: not a usable checkpoint"):
        train("digits-dit", out, cfg)
    assert tree(tmp_path) == before
