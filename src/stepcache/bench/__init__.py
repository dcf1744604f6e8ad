"""The measurement harness: ``bench`` (stepcache policies), ``compare`` (with peers), ``report``.

The module itself is callable: ``stepcache.bench(pipe, workload, policies)`` is
``stepcache.tools.bench``, the user-facing form; ``stepcache.bench.bench`` takes prepared runs.
"""

import sys
import types
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


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..tools import bench as bench_policies

        return bench_policies(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
