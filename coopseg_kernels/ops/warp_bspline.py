"""warp / upsample_field with upsample="bspline": the cubic B-spline free-form deformation,
dispatched on the backend. The geometry (origin, spacing per axis, voxel coordinates) is
resolved by the caller (reference.bspline_geometry); the inputs are checked there too."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .. import reference


def warp_bspline(moving: Tensor, coarse: Tensor, origin: Sequence[float], spacing: Sequence[float], *,
                 padding_mode: str = "zeros", mode: str = "bilinear", backend: str = "reference") -> Tensor:
    """`moving` sampled at x + u(x), u the cubic B-spline of the control points `coarse` placed at
    origin + j * spacing (reference.warp(upsample="bspline"))."""
    return reference.warp(moving, coarse, padding_mode=padding_mode, mode=mode, upsample="bspline",
                          control_origin=origin, control_spacing=spacing)


def upsample_bspline(coarse: Tensor, size: Sequence[int], origin: Sequence[float], spacing: Sequence[float], *,
                     backend: str = "reference") -> Tensor:
    """The full-resolution cubic B-spline field (B, nd, *size) of the control points `coarse`."""
    dtype = reference.math_dtype(coarse.dtype)
    return reference.bspline_upsample(coarse.to(dtype), size, origin, spacing).to(coarse.dtype)
