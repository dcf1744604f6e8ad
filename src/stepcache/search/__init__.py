"""Gradient-free, target-driven policy search (``stepcache.search``) and its planner."""

from .planner import SegmentErrors, brute_force, plan
from .study import SEARCHERS, CostModel, SearchError, Target, search

__all__ = [
    "SEARCHERS",
    "CostModel",
    "SearchError",
    "SegmentErrors",
    "Target",
    "brute_force",
    "plan",
    "search",
]
