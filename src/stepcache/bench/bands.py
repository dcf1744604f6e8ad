"""Runs compared at matched speed: for each band "at least X times fewer FLOPs", the best run of
stepcache and of each peer, and stepcache's lead.

FLOPs are the primary axis because they are deterministic; wall-clock on a shared CPU moves by
tenths between two runs of the same setting, so it is shown beside, not used to match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

BANDS = (1.1, 1.25, 1.5, 2.0, 3.0, 4.0)


def flop_speedup(run: dict[str, Any]) -> float:
    fraction = run.get("flop_fraction") or 0.0
    return 1.0 / fraction if fraction > 0 else math.inf


def _side(run: dict[str, Any]) -> str:
    return "stepcache" if run["kind"] == "stepcache" else str(run.get("peer") or "peer")


def _score(run: dict[str, Any], metric: str) -> float:
    value = run.get(metric)
    return value if isinstance(value, (int, float)) and not math.isnan(value) else -math.inf


def band_table(
    runs: list[dict[str, Any]],
    bands: tuple[float, ...] = BANDS,
    metric: str = "psnr",
    side: Callable[[dict[str, Any]], str | None] = _side,
) -> list[dict[str, Any]]:
    """Per band edge, the best run (by ``metric``) of each side among runs at least that much
    below full compute's FLOPs, and stepcache's lead over the best peer (None when a side has no
    run in the band). ``side`` names a run's side (None: left out); by default stepcache or the
    peer's name. A run whose measured speedup was flagged as noise still counts here: its FLOPs
    are exact."""
    table = []
    for edge in bands:
        best: dict[str, dict[str, Any]] = {}
        for run in runs:
            if run["kind"] == "reference" or flop_speedup(run) < edge - 1e-9:
                continue
            name = side(run)
            if name is None:
                continue
            if name not in best or _score(run, metric) > _score(best[name], metric):
                best[name] = run
        ours = best.get("stepcache")
        peers = {k: v for k, v in best.items() if k != "stepcache"}
        top_peer = max(peers.values(), key=lambda r: _score(r, metric)) if peers else None
        lead = None
        if ours is not None and top_peer is not None:
            lead = _score(ours, metric) - _score(top_peer, metric)
            lead = None if math.isnan(lead) else lead
        table.append({"band": edge, "best": best, "lead": lead, "top_peer": top_peer})
    return table
