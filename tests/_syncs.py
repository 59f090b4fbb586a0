"""A host-sync spy for tests that run on CPU tensors: the aten ops that would make the host wait
for a CUDA device (a value read back, a data-dependent shape).

``torch._assert_async`` is not one: on CUDA it is an asynchronous device-side assert.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t), if t:
    "nonzero",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",  # boolean-mask indexing
    "bincount",  # reads the maximum on CUDA
    "repeat_interleave",  # without output_size
    "equal",
    "is_nonzero",
}


class HostSyncSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            self.syncs.append("index[bool]")
        elif name in ("_to_copy", "copy_") and any(
            isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args
        ) and (kwargs or {}).get("device", None) == torch.device("cpu"):
            self.syncs.append("to_cpu")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as syncs: ...``; ``syncs`` is the list of sync op names."""
    spy = HostSyncSpy()
    with spy:
        yield spy.syncs
