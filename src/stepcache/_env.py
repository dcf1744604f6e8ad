"""Where a result came from: device, library versions, commit. Recorded beside every number."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The checked-out commit of the repository around ``cwd``, or None outside one."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=cwd, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}), {torch.get_num_threads()} threads"


def environment(cwd: str | Path | None = None) -> dict[str, Any]:
    import diffusers

    from . import __version__

    return {
        "device": device_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "stepcache": __version__,
        "commit": git_commit(cwd),
    }
