"""The command line under random hostile argument vectors and files (tests/clifuzz.py): no
traceback, no hang, nothing written by a command that fails, strict JSON from one that succeeds.
``python benchmarks/fuzz.py --cli 10000`` runs the same with many more cases."""

from __future__ import annotations

import clifuzz
import pytest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clifuzz")
    return clifuzz.Files(root / "files", clifuzz.make_result_dir(root))


def _report(result: dict) -> str:
    return "\n\n".join(f"{f['verdict']}: {f['argv']}\n{f['detail']}" for f in result["first_failures"])


def test_random_command_lines_before_the_work(files):
    result = clifuzz.fuzz(400, seed=2026, files=files)
    assert result["failures"] == 0, _report(result)
    # the generator reaches every outcome, so the checks above are exercised
    assert {"usage-error", "reached-work", "ok"} <= set(result["verdicts"]), result["verdicts"]


def test_random_command_lines_run_for_real(files):
    result = clifuzz.fuzz(16, seed=7, small=True, files=files)
    assert result["failures"] == 0, _report(result)
    assert result["verdicts"].get("usage-error", 0) > 0
