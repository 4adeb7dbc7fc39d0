"""Triton kernels for the cubic B-spline free-form deformation fused with the warp
(warp(..., upsample="bspline"); the spec: reference.bspline_upsample).

warp_bspline_fwd_kernel  one program per BLOCK output voxels of one batch item: the
                         displacement of each voxel is the tensor-product cubic B-spline
                         of its 4^nd control points (per-axis tables: first point and 4
                         weights per voxel; contracted along d, then h, then w, as the
                         reference), never stored; then the image is sampled as
                         warp_dense.py does (bilinear or nearest, zeros / border /
                         reflection). With WRITE_FIELD it stores the displacement
                         instead (upsample_field).
warp_bspline_bwd_kernel  one program per (batch item, knot cell, tile of the cell's
                         voxels): a knot cell's voxels share their 4^nd control points
                         (scalar loads); each voxel's position gradient (from the sampled
                         image or, with FIELD_GRAD, read from a field gradient) is reduced
                         to 4^nd * nd partial sums per program, which the host folds into
                         the control points in a fixed order (deterministic, no atomics).
                         The image gradient is an atomic scatter, as the linear warp's.

A 2-D problem runs as 3-D with D = 1 (ND = 2 prunes the d taps at compile time).
Non-finite control points: the sums form 0 * NaN, so a voxel whose support holds one
has a non-finite displacement and follows docs/conventions.md#non-finite-values.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .. import reference
from .geometry import PADS, block_voxels, cell_tile, grid3, needs_int64, new_output
from .warp import _field_at, _scatter_nearest
from .warp_dense import (
    _bilinear_taps,
    _finite_positions,
    _nearest_source,
    _position_grad,
    _sample_positions,
    _scatter_bilinear,
)

_FWD_BLOCK = 256
_BWD_BLOCK = 256


@triton.jit
def _channel(cb, fd, fh, fw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND: tl.constexpr,
             PER_VOXEL: tl.constexpr, like):
    """The B-spline displacement of one channel (cb: its control points) at voxels (d, h, w)
    whose first control points are (fd, fh, fw): sum over w taps of ww * (sum over h taps of
    wh * (sum over d taps of wd * c)); a tap outside the array reads 0. PER_VOXEL: fd, fh, fw
    are per voxel (loads masked by m); otherwise scalars shared by the voxels of one knot cell
    (the backward's programs), and the control points are scalar loads."""
    u = tl.zeros_like(like)
    for mw in range(4):  # loops, not unrolled: 4 control points in flight per channel, not 64 (registers)
        cw = fw + mw
        okw = (cw >= 0) & (cw < sw)
        acc_h = tl.zeros_like(like)
        for mh in range(4):
            ch = fh + mh
            okh = okw & (ch >= 0) & (ch < sh)
            if PER_VOXEL:
                okh = okh & m
            if ND == 3:
                acc_d = tl.zeros_like(like)
                for md in tl.static_range(4):
                    cd = fd + md
                    ok = okh & (cd >= 0) & (cd < sd)
                    c = tl.load(cb + (cd * sh + ch) * sw + cw, mask=ok, other=0.0)
                    acc_d += tl.load(wd_ptr + d * 4 + md, mask=m, other=0.0) * c
            else:
                acc_d = tl.zeros_like(like) + tl.load(cb + ch * sw + cw, mask=okh, other=0.0)
            acc_h += tl.load(wh_ptr + h * 4 + mh, mask=m, other=0.0) * acc_d
        u += tl.load(ww_ptr + w * 4 + mw, mask=m, other=0.0) * acc_h
    return u


@triton.jit
def warp_bspline_fwd_kernel(mov_ptr, crs_ptr, out_ptr, fd_ptr, wd_ptr, fh_ptr, wh_ptr, fw_ptr, ww_ptr,
                            C, D, H, W, sd, sh, sw,
                            ND: tl.constexpr, PAD: tl.constexpr, NEAREST: tl.constexpr, IS_FLOAT: tl.constexpr,
                            WRITE_FIELD: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs, m, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    like = tl.zeros([BLOCK], dtype=crs_ptr.dtype.element_ty)
    sc = sd * sh * sw
    cb = crs_ptr + b * ND * sc
    fh = tl.load(fh_ptr + h, mask=m, other=0)
    fw = tl.load(fw_ptr + w, mask=m, other=0)
    if ND == 3:
        fd = tl.load(fd_ptr + d, mask=m, other=0)
    else:
        fd = tl.zeros_like(fh)
    uh = _channel(cb + (ND - 2) * sc, fd, fh, fw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND, True, like)
    uw = _channel(cb + (ND - 1) * sc, fd, fh, fw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND, True, like)
    if ND == 3:
        ud = _channel(cb, fd, fh, fw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND, True, like)
    else:
        ud = tl.zeros_like(uh)
    if WRITE_FIELD:
        ob = out_ptr + b * ND * N + offs
        ty = out_ptr.dtype.element_ty
        if ND == 3:
            tl.store(ob, ud.to(ty), mask=m)
        tl.store(ob + (ND - 2) * N, uh.to(ty), mask=m)
        tl.store(ob + (ND - 1) * N, uw.to(ty), mask=m)
    else:
        pd, ph, pw, bad = _finite_positions(d.to(uh.dtype) + ud, h.to(uh.dtype) + uh, w.to(uh.dtype) + uw)
        _sample_positions(mov_ptr, out_ptr, b, C, N, offs, m, pd, ph, pw, bad, D, H, W, ND, PAD, NEAREST, IS_FLOAT,
                          INT64)

@triton.jit
def _store_part(pb, k, wt, gd, gh, gw, m, ND: tl.constexpr):
    """Partial sums of corner k: sum over the program's voxels of wt * (gd, gh, gw)."""
    if ND == 3:
        tl.store(pb + k * ND, tl.sum(tl.where(m, wt * gd, 0.0), 0))
    tl.store(pb + k * ND + ND - 2, tl.sum(tl.where(m, wt * gh, 0.0), 0))
    tl.store(pb + k * ND + ND - 1, tl.sum(tl.where(m, wt * gw, 0.0), 0))


@triton.jit
def warp_bspline_bwd_kernel(gout_ptr, mov_ptr, crs_ptr, gmov_ptr, part_ptr,
                            wd_ptr, wh_ptr, ww_ptr, cfd_ptr, cbd_ptr, cfh_ptr, cbh_ptr, cfw_ptr, cbw_ptr,
                            C, D, H, W, sd, sh, sw, nd_cells, nh_cells, nw_cells, T,
                            ND: tl.constexpr, PAD: tl.constexpr, FIELD_GRAD: tl.constexpr, NEAREST: tl.constexpr,
                            NEED_MOVING: tl.constexpr, NEED_COARSE: tl.constexpr,
                            INT64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b, kd, kh, kw, d, h, w, m = cell_tile(pid, T, nd_cells, nh_cells, nw_cells, cbd_ptr, cbh_ptr, cbw_ptr, INT64,
                                          BLOCK)
    N = D * H * W
    vox = (d * H + h) * W + w
    # the cell's first control points: scalars
    cfd = tl.load(cfd_ptr + kd)
    cfh = tl.load(cfh_ptr + kh)
    cfw = tl.load(cfw_ptr + kw)
    like = tl.zeros([BLOCK], dtype=crs_ptr.dtype.element_ty)
    sc = sd * sh * sw

    if FIELD_GRAD:
        gd, gh, gw = _field_at(gout_ptr + b * ND * N, N, vox, m, ND, like)
    else:
        cb = crs_ptr + b * ND * sc
        uh = _channel(cb + (ND - 2) * sc, cfd, cfh, cfw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND, False,
                      like)
        uw = _channel(cb + (ND - 1) * sc, cfd, cfh, cfw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND, False,
                      like)
        if ND == 3:
            ud = _channel(cb, cfd, cfh, cfw, wd_ptr, wh_ptr, ww_ptr, d, h, w, sd, sh, sw, m, ND, False, like)
        else:
            ud = tl.zeros_like(uh)
        pd, ph, pw, bad = _finite_positions(d.to(uh.dtype) + ud, h.to(uh.dtype) + uh, w.to(uh.dtype) + uw)
        mg = m & ~bad
        gd = tl.zeros_like(like)
        gh = tl.zeros_like(like)
        gw = tl.zeros_like(like)
        if NEAREST:
            # the image gradient is a scatter to the voxels read; the control points get none
            if NEED_MOVING:
                src, inside = _nearest_source(pd, ph, pw, D, H, W, mg, ND, PAD, INT64)
                _scatter_nearest(gout_ptr, gmov_ptr, b, C, N, vox, m, src, inside)
        else:
            zd, fd, okd0, okd1, cld, zh, fh, okh0, okh1, clh, zw, fw, okw0, okw1, clw = _bilinear_taps(
                pd, ph, pw, D, H, W, ND, PAD, INT64)
            inside = (okd0 | okd1) & (okh0 | okh1) & (okw0 | okw1)
            row = (zd * H + zh) * W + zw
            for c in range(C):
                g = tl.load(gout_ptr + (b * C + c) * N + vox, mask=m, other=0.0).to(fw.dtype)
                if NEED_MOVING:
                    _scatter_bilinear(gmov_ptr + (b * C + c) * N, row, H, W, mg, okd0, okd1, okh0, okh1, okw0, okw1,
                                      g, fd, fh, fw, ND)
                if NEED_COARSE:
                    sd_, sh_, sw_ = _position_grad(mov_ptr + (b * C + c) * N, row, H, W, mg, okd0, okd1, okh0, okh1,
                                                   okw0, okw1, fd, fh, fw, cld, clh, clw, ND)
                    # a voxel with no corner inside the image passes no gradient to its position
                    gd += tl.where(inside, g * sd_, 0.0)
                    gh += tl.where(inside, g * sh_, 0.0)
                    gw += tl.where(inside, g * sw_, 0.0)
            # a non-finite position has a NaN gradient (documented)
            gd = tl.where(bad, float("nan"), gd)
            gh = tl.where(bad, float("nan"), gh)
            gw = tl.where(bad, float("nan"), gw)

    if NEED_COARSE:
        # partial sums of this program, layout [B, ncell, T, KD, 4, 4, nd] (KD = 4 in 3-D, 1 in 2-D)
        if ND == 3:
            pb = part_ptr + pid.to(tl.int64) * (64 * ND)
        else:
            pb = part_ptr + pid.to(tl.int64) * (16 * ND)
        for mw in tl.static_range(4):
            ww = tl.load(ww_ptr + w * 4 + mw, mask=m, other=0.0)
            for mh in tl.static_range(4):
                whw = tl.load(wh_ptr + h * 4 + mh, mask=m, other=0.0) * ww
                if ND == 3:
                    for md in tl.static_range(4):
                        wt = tl.load(wd_ptr + d * 4 + md, mask=m, other=0.0) * whw
                        _store_part(pb, (md * 4 + mh) * 4 + mw, wt, gd, gh, gw, m, ND)
                else:
                    _store_part(pb, mh * 4 + mw, whw, gd, gh, gw, m, ND)


# ----------------------------------------------------------------------------- launchers


class BAxisTable(NamedTuple):
    first: torch.Tensor  # int32 [S]: the first of each voxel's 4 control points
    weights: torch.Tensor  # compute dtype [S, 4]
    cell_first: torch.Tensor  # int32 [ncell]: the first control point of each knot cell (increasing)
    cell_begin: torch.Tensor  # int32 [ncell + 1]: voxels of knot cell c are [cell_begin[c], cell_begin[c + 1])
    max_cell: int  # voxels in the largest knot cell


@functools.lru_cache(maxsize=256)
def _axis_table(S: int, n: int, origin: float, spacing: float, dtype: torch.dtype, device: str) -> BAxisTable:
    first, w, _valid = reference.bspline_axis_table(S, n, origin, spacing)
    cells, counts = torch.unique_consecutive(first, return_counts=True)
    begin = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return BAxisTable(first.to(torch.int32).to(device), w.to(dtype).contiguous().to(device),
                      cells.to(torch.int32).to(device), begin.to(torch.int32).to(device), int(counts.max()))


def _trivial(dtype, device) -> BAxisTable:
    """The d axis of a 2-D problem: one voxel, one knot cell, one control point of weight 1."""
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype, device=device)
    return BAxisTable(zero, w, zero, torch.tensor([0, 1], dtype=torch.int32, device=device), 1)


def _tables(size: Sequence[int], coarse_size: Sequence[int], origin, spacing, dtype, device) -> list[BAxisTable]:
    """Tables for (d, h, w); a 2-D problem gets a trivial d table."""
    tabs = [_axis_table(int(S), int(n), float(o), float(h), dtype, str(device))
            for S, n, o, h in zip(size, coarse_size, origin, spacing)]
    return [_trivial(dtype, device)] + tabs if len(size) == 2 else tabs


def _forward(moving_or_none, coarse, size, origin, spacing, padding_mode, mode, out, write_field):
    nd = coarse.dim() - 2
    D, H, W = grid3(size)
    sd, sh, sw = grid3(coarse.shape[2:])
    tabs = _tables(size, coarse.shape[2:], origin, spacing, coarse.dtype, coarse.device)
    N = D * H * W
    src = out if moving_or_none is None else moving_or_none
    src = src.view(torch.uint8) if src.dtype == torch.bool else src
    dst = out.view(torch.uint8) if out.dtype == torch.bool else out
    args = []
    for t in tabs:
        args += [t.first, t.weights]
    grid = (triton.cdiv(N, _FWD_BLOCK), coarse.shape[0])
    warp_bspline_fwd_kernel[grid](
        src, coarse, dst, *args, 0 if moving_or_none is None else moving_or_none.shape[1], D, H, W, sd, sh, sw,
        ND=nd, PAD=PADS[padding_mode], NEAREST=mode == "nearest", IS_FLOAT=out.dtype.is_floating_point,
        WRITE_FIELD=write_field, INT64=needs_int64(N), BLOCK=_FWD_BLOCK)
    return out


def _fold(part, tabs, coarse_shape, T):
    """The per-program sums [B, ncd, nch, ncw, T, KD, 4, 4, nd] folded into the control points:
    summed over the tiles, then each knot cell's 4^nd partials added to its control points
    (first + m; points beyond the array dropped), corner by corner: a fixed order."""
    B, nd = coarse_shape[0], len(coarse_shape) - 2
    ncells = [t.cell_first.numel() for t in tabs]
    KD = 4 if nd == 3 else 1
    cells = part.view(B, *ncells, T, KD, 4, 4, nd).sum(4)  # [B, ncd, nch, ncw, KD, 4, 4, nd]
    s3 = grid3(coarse_shape[2:])
    pad = 4
    g = cells.new_zeros(B, *[n + 2 * pad + 1 for n in s3], nd)
    idx = [t.cell_first.long() + pad for t in tabs]
    for md in range(KD):
        for mh in range(4):
            for mw in range(4):
                i = (idx[0] + md).view(-1, 1, 1), (idx[1] + mh).view(1, -1, 1), (idx[2] + mw).view(1, 1, -1)
                g[:, i[0], i[1], i[2]] += cells[:, :, :, :, md, mh, mw]
    g = g[:, pad:pad + s3[0], pad:pad + s3[1], pad:pad + s3[2]].permute(0, 4, 1, 2, 3)
    if nd == 2:
        g = g[:, :, 0]
    return g.contiguous()


def _backward(gout, moving_or_none, coarse_shape, coarse_or_none, size, origin, spacing, padding_mode, mode, *,
              need_moving, need_coarse, compute_dtype, field_grad=False):
    nd = len(coarse_shape) - 2
    B = coarse_shape[0]
    D, H, W = grid3(size)
    sd, sh, sw = grid3(coarse_shape[2:])
    device = gout.device
    tabs = _tables(size, coarse_shape[2:], origin, spacing, compute_dtype, device)
    N = D * H * W
    T = max(1, triton.cdiv(tabs[0].max_cell * tabs[1].max_cell * tabs[2].max_cell, _BWD_BLOCK))
    ncells = [t.cell_first.numel() for t in tabs]
    nprog = B * ncells[0] * ncells[1] * ncells[2] * T
    KD = 4 if nd == 3 else 1
    unused = torch.empty(1, dtype=compute_dtype, device=device)
    part = new_output((nprog, KD * 16 * nd), compute_dtype, device) if need_coarse else unused
    C = 0 if moving_or_none is None else moving_or_none.shape[1]
    if need_moving:
        # fp32 accumulation for half inputs; the atomics write the result in place otherwise
        acc = moving_or_none.dtype if moving_or_none.dtype in (torch.float32, torch.float64) else torch.float32
        gmov = torch.zeros(moving_or_none.shape, dtype=acc, device=device)
    else:
        gmov = unused
    if need_moving or need_coarse:
        warp_bspline_bwd_kernel[(nprog,)](
            gout, moving_or_none if moving_or_none is not None else gout,
            coarse_or_none if coarse_or_none is not None else gout, gmov, part,
            tabs[0].weights, tabs[1].weights, tabs[2].weights,
            tabs[0].cell_first, tabs[0].cell_begin, tabs[1].cell_first, tabs[1].cell_begin,
            tabs[2].cell_first, tabs[2].cell_begin,
            C, D, H, W, sd, sh, sw, ncells[0], ncells[1], ncells[2], T,
            ND=nd, PAD=PADS[padding_mode], FIELD_GRAD=field_grad, NEAREST=mode == "nearest",
            NEED_MOVING=need_moving, NEED_COARSE=need_coarse, INT64=needs_int64(N), BLOCK=_BWD_BLOCK)
    grad_coarse = _fold(part, tabs, coarse_shape, T) if need_coarse else None
    return gmov, grad_coarse


def warp_bspline_fwd(moving: torch.Tensor, coarse: torch.Tensor, origin, spacing, padding_mode: str,
                     mode: str) -> torch.Tensor:
    """Raw forward (the signature of torch.ops.coopseg.warp_bspline_fwd). coarse: the math dtype
    (float64 for float64 images, float32 otherwise), contiguous."""
    out = new_output(moving.shape, moving.dtype, moving.device) if moving.dtype.is_floating_point else \
        torch.empty(moving.shape, dtype=moving.dtype, device=moving.device)
    return _forward(moving, coarse, moving.shape[2:], origin, spacing, padding_mode, mode, out, False)


def warp_bspline_bwd(grad_out, moving, coarse, origin, spacing, padding_mode: str, mode: str, need_moving: bool,
                     need_coarse: bool):
    """Raw backward (the signature of torch.ops.coopseg.warp_bspline_bwd): (grad_moving,
    grad_coarse), each empty when not asked for; nearest gives the control points zeros."""
    nearest = mode == "nearest"
    gmov, gcrs = _backward(grad_out, moving, coarse.shape, coarse, moving.shape[2:], origin, spacing, padding_mode,
                           mode, need_moving=need_moving, need_coarse=need_coarse and not nearest,
                           compute_dtype=coarse.dtype)
    gmov = gmov.to(moving.dtype) if need_moving else moving.new_empty(0)
    if not need_coarse:
        return gmov, coarse.new_empty(0)
    return gmov, (torch.zeros_like(coarse) if nearest else gcrs)


def upsample_bspline_fwd(coarse: torch.Tensor, size, origin, spacing) -> torch.Tensor:
    out = new_output((coarse.shape[0], coarse.shape[1], *size), coarse.dtype, coarse.device)
    return _forward(None, coarse, size, origin, spacing, "zeros", "bilinear", out, True)


def upsample_bspline_bwd(grad_field: torch.Tensor, coarse_size, origin, spacing) -> torch.Tensor:
    shape = (grad_field.shape[0], grad_field.shape[1], *coarse_size)
    _, g = _backward(grad_field, None, shape, None, grad_field.shape[2:], origin, spacing, "zeros", "bilinear",
                     need_moving=False, need_coarse=True, compute_dtype=grad_field.dtype, field_grad=True)
    return g
