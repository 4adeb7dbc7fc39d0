"""Max-pooling in the dtype of its input, also under CPU autocast.

CPU autocast lists max-pooling among the ops it runs in float32, so under bf16
autocast it casts a bf16 input to a float32 copy (twice its bytes), pools that and
keeps the copy for the backward; CUDA autocast pools bf16 as it comes. The max of
bf16 values is one of those values, so pooling in bf16 gives exactly the values of
pooling their float32 copy, and the next conv (which autocast casts to bf16 anyway)
sees the same numbers: `pool_like_input` turns autocast off around the pool, so CPU
and CUDA pool the same dtype and the float32 copy never exists.
"""
from __future__ import annotations

import torch
from torch import nn


def pool_like_input(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pool(x) computed in x's dtype (autocast off around it)."""
    with torch.autocast(x.device.type, enabled=False):
        return pool(x)
