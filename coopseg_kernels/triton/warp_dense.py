"""Triton kernels for the warp by a full-resolution displacement field (DDF): the
case coarse size == image size of `warp`, and the kernels of coopseg_kernels.nn.Warp.

warp_dense_fwd_kernel   one program per BLOCK output voxels of one batch item: each
                        voxel reads its own displacement (nd loads, no interpolation),
                        pads its position (zeros / border / reflection) and samples
                        the image, bilinear or nearest (half to even); nearest reads
                        integer and bool images in their own dtype.
warp_dense_bwd_kernel   the same tiling: the field gradient of each voxel is formed and
                        stored directly (no partial sums); the image gradient is an
                        atomic scatter (nearest: one tap).

Modes as F.grid_sample(align_corners=True) in voxel coordinates. Non-finite
displacements follow docs/conventions.md#non-finite-values with the field seen as
a coarse grid of the image's size: a voxel is bad when a node of its cell (itself and
its upper neighbours, clamped) is not finite. A 2-D problem runs as 3-D with D = 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import PADS, block_voxels, grid3, needs_int64, new_output
from .warp import _bilinear, _scatter_nearest, _scatter_plane, _taps

_BLOCK = 256


@triton.jit
def _nonfinite(x):
    """True where x is NaN or infinite (x * 0 is NaN exactly then)."""
    z = x * 0.0
    return z != z


@triton.jit
def _node_bad(u_ptr, N, off, m, ND: tl.constexpr):
    """Whether the displacement node at flat offset `off` has a non-finite channel."""
    bad = _nonfinite(tl.load(u_ptr + (ND - 2) * N + off, mask=m, other=0.0)) \
        | _nonfinite(tl.load(u_ptr + (ND - 1) * N + off, mask=m, other=0.0))
    if ND == 3:
        bad = bad | _nonfinite(tl.load(u_ptr + off, mask=m, other=0.0))
    return bad


@triton.jit
def _cell_bad(u_ptr, N, d, h, w, D, H, W, m, ND: tl.constexpr):
    """The cell rule: a node among (d..d+1, h..h+1, w..w+1), clamped, is not finite."""
    w1 = tl.minimum(w + 1, W - 1)
    h1 = tl.minimum(h + 1, H - 1)
    r0 = (d * H + h) * W
    r1 = (d * H + h1) * W
    bad = _node_bad(u_ptr, N, r0 + w, m, ND) | _node_bad(u_ptr, N, r0 + w1, m, ND) \
        | _node_bad(u_ptr, N, r1 + w, m, ND) | _node_bad(u_ptr, N, r1 + w1, m, ND)
    if ND == 3:
        d1 = tl.minimum(d + 1, D - 1)
        r2 = (d1 * H + h) * W
        r3 = (d1 * H + h1) * W
        bad = bad | _node_bad(u_ptr, N, r2 + w, m, ND) | _node_bad(u_ptr, N, r2 + w1, m, ND) \
            | _node_bad(u_ptr, N, r3 + w, m, ND) | _node_bad(u_ptr, N, r3 + w1, m, ND)
    return bad


@triton.jit
def _reflect(p, n):
    """grid_sample's reflection about 0 and n - 1 (align_corners=True): |p| modulo
    2(n - 1) folded back, and its derivative (+-1)."""
    hi = tl.zeros_like(p) + (n - 1)
    span2 = 2.0 * hi
    a = tl.abs(p)
    e = a - tl.floor(a / span2) * span2
    sign = tl.where(p < 0.0, -1.0, 1.0) * tl.where(e > hi, -1.0, 1.0)
    return tl.minimum(e, span2 - e), sign.to(p.dtype)


@triton.jit
def _bilinear_axis(p, n, PAD: tl.constexpr, INT64: tl.constexpr):
    """Taps of one axis after padding: lower tap, fraction, masks, d(weight)/dp factor."""
    if PAD == 2:
        r, sign = _reflect(p, n)
        i0, f, ok0, ok1, clip = _taps(r, n, True, INT64)
        clip = clip * sign
    else:
        i0, f, ok0, ok1, clip = _taps(p, n, PAD == 1, INT64)
    return i0, f, ok0, ok1, clip


@triton.jit
def _bilinear_taps(pd, ph, pw, D, H, W, ND: tl.constexpr, PAD: tl.constexpr, INT64: tl.constexpr):
    """_bilinear_axis of the three axes; in 2-D one d plane at 0 of weight 1."""
    zh, fh, okh0, okh1, clh = _bilinear_axis(ph, H, PAD, INT64)
    zw, fw, okw0, okw1, clw = _bilinear_axis(pw, W, PAD, INT64)
    if ND == 3:
        zd, fd, okd0, okd1, cld = _bilinear_axis(pd, D, PAD, INT64)
    else:
        zd = tl.zeros_like(zh)
        fd = tl.zeros_like(fh)
        cld = tl.zeros_like(fh)
        okd0 = okh0 | True
        okd1 = okh0 & False
    return zd, fd, okd0, okd1, cld, zh, fh, okh0, okh1, clh, zw, fw, okw0, okw1, clw


@triton.jit
def _nearest_axis(p, n, PAD: tl.constexpr, INT64: tl.constexpr):
    """The index read along one axis (half to even, as nearbyint) and whether it is inside."""
    hi = tl.zeros_like(p) + (n - 1)
    if PAD == 1:
        p = tl.minimum(tl.maximum(p, 0.0), hi)
    elif PAD == 2:
        r, _s = _reflect(p, n)
        p = tl.minimum(tl.maximum(r, 0.0), hi)
    else:
        p = tl.minimum(tl.maximum(p, -2.0), hi + 2.0)
    fl = tl.floor(p)
    f = p - fl  # exact
    if INT64:
        i = fl.to(tl.int64)
    else:
        i = fl.to(tl.int32)
    odd = (i % 2) != 0
    i = tl.where((f > 0.5) | ((f == 0.5) & odd), i + 1, i)
    return i, (i >= 0) & (i < n)


@triton.jit
def _displaced(ub, N, offs, m, d, h, w, ND: tl.constexpr, like):
    """Positions (d, h, w) of voxels `offs` of one batch item's field `ub` (d = 0 in 2-D)."""
    ph = h.to(like.dtype) + tl.load(ub + (ND - 2) * N + offs, mask=m, other=0.0)
    pw = w.to(like.dtype) + tl.load(ub + (ND - 1) * N + offs, mask=m, other=0.0)
    if ND == 3:
        pd = d.to(like.dtype) + tl.load(ub + offs, mask=m, other=0.0)
    else:
        pd = tl.zeros_like(ph)
    return pd, ph, pw


@triton.jit
def _nearest_source(pd, ph, pw, D, H, W, m, ND: tl.constexpr, PAD: tl.constexpr, INT64: tl.constexpr):
    """Flat index of the voxel nearest read and whether to read it (m and inside along every axis)."""
    ih, in_h = _nearest_axis(ph, H, PAD, INT64)
    iw, in_w = _nearest_axis(pw, W, PAD, INT64)
    inside = m & in_h & in_w
    if ND == 3:
        iD, in_d = _nearest_axis(pd, D, PAD, INT64)
        return (iD * H + ih) * W + iw, inside & in_d
    return ih * W + iw, inside


@triton.jit
def _positions(u_ptr, b, N, offs, m, d, h, w, D, H, W, ND: tl.constexpr, like):
    """Positions (d, h, w) of the block's voxels and their bad flag."""
    ub = u_ptr + b * ND * N
    pd, ph, pw = _displaced(ub, N, offs, m, d, h, w, ND, like)
    bad = _cell_bad(ub, N, d, h, w, D, H, W, m, ND)
    pd = tl.where(bad, 0.0, pd)
    ph = tl.where(bad, 0.0, ph)
    pw = tl.where(bad, 0.0, pw)
    return pd, ph, pw, bad


@triton.jit
def _finite_positions(pd, ph, pw):
    """The positions with the non-finite ones set to 0, and where they were (a coordinate NaN
    or infinite makes 0 * p NaN)."""
    z = pd * 0.0 + ph * 0.0 + pw * 0.0
    bad = z != z
    return tl.where(bad, 0.0, pd), tl.where(bad, 0.0, ph), tl.where(bad, 0.0, pw), bad


@triton.jit
def _sample_positions(mov_ptr, out_ptr, b, C, N, offs, m, pd, ph, pw, bad, D, H, W, ND: tl.constexpr,
                      PAD: tl.constexpr, NEAREST: tl.constexpr, IS_FLOAT: tl.constexpr, INT64: tl.constexpr):
    """Every channel of image b sampled at the block's positions (full resolution: the dense and
    the B-spline warps) into out[b, :, offs]: NaN (a label map: 0) at a bad position."""
    if NEAREST:
        src, inside = _nearest_source(pd, ph, pw, D, H, W, m & ~bad, ND, PAD, INT64)
        for c in range(C):
            v = tl.load(mov_ptr + (b * C + c) * N + src, mask=inside, other=0)
            if IS_FLOAT:
                v = tl.where(bad, float("nan"), v)
            tl.store(out_ptr + (b * C + c) * N + offs, v, mask=m)
    else:
        zd, fd, okd0, okd1, _cd, zh, fh, okh0, okh1, _ch, zw, fw, okw0, okw1, _cw = _bilinear_taps(
            pd, ph, pw, D, H, W, ND, PAD, INT64)
        row = (zd * H + zh) * W + zw
        for c in range(C):
            v = _bilinear(mov_ptr + (b * C + c) * N, row, H, W, m, okd0, okd1, okh0, okh1, okw0, okw1, fd, fh, fw, ND)
            v = tl.where(bad, float("nan"), v)
            tl.store(out_ptr + (b * C + c) * N + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def warp_dense_fwd_kernel(mov_ptr, u_ptr, out_ptr, C, D, H, W,
                          ND: tl.constexpr, PAD: tl.constexpr, NEAREST: tl.constexpr, IS_FLOAT: tl.constexpr,
                          INT64: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs, m, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    like = tl.zeros([BLOCK], dtype=u_ptr.dtype.element_ty)
    pd, ph, pw, bad = _positions(u_ptr, b, N, offs, m, d, h, w, D, H, W, ND, like)
    _sample_positions(mov_ptr, out_ptr, b, C, N, offs, m, pd, ph, pw, bad, D, H, W, ND, PAD, NEAREST, IS_FLOAT, INT64)

@triton.jit
def _plane_value_grad(base, row, W, md, okh0, okh1, okw0, okw1, fh, fw, clh, clw):
    """One d plane: the bilinear value and its derivatives along h and w."""
    v00 = tl.load(base + row, mask=md & okh0 & okw0, other=0.0).to(fw.dtype)
    v01 = tl.load(base + row + 1, mask=md & okh0 & okw1, other=0.0).to(fw.dtype)
    v10 = tl.load(base + row + W, mask=md & okh1 & okw0, other=0.0).to(fw.dtype)
    v11 = tl.load(base + row + W + 1, mask=md & okh1 & okw1, other=0.0).to(fw.dtype)
    lo = (1.0 - fw) * v00 + fw * v01
    up = (1.0 - fw) * v10 + fw * v11
    val = (1.0 - fh) * lo + fh * up
    dh = clh * (up - lo)
    dw = clw * ((1.0 - fh) * (v01 - v00) + fh * (v11 - v10))
    return val, dh, dw


@triton.jit
def _scatter_bilinear(gmb, row, H, W, mg, okd0, okd1, okh0, okh1, okw0, okw1, g, fd, fh, fw, ND: tl.constexpr):
    """One channel's image gradient: g spread over the corners of the sample (gmb: the channel's
    gradient; two d planes in 3-D)."""
    _scatter_plane(gmb, row, W, mg & okd0, okh0, okh1, okw0, okw1, g * (1.0 - fd), fh, fw)
    if ND == 3:
        _scatter_plane(gmb, row + H * W, W, mg & okd1, okh0, okh1, okw0, okw1, g * fd, fh, fw)


@triton.jit
def _position_grad(base, row, H, W, mg, okd0, okd1, okh0, okh1, okw0, okw1, fd, fh, fw, cld, clh, clw,
                   ND: tl.constexpr):
    """d(sample)/d(position) along (d, h, w) of one channel (base) at the taps; cl*: the clamp
    factors of _bilinear_axis (0 where the position is clamped)."""
    v0, dh0, dw0 = _plane_value_grad(base, row, W, mg & okd0, okh0, okh1, okw0, okw1, fh, fw, clh, clw)
    if ND == 3:
        v1, dh1, dw1 = _plane_value_grad(base, row + H * W, W, mg & okd1, okh0, okh1, okw0, okw1, fh, fw, clh, clw)
        sd_ = cld * (v1 - v0)
        sh_ = (1.0 - fd) * dh0 + fd * dh1
        sw_ = (1.0 - fd) * dw0 + fd * dw1
    else:
        sd_ = tl.zeros_like(fw)
        sh_ = dh0
        sw_ = dw0
    return sd_, sh_, sw_


@triton.jit
def warp_dense_bwd_kernel(gout_ptr, mov_ptr, u_ptr, gmov_ptr, gu_ptr, C, D, H, W,
                          ND: tl.constexpr, PAD: tl.constexpr, NEAREST: tl.constexpr,
                          NEED_MOVING: tl.constexpr, NEED_FIELD: tl.constexpr,
                          INT64: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs, m, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    like = tl.zeros([BLOCK], dtype=u_ptr.dtype.element_ty)
    pd, ph, pw, bad = _positions(u_ptr, b, N, offs, m, d, h, w, D, H, W, ND, like)
    mg = m & ~bad
    if NEAREST:
        # the image gradient only (the field gradient is zero, filled by the launcher)
        src, inside = _nearest_source(pd, ph, pw, D, H, W, mg, ND, PAD, INT64)
        _scatter_nearest(gout_ptr, gmov_ptr, b, C, N, offs, m, src, inside)
    else:
        zd, fd, okd0, okd1, cld, zh, fh, okh0, okh1, clh, zw, fw, okw0, okw1, clw = _bilinear_taps(
            pd, ph, pw, D, H, W, ND, PAD, INT64)
        inside = (okd0 | okd1) & (okh0 | okh1) & (okw0 | okw1)
        row = (zd * H + zh) * W + zw
        gd = tl.zeros_like(fw)
        gh = tl.zeros_like(fw)
        gw = tl.zeros_like(fw)
        for c in range(C):
            g = tl.load(gout_ptr + (b * C + c) * N + offs, mask=m, other=0.0).to(fw.dtype)
            if NEED_MOVING:
                _scatter_bilinear(gmov_ptr + (b * C + c) * N, row, H, W, mg, okd0, okd1, okh0, okh1, okw0, okw1, g,
                                  fd, fh, fw, ND)
            if NEED_FIELD:
                sd_, sh_, sw_ = _position_grad(mov_ptr + (b * C + c) * N, row, H, W, mg, okd0, okd1, okh0, okh1, okw0,
                                               okw1, fd, fh, fw, cld, clh, clw, ND)
                # a voxel with no corner inside the image passes no gradient to its position
                gd += tl.where(inside, g * sd_, 0.0)
                gh += tl.where(inside, g * sh_, 0.0)
                gw += tl.where(inside, g * sw_, 0.0)
        if NEED_FIELD:
            nan = float("nan")
            gb = gu_ptr + b * ND * N + offs
            ty = gu_ptr.dtype.element_ty
            if ND == 3:
                tl.store(gb, tl.where(bad, nan, gd).to(ty), mask=m)
            tl.store(gb + (ND - 2) * N, tl.where(bad, nan, gh).to(ty), mask=m)
            tl.store(gb + (ND - 1) * N, tl.where(bad, nan, gw).to(ty), mask=m)


# ----------------------------------------------------------------------------- launchers


def warp_dense_fwd(moving: torch.Tensor, ddf: torch.Tensor, padding_mode: str, mode: str) -> torch.Tensor:
    """Raw forward (the signature of torch.ops.coopseg.warp_dense_fwd). ddf: the math dtype
    (float64 for float64 images, float32 otherwise), contiguous."""
    nd = moving.dim() - 2
    D, H, W = grid3(moving.shape[2:])
    N = D * H * W
    nearest = mode == "nearest"
    src = moving.view(torch.uint8) if moving.dtype == torch.bool else moving
    out = new_output(moving.shape, moving.dtype, moving.device) if moving.dtype.is_floating_point else \
        torch.empty(moving.shape, dtype=moving.dtype, device=moving.device)
    dst = out.view(torch.uint8) if out.dtype == torch.bool else out
    grid = (triton.cdiv(N, _BLOCK), moving.shape[0])
    warp_dense_fwd_kernel[grid](src, ddf, dst, moving.shape[1], D, H, W,
                                ND=nd, PAD=PADS[padding_mode], NEAREST=nearest,
                                IS_FLOAT=moving.dtype.is_floating_point, INT64=needs_int64(N), BLOCK=_BLOCK)
    return out


def warp_dense_bwd(grad_out, moving, ddf, padding_mode: str, mode: str, need_moving: bool, need_ddf: bool):
    """Raw backward (the signature of torch.ops.coopseg.warp_dense_bwd; the image gradient an
    atomic scatter, warp_gather.warp_dense_bwd gathers it with deterministic=True):
    (grad_moving, grad_ddf), each empty when not asked for."""
    nd = moving.dim() - 2
    D, H, W = grid3(moving.shape[2:])
    N = D * H * W
    nearest = mode == "nearest"
    unused = torch.empty(1, dtype=ddf.dtype, device=ddf.device)
    if need_moving:
        # fp32 accumulation for half inputs; the atomics write the result in place otherwise
        acc = moving.dtype if moving.dtype in (torch.float32, torch.float64) else torch.float32
        gmov = torch.zeros(moving.shape, dtype=acc, device=moving.device)
    else:
        gmov = unused
    if need_ddf:
        gu = torch.zeros_like(ddf) if nearest else new_output(ddf.shape, ddf.dtype, ddf.device)
    else:
        gu = unused
    if need_moving or (need_ddf and not nearest):
        grid = (triton.cdiv(N, _BLOCK), moving.shape[0])
        warp_dense_bwd_kernel[grid](grad_out, moving, ddf, gmov, gu, moving.shape[1], D, H, W,
                                    ND=nd, PAD=PADS[padding_mode], NEAREST=nearest,
                                    NEED_MOVING=need_moving, NEED_FIELD=need_ddf and not nearest,
                                    INT64=needs_int64(N), BLOCK=_BLOCK)
    gmov = gmov.to(moving.dtype) if need_moving else moving.new_empty(0)
    return gmov, (gu if need_ddf else ddf.new_empty(0))
