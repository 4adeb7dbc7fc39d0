"""warp_dense: the warp by a full-resolution displacement field (DDF), as torch.library
custom ops over the C++ / Triton kernels.

coopseg::warp_dense(moving, ddf, ...) -> out          forward kernel warp_dense_fwd
coopseg::warp_dense_backward(grad, moving, ddf, ...)  backward kernel warp_dense_bwd

`warp` routes here when the coarse grid has the image's size (upsampling is then the
identity): no interpolation of a grid, no per-cell partial sums; the field gradient
is written per voxel. coopseg_kernels.nn.Warp / SpatialTransformer call it too.
The backward is itself a custom op (opaque to torch.compile and opcheck); it is not
differentiable again.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, reference


@torch.library.custom_op("coopseg::warp_dense", mutates_args=())
def _warp_dense(moving: Tensor, ddf: Tensor, padding_mode: str, mode: str, backend: str,
                deterministic: bool = False) -> Tensor:
    return _backend.kernel("warp_dense_fwd", backend)(moving, ddf, padding_mode, mode)


@_warp_dense.register_fake
def _(moving, ddf, padding_mode, mode, backend, deterministic=False):
    return torch.empty_like(moving)


@torch.library.custom_op("coopseg::warp_dense_backward", mutates_args=())
def _warp_dense_backward(grad_out: Tensor, moving: Tensor, ddf: Tensor, padding_mode: str, mode: str,
                         backend: str, need_moving: bool, need_ddf: bool,
                         deterministic: bool = False) -> tuple[Tensor, Tensor]:
    # the C++ image gradient is always deterministic (slab ownership); Triton's on request
    extra = (deterministic,) if backend == "triton" else ()
    return _backend.kernel("warp_dense_bwd", backend)(grad_out, moving, ddf, padding_mode, mode, need_moving,
                                                      need_ddf, *extra)


@_warp_dense_backward.register_fake
def _(grad_out, moving, ddf, padding_mode, mode, backend, need_moving, need_ddf, deterministic=False):
    return (torch.empty_like(moving) if need_moving else moving.new_empty(0),
            torch.empty_like(ddf) if need_ddf else ddf.new_empty(0))


def _setup(ctx, inputs, output):
    moving, ddf, padding_mode, mode, backend = inputs[:5]
    ctx.save_for_backward(moving, ddf)
    ctx.args = (padding_mode, mode, backend)
    ctx.deterministic = inputs[5] if len(inputs) > 5 else False


def _grad(ctx, grad_out):
    moving, ddf = ctx.saved_tensors
    need_moving, need_ddf = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gm, gu = _warp_dense_backward(grad_out.contiguous(), moving, ddf, *ctx.args, need_moving, need_ddf,
                                  ctx.deterministic)
    return (gm if need_moving else None), (gu if need_ddf else None), None, None, None, None


_warp_dense.register_autograd(_grad, setup_context=_setup)


def warp_dense(moving: Tensor, ddf: Tensor, *, padding_mode: str = "zeros", mode: str = "bilinear",
               backend: str = "auto", deterministic: bool | None = None) -> Tensor:
    """Warp `moving` (B, C, *S) by the full-resolution displacement field `ddf` (B, nd, *S),
    in voxels, spatial-axis order: output voxel x samples `moving` at x + ddf(x) as
    F.grid_sample(align_corners=True, mode, padding_mode) in voxel coordinates. The same
    result as `warp(moving, ddf, ...)` (whose coarse grid then has the image's size).
    mode="nearest" warps integer and bool label maps in their own dtype. deterministic: as
    `warp` (None: torch.are_deterministic_algorithms_enabled())."""
    _checks.dense_warp_inputs(moving, ddf, padding_mode, mode)
    deterministic = _checks.deterministic(deterministic)
    be = _backend.resolve(backend, moving.device)
    if be == "reference":
        return reference.warp(moving, ddf, align_corners=True, padding_mode=padding_mode, mode=mode)
    if moving.dtype.is_floating_point:
        _checks.kernel_dtype("moving", moving, be, _backend.kernel_dtypes(be))
    ddf = ddf.to(reference.math_dtype(moving.dtype))
    return _warp_dense(moving.contiguous(), ddf.contiguous(), padding_mode, mode, be, deterministic)
