"""Triton kernel of one D_S optimizer step: the custom op coopseg::similarity_step
(coopseg_kernels/ops/similarity_step.py); its C++ twin is csrc/cpu/similarity_step.cpp.

similarity_step_fwd_kernel  warp_bwd_kernel (warp.py) with SIMILARITY: one program per
                            (batch item, coarse cell, tile of the cell's voxels) samples
                            tau(s1b), reads s2b where the warp's backward reads the output
                            gradient, sums the squared residual per program (the loss) and
                            reduces 2 / (N C) * residual * d tau(s1b) / d tau to 2^nd * nd
                            partial sums per program, folded into the nodes on the host.
similarity_step_fwd         its launcher: (loss[B], grad[B, nd, *s]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import warp
from .geometry import axis_tables, grid3, needs_int64, new_output
from .warp import _BWD_BLOCK, _bwd_tiles, _fold_partials, _table_args


@triton.jit
def similarity_step_fwd_kernel(s1_ptr, s2_ptr, crs_ptr, part_ptr, loss_ptr,
                               i0d, l1d, cbd, i0h, l1h, cbh, i0w, l1w, cbw,
                               C, D, H, W, sd, sh, sw, T, scale,
                               ND: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    # the image gradient is not formed (NEED_MOVING False), so its pointer is never read; called
    # through its module so that this module holds one *_kernel (tools/gpu_compile.py)
    warp.warp_bwd_kernel(s2_ptr, s1_ptr, crs_ptr, part_ptr, part_ptr, loss_ptr,
                         i0d, l1d, cbd, i0h, l1h, cbh, i0w, l1w, cbw,
                         C, D, H, W, sd, sh, sw, T, scale,
                         ND, 0, False, True,  # ND, PAD (zeros), FIELD_GRAD, SIMILARITY
                         False, True,  # NEED_MOVING, NEED_COARSE
                         INT64, BLOCK, False)  # NEAREST


def similarity_step_fwd(s1_blurred: torch.Tensor, s2_blurred: torch.Tensor, coarse: torch.Tensor,
                        align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item mean((tau(s1b) - s2b)^2) and its gradient w.r.t. the coarse grid tau,
    in one pass (the warp's backward with the residual as the output gradient)."""
    nd = coarse.dim() - 2
    B = coarse.shape[0]
    size = s1_blurred.shape[2:]
    D, H, W = grid3(size)
    sd, sh, sw = grid3(coarse.shape[2:])
    device = s2_blurred.device
    tabs = axis_tables(size, coarse.shape[2:], align_corners, coarse.dtype, device)
    N = D * H * W
    T = _bwd_tiles(tabs)
    nprog = B * sd * sh * sw * T
    part = new_output((B, sd * sh * sw, T, 8, nd), coarse.dtype, device)
    loss = new_output((nprog,), coarse.dtype, device)
    C = s1_blurred.shape[1]
    similarity_step_fwd_kernel[(nprog,)](
        s1_blurred, s2_blurred, coarse, part, loss, *_table_args(tabs, True),
        C, D, H, W, sd, sh, sw, T, 2.0 / (N * C),
        ND=nd, INT64=needs_int64(N), BLOCK=_BWD_BLOCK)
    return loss.view(B, -1).sum(1) / (N * C), _fold_partials(part, coarse.shape, T)
