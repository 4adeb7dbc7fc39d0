"""Triton kernel of the separable banded operator (the blur and its adjoint).

The operator is A_d A_h A_w (see coopseg_kernels/ops/blur.py): `blur_apply` runs
it as one pass per axis (w, then h, then d), each pass a launch of
`blur_axis_kernel`, which gives every program BLOCK consecutive voxels of one
(b, c) volume and combines, for each voxel, the M = 2r + 1 (index, weight) taps
of its row of that axis's table.

Why one pass per axis through a temporary (chosen without a GPU to measure on,
by counting memory traffic): the former kernel gathered the M^nd taps of every
voxel and their M^nd index/weight pairs, i.e. 27 data + 54 table loads per
voxel for [1, 2, 1] in 3-D and 125 + 250 for a 5-tap kernel, all served by L1/L2
but each an issued load. A pass per axis issues M data + 2M table loads per
voxel (9 + 18 in 3-D for M = 3, 15 + 30 for M = 5: linear in r instead of
cubic); its DRAM traffic is one read + one write of the volume per axis, since
the M taps of a voxel are the same rows/planes its neighbours in the block and
the next blocks read (a tap plane is H*W elements: (2r + 1) planes stay in L2),
and the table rows are shared by the whole block along h and d. The price is
one full-size temporary (two for half inputs, whose intermediates are kept in
fp32) and 2*nd instead of 2 volume transfers from DRAM.

Intermediates are in the compute dtype (fp32, fp64 for fp64 inputs), as in the
reference. Offsets inside a volume are int32 unless it has 2^31 voxels or more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import needs_int64, new_output

_BLOCK = 512


@triton.jit
def blur_axis_kernel(x_ptr, y_ptr, idx_ptr, wt_ptr, n, S, N,
                     M: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """y = A x along one axis of length n and stride S (elements) in volumes of
    N voxels; row j of A: taps idx[j, :M] (-1: none) with weights wt[j, :M]."""
    bc = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        offs = offs.to(tl.int64)
    mask = offs < N
    j = (offs // S) % n                # coordinate along the axis
    src0 = offs - j * S                # the voxel with coordinate 0 on the same line
    xb = x_ptr + bc * N
    acc = tl.zeros([BLOCK], dtype=wt_ptr.dtype.element_ty)
    for m in tl.static_range(M):
        i = tl.load(idx_ptr + j * M + m, mask=mask, other=-1)
        wgt = tl.load(wt_ptr + j * M + m, mask=mask, other=0.0)
        ok = i >= 0
        v = tl.load(xb + src0 + i * S, mask=ok, other=0.0).to(acc.dtype)
        acc += tl.where(ok, wgt * v, 0.0)
    tl.store(y_ptr + bc * N + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def blur_apply(x: torch.Tensor, idx: list[torch.Tensor], wt: list[torch.Tensor]) -> torch.Tensor:
    """A x for per-axis tables idx[k], wt[k] of shape (size[k], M) (signature of
    torch.ops.coopseg.blur_apply)."""
    x = x.contiguous()
    size = list(x.shape[2:])
    nd = len(size)
    N = 1
    for s in size:
        N *= s
    M = idx[-1].shape[1]
    compute = wt[-1].dtype
    BC = x.shape[0] * x.shape[1]
    grid = (triton.cdiv(N, _BLOCK), BC)
    int64 = needs_int64(N)
    # w first (contiguous reads), d last; each axis is a pass src -> dst
    axes = list(range(nd - 1, -1, -1))
    out = new_output(x.shape, x.dtype, x.device)
    src = x
    tmp = [None, None]  # up to two compute-dtype temporaries, reused
    for step, k in enumerate(axes):
        last = step == nd - 1
        if last:
            dst = out
        elif out.dtype == compute and (nd - 1 - step) % 2 == 0:
            # an even number of passes remain after this one: writing into `out`
            # now lets the passes ping-pong between out and one temporary
            dst = out
        else:
            slot = 0 if src is not tmp[0] else 1
            if tmp[slot] is None:
                tmp[slot] = new_output(x.shape, compute, x.device)
            dst = tmp[slot]
        stride = 1
        for s in size[k + 1:]:
            stride *= s
        blur_axis_kernel[grid](src, dst, idx[k], wt[k], size[k], stride, N,
                               M=M, INT64=int64, BLOCK=_BLOCK)
        src = dst
    return out
