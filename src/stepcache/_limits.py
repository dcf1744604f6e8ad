"""Bounds on every number a user gives: sizes the machine can hold, values torch accepts.

A number past these bounds is refused before any model loads, with a ValueError naming the
argument (the command line turns it into a usage error naming the option).
"""

from __future__ import annotations

import math
from typing import Any

MAX_STEPS = 10_000  # sampling steps of one generation
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
MAX_EVAL_SEEDS = 4096  # bench / compare / search held-out: one batch of this many images
MAX_CALIB_SEEDS = 10_000  # search calibration seeds 0..K-1 stay below the evaluation seeds
MAX_DEMO_SAMPLES = 256  # demo's grid.png is one row of these, scaled 6x
MAX_CALIB_SAMPLES = 1024
MAX_REPEATS = 100
MAX_GUIDANCE = 1000.0
MAX_BUDGET = 10_000.0  # full-generation equivalents of a search
MAX_TUNE_BUDGET = 1000.0  # full-generation equivalents per peer method and band
MAX_SPEEDUP = 1000.0
MAX_PSNR = 1000.0  # dB
MAX_WORKERS = 256
MAX_TRAIN_STEPS = 10_000_000
MAX_TRAIN_IMAGES = 10_000_000
MAX_LR = 10.0
MAX_POLICY_BYTES = 16 * 1024 * 1024
MAX_JSON_INT = 2**53  # every JSON reader takes integers up to this exactly


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an integer in [lo, hi]; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        shown = value if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
        raise ValueError(f"{name}: must be between {lo} and {hi}, got {shown}")
    return value


def float_problem(value: Any, lo: float, hi: float, above: bool = False) -> str | None:
    """What is wrong with ``value`` as a finite number in [lo, hi] (in (lo, hi] with ``above``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {type(value).__name__}"
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        return f"must be a finite number, got {number}"
    if number < lo or number > hi or (above and number == lo):
        bound = f"> {lo:g} and <= {hi:g}" if above else f"between {lo:g} and {hi:g}"
        return f"must be {bound}, got {number:g}"
    return None


def check_float(name: str, value: Any, lo: float, hi: float, above: bool = False) -> float:
    """``value`` as a finite float within bounds (see :func:`float_problem`); a ValueError naming
    ``name`` otherwise."""
    problem = float_problem(value, lo, hi, above)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    return float(value)
