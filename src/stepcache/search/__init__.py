"""Gradient-free, target-driven policy search (``stepcache.search``) and its planner.

The module itself is callable: ``stepcache.search("fmnist-dit", speedup=2)`` is
``stepcache.search.search(...)``, so the one name serves as the function and as its namespace.
"""

import sys
import types

from .evaluate import CostModel, SearchError
from .planner import SegmentErrors, brute_force, plan
from .space import SPACE, Point
from .study import SEARCHERS, SearchConfig, Target, search

__all__ = [
    "SEARCHERS",
    "SPACE",
    "Point",
    "SearchConfig",
    "CostModel",
    "SearchError",
    "SegmentErrors",
    "Target",
    "brute_force",
    "plan",
    "search",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)

    __call__.__doc__ = search.__doc__


sys.modules[__name__].__class__ = _CallableModule
