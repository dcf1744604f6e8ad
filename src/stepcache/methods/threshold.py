"""Calibrating an adaptive rule's threshold to the model it runs on (``stepcache calibrate``).

A threshold on "how much did this step change" is in the model's own units: the default that
suits one model skips too much on another, or nothing. Here it is set from full-compute runs of
the calibration seeds: the largest value that keeps a fixed fidelity to full compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# What a calibrated threshold keeps of full compute: mean PSNR over the calibration seeds.
SAFE_PSNR_DB = 30.0
GRID = tuple(round(0.01 * 1.5**i, 4) for i in range(12))  # 0.01 ... 0.865


def threshold_fit(method: str) -> Callable[[Any, Callable[[], Any], Mapping[str, Any]], float]:
    """A ``Method.calibrate`` for ``method``'s ``threshold`` (larger skips more): the largest value
    of ``GRID`` whose generations keep ``SAFE_PSNR_DB`` of full compute on the calibration seeds,
    found by bisection (a handful of generations); the smallest when none does."""

    def fit(pipe: Any, run: Callable[[], Any], params: Mapping[str, Any]) -> float:
        from .. import presets
        from ..api import disable, enable
        from ..metrics import capped_psnr_per_image
        from ..pipelines import images_of

        def images() -> np.ndarray:  # ``run`` may return the images or the pipeline's output
            out = run()
            if out is None:
                raise ValueError(
                    f"run: returned nothing; to calibrate {method}'s threshold it must return what it "
                    "generated (the images, or the pipeline's output)"
                )
            return out if isinstance(out, np.ndarray) else images_of(out)

        reference = images()

        def keeps(i: int) -> bool:
            enable(pipe, presets.get(method, **{**params, "threshold": GRID[i]}))
            try:
                got = images()
            finally:
                disable(pipe)
            return float(capped_psnr_per_image(got, reference).mean()) >= SAFE_PSNR_DB

        lo, hi = 0, len(GRID) - 1
        if keeps(hi):
            return GRID[hi]
        if not keeps(lo):
            return GRID[lo]
        while hi - lo > 1:  # keeps(lo) and not keeps(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if keeps(mid) else (lo, mid)
        return GRID[lo]

    return fit
