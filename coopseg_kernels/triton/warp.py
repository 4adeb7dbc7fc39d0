"""Triton kernels for the fused coarse-field upsampling + multilinear warp.

warp_fwd_kernel   one program per BLOCK output voxels of one batch item: the
                  displacement of each voxel is interpolated from the 2^nd coarse
                  nodes around it (never stored), then the image is sampled.
                  With WRITE_FIELD it stores the displacement instead (upsample_field).
warp_bwd_kernel   one program per (batch item, coarse cell, tile of the cell's
                  voxels): the cell's 2^nd nodes are loaded once, the gradient of
                  each voxel's displacement is formed (from the sampled image or,
                  with FIELD_GRAD, read from a field gradient; with SIMILARITY the
                  output gradient is the residual against s2, as in one D_S
                  optimizer step, whose loss is summed per program: the kernel
                  similarity_step_fwd_kernel of similarity_step.py) and reduced to
                  2^nd * nd partial sums per program, which the host folds into the
                  nodes in a fixed order (deterministic, no atomics). The image
                  gradient is an atomic scatter.

Over 500 lines on purpose: one algorithm, whose forward and backward kernels share the
@triton.jit position, padding (zeros / border / reflection) and sampling (bilinear /
nearest) helpers of this file; split, the helpers would sit apart from their users.

A 2-D problem runs as 3-D with D = 1 (ND = 2 prunes the d taps at compile time).
Offsets inside one volume are int32 unless the volume has 2^31 voxels or more
(INT64); batch/channel bases are always int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import PADS, axis_tables, block_voxels, cell_tile, fold_cell_partials, grid3, needs_int64, new_output

_FWD_BLOCK = 256
_BWD_BLOCK = 256


@triton.jit
def _interp(i0_ptr, l1_ptr, x, s, m):
    """Lower/upper coarse node and their weights for fine indices x."""
    i0 = tl.load(i0_ptr + x, mask=m, other=0)
    l1 = tl.load(l1_ptr + x, mask=m, other=0.0)
    return i0, tl.minimum(i0 + 1, s - 1), 1.0 - l1, l1


@triton.jit
def _reflect(p, hi):
    """grid_sample's reflection (align_corners=True) about 0 and hi = n - 1: |p| modulo
    2 hi folded back, clamped; and d(result)/dp: the reflection's sign, 0 where the result
    is 0 or hi (grid_sample's clip)."""
    span2 = 2.0 * hi
    a = tl.abs(p)
    safe = tl.where(span2 > 0.0, span2, 1.0)  # an axis of one voxel (d in 2-D): the result is 0
    extra = a - tl.floor(a / safe) * safe
    extra = tl.where(extra < 0.0, extra + safe, extra)  # a / span2 rounded up to a whole number
    other = span2 - extra
    flip = extra > other
    r = tl.minimum(tl.maximum(tl.where(flip, other, extra), 0.0), hi)
    sign = tl.where(flip != (p < 0.0), -1.0, 1.0)
    clip = tl.where((r > 0.0) & (r < hi), sign, 0.0).to(p.dtype)
    return r, clip


@triton.jit
def _taps(p, n, PAD: tl.constexpr, INT64: tl.constexpr):
    """The two sampling taps of positions p along an axis of length n
    (grid_sample, align_corners=True, voxel units). PAD: 0 zeros, 1 border,
    2 reflection. The lower tap is int64 under
    INT64, so that tap offsets ((zd * H + zh) * W + zw) do not overflow."""
    hi = tl.zeros_like(p) + (n - 1)  # n may be a specialised constexpr (n == 1)
    if PAD == 1:
        # the border itself counts as outside for the gradient, as in grid_sample
        clip = tl.where((p > 0.0) & (p < hi), 1.0, 0.0).to(p.dtype)
        p = tl.minimum(tl.maximum(p, 0.0), hi)
    elif PAD == 2:
        # clip carries the reflection's sign for the position gradient
        p, clip = _reflect(p, hi)
    else:
        clip = tl.full(p.shape, 1.0, p.dtype)
        # beyond one voxel outside both taps are out anyway; keeps the int cast defined
        p = tl.minimum(tl.maximum(p, -2.0), hi + 2.0)
    fl = tl.floor(p)
    if INT64:
        i0 = fl.to(tl.int64)
    else:
        i0 = fl.to(tl.int32)
    f = p - fl
    ok0 = (i0 >= 0) & (i0 < n)
    ok1 = (i0 >= -1) & (i0 < n - 1)
    return i0, f, ok0, ok1, clip


@triton.jit
def _nearest(p, n, PAD: tl.constexpr, INT64: tl.constexpr):
    """The nearest voxel of positions p along an axis of length n after the padding
    rule, rounded half to even (grid_sample's nearbyint); and whether it is inside."""
    hi = tl.zeros_like(p) + (n - 1)
    if PAD == 1:
        q = tl.minimum(tl.maximum(p, 0.0), hi)
    elif PAD == 2:
        q, _clip = _reflect(p, hi)
    else:
        q = tl.minimum(tl.maximum(p, -2.0), hi + 2.0)
    fl = tl.floor(q)
    frac = q - fl  # exact
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
    r = fl + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    if INT64:
        i = r.to(tl.int64)
    else:
        i = r.to(tl.int32)
    return i, (i >= 0) & (i < n)


@triton.jit
def _node(cptr, d, h, w, sh, sw):
    return tl.load(cptr + (d * sh + h) * sw + w)


@triton.jit
def _field_vec(cptr, id0, id1, ld0, ld1, ih0, ih1, lh0, lh1, iw0, iw1, lw0, lw1, sh, sw, m,
               ND: tl.constexpr):
    """Displacement of one channel at voxels with per-voxel nodes (gathers)."""
    r00 = (id0 * sh + ih0) * sw
    r01 = (id0 * sh + ih1) * sw
    u = lh0 * (lw0 * tl.load(cptr + r00 + iw0, mask=m, other=0.0)
               + lw1 * tl.load(cptr + r00 + iw1, mask=m, other=0.0)) \
        + lh1 * (lw0 * tl.load(cptr + r01 + iw0, mask=m, other=0.0)
                 + lw1 * tl.load(cptr + r01 + iw1, mask=m, other=0.0))
    if ND == 3:
        r10 = (id1 * sh + ih0) * sw
        r11 = (id1 * sh + ih1) * sw
        u1 = lh0 * (lw0 * tl.load(cptr + r10 + iw0, mask=m, other=0.0)
                    + lw1 * tl.load(cptr + r10 + iw1, mask=m, other=0.0)) \
            + lh1 * (lw0 * tl.load(cptr + r11 + iw0, mask=m, other=0.0)
                     + lw1 * tl.load(cptr + r11 + iw1, mask=m, other=0.0))
        u = ld0 * u + ld1 * u1
    return u


@triton.jit
def _voxel_field(crs_ptr, b, d, h, w, m, i0d, l1d, i0h, l1h, i0w, l1w, sd, sh, sw, ND: tl.constexpr):
    """Displacement (d, h, w) of voxels (d, h, w) of batch item b, interpolated from the
    coarse grid through the axis tables (gathers); d stays 0 in 2-D."""
    iw0, iw1, lw0, lw1 = _interp(i0w, l1w, w, sw, m)
    ih0, ih1, lh0, lh1 = _interp(i0h, l1h, h, sh, m)
    id0, id1, ld0, ld1 = _interp(i0d, l1d, d, sd, m)
    sc = sd * sh * sw
    cb = crs_ptr + b * ND * sc
    uh = _field_vec(cb + (ND - 2) * sc, id0, id1, ld0, ld1, ih0, ih1, lh0, lh1, iw0, iw1, lw0, lw1, sh, sw, m, ND)
    uw = _field_vec(cb + (ND - 1) * sc, id0, id1, ld0, ld1, ih0, ih1, lh0, lh1, iw0, iw1, lw0, lw1, sh, sw, m, ND)
    if ND == 3:
        ud = _field_vec(cb, id0, id1, ld0, ld1, ih0, ih1, lh0, lh1, iw0, iw1, lw0, lw1, sh, sw, m, ND)
    else:
        ud = tl.zeros_like(uh)
    return ud, uh, uw


@triton.jit
def _displace(d, h, w, ud, uh, uw):
    """Positions x + u of voxels (d, h, w); `nan` is NaN exactly where a coordinate is NaN or
    infinite (x * 0 is NaN then), `bad` flags it."""
    pd = d.to(uh.dtype) + ud
    ph = h.to(uh.dtype) + uh
    pw = w.to(uh.dtype) + uw
    nan = pd * 0.0 + ph * 0.0 + pw * 0.0
    return pd, ph, pw, nan, nan != nan


@triton.jit
def _bilinear_plane(base, row, W, md, okh0, okh1, okw0, okw1, fh, fw):
    """The bilinear value of one d plane of the taps (corners outside read 0)."""
    return (1.0 - fh) * ((1.0 - fw) * tl.load(base + row, mask=md & okh0 & okw0, other=0.0).to(fw.dtype)
                         + fw * tl.load(base + row + 1, mask=md & okh0 & okw1, other=0.0).to(fw.dtype)) \
        + fh * ((1.0 - fw) * tl.load(base + row + W, mask=md & okh1 & okw0, other=0.0).to(fw.dtype)
                + fw * tl.load(base + row + W + 1, mask=md & okh1 & okw1, other=0.0).to(fw.dtype))


@triton.jit
def _bilinear(base, row, H, W, m, okd0, okd1, okh0, okh1, okw0, okw1, fd, fh, fw, ND: tl.constexpr):
    """The multilinear sample at taps (row: flat index of the lower corner), in fw's dtype."""
    v = _bilinear_plane(base, row, W, m & okd0, okh0, okh1, okw0, okw1, fh, fw)
    if ND == 3:
        v1 = _bilinear_plane(base, row + H * W, W, m & okd1, okh0, okh1, okw0, okw1, fh, fw)
        v = (1.0 - fd) * v + fd * v1
    return v


@triton.jit
def warp_fwd_kernel(mov_ptr, crs_ptr, out_ptr,
                    i0d, l1d, i0h, l1h, i0w, l1w,
                    C, D, H, W, sd, sh, sw,
                    ND: tl.constexpr, PAD: tl.constexpr, WRITE_FIELD: tl.constexpr,
                    INT64: tl.constexpr, BLOCK: tl.constexpr, NEAREST: tl.constexpr, LABELS: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs, m, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    # displacement in (d, h, w) order; d stays 0 in 2-D
    ud, uh, uw = _voxel_field(crs_ptr, b, d, h, w, m, i0d, l1d, i0h, l1h, i0w, l1w, sd, sh, sw, ND)

    if WRITE_FIELD:
        ob = out_ptr + b * ND * N + offs
        if ND == 3:
            tl.store(ob, ud.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(ob + (ND - 2) * N, uh.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(ob + (ND - 1) * N, uw.to(out_ptr.dtype.element_ty), mask=m)
    elif NEAREST:
        pd, ph, pw, nan, bad = _displace(d, h, w, ud, uh, uw)
        zd, okd = _nearest(tl.where(bad, 0.0, pd), D, PAD, INT64)
        zh, okh = _nearest(tl.where(bad, 0.0, ph), H, PAD, INT64)
        zw, okw = _nearest(tl.where(bad, 0.0, pw), W, PAD, INT64)
        idx = (zd * H + zh) * W + zw
        mk = m & okd & okh & okw & ~bad
        for c in range(C):
            v = tl.load(mov_ptr + (b * C + c) * N + idx, mask=mk, other=0)
            if not LABELS:  # label maps: 0 where the displacement is not finite
                v = tl.where(bad, nan.to(v.dtype), v)
            tl.store(out_ptr + (b * C + c) * N + offs, v, mask=m)
    else:
        pd, ph, pw, nan, bad = _displace(d, h, w, ud, uh, uw)
        zd, fd, okd0, okd1, _cd = _taps(tl.where(bad, 0.0, pd), D, PAD, INT64)
        zh, fh, okh0, okh1, _ch = _taps(tl.where(bad, 0.0, ph), H, PAD, INT64)
        zw, fw, okw0, okw1, _cw = _taps(tl.where(bad, 0.0, pw), W, PAD, INT64)
        row = (zd * H + zh) * W + zw  # corner (0, 0, 0); may be negative, masked
        for c in range(C):
            v = _bilinear(mov_ptr + (b * C + c) * N, row, H, W, m, okd0, okd1, okh0, okh1, okw0, okw1, fd, fh, fw, ND)
            v = tl.where(bad, nan, v)
            tl.store(out_ptr + (b * C + c) * N + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _plane_corners(base, row, W, md, okh0, okh1, okw0, okw1, like):
    """The four (h, w) corners of one d plane of the sampling taps, and their masks."""
    m00 = md & okh0 & okw0
    m01 = md & okh0 & okw1
    m10 = md & okh1 & okw0
    m11 = md & okh1 & okw1
    v00 = tl.load(base + row, mask=m00, other=0.0).to(like.dtype)
    v01 = tl.load(base + row + 1, mask=m01, other=0.0).to(like.dtype)
    v10 = tl.load(base + row + W, mask=m10, other=0.0).to(like.dtype)
    v11 = tl.load(base + row + W + 1, mask=m11, other=0.0).to(like.dtype)
    return v00, v01, v10, v11, m00, m01, m10, m11


@triton.jit
def _corner(v, wt_d, wt_h, wt_w, dd, dh, dw):
    """One corner (value v) of the backward: its contributions to the position
    gradient (d, h, w)."""
    return dd * wt_h * wt_w * v, wt_d * dh * wt_w * v, wt_d * wt_h * dw * v


@triton.jit
def _field_at(fb, N, vox, m, ND: tl.constexpr, like):
    """The (d, h, w) components of one batch item's full-resolution field fb at voxels vox, in
    like's dtype (d = 0 in 2-D): the field gradient that the backward's FIELD_GRAD reduces."""
    fh = tl.load(fb + (ND - 2) * N + vox, mask=m, other=0.0).to(like.dtype)
    fw = tl.load(fb + (ND - 1) * N + vox, mask=m, other=0.0).to(like.dtype)
    if ND == 3:
        fd = tl.load(fb + vox, mask=m, other=0.0).to(like.dtype)
    else:
        fd = tl.zeros_like(fh)
    return fd, fh, fw


@triton.jit
def _scatter_nearest(gout_ptr, gmov_ptr, b, C, N, vox, m, src, inside):
    """The nearest image gradient: every channel's output gradient at vox added to the voxel
    read (src, where inside). Relaxed atomics, as _scatter_plane."""
    for c in range(C):
        g = tl.load(gout_ptr + (b * C + c) * N + vox, mask=m, other=0.0)
        tl.atomic_add(gmov_ptr + (b * C + c) * N + src, g.to(gmov_ptr.dtype.element_ty), mask=inside, sem="relaxed")


@triton.jit
def _scatter_plane(gm_base, row, W, md, okh0, okh1, okw0, okw1, gd, fh, fw):
    """Scatter gd * (h, w) weights into the four corners of one d plane of the image
    gradient (gd: the output gradient times the plane's d weight). Relaxed atomics:
    the scatter is a sum, no ordering is needed."""
    ty = gm_base.dtype.element_ty
    tl.atomic_add(gm_base + row, (gd * (1.0 - fh) * (1.0 - fw)).to(ty), mask=md & okh0 & okw0, sem="relaxed")
    tl.atomic_add(gm_base + row + 1, (gd * (1.0 - fh) * fw).to(ty), mask=md & okh0 & okw1, sem="relaxed")
    tl.atomic_add(gm_base + row + W, (gd * fh * (1.0 - fw)).to(ty), mask=md & okh1 & okw0, sem="relaxed")
    tl.atomic_add(gm_base + row + W + 1, (gd * fh * fw).to(ty), mask=md & okh1 & okw1, sem="relaxed")


@triton.jit
def warp_bwd_kernel(gout_ptr, mov_ptr, crs_ptr, gmov_ptr, part_ptr, loss_ptr,
                    i0d, l1d, cbd, i0h, l1h, cbh, i0w, l1w, cbw,
                    C, D, H, W, sd, sh, sw, T, scale,
                    ND: tl.constexpr, PAD: tl.constexpr, FIELD_GRAD: tl.constexpr, SIMILARITY: tl.constexpr,
                    NEED_MOVING: tl.constexpr, NEED_COARSE: tl.constexpr,
                    INT64: tl.constexpr, BLOCK: tl.constexpr, NEAREST: tl.constexpr):
    pid = tl.program_id(0)
    b, cd, ch, cw, d, h, w, m = cell_tile(pid, T, sd, sh, sw, cbd, cbh, cbw, INT64, BLOCK)
    N = D * H * W
    vox = (d * H + h) * W + w

    # every voxel of the cell shares its nodes: scalar loads
    lw1 = tl.load(l1w + w, mask=m, other=0.0)
    lh1 = tl.load(l1h + h, mask=m, other=0.0)
    ld1 = tl.load(l1d + d, mask=m, other=0.0)
    lw0 = 1.0 - lw1
    lh0 = 1.0 - lh1
    ld0 = 1.0 - ld1
    cd1 = tl.minimum(cd + 1, sd - 1)
    ch1 = tl.minimum(ch + 1, sh - 1)
    cw1 = tl.minimum(cw + 1, sw - 1)
    sc = sd * sh * sw

    if FIELD_GRAD:
        gd, gh, gw = _field_at(gout_ptr + b * ND * N, N, vox, m, ND, lw1)
    elif NEAREST:
        # the image gradient is a scatter to the voxels read; the field gets none
        tl.static_assert(not SIMILARITY, "the D_S step is bilinear")
        pd, ph, pw, nan, bad = _cell_positions(crs_ptr + b * ND * sc, d, h, w, cd, cd1, ld0, ld1, ch, ch1, lh0, lh1,
                                               cw, cw1, lw0, lw1, sd, sh, sw, ND)
        gd = tl.zeros_like(pd)
        gh = tl.zeros_like(pd)
        gw = tl.zeros_like(pd)
        if NEED_MOVING:
            zd, okd = _nearest(tl.where(bad, 0.0, pd), D, PAD, INT64)
            zh, okh = _nearest(tl.where(bad, 0.0, ph), H, PAD, INT64)
            zw, okw = _nearest(tl.where(bad, 0.0, pw), W, PAD, INT64)
            idx = (zd * H + zh) * W + zw
            mk = m & okd & okh & okw & ~bad
            _scatter_nearest(gout_ptr, gmov_ptr, b, C, N, vox, m, idx, mk)
    else:
        pd, ph, pw, nan, bad = _cell_positions(crs_ptr + b * ND * sc, d, h, w, cd, cd1, ld0, ld1, ch, ch1, lh0, lh1,
                                               cw, cw1, lw0, lw1, sd, sh, sw, ND)
        zd, fd, okd0, okd1, cld = _taps(tl.where(bad, 0.0, pd), D, PAD, INT64)
        zh, fh, okh0, okh1, clh = _taps(tl.where(bad, 0.0, ph), H, PAD, INT64)
        zw, fw, okw0, okw1, clw = _taps(tl.where(bad, 0.0, pw), W, PAD, INT64)
        mg = m & ~bad
        inside = (okd0 | okd1) & (okh0 | okh1) & (okw0 | okw1)
        row = (zd * H + zh) * W + zw
        loss = tl.zeros_like(fw)
        gd = tl.zeros_like(fw)
        gh = tl.zeros_like(fw)
        gw = tl.zeros_like(fw)
        for c in range(C):
            base = mov_ptr + (b * C + c) * N
            gmb = gmov_ptr + (b * C + c) * N
            g = tl.load(gout_ptr + (b * C + c) * N + vox, mask=m, other=0.0).to(fw.dtype)
            if NEED_MOVING:
                # the image-gradient scatter first, from g and the weights alone, so that
                # its addresses and weights are dead before the eight corner values below
                # are loaded (3-D, both gradients: docs/gpu.md#registers-spills-and-shared-memory)
                tl.static_assert(not SIMILARITY, "the D_S step has no image gradient")
                _scatter_plane(gmb, row, W, mg & okd0, okh0, okh1, okw0, okw1, g * (1.0 - fd), fh, fw)
                if ND == 3:
                    _scatter_plane(gmb, row + H * W, W, mg & okd1, okh0, okh1, okw0, okw1, g * fd, fh, fw)
            v000, v001, v010, v011, m000, m001, m010, m011 = _plane_corners(base, row, W, mg & okd0, okh0, okh1,
                                                                           okw0, okw1, fw)
            val = (1.0 - fh) * ((1.0 - fw) * v000 + fw * v001) + fh * ((1.0 - fw) * v010 + fw * v011)
            if ND == 3:
                r1 = row + H * W
                v100, v101, v110, v111, m100, m101, m110, m111 = _plane_corners(base, r1, W, mg & okd1, okh0, okh1,
                                                                               okw0, okw1, fw)
                val1 = (1.0 - fh) * ((1.0 - fw) * v100 + fw * v101) + fh * ((1.0 - fw) * v110 + fw * v111)
                val = (1.0 - fd) * val + fd * val1
            if SIMILARITY:
                # g was s2 at this voxel: the residual, and d(loss)/d(sample) = scale * residual
                res = tl.where(m, val - g, 0.0)
                res = tl.where(bad, nan, res)
                loss += res * res
                g = scale * res
            a0, a1, a2 = _corner(v000, 1.0 - fd, 1.0 - fh, 1.0 - fw, -cld, -clh, -clw)
            b0, b1, b2 = _corner(v001, 1.0 - fd, 1.0 - fh, fw, -cld, -clh, clw)
            c0, c1, c2 = _corner(v010, 1.0 - fd, fh, 1.0 - fw, -cld, clh, -clw)
            e0, e1, e2 = _corner(v011, 1.0 - fd, fh, fw, -cld, clh, clw)
            sd_ = a0 + b0 + c0 + e0
            sh_ = a1 + b1 + c1 + e1
            sw_ = a2 + b2 + c2 + e2
            if ND == 3:
                a0, a1, a2 = _corner(v100, fd, 1.0 - fh, 1.0 - fw, cld, -clh, -clw)
                b0, b1, b2 = _corner(v101, fd, 1.0 - fh, fw, cld, -clh, clw)
                c0, c1, c2 = _corner(v110, fd, fh, 1.0 - fw, cld, clh, -clw)
                e0, e1, e2 = _corner(v111, fd, fh, fw, cld, clh, clw)
                sd_ += a0 + b0 + c0 + e0
                sh_ += a1 + b1 + c1 + e1
                sw_ += a2 + b2 + c2 + e2
            # a voxel with no corner inside the image passes no gradient to its
            # position, even for a non-finite g (as grid_sample)
            gd += tl.where(inside, g * sd_, 0.0)
            gh += tl.where(inside, g * sh_, 0.0)
            gw += tl.where(inside, g * sw_, 0.0)
        # a non-finite position has a NaN gradient (documented)
        gd = tl.where(bad, nan, gd)
        gh = tl.where(bad, nan, gh)
        gw = tl.where(bad, nan, gw)
        if SIMILARITY:
            tl.store(loss_ptr + pid, tl.sum(tl.where(m, loss, 0.0), 0))

    if NEED_COARSE:
        # partial sums of this program, layout [B, ncell, T, 2, 2, 2, nd]
        pb = part_ptr + pid.to(tl.int64) * (8 * ND)
        _store_corner_sums(pb, ld0 * lh0 * lw0, gd, gh, gw, m, ND, 0)
        _store_corner_sums(pb, ld0 * lh0 * lw1, gd, gh, gw, m, ND, 1)
        _store_corner_sums(pb, ld0 * lh1 * lw0, gd, gh, gw, m, ND, 2)
        _store_corner_sums(pb, ld0 * lh1 * lw1, gd, gh, gw, m, ND, 3)
        if ND == 3:
            _store_corner_sums(pb, ld1 * lh0 * lw0, gd, gh, gw, m, ND, 4)
            _store_corner_sums(pb, ld1 * lh0 * lw1, gd, gh, gw, m, ND, 5)
            _store_corner_sums(pb, ld1 * lh1 * lw0, gd, gh, gw, m, ND, 6)
            _store_corner_sums(pb, ld1 * lh1 * lw1, gd, gh, gw, m, ND, 7)
        else:
            for k in tl.static_range(4 * ND, 8 * ND):  # the absent d corners
                tl.store(pb + k, 0.0)


@triton.jit
def _cell_field(cptr, d0, d1, ld0, ld1, h0, h1, lh0, lh1, w0, w1, lw0, lw1, sh, sw, ND: tl.constexpr):
    """Displacement of one channel at voxels of one cell (nodes are scalars)."""
    u = lh0 * (lw0 * _node(cptr, d0, h0, w0, sh, sw) + lw1 * _node(cptr, d0, h0, w1, sh, sw)) \
        + lh1 * (lw0 * _node(cptr, d0, h1, w0, sh, sw) + lw1 * _node(cptr, d0, h1, w1, sh, sw))
    if ND == 3:
        u1 = lh0 * (lw0 * _node(cptr, d1, h0, w0, sh, sw) + lw1 * _node(cptr, d1, h0, w1, sh, sw)) \
            + lh1 * (lw0 * _node(cptr, d1, h1, w0, sh, sw) + lw1 * _node(cptr, d1, h1, w1, sh, sw))
        u = ld0 * u + ld1 * u1
    return u


@triton.jit
def _cell_positions(cb, d, h, w, d0, d1, ld0, ld1, h0, h1, lh0, lh1, w0, w1, lw0, lw1, sd, sh, sw, ND: tl.constexpr):
    """Positions (and _displace's nan / bad) of voxels of one cell of the grid cb (one batch item)."""
    sc = sd * sh * sw
    uh = _cell_field(cb + (ND - 2) * sc, d0, d1, ld0, ld1, h0, h1, lh0, lh1, w0, w1, lw0, lw1, sh, sw, ND)
    uw = _cell_field(cb + (ND - 1) * sc, d0, d1, ld0, ld1, h0, h1, lh0, lh1, w0, w1, lw0, lw1, sh, sw, ND)
    if ND == 3:
        ud = _cell_field(cb, d0, d1, ld0, ld1, h0, h1, lh0, lh1, w0, w1, lw0, lw1, sh, sw, ND)
    else:
        ud = tl.zeros_like(uh)
    return _displace(d, h, w, ud, uh, uw)


@triton.jit
def _store_corner_sums(pb, wt, gd, gh, gw, m, ND: tl.constexpr, K: tl.constexpr):
    if ND == 3:
        tl.store(pb + K * ND, tl.sum(tl.where(m, wt * gd, 0.0), 0))
    tl.store(pb + K * ND + ND - 2, tl.sum(tl.where(m, wt * gh, 0.0), 0))
    tl.store(pb + K * ND + ND - 1, tl.sum(tl.where(m, wt * gw, 0.0), 0))


# ----------------------------------------------------------------------------- launchers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _table_args(tabs, with_cells: bool):
    args = []
    for t in tabs:
        args += [t.i0, t.l1] + ([t.cell_begin] if with_cells else [])
    return args




def _forward(moving_or_none, coarse, size, align_corners, padding_mode, C, out, write_field, mode="bilinear"):
    nd = coarse.dim() - 2
    D, H, W = grid3(size)
    sd, sh, sw = grid3(coarse.shape[2:])
    tabs = axis_tables(size, coarse.shape[2:], align_corners, coarse.dtype, coarse.device)
    N = D * H * W
    grid = (triton.cdiv(N, _FWD_BLOCK), coarse.shape[0])
    warp_fwd_kernel[grid](
        moving_or_none if moving_or_none is not None else out, coarse, out, *_table_args(tabs, False),
        C, D, H, W, sd, sh, sw,
        ND=nd, PAD=PADS[padding_mode], WRITE_FIELD=write_field,
        INT64=needs_int64(N), BLOCK=_FWD_BLOCK, NEAREST=mode == "nearest",
        LABELS=not out.dtype.is_floating_point)
    return out


def _bwd_tiles(tabs) -> int:
    """Programs per coarse cell of the per-cell kernels: tiles of _BWD_BLOCK voxels of the largest cell."""
    return max(1, triton.cdiv(tabs[0].max_cell * tabs[1].max_cell * tabs[2].max_cell, _BWD_BLOCK))


def _fold_partials(part, coarse_shape, T):
    """The per-program corner sums [B, ncell, T, 8, nd] folded into the coarse grid's gradient."""
    nd = len(coarse_shape) - 2
    sd, sh, sw = grid3(coarse_shape[2:])
    cells_sum = part.view(coarse_shape[0], sd, sh, sw, T, 2, 2, 2, nd).sum(4)
    return fold_cell_partials(cells_sum, coarse_shape[2:])


def _backward(gout, moving_or_none, coarse_shape, coarse_or_none, size, align_corners, padding_mode, *,
              need_moving, need_coarse, compute_dtype, field_grad=False, mode="bilinear"):
    """warp_bwd_kernel launch. gout is the output gradient, or the field gradient
    (field_grad). The D_S step's launch is similarity_step.py's. The image gradient is an
    atomic scatter; warp_gather.py's warp_bwd gathers it instead (deterministic=True)."""
    nd = len(coarse_shape) - 2
    B = coarse_shape[0]
    D, H, W = grid3(size)
    sd, sh, sw = grid3(coarse_shape[2:])
    device = gout.device
    tabs = axis_tables(size, coarse_shape[2:], align_corners, compute_dtype, device)
    N = D * H * W
    T = _bwd_tiles(tabs)
    ncell = sd * sh * sw
    nprog = B * ncell * T
    unused = torch.empty(1, dtype=compute_dtype, device=device)
    part = new_output((B, ncell, T, 8, nd), compute_dtype, device) if need_coarse else unused
    C = 0 if moving_or_none is None else moving_or_none.shape[1]
    if need_moving:
        # fp32 accumulation for half inputs; the atomics write the result in place otherwise
        acc_dtype = moving_or_none.dtype if moving_or_none.dtype in (torch.float32, torch.float64) else torch.float32
        gmov = gmov_k = torch.zeros(moving_or_none.shape, dtype=acc_dtype, device=device)
    else:
        gmov = gmov_k = unused
    warp_bwd_kernel[(nprog,)](
        gout, moving_or_none if moving_or_none is not None else gout,
        coarse_or_none if coarse_or_none is not None else gout, gmov_k, part, unused,
        *_table_args(tabs, True),
        C, D, H, W, sd, sh, sw, T, 0.0,
        ND=nd, PAD=PADS[padding_mode], FIELD_GRAD=field_grad, SIMILARITY=False,
        NEED_MOVING=need_moving, NEED_COARSE=need_coarse,
        INT64=needs_int64(N), BLOCK=_BWD_BLOCK, NEAREST=mode == "nearest")
    grad_coarse = _fold_partials(part, coarse_shape, T) if need_coarse else None
    return gmov, grad_coarse


def warp_fwd(moving: torch.Tensor, coarse: torch.Tensor, align_corners: bool, padding_mode: str,
             mode: str = "bilinear") -> torch.Tensor:
    out = new_output(moving.shape, moving.dtype, moving.device)
    return _forward(moving, coarse, moving.shape[2:], align_corners, padding_mode, moving.shape[1], out, False,
                    mode)


def warp_bwd(grad_out, moving, coarse, align_corners, padding_mode, mode, need_moving, need_coarse):
    """The raw backward (the C++ op's signature; the image gradient an atomic scatter; the
    public launcher with `deterministic` is warp_gather.warp_bwd)."""
    gmov, gcrs = _backward(grad_out, moving, coarse.shape, coarse, moving.shape[2:], align_corners, padding_mode,
                           need_moving=need_moving, need_coarse=need_coarse, compute_dtype=coarse.dtype, mode=mode)
    gmov = gmov.to(moving.dtype) if need_moving else moving.new_empty(0)
    return gmov, (gcrs if need_coarse else coarse.new_empty(0))


def upsample_field_fwd(coarse: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    out = new_output((coarse.shape[0], coarse.shape[1], *size), coarse.dtype, coarse.device)
    return _forward(None, coarse, size, align_corners, "zeros", 0, out, True)


def upsample_field_bwd(grad_field: torch.Tensor, coarse_size, align_corners: bool) -> torch.Tensor:
    shape = (grad_field.shape[0], grad_field.shape[1], *coarse_size)
    _, g = _backward(grad_field, None, shape, None, grad_field.shape[2:], align_corners, "zeros",
                     need_moving=False, need_coarse=True, compute_dtype=grad_field.dtype, field_grad=True)
    return g
