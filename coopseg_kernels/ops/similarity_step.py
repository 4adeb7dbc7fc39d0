"""similarity_step: one step of the D_S optimizer as a custom op (C++ / Triton).

coopseg::similarity_step(s1_blurred, s2_blurred, coarse, align_corners, backend)
    -> (loss[B], grad[B, nd, *s])                  kernel similarity_step_fwd (C++ / Triton)
loss = mean over voxels (and channels) of (tau(s1b) - s2b)^2 with tau the coarse
grid upsampled and applied exactly as `warp` (zeros padding); grad = d loss/d tau.
The gradient is computed by the kernel itself, in the same pass: the op is a
function, not a differentiable one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, reference


@torch.library.custom_op("coopseg::similarity_step", mutates_args=())
def _similarity_step(s1_blurred: Tensor, s2_blurred: Tensor, coarse: Tensor, align_corners: bool,
                     backend: str) -> tuple[Tensor, Tensor]:
    return _backend.kernel("similarity_step_fwd", backend)(s1_blurred, s2_blurred, coarse, align_corners)


@_similarity_step.register_fake
def _(s1_blurred, s2_blurred, coarse, align_corners, backend):
    return coarse.new_empty(s1_blurred.shape[0]), torch.empty_like(coarse)


def similarity_step(s1_blurred: Tensor, s2_blurred: Tensor, coarse: Tensor, *, align_corners: bool = True,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Loss mean((tau(s1b) - s2b)^2) per batch item and its gradient w.r.t. the
    coarse displacement grid tau (B, nd, *s), in one fused pass.

    s1_blurred and s2_blurred must have one shape and one dtype (float32/float64 for
    the C++ kernels; Triton and the reference also take float16/bfloat16); the small
    coarse grid is cast to the math dtype as in `warp`."""
    _checks.similarity_inputs(s1_blurred, s2_blurred, coarse, align_corners)
    be = _backend.resolve(backend, s1_blurred.device)
    if be != "reference":  # as warp: the compiled kernels take their dtypes only, never a silent cast
        _checks.kernel_dtype("s1_blurred", s1_blurred, be, _backend.kernel_dtypes(be))
    if be == "reference":
        return reference.similarity_step(s1_blurred, s2_blurred, coarse, align_corners=align_corners)
    dtype = reference.math_dtype(s1_blurred.dtype)
    s1 = s1_blurred.to(dtype).contiguous()
    s2 = s2_blurred.to(dtype).contiguous()
    c = coarse.detach().to(dtype).contiguous()
    return _similarity_step(s1, s2, c, bool(align_corners), be)
