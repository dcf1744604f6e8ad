"""Rank-consistent decisions for denoisers split over processes.

Under context parallelism every rank runs the same denoiser call on a shard of the tokens, so an
indicator computed from a rank's tensors (a relative change, a magnitude ratio, a cosine) differs
per rank; ranks that then decide differently deadlock in the next collective (one runs the
blocks and waits in an all-to-all the other never joins). Every decision is therefore reduced
over the group before it is taken: a row computes when any rank wants it computed, an estimate is
used only when every rank can use it. A decision that is the same on every rank (a fixed
schedule) costs one small all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch

Plan = bool | torch.Tensor


class Agreement:
    """Reduces each decision over ``group`` (None: the default group)."""

    def __init__(self, group: Any = None):
        self.group = group
        self.reductions = 0  # decisions reduced so far (tests read it)

    def _device(self, hint: torch.device | None) -> torch.device:
        import torch.distributed as dist

        # Gloo reduces host tensors; NCCL device tensors.
        if dist.get_backend(self.group) == "gloo" or hint is None:
            return torch.device("cpu")
        return hint

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed as dist

        self.reductions += 1
        dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=self.group)
        return values

    def plan(self, plan: Plan, device: torch.device | None = None) -> Plan:
        """The plan every rank takes: compute a row (or the call) if any rank wants it."""
        if isinstance(plan, bool):
            flag = torch.tensor([int(plan)], dtype=torch.int32, device=self._device(device))
            return bool(self._reduce(flag, "max").item())
        rows = plan.to(dtype=torch.int32, device=self._device(plan.device)).reshape(-1)
        return self._reduce(rows, "max").to(device=plan.device, dtype=torch.bool)

    def every(self, ok: bool, device: torch.device | None = None) -> bool:
        """True only if ``ok`` holds on every rank (an estimate every rank can use)."""
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self._device(device))
        return bool(self._reduce(flag, "min").item())


def agreement_for(model: Any, group: Any) -> Agreement | None:
    """The agreement a handle uses: ``group=False`` none; a process group (or ``"world"``) that
    group; ``None`` (the default) the group of the model's diffusers parallel config when the
    model was split with ``enable_parallelism`` and more than one process runs, else none."""
    if group is False:
        return None
    import torch.distributed as dist

    if group is not None:
        if not (group == "world" or (dist.is_available() and isinstance(group, dist.ProcessGroup))):
            raise ValueError(
                f"group: expected a torch.distributed process group, 'world' or False, got {group!r}"
            )
        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised in this process")
        return Agreement(None if group == "world" else group)
    config = getattr(model, "_parallel_config", None)
    if config is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    return Agreement(mesh.get_group() if mesh is not None else None)
