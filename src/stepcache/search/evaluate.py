"""Scoring candidates: a seed set's reference and the PSNR of a policy against it, and the cost
model that predicts a policy's work from its per-step actions. Imported by the search, its
storage and its Ray workers; it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import presets
from ..api import disable, enable
from ..bench.harness import Batch, _flops, adherence
from ..errors import UnsupportedModelError
from ..methods.step.schedule import Schedule
from ..metrics import bootstrap_ci, capped_psnr_per_image, ssim_per_image
from ..policy import Policy
from .fit import TrajectoryFit, fitted_weights
from .planner import SegmentErrors, plan
from .space import Candidate, strided_mask
from .trajectory import record


class SearchError(ValueError):
    """A search request that cannot be carried out; the message names the argument."""


def policy_key(policy: Policy, fit: bool = False) -> str:
    """Identifies what a policy computes, whatever its name or meta (and whether its evaluation
    fits its schedule's weights)."""
    return str(sorted(policy.to_dict()["rules"].items())) + ("|fit" if fit else "")


class Evaluator:
    """A seed set's reference (trajectory and images) and the evaluation of candidate policies."""

    def __init__(
        self,
        pipe: Any,
        work: Batch,
        reference: np.ndarray | None = None,
        samples: torch.Tensor | None = None,
    ):
        """Records the reference trajectory, or, given ``reference`` images and the reference's
        per-step ``samples`` (a remote worker that only scores candidates), takes them as they are."""
        self.pipe, self.work = pipe, work
        self.traj = record(pipe, lambda: work.generate(pipe)) if reference is None else None
        self.reference = self.traj.images if self.traj is not None else reference
        self.samples = self.traj.x if self.traj is not None else samples
        self.cfg = (work.guidance or 0.0) > 1.0
        self._errors = {order: SegmentErrors(self.traj, order) for order in (0, 1)} if self.traj else {}
        self._masks: dict[tuple[int, int], list[bool]] = {}
        self._cache: dict[str, dict[str, Any]] = {}
        self.reference_adherence = adherence(work.model, self.reference, work.captions)

    @property
    def num_steps(self) -> int:
        return self.traj.num_steps

    def mask(self, computed: int, order: int, stride: int = 0) -> list[bool]:
        """The planner's schedule for ``computed`` steps (exact for order <= 1, reused above), or
        with a ``stride`` the peers' placement (``space.strided_mask``)."""
        if stride:
            return strided_mask(self.num_steps, computed, stride)
        key = (computed, min(order, 1))
        if key not in self._masks:
            self._masks[key] = plan(self._errors[key[1]], self.num_steps, computed)[0]
        return self._masks[key]

    def evaluate(self, policy: Policy, fit: bool = False) -> dict[str, Any]:
        """Fidelity of ``policy`` on this seed set; ``cost`` is the fraction of network rows it
        ran (0 when the same policy was evaluated before: its result is reused). With ``fit``,
        its schedule's skipped-step weights are fitted to this seed set's trajectory as it runs
        (``search.fit``) and returned as ``weights``: the policy with them gives these images."""
        key = policy_key(policy, fit)
        if key in self._cache:
            return {**self._cache[key], "cost": 0.0}
        handle = enable(self.pipe, policy)
        weights = None
        try:
            if fit:
                images, weights = self._fitted_generation(handle.rules.step)
            else:
                images = self.work.generate(self.pipe)
            stats = handle.stats()
        finally:
            disable(self.pipe)
        psnr = capped_psnr_per_image(images, self.reference)
        letters = "".join(stats["row_actions"])
        result = {
            "psnr": float(psnr.mean()),
            "psnr_median": float(np.median(psnr)),
            "psnr_ci": list(bootstrap_ci(psnr)),
            "ssim": float(ssim_per_image(images, self.reference).mean()),
            "actions": "".join(stats["actions"]),
            "row_actions": list(stats["row_actions"]),
            # Partial rows ran the span's ends; counted as half a row, a rough share.
            "cost": (letters.count("C") + 0.5 * letters.count("P")) / len(letters),
            "adherence": adherence(self.work.model, images, self.work.captions),
            "images": images,
            **({"weights": weights} if fit else {}),
        }
        # Kept without images: a long search on a large pipeline holds one candidate's at a time.
        self._cache[key] = {k: v for k, v in result.items() if k != "images"}
        return result

    def _fitted_generation(self, rule: Any) -> tuple[np.ndarray, list[float]]:
        if not isinstance(rule, Schedule):
            raise SearchError("fitting: only a planned schedule's forecast weights can be fitted")
        if self.samples is None:
            raise SearchError("fitting: needs the reference trajectory's samples")
        fit = TrajectoryFit(self.pipe.scheduler, self.samples, rule.mask)
        rule.fitter = fit
        try:
            with fit.recording():
                images = self.work.generate(self.pipe)
        finally:
            rule.fitter = None
        return images, fitted_weights(fit, len(rule.mask), rule.order + 1)


@dataclass(frozen=True)
class CostModel:
    """Work of a generation from its per-step actions: ``full`` minus what each estimated step
    (E) and each conditional-only step (G) saves, in FLOPs (torch's counter: matrix products,
    convolutions and attention), counted once per action. Deterministic, unlike timings on a
    shared machine; an estimated step's elementwise arithmetic counts as free."""

    full: float
    save_estimated: float
    save_cond_only: float
    save_partial: float = 0.0  # per step whose every row skips all blocks but the first
    num_blocks: int = 0

    @classmethod
    def calibrate(cls, ev: Evaluator, blocks: bool = False) -> CostModel:
        n = ev.num_steps
        only_first = [True] + [False] * (n - 1)

        def work(policy: Policy | None) -> float:
            if policy is not None:
                enable(ev.pipe, policy)
            try:
                return _flops(lambda: ev.work.generate(ev.pipe))
            finally:
                disable(ev.pipe)

        full = work(None)
        estimated = work(Candidate(1, 1).policy(only_first, cfg=False))
        save_g = 0.0
        if ev.cfg and n > 1:
            # step 0 with guidance (full_until is at least 1), the other n - 1 conditional only
            cond_only = work(Candidate(n, 0, cfg_full=0.0, cfg_mode="cond-only").policy([True] * n, cfg=True))
            save_g = max(0.0, (full - cond_only) / (n - 1))
        save_e = max(0.0, (full - estimated) / max(1, n - 1))
        save_p, num_blocks = 0.0, _num_blocks(ev.pipe) if blocks else 0
        if num_blocks >= 2 and n > 1:
            skip_middle = presets.get("dbcache", fn=1, bn=0, threshold=1e9, max_consecutive=100_000, warmup=1)
            save_p = max(0.0, (full - work(skip_middle)) / (n - 1))
        return cls(
            full=full,
            save_estimated=save_e,
            save_cond_only=save_g,
            save_partial=save_p,
            num_blocks=num_blocks,
        )

    def speedup(self, actions: str) -> float:
        latency = (
            self.full - actions.count("E") * self.save_estimated - actions.count("G") * self.save_cond_only
        )
        return self.full / max(latency, 1e-9)

    def speedup_rows(self, row_actions: list[str], middle_fraction: float) -> float:
        """Speedup from what each row did per step (as ``stats()["row_actions"]`` reports it):
        estimated steps, left-out unconditional rows, and rows whose middle blocks were skipped."""
        latency = self.full
        for rows in row_actions:
            if set(rows) == {"E"}:
                latency -= self.save_estimated
                continue
            latency -= self.save_cond_only * min(1.0, 2 * rows.count("G") / len(rows))
            latency -= self.save_partial * middle_fraction * rows.count("P") / len(rows)
        return self.full / max(latency, 1e-9)

    def optimistic(self, actions: str, middle_fraction: float) -> float:
        """Upper bound before running: every computed step after the first also partial."""
        partial = sum(1 for i, a in enumerate(actions) if a in "CG" and i > 0)
        latency = self.full / self.speedup(actions) - partial * self.save_partial * middle_fraction
        return self.full / max(latency, 1e-9)


def _num_blocks(pipe: Any) -> int:
    """Blocks in the denoiser's stack; 0 (no block level to search) for a model without one."""
    from ..adapters import adapter_for, find_denoiser

    try:
        return len(adapter_for(find_denoiser(pipe)).blocks() or [])
    except UnsupportedModelError:
        return 0
