"""Naive torch implementations: the executable spec of every op, the test
oracle and the benchmark baseline. Plain torch ops, autograd by torch."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from .convert import field_to_grid, identity_positions

_PAD_MODES = {"zeros": "constant", "replicate": "replicate", "reflect": "reflect"}

_MODES = {2: "bilinear", 3: "trilinear"}


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op computes in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upsample_field(coarse: torch.Tensor, size: Sequence[int], *, align_corners: bool = True,
                   upsample: str = "linear", control_origin=None, control_spacing=None) -> torch.Tensor:
    """Coarse displacement grid (B, nd, *s) -> full-resolution field (B, nd, *size), voxel units.

    upsample="linear": F.interpolate(mode="bilinear"/"trilinear", align_corners=align_corners).
    upsample="bspline": the uniform cubic B-spline of the control points (every s_k >= 4) placed by
    `bspline_geometry` (control_origin / control_spacing, or the defaults of align_corners); see
    `bspline_upsample`."""
    if upsample == "bspline":
        origin, spacing = bspline_geometry(size, coarse.shape[2:], align_corners=align_corners,
                                           control_origin=control_origin, control_spacing=control_spacing)
        return bspline_upsample(coarse, size, origin, spacing)
    return F.interpolate(coarse, size=tuple(size), mode=_MODES[coarse.dim() - 2], align_corners=align_corners)


# ----------------------------------------------------------------------------- cubic B-spline (FFD)
# The spec of upsample="bspline" (docs/conventions.md#cubic-b-spline-control-grids). The compiled
# kernels compute the per-axis tables of `bspline_axis_table` in float64 exactly as here.

BSPLINE_MIN_SIZE = 4  # control points per axis: one interval needs 4 (one beyond each end)


def _per_axis(value, nd: int) -> tuple[float, ...]:
    if isinstance(value, numbers.Real):
        return (float(value),) * nd
    return tuple(float(v) for v in value)


def bspline_geometry(size: Sequence[int], coarse_size: Sequence[int], *, align_corners: bool = True,
                     control_origin=None, control_spacing=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing) per spatial axis, in voxel coordinates: control point j of axis k sits at
    origin[k] + j * spacing[k].

    Defaults: the domain [0, S_k - 1] (align_corners=True) or [-0.5, S_k - 0.5] (align_corners=False)
    is split into s_k - 3 equal intervals of length h_k, with one control point beyond each end:
    spacing = h_k, origin = domain start - spacing. control_origin / control_spacing (a float, or one
    per axis) override them; an explicit spacing alone keeps the one-point margin (origin = domain
    start - spacing)."""
    nd = len(size)
    spacing = []
    starts = []
    for S, s in zip(size, coarse_size):
        start, end = (0.0, S - 1.0) if align_corners else (-0.5, S - 0.5)
        starts.append(start)
        spacing.append((end - start) / (s - 3))
    if control_spacing is not None:
        spacing = list(_per_axis(control_spacing, nd))
    origin = [a - h for a, h in zip(starts, spacing)]
    if control_origin is not None:
        origin = list(_per_axis(control_origin, nd))
    return tuple(origin), tuple(spacing)


def bspline_weights(t: torch.Tensor) -> torch.Tensor:
    """(..., 4) uniform cubic B-spline weights of the control points i - 1, i, i + 1, i + 2 at the
    fraction t in [0, 1) (ITK's BSplineKernelFunction of order 3); they sum to 1."""
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    return torch.stack([s * s * s / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
                        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t3 / 6.0], -1)


def bspline_axis_table(S: int, n: int, origin: float, spacing: float,
                       device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The B-spline taps of one axis: for each voxel x in [0, S), u = (x - origin) / spacing
    (float64), clamped to [-3, n + 2] (beyond, no tap lies in the array either way), i = floor(u),
    t = u - i; returns (first, weights, valid): first = i - 1 (int64, (S,)), the float64 weights
    (S, 4) of the control points first .. first + 3, and which of them lie in [0, n) (a point
    beyond the array contributes 0)."""
    x = torch.arange(S, dtype=torch.float64, device=device)
    u = ((x - origin) / spacing).clamp(-3.0, n + 2.0)
    i = u.floor()
    w = bspline_weights(u - i)
    first = i.long() - 1
    idx = first.unsqueeze(1) + torch.arange(4, device=device)
    return first, w, (idx >= 0) & (idx < n)


def bspline_upsample(coarse: torch.Tensor, size: Sequence[int], origin: Sequence[float],
                     spacing: Sequence[float]) -> torch.Tensor:
    """The cubic B-spline field (B, nd, *size) of the control points `coarse` (B, nd, *s) at the
    given geometry: u(x) = sum over m in {-1, 0, 1, 2}^nd of prod_k B_{m_k}(t_k) coarse[i + m],
    computed as one 4-tap gather per axis in coarse's dtype (weights rounded to it). A control
    point beyond the array contributes 0; a non-finite one makes the field non-finite at every
    voxel whose 4^nd support holds it, weight 0 included (0 * NaN)."""
    f = coarse
    for k, S in enumerate(size):
        ax = k + 2
        n = f.shape[ax]
        first, w, valid = bspline_axis_table(int(S), n, origin[k], spacing[k], device=coarse.device)
        w = w.to(coarse.dtype)
        shape = [1] * f.dim()
        shape[ax] = int(S)
        acc = None
        for m in range(4):
            taps = f.index_select(ax, (first + m).clamp(0, n - 1))
            term = torch.where(valid[:, m].view(shape), taps * w[:, m].view(shape), 0.0)
            acc = term if acc is None else acc + term
        f = acc
    return f


def warp(moving: torch.Tensor, coarse: torch.Tensor, *, align_corners: bool = True,
         padding_mode: str = "zeros", mode: str = "bilinear", upsample: str = "linear",
         control_origin=None, control_spacing=None) -> torch.Tensor:
    """Sample `moving` at voxel + upsampled displacement, as F.grid_sample(align_corners=True,
    mode, padding_mode) in voxel coordinates.

    mode="bilinear": multilinear (through grid_sample). padding_mode "zeros" (taps outside read 0),
    "border" (position clamped to [0, n - 1]) or "reflection" (position reflected about the first
    and last voxel centres, then clamped). Math in float32 (float64 for float64 images); the
    result has the image's dtype.

    mode="nearest": the voxel nearest to the (padded) position, half to even (grid_sample's
    nearbyint), see `warp_nearest`. Integer and bool images are warped as they are.

    Non-finite displacements (docs/conventions.md#non-finite-values): a voxel whose displacement is
    NaN or infinite comes out NaN, adds nothing to the image gradient and gives a
    NaN gradient to its displacement (so to the coarse nodes it interpolates from).
    grid_sample itself is only ever given finite coordinates: such voxels sample
    at displacement 0 and are overwritten. Besides defining the rule, this guards
    against torch 2.13's grid_sample backward, which crashes the process
    (segfault) on a NaN grid with padding_mode="border".

    upsample="bspline": the field is the cubic B-spline of the control points (`upsample_field`,
    geometry `bspline_geometry`); a non-finite control point makes NaN every voxel whose 4^nd
    support holds it. Sampling, modes, padding and the rules above are the same."""
    geometry = dict(upsample=upsample, control_origin=control_origin, control_spacing=control_spacing)
    if mode == "nearest":
        return warp_nearest(moving, coarse, align_corners=align_corners, padding_mode=padding_mode, **geometry)
    dtype = math_dtype(moving.dtype)
    field, bad = _field_and_bad(coarse, moving.shape[2:], dtype, align_corners, geometry)
    if bad.any():
        if field.requires_grad:
            field.register_hook(lambda g: g.masked_fill(bad.expand_as(g), float("nan")))
        field = field.masked_fill(bad.expand_as(field), 0.0)
    grid = field_to_grid(field, align_corners=True)
    out = F.grid_sample(moving.to(dtype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    out = out.masked_fill(bad.expand_as(out), float("nan"))
    return out.to(moving.dtype)


def pad_position(p: torch.Tensor, n: int, padding_mode: str) -> torch.Tensor:
    """A position along an axis of n voxels after the padding rule of grid_sample(align_corners=True):
    "zeros" as it is, "border" clamped to [0, n - 1], "reflection" reflected about 0 and n - 1
    (|p| modulo 2(n - 1), folded back: exact in floating point), then clamped."""
    if padding_mode == "border":
        return p.clamp(0, n - 1)
    if padding_mode == "reflection":
        span2 = 2.0 * (n - 1)
        extra = torch.fmod(p.abs(), span2)
        return torch.minimum(extra, span2 - extra).clamp(0, n - 1)
    return p


class _NoFieldGrad(torch.autograd.Function):
    """Identity on `out` whose gradient w.r.t. `coarse` is zeros: nearest sampling is
    piecewise constant in the position."""

    @staticmethod
    def forward(ctx, out, coarse):
        ctx.coarse = (coarse.shape, coarse.dtype, coarse.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.coarse
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def warp_nearest(moving: torch.Tensor, coarse: torch.Tensor, *, align_corners: bool = True,
                 padding_mode: str = "zeros", upsample: str = "linear", control_origin=None,
                 control_spacing=None) -> torch.Tensor:
    """Nearest-voxel warp, the spec of mode="nearest" (F.grid_sample(mode="nearest",
    align_corners=True) in voxel coordinates): the position p = x + u(x) (u upsampled in the
    math dtype, float32 for integer and bool images) goes through `pad_position`, is rounded
    half to even, and the voxel there is read; with "zeros" a rounded index outside the image
    reads 0. Any dtype (integer and bool images included) comes out in its own dtype.

    Gradients: the image gradient is the scatter of grad_out to the voxels read; the field
    gradient is zero. A voxel whose displacement is not finite (docs/conventions.md#non-finite-values)
    comes out NaN for floating images and 0 (False) for integer and bool images, and adds
    nothing to the image gradient."""
    size = moving.shape[2:]
    B, C = moving.shape[0], moving.shape[1]
    dtype = math_dtype(moving.dtype)
    geometry = dict(upsample=upsample, control_origin=control_origin, control_spacing=control_spacing)
    field, bad = _field_and_bad(coarse.detach(), size, dtype, align_corners, geometry)
    bad = bad[:, 0]
    pos = identity_positions(size, dtype, moving.device).unsqueeze(0) + field.masked_fill(bad.unsqueeze(1), 0.0)
    inside = ~bad
    flat = torch.zeros_like(bad, dtype=torch.long)
    for k, n in enumerate(size):
        r = torch.round(pad_position(pos[:, k], n, padding_mode))  # half to even, as nearbyint
        inside &= (r >= 0) & (r <= n - 1)
        flat = flat * n + r.clamp(0, n - 1).long()
    flat = flat.masked_fill(~inside, 0).view(B, 1, -1).expand(B, C, -1)
    out = moving.flatten(2).gather(2, flat).view(moving.shape)
    out = out.masked_fill(~inside.unsqueeze(1), 0)
    if moving.dtype.is_floating_point:
        out = out.masked_fill(bad.unsqueeze(1), float("nan"))
        if coarse.requires_grad and torch.is_grad_enabled():
            out = _NoFieldGrad.apply(out, coarse)
    return out


def _field_and_bad(coarse: torch.Tensor, size: Sequence[int], dtype: torch.dtype, align_corners: bool,
                   geometry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The upsampled field in `dtype` and the (B, 1, *S) voxels whose displacement is not finite:
    per cell for "linear" (`_cells_with_nonfinite_node`); for "bspline" the 4-tap gathers spread a
    non-finite point over its support by themselves (0 * NaN is NaN)."""
    field = upsample_field(coarse.to(dtype), size, align_corners=align_corners, **geometry)
    bad = ~field.isfinite().all(1, keepdim=True)
    if geometry["upsample"] != "bspline":
        bad = bad | _cells_with_nonfinite_node(coarse, size, align_corners)
    return field, bad


def _cells_with_nonfinite_node(coarse: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """(B, 1, *S) bool: voxels of a coarse cell with a non-finite node among its
    2^nd corners. Interpolation forms 0 * node there too (0 * inf = NaN), so such
    a voxel's displacement is not finite even where the node's weight is 0 --
    except that F.interpolate copies an axis whose coarse and fine sizes are equal
    (align_corners=True) and so sometimes skips that product; the rule is the
    arithmetic's, stated per cell (docs/conventions.md#non-finite-values)."""
    node_bad = ~coarse.isfinite().all(1)  # (B, *s)
    if not node_bad.any():
        return torch.zeros((coarse.shape[0], 1, *size), dtype=torch.bool, device=coarse.device)
    dtype = math_dtype(coarse.dtype)
    t = node_bad
    for k, (S, n) in enumerate(zip(size, coarse.shape[2:])):
        x = torch.arange(S, dtype=dtype, device=coarse.device)
        if align_corners:  # the index arithmetic of F.interpolate, in the math dtype
            src = x * (torch.tensor(float(n - 1), dtype=dtype) / (S - 1) if S > 1 else torch.tensor(0.0, dtype=dtype))
        else:
            src = (torch.tensor(float(n), dtype=dtype) / S * (x + 0.5) - 0.5).clamp_min(0)
        i0 = src.floor().clamp_max(n - 1).long()
        i1 = (i0 + 1).clamp_max(n - 1)
        t = t.index_select(k + 1, i0) | t.index_select(k + 1, i1)
    return t.unsqueeze(1)


def normalized_kernel(kernel) -> list[float]:
    """The 1-D blur kernel scaled to sum 1 (float64 arithmetic)."""
    k = [float(v) for v in kernel]
    total = sum(k)
    return [v / total for v in k]


def blur(x: torch.Tensor, *, kernel=(1.0, 2.0, 1.0), boundary: str = "zeros") -> torch.Tensor:
    """Separable blur: correlation with the normalised 1-D kernel along every
    spatial axis, as depthwise convolutions of the F.pad-ed input."""
    nd = x.dim() - 2
    C = x.shape[1]
    k = torch.tensor(normalized_kernel(kernel), dtype=math_dtype(x.dtype), device=x.device)
    r = len(k) // 2
    conv = F.conv2d if nd == 2 else F.conv3d
    y = x.to(k.dtype)
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = len(k)
        weight = k.view(1, 1, *shape).expand(C, 1, *shape).contiguous()
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = r
        y = conv(F.pad(y, pad, mode=_PAD_MODES[boundary]), weight, groups=C)
    return y.to(x.dtype)


def blur_adjoint(y: torch.Tensor, *, kernel=(1.0, 2.0, 1.0), boundary: str = "zeros") -> torch.Tensor:
    """The adjoint of `blur` (the map its backward applies), by autograd through it."""
    x = torch.zeros_like(y, requires_grad=True)  # blur is linear: the point does not matter
    with torch.enable_grad():
        return torch.autograd.grad(blur(x, kernel=kernel, boundary=boundary), x, y, create_graph=y.requires_grad)[0]


def similarity_step(s1_blurred: torch.Tensor, s2_blurred: torch.Tensor, coarse: torch.Tensor, *,
                    align_corners: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One D_S optimizer step's loss mean((tau(s1b) - s2b)^2) per batch item and
    its gradient w.r.t. the coarse grid tau, by autograd through `warp`."""
    dtype = math_dtype(s1_blurred.dtype)
    c = coarse.detach().to(dtype).requires_grad_()
    with torch.enable_grad():
        out = warp(s1_blurred.to(dtype), c, align_corners=align_corners, padding_mode="zeros")
        loss = (out - s2_blurred.to(dtype)).square().flatten(1).mean(1)
        (grad,) = torch.autograd.grad(loss.sum(), c)
    return loss.detach(), grad
