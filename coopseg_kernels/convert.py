"""Converters between voxel displacement fields and F.grid_sample grids.

A displacement field (B, nd, *S) holds, per voxel, the displacement in voxels
along (d, h, w) / (h, w). grid_sample takes absolute positions normalised to
[-1, 1] in reversed (x, y, z) = (w, h, d) order, shape (B, *S, nd):
  align_corners=True:  g = 2 p / (S - 1) - 1
  align_corners=False: g = (2 p + 1) / S - 1
where p = voxel index + displacement.

Cubic B-spline control grids (warp/upsample_field with upsample="bspline") and ITK:
ITK describes a B-spline grid by its mesh size M (intervals per axis); the grid has
s = M + 3 control points per axis (TorchIO's num_control_points). `itk_bspline_geometry`
gives the control_origin / control_spacing (voxels) of the grid that SimpleITK's
BSplineTransformInitializer lays over an image, `bspline_from_sitk` turns a SimpleITK
BSplineTransform into (coarse, control_origin, control_spacing) for that image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import _checks


def identity_positions(size, dtype=torch.float32, device=None) -> torch.Tensor:
    """(nd, *size) voxel coordinates of every voxel, in spatial-axis order."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _scale_offset(size, align_corners, like):
    shape = (1, len(size)) + (1,) * len(size)
    S = torch.tensor([float(n) for n in size], dtype=like.dtype, device=like.device).view(shape)
    if align_corners:
        return 2.0 / (S - 1), -1.0, S
    return 2.0 / S, 1.0 / S - 1.0, S


def field_to_grid(field: torch.Tensor, *, align_corners: bool = True) -> torch.Tensor:
    """Voxel displacement field (B, nd, *S) -> grid_sample grid (B, *S, nd)."""
    nd = _checks.image("field", field)
    if field.shape[1] != nd:
        raise ValueError(f"field must have {nd} channels, got shape {tuple(field.shape)}")
    size = field.shape[2:]
    scale, offset, _ = _scale_offset(size, align_corners, field)
    pos = identity_positions(size, field.dtype, field.device).unsqueeze(0) + field
    grid = pos * scale + offset
    return grid.flip(1).movedim(1, -1)


def grid_to_field(grid: torch.Tensor, *, align_corners: bool = True) -> torch.Tensor:
    """grid_sample grid (B, *S, nd) -> voxel displacement field (B, nd, *S)."""
    _checks.tensor("grid", grid)
    if grid.dim() not in (4, 5) or grid.shape[-1] != grid.dim() - 2:
        raise ValueError(f"grid must be (B, H, W, 2) or (B, D, H, W, 3), got shape {tuple(grid.shape)}")
    size = grid.shape[1:-1]
    if min(size) < 2:
        raise ValueError(f"grid spatial sizes must be >= 2, got shape {tuple(grid.shape)}")
    g = grid.movedim(-1, 1).flip(1)
    scale, offset, _ = _scale_offset(size, align_corners, g)
    pos = (g - offset) / scale
    return pos - identity_positions(size, grid.dtype, grid.device).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# ITK / SimpleITK B-spline transforms

ITK_SPLINE_ORDER = 3
# BSplineTransformInitializer widens the image's extent [-0.5, S - 0.5] (voxel centres at
# 0 .. S - 1) by 1/8 voxel at both ends: the transform domain is [-0.625, S - 0.375].
ITK_DOMAIN_EPSILON = 0.125


def itk_mesh_size(num_control_points: Sequence[int]) -> tuple[int, ...]:
    """ITK mesh size M (B-spline intervals per axis) of a grid of s = M + 3 control points per axis."""
    s = _int_sequence("num_control_points", num_control_points)
    if min(s) < ITK_SPLINE_ORDER + 1:
        raise ValueError(f"num_control_points must be >= 4 per axis (a cubic B-spline needs 4), got {s}")
    return tuple(n - ITK_SPLINE_ORDER for n in s)


def itk_num_control_points(mesh_size: Sequence[int]) -> tuple[int, ...]:
    """Control points per axis, s = M + 3, of an ITK mesh size M (intervals per axis)."""
    m = _int_sequence("mesh_size", mesh_size)
    if min(m) < 1:
        raise ValueError(f"mesh_size must be >= 1 per axis, got {m}")
    return tuple(n + ITK_SPLINE_ORDER for n in m)


def itk_bspline_geometry(size: Sequence[int], mesh_size: Sequence[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(control_origin, control_spacing) in voxels, per axis of `size`, of the grid that
    SimpleITK's BSplineTransformInitializer(image, mesh_size) lays over an image of `size`
    voxels (same axis order as `size`): the domain [-0.625, S - 0.375] split into M intervals
    of h = (S + 0.25) / M voxels, control point j at -0.625 + (j - 1) h. (The initializer computes
    the domain's corners in float32: its grid differs from this one by ~1e-7 relative; use
    bspline_from_sitk on its transform for ITK's grid exactly.)

    This holds along every image axis that the initializer's grid follows; with a direction
    matrix that permutes or flips axes the initializer assigns the mesh sizes to the physical
    axes instead (bspline_from_sitk handles any such transform)."""
    S = _int_sequence("size", size)
    m = _int_sequence("mesh_size", mesh_size)
    if len(m) != len(S):
        raise ValueError(f"mesh_size must have one entry per axis of size {S}, got {m}")
    if min(S) < 1 or min(m) < 1:
        raise ValueError(f"size and mesh_size must be >= 1 per axis, got size {S}, mesh_size {m}")
    spacing = tuple((n + 2 * ITK_DOMAIN_EPSILON) / k for n, k in zip(S, m))
    origin = tuple(-0.5 - ITK_DOMAIN_EPSILON - h for h in spacing)
    return origin, spacing


def bspline_from_sitk(transform, image, *, dtype: torch.dtype = torch.float32,
                      device=None) -> tuple[torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """A SimpleITK cubic BSplineTransform, applied to `image` (a SimpleITK image: its size,
    spacing, origin and direction), as the arguments of
    warp(..., upsample="bspline", control_origin=..., control_spacing=...).

    Returns (coarse, control_origin, control_spacing): coarse (1, nd, *s) control-point
    displacements in voxels of `image`, in the spatial-axis order of the array
    sitk.GetArrayFromImage(image) (d, h, w) = (z, y, x), and the grid geometry in voxels, in the
    same order. Then, for `moving = torch.from_numpy(sitk.GetArrayFromImage(image))[None, None]`,
    warp(moving, coarse, upsample="bspline", control_origin=..., control_spacing=...,
    padding_mode="border") equals sitk.Resample(image, transform, sitk.sitkLinear) wherever the
    sampled position lies in [-0.5, S - 0.5) voxels along every axis (ITK's inside test;
    outside it ITK writes its default pixel value).

    ITK's parameters are physical displacements (mm, along the physical x, y, z axes) on a
    grid with its own origin, spacing and direction. They are mapped to the image's voxel axes
    with the inverse of direction @ diag(spacing); the grid's axes must then run along the
    image's axes (any permutation and flip, as BSplineTransformInitializer's grids do for every
    direction matrix), otherwise a ValueError. The grid's domain must cover the image
    (ITK leaves a point outside its domain unmoved, which a control grid cannot express)."""
    name = _call(transform, "GetName", "transform")
    if name != "BSplineTransform":
        raise TypeError(f"transform must be a SimpleITK BSplineTransform, got a {name}")
    if _call(transform, "GetOrder", "transform") != ITK_SPLINE_ORDER:
        raise ValueError(f"transform must be a cubic B-spline (order 3), got order {transform.GetOrder()}")
    size = tuple(int(n) for n in _call(image, "GetSize", "image"))
    nd = len(size)
    if nd not in (2, 3) or _call(image, "GetDimension", "image") != nd:
        raise ValueError(f"image must be a 2-D or 3-D SimpleITK image, got size {size}")
    if transform.GetDimension() != nd:
        raise ValueError(f"transform is {transform.GetDimension()}-D but image is {nd}-D")

    # fixed parameters: grid size, grid origin, grid spacing, grid direction (row-major)
    fixed = np.asarray(transform.GetFixedParameters(), dtype=np.float64)
    shape = tuple(int(round(n)) for n in fixed[:nd])
    g_origin, g_spacing = fixed[nd:2 * nd], fixed[2 * nd:3 * nd]
    g_direction = fixed[3 * nd:3 * nd + nd * nd].reshape(nd, nd)
    # parameters: one block per physical displacement component, x fastest within a block
    params = np.asarray(transform.GetParameters(), dtype=np.float64)
    grid = params.reshape(nd, *shape[::-1]).transpose(0, *range(nd, 0, -1))  # (component, gx, gy, ...)
    A = np.asarray(image.GetDirection(), dtype=np.float64).reshape(nd, nd) @ np.diag(image.GetSpacing())
    G = g_direction @ np.diag(g_spacing)
    A_inv = np.linalg.inv(A)
    M = A_inv @ G  # grid index -> image voxel (linear part)
    o = A_inv @ (g_origin - np.asarray(image.GetOrigin(), dtype=np.float64))
    # which grid axis runs along each image axis
    axis_of = [int(np.argmax(np.abs(M[k]))) for k in range(nd)]
    if sorted(axis_of) != list(range(nd)) or any(
            abs(M[k, g]) > 1e-6 * abs(M[k, axis_of[k]]) for k in range(nd) for g in range(nd) if g != axis_of[k]):
        raise ValueError("the transform's control grid is oblique to the image's voxel axes (grid index -> voxel "
                         f"matrix {np.round(M, 6).tolist()}); only grids along the image axes (permuted or flipped) "
                         "can be converted")
    vox = np.tensordot(A_inv, grid, axes=(1, 0))  # voxel displacements along the image axes (x, y, ...)
    vox = vox.transpose(0, *[1 + g for g in axis_of])  # grid axes in image-axis order
    origin, spacing = [], []
    for k, g in enumerate(axis_of):
        step, n = M[k, g], vox.shape[1 + k]
        if step < 0:
            vox = np.flip(vox, 1 + k)
            origin.append(float(o[k] + step * (n - 1)))
        else:
            origin.append(float(o[k]))
        spacing.append(float(abs(step)))
    for k in range(nd):
        lo, hi = origin[k] + spacing[k], origin[k] + spacing[k] * (vox.shape[1 + k] - 2)
        if lo > 1e-9 or hi < size[k] - 1 - 1e-9:
            raise ValueError(f"the transform's domain [{lo:.6g}, {hi:.6g}] (voxels along image axis {k}) does not "
                             f"cover the image's voxels [0, {size[k] - 1}]: ITK leaves points outside its domain "
                             "unmoved, which a control grid cannot express")
    # image-axis order (x, y, z) -> spatial-axis order of the array (z, y, x)
    vox = np.flip(vox, 0).transpose(0, *range(nd, 0, -1))
    coarse = torch.from_numpy(np.ascontiguousarray(vox)).to(dtype=dtype, device=device).unsqueeze(0)
    return coarse, tuple(origin[::-1]), tuple(spacing[::-1])


def _call(obj, method: str, name: str):
    if not callable(getattr(obj, method, None)):
        raise TypeError(f"{name} must be a SimpleITK object with {method}(), got {type(obj).__name__}")
    return getattr(obj, method)()


def _int_sequence(name: str, value) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}") from None
    if not out or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in out):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    return tuple(int(n) for n in out)
