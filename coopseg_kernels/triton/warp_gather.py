"""Deterministic image gradient of the warps (coarse grid and full-resolution field):
a gather by destination voxel instead of the atomic scatter.

The image gradient is a scatter: output voxel x adds g(x) times each of its 2^nd tap
weights to the image voxels it read. With atomics the order of the additions into one
image voxel depends on the schedule, so fp32 sums differ in their last bits from run to
run. Here every image voxel sums its own contributions in one fixed order:

warp_keys_kernel    one program per BLOCK output voxels: the key of each voxel is the
                    flat index of its lower tap corner (bilinear: in the image padded by
                    one voxel below along each axis, so that a corner at -1 has a key;
                    nearest: the voxel read), offset by batch item; a voxel that adds
                    nothing (non-finite displacement, every tap outside) gets the
                    sentinel B * K.
(host)              a stable sort of the keys (the output voxels grouped by key, in
                    increasing voxel order within a key) and the start of each key's run
                    (searchsorted): a fixed layout, whatever the schedule.
warp_gather_kernel  one program per BLOCK image voxels (the destinations): for each of
                    its 2^nd corner roles (nearest: one) the voxel walks the run of the
                    key that puts it in that role, recomputes each output voxel's
                    position and weight exactly as the scatter does (same helpers, same
                    products) and adds g times the weight in run order. Each image
                    voxel's gradient is written once, by one lane.

Bitwise reproducible run to run, equal to the atomic scatter up to the order of the
additions, for every mode, padding and dtype (fp32 accumulation for half images, as
the atomic path; the result is stored in the image dtype directly). Cost: the keys pass,
a sort of B*N integer keys, and ~2^nd position evaluations per output voxel in the
gather; scratch: keys, sorted keys and order (int32 below 2^31 entries), and B*K + 1
run starts — about 20 bytes per voxel, freed on return. A run is walked by its lane
sequentially, so a field that sends many output voxels to one image voxel (e.g. border
padding far outside) makes that voxel's program long, as it serialises the atomics.

DENSE selects how a position is formed: from the coarse grid through the interpolation
tables (triton/warp.py) or read from a full-resolution field (triton/warp_dense.py),
with the tap helpers of that path, so that the weights are the ones its scatter forms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import warp as _warp
from . import warp_dense as _warp_dense
from .geometry import PADS, axis_tables, block_voxels, needs_int64, new_output
from .warp import _displace, _nearest, _taps, _voxel_field
from .warp_dense import _bilinear_taps, _cell_bad, _displaced, _nearest_source

_BLOCK = 256


@triton.jit
def _source_positions(u_ptr, b, N, offs, m, d, h, w, D, H, W, i0d, l1d, i0h, l1h, i0w, l1w, sd, sh, sw,
                      ND: tl.constexpr, DENSE: tl.constexpr, CHECK: tl.constexpr):
    """Positions (d, h, w) of output voxels `offs` (coordinates d, h, w) and, with CHECK,
    whether each is non-finite (the rule of its path). Without CHECK the voxels are known
    finite (they were given a key)."""
    if DENSE:
        like = tl.zeros(offs.shape, dtype=u_ptr.dtype.element_ty)
        ub = u_ptr + b * ND * N
        pd, ph, pw = _displaced(ub, N, offs, m, d, h, w, ND, like)
        if CHECK:
            bad = _cell_bad(ub, N, d, h, w, D, H, W, m, ND)
        else:
            bad = m & False
    else:
        ud, uh, uw = _voxel_field(u_ptr, b, d, h, w, m, i0d, l1d, i0h, l1h, i0w, l1w, sd, sh, sw, ND)
        pd, ph, pw, _nan, bad = _displace(d, h, w, ud, uh, uw)
        if not CHECK:
            bad = m & False
    pd = tl.where(bad, 0.0, pd)
    ph = tl.where(bad, 0.0, ph)
    pw = tl.where(bad, 0.0, pw)
    return pd, ph, pw, bad


@triton.jit
def _source_taps(pd, ph, pw, D, H, W, ND: tl.constexpr, PAD: tl.constexpr, DENSE: tl.constexpr,
                 INT64: tl.constexpr):
    """Bilinear taps of the three axes (lower tap, fraction, in-image masks), as the scatter of
    the path forms them (2-D: one d plane at 0 of weight 1)."""
    if DENSE:
        zd, fd, okd0, okd1, _cd, zh, fh, okh0, okh1, _ch, zw, fw, okw0, okw1, _cw = _bilinear_taps(
            pd, ph, pw, D, H, W, ND, PAD, INT64)
    else:  # as warp_bwd_kernel, whose d axis in 2-D has one voxel and pd = 0
        zd, fd, okd0, okd1, _cd = _taps(pd, D, PAD, INT64)
        zh, fh, okh0, okh1, _ch = _taps(ph, H, PAD, INT64)
        zw, fw, okw0, okw1, _cw = _taps(pw, W, PAD, INT64)
    return zd, fd, okd0, okd1, zh, fh, okh0, okh1, zw, fw, okw0, okw1


@triton.jit
def _source_nearest(pd, ph, pw, D, H, W, m, ND: tl.constexpr, PAD: tl.constexpr, DENSE: tl.constexpr,
                    INT64: tl.constexpr):
    """Flat index of the voxel read by nearest and whether it is read (m and inside), as the
    scatter of the path forms them."""
    if DENSE:
        return _nearest_source(pd, ph, pw, D, H, W, m, ND, PAD, INT64)
    zd, okd = _nearest(pd, D, PAD, INT64)  # 2-D: pd = 0 on an axis of one voxel, as warp_bwd_kernel
    zh, okh = _nearest(ph, H, PAD, INT64)
    zw, okw = _nearest(pw, W, PAD, INT64)
    return (zd * H + zh) * W + zw, m & okd & okh & okw


@triton.jit
def warp_keys_kernel(u_ptr, key_ptr, i0d, l1d, i0h, l1h, i0w, l1w, D, H, W, sd, sh, sw, K, SENTINEL,
                     ND: tl.constexpr, PAD: tl.constexpr, NEAREST: tl.constexpr, DENSE: tl.constexpr,
                     INT64: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs, m, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    pd, ph, pw, bad = _source_positions(u_ptr, b, N, offs, m, d, h, w, D, H, W, i0d, l1d, i0h, l1h, i0w, l1w,
                                        sd, sh, sw, ND, DENSE, True)
    if NEAREST:
        key, inside = _source_nearest(pd, ph, pw, D, H, W, m, ND, PAD, DENSE, INT64)
    else:
        zd, fd, okd0, okd1, zh, fh, okh0, okh1, zw, fw, okw0, okw1 = _source_taps(pd, ph, pw, D, H, W, ND, PAD,
                                                                                  DENSE, INT64)
        inside = (okd0 | okd1) & (okh0 | okh1) & (okw0 | okw1)
        # lower corner in the image padded by one voxel below each axis (d too in 3-D)
        key = ((zd + (ND - 2)) * (H + 1) + (zh + 1)) * (W + 1) + (zw + 1)
    gkey = tl.where(inside & ~bad, b * K + key, SENTINEL)
    tl.store(key_ptr + b * N + offs, gkey.to(key_ptr.dtype.element_ty), mask=m)


@triton.jit
def _run_sum(gb, order_ptr, starts_ptr, run, m, b, N, u_ptr, D, H, W, i0d, l1d, i0h, l1h, i0w, l1w, sd, sh, sw,
             acc, ND: tl.constexpr, PAD: tl.constexpr, NEAREST: tl.constexpr, DENSE: tl.constexpr,
             INT64: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """acc plus the contributions of the output voxels of run `run` (a global key) to the
    destination voxel of each lane, in run order; the destination is the corner (KD, KH, KW)
    of each (nearest: the voxel read)."""
    s0 = tl.load(starts_ptr + run, mask=m, other=0)
    n = tl.load(starts_ptr + run + 1, mask=m, other=0) - s0
    for j in range(0, tl.max(n, 0)):
        ok = j < n
        src = tl.load(order_ptr + s0 + j, mask=ok, other=0) - b * N  # the output voxel, in its batch item
        if not INT64:
            src = src.to(tl.int32)
        sw_ = src % W
        t = src // W
        sh_ = t % H
        sd_ = t // H
        pd, ph, pw, _bad = _source_positions(u_ptr, b, N, src, ok, sd_, sh_, sw_, D, H, W, i0d, l1d, i0h, l1h,
                                             i0w, l1w, sd, sh, sw, ND, DENSE, False)
        if NEAREST:
            g = tl.load(gb + src, mask=ok, other=0.0).to(acc.dtype)
            acc += tl.where(ok, g, 0.0)
        else:
            zd, fd, okd0, okd1, zh, fh, okh0, okh1, zw, fw, okw0, okw1 = _source_taps(pd, ph, pw, D, H, W, ND, PAD,
                                                                                      DENSE, INT64)
            g = tl.load(gb + src, mask=ok, other=0.0).to(fw.dtype)
            # the scatter's products, in its order (triton/warp.py _scatter_plane)
            if KD == 0:
                gd = g * (1.0 - fd)
            else:
                gd = g * fd
            if KH == 0:
                gd = gd * (1.0 - fh)
            else:
                gd = gd * fh
            if KW == 0:
                gd = gd * (1.0 - fw)
            else:
                gd = gd * fw
            acc += tl.where(ok, gd.to(acc.dtype), 0.0)
    return acc


@triton.jit
def warp_gather_kernel(gout_ptr, u_ptr, order_ptr, starts_ptr, gmov_ptr, i0d, l1d, i0h, l1h, i0w, l1w,
                       C, D, H, W, sd, sh, sw, K,
                       ND: tl.constexpr, PAD: tl.constexpr, NEAREST: tl.constexpr, DENSE: tl.constexpr,
                       INT64: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs, m, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    for c in range(C):
        gb = gout_ptr + (b * C + c) * N
        acc = tl.zeros(offs.shape, dtype=u_ptr.dtype.element_ty)
        if NEAREST:
            acc = _run_sum(gb, order_ptr, starts_ptr, b * K + offs, m, b, N, u_ptr, D, H, W, i0d, l1d, i0h, l1h,
                           i0w, l1w, sd, sh, sw, acc, ND, PAD, NEAREST, DENSE, INT64, 0, 0, 0)
        else:
            for KD in tl.static_range(ND - 1):  # 2-D: the one plane d = 0
                for KH in tl.static_range(2):
                    for KW in tl.static_range(2):
                        # the voxel is corner (KD, KH, KW) of the output voxels whose lower corner is this key
                        key = ((d - KD + (ND - 2)) * (H + 1) + (h - KH + 1)) * (W + 1) + (w - KW + 1)
                        acc = _run_sum(gb, order_ptr, starts_ptr, b * K + key, m, b, N, u_ptr, D, H, W,
                                       i0d, l1d, i0h, l1h, i0w, l1w, sd, sh, sw, acc, ND, PAD, NEAREST, DENSE,
                                       INT64, KD, KH, KW)
        tl.store(gmov_ptr + (b * C + c) * N + offs, acc.to(gmov_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launcher




def gather_image_grad(grad_out: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, padding_mode: str, mode: str,
                      tabs=None) -> torch.Tensor:
    """The image gradient (moving's shape and dtype), bitwise reproducible.

    u: the full-resolution field (B, nd, *S) when tabs is None (DENSE), else the coarse
    grid (B, nd, *s) with its axis tables (geometry.axis_tables) for S. u's dtype is the
    math dtype (float64 for float64 images, float32 otherwise), both contiguous."""
    dense = tabs is None
    nd = moving.dim() - 2
    B, C = moving.shape[:2]
    size = list(moving.shape[2:])
    D, H, W = [1] + size if nd == 2 else size
    N = D * H * W
    nearest = mode == "nearest"
    K = N if nearest else (D + nd - 2) * (H + 1) * (W + 1)
    int64 = needs_int64(max(N, B * K + 1))
    key_dtype = torch.int64 if int64 else torch.int32
    device = moving.device
    if dense:
        table_args = [u] * 6  # unused
        sd = sh = sw = 1
    else:
        table_args = [x for t in tabs for x in (t.i0, t.l1)]
        cs = list(u.shape[2:])
        sd, sh, sw = [1] + cs if nd == 2 else cs
    grid = (triton.cdiv(N, _BLOCK), B)
    flags = dict(ND=nd, PAD=PADS[padding_mode], NEAREST=nearest, DENSE=dense, INT64=int64, BLOCK=_BLOCK)
    keys = torch.empty(B * N, dtype=key_dtype, device=device)
    warp_keys_kernel[grid](u, keys, *table_args, D, H, W, sd, sh, sw, K, B * K, **flags)
    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    order = order.to(key_dtype)
    starts = torch.searchsorted(sorted_keys, torch.arange(B * K + 1, dtype=key_dtype, device=device),
                                out_int32=not int64)
    del sorted_keys
    gmov = new_output(moving.shape, moving.dtype, device)
    warp_gather_kernel[grid](grad_out, u, order, starts, gmov, *table_args, C, D, H, W, sd, sh, sw, K, **flags)
    return gmov


def warp_bwd(grad_out, moving, coarse, align_corners, padding_mode, mode, need_moving, need_coarse,
             deterministic=False):
    """The raw backward of the coarse warp (the C++ op's signature, plus `deterministic`: the
    image gradient gathered per destination voxel, bitwise reproducible, instead of warp.py's
    atomic scatter; the coarse grid's gradient is deterministic either way)."""
    if not (deterministic and need_moving):
        return _warp.warp_bwd(grad_out, moving, coarse, align_corners, padding_mode, mode, need_moving, need_coarse)
    tabs = axis_tables(moving.shape[2:], coarse.shape[2:], align_corners, coarse.dtype, moving.device)
    gmov = gather_image_grad(grad_out, moving, coarse, padding_mode, mode, tabs=tabs).to(moving.dtype)
    _, gcrs = _warp.warp_bwd(grad_out, moving, coarse, align_corners, padding_mode, mode, False, need_coarse)
    return gmov, gcrs


def warp_dense_bwd(grad_out, moving, ddf, padding_mode: str, mode: str, need_moving: bool, need_ddf: bool,
                   deterministic: bool = False):
    """The raw backward of the full-resolution warp (warp_dense.py's, plus `deterministic`)."""
    if not (deterministic and need_moving):
        return _warp_dense.warp_dense_bwd(grad_out, moving, ddf, padding_mode, mode, need_moving, need_ddf)
    gmov = gather_image_grad(grad_out, moving, ddf, padding_mode, mode).to(moving.dtype)
    _, gu = _warp_dense.warp_dense_bwd(grad_out, moving, ddf, padding_mode, mode, False, need_ddf)
    return gmov, gu
