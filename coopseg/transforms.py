"""TorchIO's elastic deformation on coopseg's fused cubic B-spline warp.

`RandomElasticDeformation` and `ElasticDeformation` take TorchIO's constructor arguments and
give TorchIO's output (they subclass TorchIO's transforms, so they compose in `tio.Compose`,
honour `p`, `include`, `exclude`, `copy`, `keep` and the subject's history, and draw their
control points with the same calls to torch's generator as TorchIO's). Only the resampling
differs: instead of building a SimpleITK `BSplineTransform` and resampling every channel with
`sitk.Resample` on the CPU, the same transform (TorchIO's own code builds it) is converted to
control points in voxels (`coopseg_kernels.convert.bspline_from_sitk`) and applied with
`coopseg_kernels.warp(..., upsample="bspline")` on the tensor's device, all channels at once,
without a full-resolution field.

TorchIO's semantics, kept here:
- Each image uses its own affine (spacing, origin, direction): the grid of num_control_points
  is laid over the image by SimpleITK's BSplineTransformInitializer, max_displacement and
  control_points are in mm along the physical (LPS) axes.
- ScalarImages are resampled with image_interpolation, LabelMaps with label_interpolation;
  "linear" and "nearest" are supported (the others TorchIO accepts raise a ValueError).
- A sampled position outside the image (outside [-0.5, S - 0.5) voxels along an axis) takes the
  channel's minimum (TorchIO's default pixel value); inside, positions are clamped to the voxel
  centres (ITK's linear interpolator at the border).
- Every output is float32 (TorchIO's output pixel type), label maps included.
- locked_borders zeroes the first and last `locked_borders` control points along the first two
  axes of the grid only (TorchIO's get_params, used as it is).

Outputs equal TorchIO's to float32 rounding (tests/test_transforms.py): sampling positions are
computed in float32 (float64 for float64 images) where ITK uses float64; the inside test is
computed in float64, as ITK's.
"""
from __future__ import annotations

import math
from numbers import Number

import numpy as np
import torch

import coopseg_kernels as ck
from coopseg_kernels import convert, reference

try:
    import SimpleITK as sitk
    import torchio as tio
    from torchio.data.io import get_sitk_metadata_from_ras_affine
except ImportError as exc:  # torchio is optional: only this module needs it
    raise ImportError("coopseg.transforms needs torchio (and the SimpleITK it installs): pip install torchio") from exc

__all__ = ["ElasticDeformation", "RandomElasticDeformation"]

# TorchIO interpolation name -> warp mode
INTERPOLATIONS = {"linear": "bilinear", "nearest": "nearest"}
_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


class ElasticDeformation(tio.ElasticDeformation):
    """TorchIO's ElasticDeformation (same arguments) on the fused B-spline warp.

    Args:
        control_points: (n_x, n_y, n_z, 3) displacements in mm of the control grid, every n >= 4
            (TorchIO's layout: the grid of SimpleITK's BSplineTransformInitializer, mesh size n - 3).
        max_displacement: number or 3 numbers >= 0; all zero leaves the subject unchanged (and
            is used, as in TorchIO, only for that and for the folding warning).
        image_interpolation, label_interpolation: "linear" or "nearest".
        backend: coopseg_kernels backend ("auto": C++ on CPU tensors, Triton on CUDA tensors).
        **kwargs: TorchIO's Transform arguments (p, include, exclude, copy, keep, ...).
    """

    def __init__(self, control_points: np.ndarray, max_displacement, image_interpolation: str = "linear",
                 label_interpolation: str = "nearest", backend: str = "auto", **kwargs):
        control_points = _check_control_points(control_points)
        max_displacement = _check_triplet("max_displacement", max_displacement)
        _check_interpolation("image_interpolation", image_interpolation)
        _check_interpolation("label_interpolation", label_interpolation)
        _check_backend(backend)
        super().__init__(control_points, max_displacement, image_interpolation=image_interpolation,
                         label_interpolation=label_interpolation, **kwargs)
        self.backend = backend

    def apply_bspline_transform(self, tensor: torch.Tensor, affine: np.ndarray, interpolation: str) -> torch.Tensor:
        """One image (C, W, H, D) and its RAS affine -> the deformed image, float32, on its device."""
        reference = _reference_image(tuple(tensor.shape[1:]), affine)
        bspline = self.get_bspline_transform(reference)  # TorchIO's: inversion, 2-D, mesh size, parameters
        self.parse_free_form_transform(bspline, self.max_displacement)  # TorchIO's folding warning
        coarse, origin, spacing = convert.bspline_from_sitk(bspline, reference, dtype=torch.float64)
        # the array order (z, y, x) of bspline_from_sitk -> TorchIO's tensor order (x, y, z)
        coarse = coarse.flip(1).permute(0, 1, 4, 3, 2)
        return warp_like_itk(tensor, coarse, origin[::-1], spacing[::-1], mode=INTERPOLATIONS[interpolation],
                             backend=self.backend)


class RandomElasticDeformation(tio.RandomElasticDeformation):
    """TorchIO's RandomElasticDeformation (same arguments, same draws) on the fused B-spline warp.

    Args:
        num_control_points: int or 3 ints >= 4 (control points per axis, TorchIO's default 7).
        max_displacement: number or 3 numbers >= 0, mm (default 7.5); each control point's
            displacement along axis i is drawn from U(-max_displacement[i], max_displacement[i]).
        locked_borders: 0, 1 or 2 (default 2): the control points at the first/last
            `locked_borders` positions of the grid's first two axes do not move.
        image_interpolation, label_interpolation: "linear" (default for images) or "nearest"
            (default for label maps).
        backend: coopseg_kernels backend ("auto": C++ on CPU tensors, Triton on CUDA tensors).
        **kwargs: TorchIO's Transform arguments (p, include, exclude, copy, keep, ...).

    With the same torch seed it draws the same control points as TorchIO's transform.
    """

    def __init__(self, num_control_points=7, max_displacement=7.5, locked_borders: int = 2,
                 image_interpolation: str = "linear", label_interpolation: str = "nearest", backend: str = "auto",
                 **kwargs):
        num_control_points = _check_num_control_points(num_control_points)
        max_displacement = _check_triplet("max_displacement", max_displacement)
        if isinstance(locked_borders, bool) or locked_borders not in (0, 1, 2):
            raise ValueError(f"locked_borders must be 0, 1 or 2, got {locked_borders!r}")
        if locked_borders == 2 and 4 in num_control_points:
            raise ValueError(f"locked_borders=2 with 4 control points on an axis (num_control_points="
                             f"{num_control_points}) locks every control point: use locked_borders < 2 or more points")
        _check_interpolation("image_interpolation", image_interpolation)
        _check_interpolation("label_interpolation", label_interpolation)
        _check_backend(backend)
        super().__init__(num_control_points=num_control_points, max_displacement=max_displacement,
                         locked_borders=locked_borders, image_interpolation=image_interpolation,
                         label_interpolation=label_interpolation, **kwargs)
        self.backend = backend

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        subject.check_consistent_spatial_shape()
        control_points = self.get_params(self.num_control_points, self.max_displacement, self.num_locked_borders)
        transform = ElasticDeformation(control_points=control_points, max_displacement=self.max_displacement,
                                       image_interpolation=self.image_interpolation,
                                       label_interpolation=self.label_interpolation, backend=self.backend,
                                       **self._get_base_args())
        return transform(subject)


def warp_like_itk(tensor: torch.Tensor, coarse: torch.Tensor, origin, spacing, *, mode: str = "bilinear",
                  backend: str = "auto") -> torch.Tensor:
    """sitk.Resample of every channel of `tensor` (C, *S) by the B-spline grid `coarse` (1, nd, *s)
    (voxels, the axis order of `tensor`; geometry `origin`, `spacing` in voxels), as TorchIO calls it:
    linear ("bilinear") or nearest interpolation with positions clamped to the voxel centres, the
    channel's minimum where the position leaves [-0.5, S - 0.5) along any axis, float32 output.
    Size-1 axes (2-D images stored as (C, W, H, 1)) are folded into the grid first."""
    size = tuple(tensor.shape[1:])
    defaults = tensor.detach().flatten(1).min(1).values  # TorchIO: SetDefaultPixelValue(component.min())
    coarse = coarse.to(torch.float64)
    origin, spacing = list(origin), list(spacing)
    # fold size-1 axes: the field there is the B-spline at voxel 0 along them; keep their own
    # displacement component for the inside test
    flat_components = []
    for k in reversed(range(len(size))):
        if size[k] != 1:
            continue
        w = _weight_matrix(0, 1, coarse.shape[2 + k], origin[k], spacing[k])[0]
        coarse = torch.tensordot(coarse, w, dims=([2 + k], [0]))
        flat_components.append(coarse[:, k:k + 1])
        coarse = torch.cat([coarse[:, :k], coarse[:, k + 1:]], 1)
        del origin[k], spacing[k]
    keep = [k for k, n in enumerate(size) if n != 1]
    if len(keep) not in (2, 3):
        raise ValueError(f"the image must have 2 or 3 axes of size > 1 to be deformed, got spatial shape {size}")
    shape = tuple(size[k] for k in keep)
    x = tensor.reshape(tensor.shape[0], *shape)[None]
    if mode == "bilinear" and x.dtype != torch.float64:
        x = x.to(torch.float32)
    elif mode == "nearest" and not x.dtype.is_floating_point and x.dtype not in _LABEL_DTYPES:
        x = x.to(torch.int64)
    elif mode == "nearest" and x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    mdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    kw = dict(upsample="bspline", control_origin=tuple(origin), control_spacing=tuple(spacing), backend=backend)
    coarse_m = coarse.to(device=x.device, dtype=mdtype)
    out = ck.warp(x, coarse_m, mode=mode, padding_mode="border", **kw)[0].to(torch.float32)
    # the inside test in float64, as ITK's: in float32 a position within rounding of -0.5 or
    # S - 0.5 could land on the other side (one voxel in 8.4 M on the 1/16-grid benchmark)
    coarse = coarse.to(x.device)
    fill = defaults.to(out).view(-1, *(1,) * len(shape))
    regions = list(_outside_slabs(coarse, shape, origin, spacing))
    for c in flat_components:  # a size-1 axis: inside iff its displacement is in [-0.5, 0.5)
        if float(c.abs().max()) >= 0.5:
            u = _field_component(c[0, 0].to(x.device), [(0, n) for n in shape], origin, spacing)
            regions.append(((slice(None),) * len(shape), (u < -0.5) | (u >= 0.5)))
    for index, outside in regions:
        view = out[(slice(None), *index)]
        view.copy_(torch.where(outside, fill, view))
    return out.reshape(tensor.shape)


def _outside_slabs(coarse: torch.Tensor, shape, origin, spacing):
    """(index, bool mask) per slab at the faces: the voxels of out[:, index] whose sampled position
    leaves [-0.5, S - 0.5) along that slab's axis. Since the B-spline weights are >= 0 and sum to 1,
    |u_k| <= max |coarse_k|: only slabs of that thickness can leave, and only they are evaluated
    (u_k by separable contraction with per-axis weight matrices, float64)."""
    for k, n in enumerate(shape):
        reach = float(coarse[:, k].abs().max())
        if reach < 0.5:
            continue
        # x + u < -0.5 needs x < reach - 0.5; x + u >= n - 0.5 needs x >= n - 0.5 - reach
        low, high = min(n, math.ceil(reach - 0.5)), max(0, math.ceil(n - 0.5 - reach))
        slabs = [(0, n)] if low >= high else [(0, low), (high, n)]
        for start, stop in slabs:
            if stop <= start:
                continue
            ranges = [(start, stop) if a == k else (0, m) for a, m in enumerate(shape)]
            u = _field_component(coarse[0, k], ranges, origin, spacing)
            x = torch.arange(start, stop, dtype=u.dtype, device=u.device)
            x = x.view(*(1,) * k, stop - start, *(1,) * (len(shape) - k - 1))
            index = tuple(slice(a, b) for a, b in ranges)
            yield index, (u < -0.5 - x) | (u >= (n - 0.5) - x)


def _field_component(c: torch.Tensor, ranges, origin, spacing) -> torch.Tensor:
    """One displacement component of the B-spline grid `c` (*s), float64, at the voxels
    [a_k, b_k) of every axis: c contracted with one (b_k - a_k, s_k) weight matrix per axis."""
    u = c.to(torch.float64)
    for k, (a, b) in enumerate(ranges):
        w = _weight_matrix(a, b, c.shape[k], origin[k], spacing[k]).to(u.device)
        u = torch.movedim(torch.tensordot(u, w, dims=([k], [1])), -1, k)
    return u


def _weight_matrix(a: int, b: int, s: int, origin: float, spacing: float) -> torch.Tensor:
    """(b - a, s) cubic B-spline weights of the s control points at the voxels a .. b - 1: the taps
    of reference.bspline_axis_table (the kernels' spec) as a dense matrix, 0 beyond the grid."""
    first, w, valid = (t[a:] for t in reference.bspline_axis_table(b, s, origin, spacing))
    cols = first.unsqueeze(1) + torch.arange(4)
    rows = torch.arange(b - a).unsqueeze(1).expand(-1, 4)
    out = torch.zeros(b - a, s, dtype=torch.float64)
    out[rows[valid], cols[valid]] = w[valid]
    return out


def _reference_image(size, affine) -> sitk.Image:
    """A SimpleITK image with the size and geometry that TorchIO's nib_to_sitk(..., force_3d=True)
    gives an image of that shape and affine (uint8: only its header is used)."""
    image = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    origin, spacing, direction = get_sitk_metadata_from_ras_affine(np.asarray(affine, dtype=np.float64))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in ck.BACKENDS:
        raise ValueError(f"backend must be one of {ck.BACKENDS}, got {backend!r}")


def _check_interpolation(name: str, value) -> None:
    if not isinstance(value, str) or value.lower() not in INTERPOLATIONS:
        raise ValueError(f"{name} must be one of {tuple(INTERPOLATIONS)} (the interpolations the fused warp "
                         f"has), got {value!r}")


def _check_triplet(name: str, value) -> tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, Number) else value
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a number or 3 numbers, got {value!r}") from None
    if len(values) != 3 or not all(isinstance(v, Number) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be a number or 3 numbers, got {value!r}")
    if not all(np.isfinite(float(v)) and v >= 0 for v in values):
        raise ValueError(f"{name} must be finite and >= 0 (mm), got {value!r}")
    return tuple(float(v) for v in values)


def _check_num_control_points(value) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"num_control_points must be an int or 3 ints, got {value!r}") from None
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"num_control_points must be an int or 3 ints, got {value!r}")
    if min(values) < 4:
        raise ValueError(f"num_control_points must be >= 4 per axis (a cubic B-spline needs 4), got {value!r}")
    return tuple(int(v) for v in values)


def _check_control_points(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"control_points must be a numpy array (n_x, n_y, n_z, 3), got {type(value).__name__}")
    if value.ndim != 4 or value.shape[-1] != 3 or min(value.shape[:3]) < 4:
        raise ValueError(f"control_points must have shape (n_x, n_y, n_z, 3) with every n >= 4, got {value.shape}")
    if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
        raise ValueError("control_points must be finite numbers (displacements in mm)")
    return value
