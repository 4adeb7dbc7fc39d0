"""warp / upsample_field with upsample="bspline" (cubic B-spline free-form deformation):
torch.library custom ops over the C++ / Triton kernels.

coopseg::warp_bspline(moving, coarse, origin, spacing, ...) -> out      forward kernel warp_bspline_fwd
coopseg::warp_bspline_backward(grad, moving, coarse, origin, spacing, ...)  backward kernel warp_bspline_bwd
coopseg::upsample_bspline / upsample_bspline_backward                   upsample_bspline_fwd / _bwd

The geometry (origin, spacing per spatial axis, voxel coordinates: control point j at
origin + j * spacing) is resolved and the inputs are checked by the caller
(ops/warp.py: reference.bspline_geometry, _checks.upsample_args). The backward is itself a
custom op (opaque to torch.compile and opcheck); it is not differentiable again. Origin and
spacing are not differentiable.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _backend, _checks, reference


@torch.library.custom_op("coopseg::warp_bspline", mutates_args=())
def _warp_bspline(moving: Tensor, coarse: Tensor, origin: Sequence[float], spacing: Sequence[float],
                  padding_mode: str, mode: str, backend: str) -> Tensor:
    return _backend.kernel("warp_bspline_fwd", backend)(moving, coarse, list(origin), list(spacing), padding_mode,
                                                        mode)


@_warp_bspline.register_fake
def _(moving, coarse, origin, spacing, padding_mode, mode, backend):
    return torch.empty_like(moving)


@torch.library.custom_op("coopseg::warp_bspline_backward", mutates_args=())
def _warp_bspline_backward(grad_out: Tensor, moving: Tensor, coarse: Tensor, origin: Sequence[float],
                           spacing: Sequence[float], padding_mode: str, mode: str, backend: str, need_moving: bool,
                           need_coarse: bool) -> tuple[Tensor, Tensor]:
    return _backend.kernel("warp_bspline_bwd", backend)(grad_out, moving, coarse, list(origin), list(spacing),
                                                        padding_mode, mode, need_moving, need_coarse)


@_warp_bspline_backward.register_fake
def _(grad_out, moving, coarse, origin, spacing, padding_mode, mode, backend, need_moving, need_coarse):
    return (torch.empty_like(moving) if need_moving else moving.new_empty(0),
            torch.empty_like(coarse) if need_coarse else coarse.new_empty(0))


def _warp_setup(ctx, inputs, output):
    moving, coarse, origin, spacing, padding_mode, mode, backend = inputs
    ctx.save_for_backward(moving, coarse)
    ctx.args = (list(origin), list(spacing), padding_mode, mode, backend)


def _warp_grad(ctx, grad_out):
    moving, coarse = ctx.saved_tensors
    need_moving, need_coarse = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gm, gc = _warp_bspline_backward(grad_out.contiguous(), moving, coarse, *ctx.args, need_moving, need_coarse)
    return (gm if need_moving else None), (gc if need_coarse else None), None, None, None, None, None


_warp_bspline.register_autograd(_warp_grad, setup_context=_warp_setup)


@torch.library.custom_op("coopseg::upsample_bspline", mutates_args=())
def _upsample_bspline(coarse: Tensor, size: Sequence[int], origin: Sequence[float], spacing: Sequence[float],
                      backend: str) -> Tensor:
    return _backend.kernel("upsample_bspline_fwd", backend)(coarse, list(size), list(origin), list(spacing))


@_upsample_bspline.register_fake
def _(coarse, size, origin, spacing, backend):
    return coarse.new_empty((coarse.shape[0], coarse.shape[1], *size))


@torch.library.custom_op("coopseg::upsample_bspline_backward", mutates_args=())
def _upsample_bspline_backward(grad_field: Tensor, coarse_size: Sequence[int], origin: Sequence[float],
                               spacing: Sequence[float], backend: str) -> Tensor:
    return _backend.kernel("upsample_bspline_bwd", backend)(grad_field, list(coarse_size), list(origin),
                                                            list(spacing))


@_upsample_bspline_backward.register_fake
def _(grad_field, coarse_size, origin, spacing, backend):
    return grad_field.new_empty((grad_field.shape[0], grad_field.shape[1], *coarse_size))


def _upsample_setup(ctx, inputs, output):
    coarse, _size, origin, spacing, backend = inputs
    ctx.args = (list(coarse.shape[2:]), list(origin), list(spacing), backend)


def _upsample_grad(ctx, grad_field):
    return _upsample_bspline_backward(grad_field.contiguous(), *ctx.args), None, None, None, None


_upsample_bspline.register_autograd(_upsample_grad, setup_context=_upsample_setup)


def warp_bspline(moving: Tensor, coarse: Tensor, origin: Sequence[float], spacing: Sequence[float], *,
                 padding_mode: str = "zeros", mode: str = "bilinear", backend: str = "reference") -> Tensor:
    """`moving` sampled at x + u(x), u the cubic B-spline of the control points `coarse` placed at
    origin + j * spacing voxels (reference.warp(upsample="bspline")); `backend` already resolved."""
    origin, spacing = [float(v) for v in origin], [float(v) for v in spacing]
    if backend == "reference":
        return reference.warp(moving, coarse, padding_mode=padding_mode, mode=mode, upsample="bspline",
                              control_origin=origin, control_spacing=spacing)
    if moving.dtype.is_floating_point:
        _checks.kernel_dtype("moving", moving, backend, _backend.kernel_dtypes(backend))
    coarse = coarse.to(reference.math_dtype(moving.dtype))
    return _warp_bspline(moving.contiguous(), coarse.contiguous(), origin, spacing, padding_mode, mode, backend)


def upsample_bspline(coarse: Tensor, size: Sequence[int], origin: Sequence[float], spacing: Sequence[float], *,
                     backend: str = "reference") -> Tensor:
    """The full-resolution cubic B-spline field (B, nd, *size) of the control points `coarse`,
    computed in the math dtype and returned in coarse's dtype; `backend` already resolved."""
    origin, spacing = [float(v) for v in origin], [float(v) for v in spacing]
    dtype = reference.math_dtype(coarse.dtype)
    if backend == "reference":
        return reference.bspline_upsample(coarse.to(dtype), size, origin, spacing).to(coarse.dtype)
    _checks.kernel_dtype("coarse", coarse, backend, _backend.kernel_dtypes(backend))
    return _upsample_bspline(coarse.to(dtype).contiguous(), list(size), origin, spacing, backend).to(coarse.dtype)
