"""Geometry shared by the Triton kernels: interpolation tables and the fold of
per-cell partial sums into coarse-grid nodes (host side), and the block-to-voxel
index helper (device side).

The tables repeat F.interpolate's arithmetic (scale, source index, clamping) in
the kernels' compute dtype, so the fused field equals the reference to rounding.
They are tiny (one entry per voxel along one axis) and cached per geometry.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl


class AxisTable(NamedTuple):
    i0: torch.Tensor  # int32 [S]: lower coarse node of each voxel (its cell)
    l1: torch.Tensor  # compute dtype [S]: weight of the upper node i1 = min(i0 + 1, s - 1)
    cell_begin: torch.Tensor  # int32 [s + 1]: voxels of cell c are [cell_begin[c], cell_begin[c + 1])
    max_cell: int  # voxels in the largest cell


@functools.lru_cache(maxsize=256)
def _axis_table(S: int, s: int, align_corners: bool, dtype: torch.dtype, device: str) -> AxisTable:
    x = torch.arange(S, dtype=dtype, device=device)
    if align_corners:
        scale = torch.tensor(float(s - 1), dtype=dtype) / (S - 1) if S > 1 else torch.tensor(0.0, dtype=dtype)
        src = x * scale.to(device)
    else:
        scale = torch.tensor(float(s), dtype=dtype) / S
        src = (scale.to(device) * (x + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor().clamp_max(s - 1)
    l1 = (src - i0).clamp(0, 1)
    i0 = i0.to(torch.int32)
    counts = torch.bincount(i0.long(), minlength=s)
    cell_begin = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return AxisTable(i0.contiguous(), l1.contiguous(), cell_begin.contiguous(), int(counts.max()))


def axis_tables(size: Sequence[int], coarse_size: Sequence[int], align_corners: bool,
                dtype: torch.dtype, device: torch.device) -> list[AxisTable]:
    """Tables for (d, h, w); a 2-D problem gets a trivial d table (S = s = 1)."""
    size, coarse_size = list(size), list(coarse_size)
    if len(size) == 2:
        size, coarse_size = [1] + size, [1] + coarse_size
    return [_axis_table(int(S), int(s), bool(align_corners), dtype, str(device))
            for S, s in zip(size, coarse_size)]


def fold_cell_partials(cells: torch.Tensor, coarse_size: Sequence[int]) -> torch.Tensor:
    """Sum per-cell corner partials into the nodes of the coarse grid.

    cells: (B, sd, sh, sw, 2, 2, 2, nd) -- the partial of cell (i, j, k) for its
    corner (a, b, c) belongs to node (i + a, j + b, k + c), where the upper
    neighbour of the last cell is the last node itself (index clamping of the
    interpolation). Returns (B, nd, *coarse_size). Plain slice additions in a
    fixed order: deterministic on every device.
    """
    B, sd, sh, sw = cells.shape[:4]
    nd = cells.shape[-1]
    g = cells.new_zeros(B, sd + 1, sh + 1, sw + 1, nd)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                g[:, a:a + sd, b:b + sh, c:c + sw] += cells[:, :, :, :, a, b, c]
    g[:, sd - 1] += g[:, sd]
    g[:, :, sh - 1] += g[:, :, sh]
    g[:, :, :, sw - 1] += g[:, :, :, sw]
    g = g[:, :sd, :sh, :sw].permute(0, 4, 1, 2, 3)
    if len(coarse_size) == 2:
        g = g[:, :, 0]
    return g.contiguous()


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor for a kernel to fill; NaN-filled under COOPSEG_POISON=1 (the tests
    set it) so that an element a kernel forgets to write cannot pass unseen."""
    if os.environ.get("COOPSEG_POISON") == "1":
        if not dtype.is_floating_point:  # label maps: all bits set (255, -1, True)
            return torch.full(shape, -1, dtype=torch.int64, device=device).to(dtype)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# padding_mode -> the PAD constexpr of the warp kernels
PADS = {"zeros": 0, "border": 1, "reflection": 2}


def grid3(size: Sequence[int]) -> list[int]:
    """Spatial sizes as (d, h, w): a 2-D problem gets d = 1."""
    size = list(size)
    return [1] + size if len(size) == 2 else size


def needs_int64(numel: int) -> bool:
    """64-bit offsets inside a volume: for 2^31 - 1 voxels or more, or always under
    the test-only switch COOPSEG_FORCE_INT64=1, which runs the INT64
    specialisations on small inputs (the C++ kernels read the same variable)."""
    return numel >= 2**31 - 1 or os.environ.get("COOPSEG_FORCE_INT64") == "1"


@triton.jit
def block_voxels(pid, D, H, W, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """The BLOCK flat voxel indices of program `pid` in a (D, H, W) volume, their
    mask and (d, h, w) coordinates (int64 offsets when INT64)."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        offs = offs.to(tl.int64)
    m = offs < D * H * W
    w = offs % W
    t = offs // W
    return offs, m, t // H, t % H, w


@triton.jit
def cell_tile(pid, T, nd_cells, nh_cells, nw_cells, cbd, cbh, cbw, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """Program `pid` of a backward that runs T tiles of BLOCK voxels per cell of a
    (nd_cells, nh_cells, nw_cells) grid of cells per batch item; cell k spans the voxels
    [cb*[k], cb*[k + 1]) along each axis (cbd, cbh, cbw: the cell bounds). Returns the batch
    item b (int64), the cell (kd, kh, kw), the tile's voxel coordinates (d, h, w) and mask."""
    tile = pid % T
    ncell = nd_cells * nh_cells * nw_cells
    cell = (pid // T) % ncell
    b = (pid // T // ncell).to(tl.int64)
    kw = cell % nw_cells
    kh = (cell // nw_cells) % nh_cells
    kd = cell // (nw_cells * nh_cells)
    d_lo = tl.load(cbd + kd)
    h_lo = tl.load(cbh + kh)
    w_lo = tl.load(cbw + kw)
    ed = tl.load(cbd + kd + 1) - d_lo
    eh = tl.load(cbh + kh + 1) - h_lo
    ew = tl.load(cbw + kw + 1) - w_lo
    o = tile * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        o = o.to(tl.int64)
    m = o < ed * eh * ew
    ew1 = tl.maximum(ew, 1)
    eh1 = tl.maximum(eh, 1)
    w = w_lo + o % ew1
    h = h_lo + (o // ew1) % eh1
    d = d_lo + o // (ew1 * eh1)
    return b, kd, kh, kw, d, h, w, m
