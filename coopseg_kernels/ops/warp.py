"""warp and upsample_field: torch.library custom ops over the C++ / Triton kernels.

coopseg::warp(moving, coarse, ...) -> out          forward kernel warp_fwd
coopseg::warp_backward(grad, moving, coarse, ...)  backward kernel warp_bwd
coopseg::upsample_field / upsample_field_backward  likewise

The backward is itself a custom op so that torch.compile and opcheck see an
opaque, fake-able node; it is not differentiable again (no double backward).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from .warp_bspline import upsample_bspline, warp_bspline
from .warp_dense import warp_dense


@torch.library.custom_op("coopseg::warp", mutates_args=())
def _warp(moving: Tensor, coarse: Tensor, align_corners: bool, padding_mode: str, mode: str, backend: str,
          deterministic: bool = False) -> Tensor:
    return _backend.kernel("warp_fwd", backend)(moving, coarse, align_corners, padding_mode, mode)


@_warp.register_fake
def _(moving, coarse, align_corners, padding_mode, mode, backend, deterministic=False):
    return torch.empty_like(moving)


@torch.library.custom_op("coopseg::warp_backward", mutates_args=())
def _warp_backward(grad_out: Tensor, moving: Tensor, coarse: Tensor, align_corners: bool, padding_mode: str,
                   mode: str, backend: str, need_moving: bool, need_coarse: bool,
                   deterministic: bool = False) -> tuple[Tensor, Tensor]:
    # the C++ image gradient is always deterministic (slab ownership); Triton's on request
    extra = (deterministic,) if backend == "triton" else ()
    return _backend.kernel("warp_bwd", backend)(grad_out, moving, coarse, align_corners, padding_mode, mode,
                                                need_moving, need_coarse, *extra)


@_warp_backward.register_fake
def _(grad_out, moving, coarse, align_corners, padding_mode, mode, backend, need_moving, need_coarse,
      deterministic=False):
    return (torch.empty_like(moving) if need_moving else moving.new_empty(0),
            torch.empty_like(coarse) if need_coarse else coarse.new_empty(0))


def _warp_setup(ctx, inputs, output):
    moving, coarse, align_corners, padding_mode, mode, backend = inputs[:6]
    ctx.save_for_backward(moving, coarse)
    ctx.args = (align_corners, padding_mode, mode, backend)
    ctx.deterministic = inputs[6] if len(inputs) > 6 else False


def _warp_grad(ctx, grad_out):
    moving, coarse = ctx.saved_tensors
    need_moving, need_coarse = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gm, gc = _warp_backward(grad_out.contiguous(), moving, coarse, *ctx.args, need_moving, need_coarse,
                            ctx.deterministic)
    return (gm if need_moving else None), (gc if need_coarse else None), None, None, None, None, None


_warp.register_autograd(_warp_grad, setup_context=_warp_setup)


@torch.library.custom_op("coopseg::upsample_field", mutates_args=())
def _upsample(coarse: Tensor, size: Sequence[int], align_corners: bool, backend: str) -> Tensor:
    return _backend.kernel("upsample_field_fwd", backend)(coarse, list(size), align_corners)


@_upsample.register_fake
def _(coarse, size, align_corners, backend):
    return coarse.new_empty((coarse.shape[0], coarse.shape[1], *size))


@torch.library.custom_op("coopseg::upsample_field_backward", mutates_args=())
def _upsample_backward(grad_field: Tensor, coarse_size: Sequence[int], align_corners: bool,
                       backend: str) -> Tensor:
    return _backend.kernel("upsample_field_bwd", backend)(grad_field, list(coarse_size), align_corners)


@_upsample_backward.register_fake
def _(grad_field, coarse_size, align_corners, backend):
    return grad_field.new_empty((grad_field.shape[0], grad_field.shape[1], *coarse_size))


def _upsample_setup(ctx, inputs, output):
    coarse, _size, align_corners, backend = inputs
    ctx.args = (list(coarse.shape[2:]), align_corners, backend)


def _upsample_grad(ctx, grad_field):
    return _upsample_backward(grad_field.contiguous(), *ctx.args), None, None, None


_upsample.register_autograd(_upsample_grad, setup_context=_upsample_setup)


def _prepare(backend: str, moving: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous inputs; the (small) coarse grid cast to the math dtype (float32 for label maps,
    which only mode="nearest" takes and which the kernels read as they are)."""
    if moving.dtype.is_floating_point:
        _checks.kernel_dtype("moving", moving, backend, _backend.kernel_dtypes(backend))
    coarse = coarse.to(reference.math_dtype(moving.dtype))
    return moving.contiguous(), coarse.contiguous()


def warp(moving: Tensor, coarse: Tensor, *, align_corners: bool = True, padding_mode: str = "zeros",
         mode: str = "bilinear", upsample: str = "linear", control_origin=None, control_spacing=None,
         backend: str = "auto", deterministic: bool | None = None) -> Tensor:
    """Warp `moving` (B, C, *S) by the coarse displacement grid `coarse` (B, nd, *s).

    The grid is upsampled to S as F.interpolate(..., align_corners=align_corners)
    and each output voxel x samples `moving` at x + u(x) (voxel units, spatial-axis
    order) like F.grid_sample(align_corners=True, mode, padding_mode): mode "bilinear"
    (multilinear) or "nearest" (half to even), padding_mode "zeros", "border" or
    "reflection" (about the first and last voxel centres). With mode="nearest", integer
    and bool label maps are warped as they are (output in their dtype) and the field gets
    a zero gradient. The full-resolution field is never stored. Differentiable w.r.t. both inputs.
    A NaN displacement yields NaN at the voxels that use it (0 for label maps;
    docs/conventions.md#non-finite-values).

    upsample="bspline": `coarse` holds the control points of a uniform cubic B-spline (every
    s_k >= 4) placed at control_origin + j * control_spacing voxels (defaults: the domain of
    align_corners split into s_k - 3 intervals, one point beyond each end;
    docs/conventions.md#cubic-b-spline-control-grids), fused with the sampling in the same way.

    deterministic: the image gradient bitwise reproducible from run to run on CUDA (a gather
    per destination voxel instead of the atomic scatter; docs/kernels.md#image-gradient), for
    the linear and full-resolution paths; the B-spline Triton backward scatters atomically, so
    there deterministic=True with a moving image that requires grad raises a ValueError.
    None (default): PyTorch's switch, torch.are_deterministic_algorithms_enabled(), read at
    this call -- atomic by default as grid_sample's CUDA backward (MONAI, VoxelMorph), and
    deterministic under torch.use_deterministic_algorithms(True), where grid_sample raises.
    The CPU kernels are always deterministic.
    """
    nd = _checks.warp_inputs(moving, coarse, padding_mode, align_corners, mode)
    origin, spacing = _checks.upsample_args(upsample, coarse, nd, control_origin, control_spacing)
    deterministic = _checks.deterministic(deterministic)
    be = _backend.resolve(backend, moving.device)
    if upsample == "bspline":
        if deterministic and be == "triton" and moving.requires_grad and torch.is_grad_enabled():
            # refused rather than silently atomic (as grid_sample under torch.use_deterministic_algorithms)
            raise ValueError("deterministic=True (or torch.use_deterministic_algorithms(True)) is not available "
                             "for upsample='bspline' on the Triton backend when moving requires grad: its image "
                             "gradient is an atomic scatter; pass deterministic=False, detach moving, or warp "
                             "with the field: warp_dense(moving, upsample_field(coarse, size, "
                             "upsample='bspline', ...), deterministic=True)")
        origin, spacing = reference.bspline_geometry(moving.shape[2:], coarse.shape[2:], align_corners=align_corners,
                                                     control_origin=origin, control_spacing=spacing)
        return warp_bspline(moving, coarse, origin, spacing, padding_mode=padding_mode, mode=mode, backend=be)
    # a full-resolution field (coarse size == image size: upsampling is the identity) has its own kernels
    if be != "reference" and tuple(coarse.shape[2:]) == tuple(moving.shape[2:]):
        return warp_dense(moving, coarse, padding_mode=padding_mode, mode=mode, backend=be,
                          deterministic=deterministic)
    if be == "reference":
        return reference.warp(moving, coarse, align_corners=align_corners, padding_mode=padding_mode, mode=mode)
    moving, coarse_k = _prepare(be, moving, coarse)
    return _warp(moving, coarse_k, bool(align_corners), padding_mode, mode, be, deterministic)


def upsample_field(coarse: Tensor, size: Sequence[int], *, align_corners: bool = True, upsample: str = "linear",
                   control_origin=None, control_spacing=None, backend: str = "auto") -> Tensor:
    """Materialise the full-resolution displacement field (B, nd, *size) of a coarse grid
    (upsample="linear") or of cubic B-spline control points (upsample="bspline", as in `warp`)."""
    _checks.tensor("coarse", coarse)
    if coarse.dim() not in (4, 5):
        raise ValueError(f"coarse must be (B, 2, h, w) or (B, 3, d, h, w), got shape {tuple(coarse.shape)}")
    nd = coarse.dim() - 2
    _checks.coarse_field("coarse", coarse, nd)
    _checks.not_meta("coarse", coarse)
    _checks.flag("align_corners", align_corners)
    size = _checks.size("size", size, nd)
    origin, spacing = _checks.upsample_args(upsample, coarse, nd, control_origin, control_spacing)
    be = _backend.resolve(backend, coarse.device)
    if upsample == "bspline":
        origin, spacing = reference.bspline_geometry(size, coarse.shape[2:], align_corners=align_corners,
                                                     control_origin=origin, control_spacing=spacing)
        return upsample_bspline(coarse, size, origin, spacing, backend=be)
    if be == "reference":
        return reference.upsample_field(coarse, size, align_corners=align_corners)
    _checks.kernel_dtype("coarse", coarse, be, _backend.kernel_dtypes(be))
    dtype = coarse.dtype
    out = _upsample(coarse.to(reference.math_dtype(dtype)).contiguous(), list(size), bool(align_corners), be)
    return out.to(dtype)
