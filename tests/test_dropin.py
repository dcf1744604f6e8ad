"""A method is one file: dropped into ``methods/step/`` of a copy of the package, a new method
shows up in the presets, in ``enable``, in the fuzz tests and in ``compare`` with no other file
touched. Also: the registry refuses a method file whose parts disagree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stepcache
from stepcache.methods import Method, register
from stepcache.methods.step.static_interval import SCHEMA, StaticInterval

DROPPED = '''"""Every-k reuse (a test method): compute every ``interval``-th step, reuse the last output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...policy import Param, RuleSchema
from ...runtime import StepRule
from .. import Method


@dataclass
class Last:
    out: torch.Tensor | None = None


class EveryK(StepRule):
    def __init__(self, interval: int):
        self.interval = interval

    def new_state(self) -> Last:
        return Last()

    def plan(self, ctx, state):
        return state.out is None or ctx.step % self.interval == 0

    def estimate(self, ctx, state, rows):
        return state.out.clone() if rows is None else state.out.index_select(0, rows)

    def observe(self, ctx, state, output, rows):
        if rows is None:
            state.out = output.detach().clone()


METHOD = Method(
    schema=RuleSchema(
        method="every-k",
        level="step",
        summary="compute every `interval`-th step; reuse the last output between",
        params={"interval": Param("int", 3, "compute every interval-th step", min=1, max=100)},
    ),
    rule=EveryK,
    preset="Every-k reuse: compute every 3rd step, reuse the last output between.",
    sweep=({}, {"interval": 2}),
)
'''

CHECK = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])  # the tests folder: tiny models and the fuzz test
import stepcache
assert Path(stepcache.__file__).is_relative_to(sys.argv[1]), stepcache.__file__
from typer.testing import CliRunner
from stepcache import presets
from stepcache.bench.compare import default_sweep
from stepcache.cli import app
import tiny, test_fuzz
from hypothesis import find, settings

out = {"presets": presets.names(), "sweep": [p for p, o in default_sweep() if p == "every-k"]}
listed = CliRunner().invoke(app, ["presets"])
out["cli_presets"] = listed.output
model = tiny.make("dit")
handle = stepcache.enable(model, "every-k")
with handle.generation(num_steps=9):
    tiny.sample("dit", model, batch=2, steps=9)
out["actions"] = "".join(handle.stats()["actions"])
stepcache.disable(model)
case = find(
    test_fuzz.cases(),
    lambda c: c[4]["rules"].get("step", {}).get("method") == "every-k",
    settings=settings(database=None, max_examples=2000),
)
test_fuzz.test_random_valid_policies_run_on_every_family.hypothesis.inner_test(case)
out["fuzzed"] = case[4]
res = CliRunner().invoke(app, [
    "compare", "digits-dit", "--out", sys.argv[3], "--peers", "", "--preset", "every-k",
    "--seeds", "2", "--repeats", "1", "--steps", "6",
])
out["compare_exit"] = res.exit_code
out["compare_output"] = res.output[-2000:]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the installed package (weights linked, not copied) with the new method file."""
    root = tmp_path_factory.mktemp("pkg")
    src = Path(stepcache.__file__).parent
    shutil.copytree(src, root / "stepcache", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    (root / "stepcache" / "zoo" / "weights").symlink_to(src / "zoo" / "weights", target_is_directory=True)
    (root / "stepcache" / "methods" / "step" / "every_k.py").write_text(DROPPED)
    return root


def test_a_dropped_in_method_file_is_everywhere(package_copy: Path, tmp_path: Path) -> None:
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(package_copy), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(package_copy), str(tests), str(tmp_path / "cmp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert "every-k" in out["presets"]
    assert "every-k" in out["cli_presets"] and "Every-k reuse" in out["cli_presets"]
    assert out["actions"] == "CEECEECEE"  # steps 0, 3, 6 computed: the file's own rule ran
    assert out["fuzzed"]["rules"]["step"]["method"] == "every-k"
    assert out["sweep"] == ["every-k", "every-k"]
    assert out["compare_exit"] == 0, out["compare_output"]
    doc = json.loads((tmp_path / "cmp" / "result.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["reference", "every-k", "every-k interval=2"]
    assert [r["actions"] for r in doc["runs"][1:]] == ["CEECEE", "CECECE"]
    # The installed package never saw the file.
    assert "every-k" not in stepcache.presets.names()


def _method(**changes) -> Method:
    fields = {"schema": SCHEMA, "rule": StaticInterval, "preset": "x", **changes}
    return Method(**fields)


def test_the_registry_refuses_a_method_file_whose_parts_disagree() -> None:
    def rule(interval, warmup):  # no `mask`: the schema declares one
        raise AssertionError

    with pytest.raises(TypeError, match="its rule takes"):
        register(_method(rule=rule), source="x")
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['intervall'\]"):
        register(_method(sweep=({"intervall": 2},)), source="x")
    with pytest.raises(TypeError, match="`fits`"):
        register(_method(fits="interval"), source="x")
    with pytest.raises(ValueError, match="declared twice"):
        register(_method(), source="somewhere.else")
    with pytest.raises(TypeError, match="must be a stepcache.methods.Method"):
        register({"schema": SCHEMA}, source="x")  # type: ignore[arg-type]
