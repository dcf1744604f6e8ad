"""The public entry points: enable, disable, and turning anything policy-like into a Policy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import methods, presets
from .adapters import adapter_for, find_denoisers
from .errors import PolicyError
from .policy import Policy
from .runtime import Handle, attach, detach
from .runtime.engine import ExpertsHandle

PolicyLike = Policy | str | os.PathLike | Mapping[str, Any] | None


def resolve_policy(policy: PolicyLike) -> Policy:
    """A Policy from a Policy, preset name, path to a JSON file, dict, or None (always compute)."""
    if policy is None:
        return Policy.from_dict({"schema": "stepcache.policy/1", "name": "always-compute", "rules": {}})
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_dict(policy)
    if isinstance(policy, str) and policy in presets.names():
        return presets.get(policy)
    if isinstance(policy, (str, os.PathLike)):
        path = Path(policy)
        if path.suffix == ".json" or path.exists():
            return Policy.load(path)
        raise PolicyError(
            f"policy: {str(policy)!r} is neither a preset ({', '.join(presets.names())}) nor a policy file"
        )
    raise PolicyError(f"policy: expected a Policy, preset name, path or dict, got {type(policy).__name__}")


def enable(
    pipe_or_module: Any,
    policy: PolicyLike = None,
    *,
    sample_arg: str | None = None,
    timestep_arg: str | None = None,
    group: Any = None,
) -> Handle | ExpertsHandle:
    """Attach ``policy`` to a diffusers pipeline, a denoiser module of any class, or a plain
    ``model(x, sigma, **extra)`` callable; returns the handle (callable like the model).

    Block-level rules need a family the runtime knows; step- and guidance-level rules work on
    any module. ``sample_arg`` / ``timestep_arg`` name the noisy-sample and time arguments of a
    model whose names the runtime cannot guess. ``group``: the processes that must take every
    decision together (a torch.distributed process group, ``"world"``, or ``False`` for none); by
    default, the ranks of a denoiser split with diffusers' ``enable_parallelism``, so that a
    decision computed on each rank's shard of the tokens is the same everywhere (a row computes
    when any rank wants it). Enabling again replaces the previous policy.
    Nothing about the classes changes; ``disable`` restores the exact original objects.
    """
    pol = resolve_policy(policy)
    models = find_denoisers(pipe_or_module)
    adapters = {name: adapter_for(m, sample_arg, timestep_arg) for name, m in models.items()}
    if len(models) == 1:
        ((name, model),) = models.items()
        return attach(pipe_or_module, model, adapters[name], methods.build(pol), pol, group)
    disable(pipe_or_module)  # the experts' wrappers nest: take them off in order first
    handles = {}
    try:
        for name, model in models.items():  # own rules per expert: caches never cross
            handles[name] = attach(pipe_or_module, model, adapters[name], methods.build(pol), pol, group)
    except BaseException:
        disable(pipe_or_module)
        raise
    return ExpertsHandle(handles)


def disable(pipe_or_module: Any) -> None:
    """Remove stepcache from a pipeline or module; a no-op when it is not enabled."""
    for model in reversed(list(find_denoisers(pipe_or_module).values())):
        detach(model)
