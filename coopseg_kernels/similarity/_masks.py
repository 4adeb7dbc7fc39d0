"""Bool masks: thresholding, voxel counts and the pooled Dice every D_S module scores with."""
from __future__ import annotations

import torch
from torch import Tensor


def _binary(x: Tensor, threshold: float) -> Tensor:
    return x if x.dtype == torch.bool else x > threshold


def _count(X: Tensor) -> Tensor:
    """Set voxels per batch item of a bool batch, int64 (summed as bytes: ~2x faster than bool)."""
    X = X.flatten(1)
    acc = torch.int32 if X.shape[1] < 2**31 else torch.int64
    return X.view(torch.uint8).sum(1, dtype=acc).to(torch.int64)


def _dice_bool(A: Tensor, B: Tensor) -> Tensor:
    """Pooled Dice of bool batches (integer counts, one float64 division)."""
    A, B = A.flatten(1), B.flatten(1)
    inter = _count(A & B)
    total = _count(A) + _count(B)
    return torch.where(total > 0, 2 * inter.double() / total.clamp_min(1).double(),
                       torch.ones(total.shape, dtype=torch.float64, device=A.device))
