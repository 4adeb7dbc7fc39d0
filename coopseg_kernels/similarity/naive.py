"""Brute force: the oracle of the translation search (tests) and its slowest baseline
(benchmarks). Nothing here is used by the fast path.

`brute_force_translation` shifts s1 by every integer t in the bound by explicit slicing
and counts each channel's overlap and sizes itself (it does not call `dice`, so it checks
the channel pooling too); the definitions it follows are docs/conventions.md#d_s-definitions.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor


def shift(s1: Tensor, t: Sequence[int]) -> Tensor:
    """s1(x + t) with zero padding, by explicit slicing."""
    shifted = torch.zeros_like(s1)
    src = tuple(slice(max(v, 0), n + min(v, 0)) for v, n in zip(t, s1.shape[2:]))
    dst = tuple(slice(max(-v, 0), n + min(-v, 0)) for v, n in zip(t, s1.shape[2:]))
    shifted[(..., *dst)] = s1[(..., *src)]
    return shifted


def _per_channel_counts(x: Tensor) -> Tensor:
    """(B, C) set voxels of each channel of a bool batch, int64."""
    return x.flatten(2).sum(2, dtype=torch.int64)


def brute_force_translation(s1: Tensor, s2: Tensor, bound: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """max over integer t (|t_k| <= bound_k; one int: every axis) of the pooled
    Dice(s1(x + t), s2) per batch item of bool masks (B, C, *S): 2 sum_c |s1_c(x + t) & s2_c|
    / (sum_c |s1_c(x + t)| + sum_c |s2_c|), two empty masks 1 (masks that are not bool are
    thresholded at 0.5). A shift that leaves nothing
    of a non-empty s1 is no candidate. Ties: the smallest |t|_1, then the lexicographically
    smallest t. Returns (t (B, nd) float64, Dice (B,) float64), as `translation_search`."""
    s1, s2 = (x if x.dtype == torch.bool else x > 0.5 for x in (s1, s2))
    nd = s1.dim() - 2
    bound = [bound] * nd if isinstance(bound, int) else list(bound)
    B, device = s1.shape[0], s1.device
    size2 = _per_channel_counts(s2).sum(1)
    nonempty1 = s1.flatten(1).any(1)
    best = torch.full((B,), -1.0, dtype=torch.float64, device=device)
    best_t = torch.zeros(B, nd, dtype=torch.float64, device=device)
    # in tie order: the first shift to reach an item's best Dice is its answer
    shifts = sorted(itertools.product(*[range(-b, b + 1) for b in bound]), key=lambda t: (sum(map(abs, t)), t))
    for t in shifts:
        shifted = shift(s1, t)
        inter = _per_channel_counts(shifted & s2).sum(1)
        size1 = _per_channel_counts(shifted).sum(1)
        total = size1 + size2
        d = torch.where(total > 0, 2 * inter.double() / total.clamp_min(1).double(),
                        torch.ones(B, dtype=torch.float64, device=device))
        take = (d > best) & ~(nonempty1 & (size1 == 0))
        best = torch.where(take, d, best)
        best_t[take] = torch.tensor(t, dtype=torch.float64, device=device)
    return best_t, best
