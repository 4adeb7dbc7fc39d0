"""Activation checkpointing of one network block.

torch.utils.checkpoint runs a block forward without keeping its activations and
runs it again during backward. A BatchNorm in training mode would then update its
running statistics a second time; `checkpointed` therefore recomputes with the
running statistics frozen. The recomputation uses batch statistics either way, so
its outputs (and so the gradients) equal the first pass exactly.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .norm import frozen_running_stats


def checkpointed(block: nn.Module, *args, **kwargs):
    """block(*args, **kwargs), activation-checkpointed when gradients are being recorded."""
    if not torch.is_grad_enabled():
        return block(*args, **kwargs)
    calls = 0

    def run(*a, **kw):
        nonlocal calls
        calls += 1
        if calls == 1:
            return block(*a, **kw)
        with frozen_running_stats(block):
            return block(*a, **kw)

    # The blocks hold no randomness (no dropout): no RNG state to stash.
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
