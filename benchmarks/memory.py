"""Peak memory of a piece of work, in bytes above what was live before it.

CPU: live tensor storages are counted with a TorchDispatchMode. Every aten or
custom op that returns a tensor is seen (autograd's backward ops too); a storage
counts from its first appearance until it is freed (a weakref finalizer on the
storage). Views share their storage and count once, and a result the op's schema
marks as aliasing an input (a view, an in-place or out= result) is never a new
storage: a view of a tensor that existed before the call (a slice of an input)
costs nothing. Allocations made inside a
fused kernel and freed before it returns are invisible to this mode: the kernels
in this package keep such scratch small (coarse-grid sized).
CUDA: torch.cuda.max_memory_allocated, which sees everything.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created while active; .peak is the maximum."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._release, key, n)

    def _release(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # only results the schema marks fresh: a view or an in-place/out= result aliases an
        # input (Tensor(a)), whose storage is not new -- counting it would charge a view of a
        # tensor that existed before the call (e.g. a slice of an input) as an allocation
        rets = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) and len(rets) > 1 else (out,)
        for r, o in zip(rets, outs):
            if r.alias_info is not None:
                continue
            for t in tree_flatten(o)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self._track(t)
        return out


def peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by fn() above the bytes live when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveStorageBytes() as mode:
        fn()
    return mode.peak
