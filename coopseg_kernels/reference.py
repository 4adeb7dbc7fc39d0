"""Naive torch implementations: the executable spec of every op, the test
oracle and the benchmark baseline. Plain torch ops, autograd by torch."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .convert import field_to_grid

_MODES = {2: "bilinear", 3: "trilinear"}


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op computes in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upsample_field(coarse: torch.Tensor, size: Sequence[int], *, align_corners: bool = True) -> torch.Tensor:
    """Coarse displacement grid (B, nd, *s) -> full-resolution field (B, nd, *size), voxel units."""
    return F.interpolate(coarse, size=tuple(size), mode=_MODES[coarse.dim() - 2], align_corners=align_corners)


def warp(moving: torch.Tensor, coarse: torch.Tensor, *, align_corners: bool = True,
         padding_mode: str = "zeros") -> torch.Tensor:
    """Sample `moving` at voxel + upsampled displacement (multilinear, grid_sample align_corners=True).

    Math in float32 (float64 for float64 images); the result has the image's dtype."""
    dtype = math_dtype(moving.dtype)
    field = upsample_field(coarse.to(dtype), moving.shape[2:], align_corners=align_corners)
    grid = field_to_grid(field, align_corners=True)
    out = F.grid_sample(moving.to(dtype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.to(moving.dtype)
