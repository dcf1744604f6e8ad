"""The measurement harness: ``bench`` (stepcache policies), ``compare`` (with peers), ``report``."""

from .harness import Candidate, bench, peer_candidate, policies_from, policy_candidate, reference_candidate
from .report import write_report
from .result import SCHEMA, ResultError, validate_result

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
