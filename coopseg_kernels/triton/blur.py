"""Triton kernel of the separable banded operator (the blur and its adjoint).

blur_apply_kernel: one program per BLOCK output voxels of one (b, c) volume;
each voxel combines the M^nd (index, weight) taps of the per-axis tables (see
coopseg_kernels/ops/blur.py) directly from the input, so nothing but the output
is written to memory; neighbouring programs' overlapping reads are served by
the caches. Math in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import block_voxels, needs_int64, new_output

_BLOCK = 256


@triton.jit
def blur_apply_kernel(x_ptr, out_ptr, idx_d, wt_d, idx_h, wt_h, idx_w, wt_w, D, H, W,
                      M: tl.constexpr, ND: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    bc = tl.program_id(1).to(tl.int64)
    offs, mask, d, h, w = block_voxels(tl.program_id(0), D, H, W, INT64, BLOCK)
    N = D * H * W
    base = x_ptr + bc * N
    acc = tl.zeros([BLOCK], dtype=wt_w.dtype.element_ty)
    for a in range(M if ND == 3 else 1):
        if ND == 3:
            id_ = tl.load(idx_d + d * M + a, mask=mask, other=-1)
            wd = tl.load(wt_d + d * M + a, mask=mask, other=0.0)
        else:
            id_ = tl.zeros_like(d)
            wd = tl.full([BLOCK], 1.0, wt_w.dtype.element_ty)
        for b in range(M):
            ih = tl.load(idx_h + h * M + b, mask=mask, other=-1)
            wh = tl.load(wt_h + h * M + b, mask=mask, other=0.0)
            for c in range(M):
                iw = tl.load(idx_w + w * M + c, mask=mask, other=-1)
                ww = tl.load(wt_w + w * M + c, mask=mask, other=0.0)
                ok = mask & (id_ >= 0) & (ih >= 0) & (iw >= 0)
                v = tl.load(base + (id_ * H + ih) * W + iw, mask=ok, other=0.0).to(acc.dtype)
                acc += tl.where(ok, wd * wh * ww * v, 0.0)
    tl.store(out_ptr + bc * N + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def blur_apply(x: torch.Tensor, idx: list[torch.Tensor], wt: list[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    nd = x.dim() - 2
    size = list(x.shape[2:])
    if nd == 2:
        size = [1] + size
        idx, wt = [idx[0]] + list(idx), [wt[0]] + list(wt)  # d tables unused (ND = 2)
    D, H, W = size
    N = D * H * W
    M = idx[-1].shape[1]
    out = new_output(x.shape, x.dtype, x.device)
    grid = (triton.cdiv(N, _BLOCK), x.shape[0] * x.shape[1])
    blur_apply_kernel[grid](x, out, idx[0], wt[0], idx[1], wt[1], idx[2], wt[2], D, H, W,
                            M=M, ND=nd, INT64=needs_int64(N), BLOCK=_BLOCK)
    return out
