"""Converters between voxel displacement fields and F.grid_sample grids.

A displacement field (B, nd, *S) holds, per voxel, the displacement in voxels
along (d, h, w) / (h, w). grid_sample takes absolute positions normalised to
[-1, 1] in reversed (x, y, z) = (w, h, d) order, shape (B, *S, nd):
  align_corners=True:  g = 2 p / (S - 1) - 1
  align_corners=False: g = (2 p + 1) / S - 1
where p = voxel index + displacement.
"""
from __future__ import annotations

import torch

from . import _checks


def identity_positions(size, dtype=torch.float32, device=None) -> torch.Tensor:
    """(nd, *size) voxel coordinates of every voxel, in spatial-axis order."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _scale_offset(size, align_corners, like):
    shape = (1, len(size)) + (1,) * len(size)
    S = torch.tensor([float(n) for n in size], dtype=like.dtype, device=like.device).view(shape)
    if align_corners:
        return 2.0 / (S - 1), -1.0, S
    return 2.0 / S, 1.0 / S - 1.0, S


def field_to_grid(field: torch.Tensor, *, align_corners: bool = True) -> torch.Tensor:
    """Voxel displacement field (B, nd, *S) -> grid_sample grid (B, *S, nd)."""
    nd = _checks.image("field", field)
    if field.shape[1] != nd:
        raise ValueError(f"field must have {nd} channels, got shape {tuple(field.shape)}")
    size = field.shape[2:]
    scale, offset, _ = _scale_offset(size, align_corners, field)
    pos = identity_positions(size, field.dtype, field.device).unsqueeze(0) + field
    grid = pos * scale + offset
    return grid.flip(1).movedim(1, -1)


def grid_to_field(grid: torch.Tensor, *, align_corners: bool = True) -> torch.Tensor:
    """grid_sample grid (B, *S, nd) -> voxel displacement field (B, nd, *S)."""
    _checks.tensor("grid", grid)
    if grid.dim() not in (4, 5) or grid.shape[-1] != grid.dim() - 2:
        raise ValueError(f"grid must be (B, H, W, 2) or (B, D, H, W, 3), got shape {tuple(grid.shape)}")
    size = grid.shape[1:-1]
    if min(size) < 2:
        raise ValueError(f"grid spatial sizes must be >= 2, got shape {tuple(grid.shape)}")
    g = grid.movedim(-1, 1).flip(1)
    scale, offset, _ = _scale_offset(size, align_corners, g)
    pos = (g - offset) / scale
    return pos - identity_positions(size, grid.dtype, grid.device).unsqueeze(0)
