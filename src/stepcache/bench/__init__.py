"""The measurement harness: ``bench`` (stepcache policies), ``compare`` (with peers), ``report``."""

from typing import Any

from .harness import Candidate, bench, peer_candidate, policies_from, policy_candidate, reference_candidate
from .result import SCHEMA, ResultError, validate_result


def __getattr__(name: str) -> Any:
    # The report needs matplotlib; measuring (and the GPU scripts) should not.
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(f"module 'stepcache.bench' has no attribute {name!r}")


__all__ = [
    "SCHEMA",
    "Candidate",
    "ResultError",
    "bench",
    "peer_candidate",
    "policies_from",
    "policy_candidate",
    "reference_candidate",
    "validate_result",
    "write_report",
]
