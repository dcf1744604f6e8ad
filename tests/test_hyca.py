"""HyCa: each channel of the middle blocks' residual forecast by its own solver, fitted offline
(calibrate) or chosen online from the computed steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_blocks import _count_blocks, _run
from typer.testing import CliRunner

import stepcache
from stepcache import presets
from stepcache.calibration import calibrate
from stepcache.cli import app
from stepcache.errors import PolicyError
from stepcache.methods.block.hyca import SOLVERS, HyCa, fit_solvers
from stepcache.runtime import CallContext

STEPS = 14


def _mixed(step: int) -> tuple[torch.Tensor]:
    """Channel 0 a parabola in the step (only the quadratic solver is exact on it); channel 1
    holds its value from one computed step of the schedule below to the next and jumps
    irregularly there (only reuse is exact on it)."""
    jumps = [0.0, 5.0, -3.0, 8.0, 1.0, 6.0, -2.0, 4.0, 9.0, 0.5, 3.0, -4.0, 7.0, 2.0]
    held = jumps[step if step < 3 else 3 + 3 * ((step - 3) // 3)]
    value = torch.tensor([0.3 * step**2 - step + 2.0, held], dtype=torch.float64)
    return (value.expand(2, 5, 2).clone(),)  # (batch, tokens, channels)


def _errors(rule: HyCa) -> list[float]:
    state, errors = rule.new_state(), []
    for s in range(STEPS):
        ctx = CallContext(step=s, branch=0, num_steps=STEPS, batch=2, timestep=0)
        if rule.plan(ctx, state, ()):
            rule.observe(ctx, state, _mixed(s), None)
        else:
            (est,) = rule.estimate(ctx, state, None)
            errors.append(float((est - _mixed(s)[0]).abs().max()))
    return errors


def test_the_fitted_mix_is_exact_where_every_single_solver_is_not():
    schedule = HyCa(interval=3, warmup=3, fn=0, bn=0, mask=None, solvers=None)
    record = {(0, s): [_mixed(s)] for s in range(STEPS)}
    solvers = fit_solvers(record, schedule.computes)
    assert [list(SOLVERS)[k] for k in solvers] == ["quadratic", "reuse"]

    hybrid = _errors(HyCa(3, 3, 0, 0, None, solvers))
    assert len(hybrid) == 7 and max(hybrid) < 1e-9  # 7 of 14 steps forecast, all exactly
    for k, name in enumerate(SOLVERS):
        assert max(_errors(HyCa(3, 3, 0, 0, None, [k, k]))) > 0.1, name
    # Chosen online (every computed step scores each solver's forecast of it): after the first
    # few computed steps it settles on the same mix and is exact from then on.
    online = _errors(HyCa(3, 3, 0, 0, None, None))
    assert max(online[-3:]) < 1e-9


def test_all_true_mask_is_full_compute_and_the_schedule_runs_fewer_middle_blocks(digits_pipe):
    reference = _run(digits_pipe, steps=12)
    stepcache.enable(digits_pipe, presets.get("hyca", mask=[True] * 12))
    exact = _run(digits_pipe, steps=12)
    stepcache.disable(digits_pipe)
    assert (exact == reference).all()

    counts, hooks = _count_blocks(digits_pipe.transformer)
    try:
        handle = stepcache.enable(digits_pipe, presets.get("hyca", interval=3, warmup=3, fn=1, bn=1))
        out = _run(digits_pipe, steps=12)
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    computed = 3 + 3  # warm-up, then steps 3, 6, 9
    assert counts == [12] + [computed] * 4 + [12]
    assert handle.stats()["partial"] == 12 - computed
    assert stepcache.metrics.psnr_per_image(out, reference).mean() > 25


def test_calibrate_fits_one_solver_per_channel_and_the_policy_runs(digits_pipe):
    def run():
        _run(digits_pipe, steps=10, labels=(1, 4, 7))

    pol = calibrate("hyca", digits_pipe, run, interval=2)
    block = pol.rules["block"].params
    assert block["interval"] == 2 and len(block["solvers"]) == 64  # digits-dit: 64 channels
    assert set(block["solvers"]) <= set(range(len(SOLVERS)))
    again = stepcache.Policy.from_dict(json.loads(json.dumps(pol.to_dict())))
    stepcache.enable(digits_pipe, again)
    try:
        out = _run(digits_pipe, steps=10)
    finally:
        stepcache.disable(digits_pipe)
    assert np.isfinite(out).all()

    with pytest.raises(ValueError, match="skips none of the recorded steps"):
        calibrate("hyca", digits_pipe, run, mask=[True] * 10)
    with pytest.raises(ValueError, match="hyca.solvers: is what calibration fits"):
        calibrate("hyca", digits_pipe, run, solvers=[0])


def test_solvers_fitted_on_another_model_are_refused_by_name(digits_pipe):
    stepcache.enable(digits_pipe, presets.get("hyca", solvers=[1] * 63))
    try:
        with pytest.raises(ValueError, match=r"hyca.solvers has 63 entries .* 64 channels"):
            _run(digits_pipe, steps=6)
    finally:
        stepcache.disable(digits_pipe)
    assert np.isfinite(_run(digits_pipe, steps=6)).all()  # the model is left working


@pytest.mark.parametrize(
    ("solvers", "message"),
    [
        ([5], "must be <= 4"),
        ([-1], "must be >= 0"),
        ([1.5], "expected an integer"),
        ("1,2", "expected a list"),
    ],
)
def test_bad_solver_lists_are_policy_errors(solvers, message):
    with pytest.raises(PolicyError, match=rf"hyca.solvers.*{message}"):
        presets.get("hyca", solvers=solvers)


def test_cli_calibrate_hyca_writes_the_fitted_policy(tmp_path):
    out = tmp_path / "hyca.json"
    args = ["calibrate", "hyca", "--model", "digits-dit", "--samples", "2", "--steps", "8", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "-p", "interval=2"])
    assert result.exit_code == 0, result.output
    block = json.loads(out.read_text())["rules"]["block"]
    assert block["method"] == "hyca" and block["interval"] == 2 and len(block["solvers"]) == 64
