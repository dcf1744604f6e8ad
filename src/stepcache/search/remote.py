"""Candidate evaluations on Ray workers (the optional ``ray`` extra).

Each worker is a Ray actor that loads the same pipeline (zoo key, folder or factory) and scores
policies against the reference images the driver recorded (sent once, so workers spend no budget
on references).
``address=None`` starts a local cluster on this machine; a real cluster's address joins it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..policy import Policy


class _Worker:
    """Lives in a Ray worker process: one pipeline, one evaluator, many policies."""

    def __init__(
        self,
        spec: str,
        workload: dict[str, Any] | None,
        steps: int,
        guidance: float | None,
        seeds: list[int],
        reference: np.ndarray,
        samples: np.ndarray | None = None,
    ):
        import torch

        from ..bench.harness import make_batch, workload_batch
        from ..pipelines import load_pipeline
        from ..workload import Workload
        from .evaluate import Evaluator

        target = load_pipeline(spec)
        if workload is None:
            batch = make_batch(target.pipe, target.name, steps, guidance, seeds)
        else:
            batch = workload_batch(target.pipe, target.name, Workload.from_dict(workload), seeds)
        trajectory = None if samples is None else torch.from_numpy(samples)
        self.ev = Evaluator(target.pipe, batch, reference=reference, samples=trajectory)

    def evaluate(self, policy: dict[str, Any], fit: bool = False) -> dict[str, Any]:
        res = self.ev.evaluate(Policy.from_dict(policy), fit=fit)
        return {k: v for k, v in res.items() if k != "images"}  # images stay on the worker


class RayPool:
    """``size`` workers; ``evaluate`` scores a list of policies, one per worker at a time."""

    def __init__(
        self,
        spec: str,
        workload: Any,
        work: Any,
        reference: np.ndarray,
        workers: int,
        address: str | None = None,
        samples: Any = None,
    ):
        try:
            import ray
        except ImportError as e:
            raise ImportError('the ray engine needs Ray: pip install "stepcache[ray]"') from e
        self._started = not ray.is_initialized()
        if self._started:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home from a search
            if address is None:
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=200 * 2**20,
                )
            else:
                ray.init(address=address, log_to_driver=False)
        # Ray gives each 1-CPU actor OMP_NUM_THREADS=1 itself; a runtime_env would cost a setup agent.
        actor = ray.remote(num_cpus=1)(_Worker)
        self._ray = ray
        self.size = workers
        self.actors = [
            actor.remote(
                spec,
                workload.to_dict() if workload is not None else None,
                work.steps,
                work.guidance,
                list(work.seeds),
                reference,
                None if samples is None else samples.numpy(),
            )
            for _ in range(workers)
        ]

    def evaluate(self, policies: list[tuple[Policy, bool]]) -> list[dict[str, Any]]:
        """Scores (policy, fit) pairs: ``fit`` fits a schedule's weights as it runs."""
        actors = [self.actors[i % self.size] for i in range(len(policies))]
        futures = [a.evaluate.remote(p.to_dict(), fit) for a, (p, fit) in zip(actors, policies, strict=True)]
        return self._ray.get(futures)

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        if self._started:  # a local cluster this pool started ends with it
            self._ray.shutdown()
