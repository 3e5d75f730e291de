"""A guard for tests: which operations in a block would make the host wait for the device."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a value (``.item()``, ``bool()``,
    ``int()``), and those whose output shape depends on the data. On the CPU they are cheap, but each would stall
    a CUDA step and none may be captured in a CUDA graph."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING or (name == "_to_copy" and "device" in (kwargs or {})):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
