"""Count host syncs: places where the host reads a value the accelerator computed.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()`` or ``.nonzero()`` of a
device tensor waits for the device. To count them on any machine, run the model on PyTorch's
``meta`` device (shapes only, no values): a read of a meta tensor is exactly a read the host
would have to wait for. Host-side tensors (created on the CPU on purpose, such as a fixed
schedule's row masks) are not counted. A counted read gets a stand-in value (zeros, False, or
all-true for a boolean array read back) so the run goes on; the stand-in may steer a
data-dependent rule down one branch, so the count is per path taken, which is what a fast path
is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "__bool__", "tolist", "numpy", "cpu", "nonzero", "__int__", "__float__", "__index__"}


def _is_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _stand_in(name: str, t: torch.Tensor) -> Any:
    if name in ("item", "__int__", "__index__"):
        return False if t.dtype == torch.bool else 0
    if name == "__float__":
        return 0.0
    if name == "__bool__":
        return False
    # A boolean array read back (a mask, a finiteness flag) reads all-true: "nothing unusual".
    fill = torch.ones if t.dtype == torch.bool else torch.zeros
    if name == "tolist":
        return fill(t.shape, dtype=t.dtype).tolist()
    if name == "numpy":
        return fill(t.shape, dtype=t.dtype).numpy()
    if name == "nonzero":
        return torch.zeros((0, t.dim()), dtype=torch.long, device="meta")
    return fill(t.shape, dtype=t.dtype)  # cpu()


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: ...`` then ``c.count`` (and ``c.calls``, by kind)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else None
        moves_to_host = name == "to" and any(
            str(a).startswith("cpu") for a in (*args[1:], kwargs.get("device", ""))
        )
        if _is_meta(target) and (name in _READS or moves_to_host):
            key = "to(cpu)" if moves_to_host else name
            self.calls[key] = self.calls.get(key, 0) + 1
            return _stand_in("cpu" if moves_to_host else name, target)
        return func(*args, **kwargs)
