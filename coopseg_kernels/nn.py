"""Modules: drop-ins for MONAI's `Warp` and VoxelMorph's `SpatialTransformer`, and `CoarseWarp`.

- `Warp(mode="bilinear", padding_mode="border", jitter=False)`: the constructor and
  `forward(image, ddf)` of `monai.networks.blocks.Warp` (MONAI's defaults): `ddf` is the
  full-resolution displacement field (B, nd, *S) in voxels, channels in spatial-axis order
  (MONAI's order, which is coopseg's).
- `SpatialTransformer(interpolation_mode="linear", align_corners=True, device=None)`: the
  constructor and `forward(moving_image, deformation_field)` of VoxelMorph 0.3.4's PyTorch
  `voxelmorph.nn.modules.SpatialTransformer` (zeros padding, the field in voxels, channels
  in spatial-axis order).
- `CoarseWarp(mode="bilinear", padding_mode="zeros", align_corners=True)`: `forward(image,
  coarse)` = `coopseg_kernels.warp` (a coarse grid upsampled inside the kernel).

Each takes a keyword-only `backend` ("auto" | "cpp" | "triton" | "reference") and
`deterministic` (None | True | False: the CUDA image gradient bitwise reproducible; None
follows torch.are_deterministic_algorithms_enabled(), see `coopseg_kernels.warp`). A full-
resolution field goes to the dense kernels (ops/warp_dense.py): same results as
F.grid_sample(align_corners=True) to rounding, nearest label maps bit-exact, and with
mode="nearest" integer and bool label maps are warped in their own dtype. See
docs/kernels.md#full-resolution-fields.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .ops.warp import warp
from .ops.warp_dense import warp_dense

__all__ = ["Warp", "SpatialTransformer", "CoarseWarp"]

_MONAI_MODES = ("bilinear", "nearest", "bicubic")
_PADDINGS = ("zeros", "border", "reflection")


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


class Warp(torch.nn.Module):
    """Warp an image with a dense displacement field (DDF), as monai.networks.blocks.Warp.

    mode: "bilinear" | "nearest" (the fused kernels) | "bicubic" (MONAI's own path through
    F.grid_sample, unchanged). padding_mode: "zeros" | "border" | "reflection".
    jitter: as MONAI, the reference grid moved by uniform [0, 1) offsets drawn with seed 0.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "border", jitter: bool = False, *,
                 backend: str = "auto", deterministic: bool | None = None):
        super().__init__()
        self.deterministic = _checks.deterministic_option(deterministic)
        self.mode = _choice("mode", mode, _MONAI_MODES)
        self.padding_mode = _choice("padding_mode", padding_mode, _PADDINGS)
        if not isinstance(jitter, bool):
            raise TypeError(f"jitter must be True or False, got {jitter!r}")
        self.jitter = jitter
        self.backend = backend
        self._jitter_offsets = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, jitter={self.jitter}"

    def _offsets(self, ddf: Tensor) -> Tensor:
        """MONAI's jitter: torch.rand of the reference grid's shape after manual_seed(0), cached."""
        o = self._jitter_offsets
        if o is None or o.shape != ddf.shape or o.dtype != ddf.dtype or o.device != ddf.device:
            with torch.random.fork_rng(devices=[ddf.device] if ddf.device.type == "cuda" else []):
                torch.random.manual_seed(0)
                o = torch.rand(ddf.shape, dtype=ddf.dtype, device=ddf.device)
            self._jitter_offsets = o
        return o

    def forward(self, image: Tensor, ddf: Tensor) -> Tensor:
        """image (B, C, H, W[, D]), ddf (B, spatial_dims, H, W[, D]) -> warped image (B, C, H, W[, D])."""
        spatial_dims = len(image.shape) - 2
        if spatial_dims not in (2, 3):
            raise NotImplementedError(f"got unsupported spatial_dims={spatial_dims}, currently support 2 or 3.")
        ddf_shape = (image.shape[0], spatial_dims) + tuple(image.shape[2:])
        if ddf.shape != ddf_shape:
            raise ValueError(f"Given input {spatial_dims}-d image shape {image.shape}, the input DDF shape must be "
                             f"{ddf_shape}, Got {ddf.shape} instead.")
        if self.jitter:
            ddf = ddf + self._offsets(ddf)
        if self.mode == "bicubic":
            return _grid_sample_voxels(image, ddf, "bicubic", self.padding_mode, True)
        return warp_dense(image, ddf, padding_mode=self.padding_mode, mode=self.mode, backend=self.backend,
                          deterministic=self.deterministic)


class SpatialTransformer(torch.nn.Module):
    """N-D spatial transformation by a deformation field, as VoxelMorph 0.3.4's SpatialTransformer.

    interpolation_mode: "linear" (also "bilinear"/"trilinear") or "nearest". align_corners:
    as VoxelMorph, positions are normalised with align_corners=True's scale and grid_sample
    reads them with `align_corners` (False samples at (x + u) * S / (S - 1) - 0.5 per axis).
    Padding zeros. Integer images: "nearest" keeps their dtype, "linear" returns float32
    (VoxelMorph's casts). device: deprecated in VoxelMorph, ignored.
    """

    def __init__(self, interpolation_mode: str = "linear", align_corners: bool = True, device=None, *,
                 backend: str = "auto", deterministic: bool | None = None):
        super().__init__()
        self.deterministic = _checks.deterministic_option(deterministic)
        self.interpolation_mode = _choice("interpolation_mode", interpolation_mode,
                                          ("linear", "bilinear", "trilinear", "nearest"))
        if not isinstance(align_corners, bool):
            raise TypeError(f"align_corners must be True or False, got {align_corners!r}")
        self.align_corners = align_corners
        self.backend = backend

    def extra_repr(self) -> str:
        return f"interpolation_mode={self.interpolation_mode!r}, align_corners={self.align_corners}"

    def forward(self, moving_image: Tensor, deformation_field: Tensor) -> Tensor:
        """moving_image (B, C, *S), deformation_field (B, ndim, *S) in voxels -> (B, C, *S)."""
        if moving_image.dim() < 4:
            raise ValueError(f"moving_image must have >=4 dims (B,C,*spatial), got {tuple(moving_image.shape)}")
        if deformation_field.dim() != moving_image.dim():
            raise ValueError(f"dim mismatch: moving={moving_image.dim()}, field={deformation_field.dim()}")
        mode = "nearest" if self.interpolation_mode == "nearest" else "bilinear"
        if mode == "bilinear" and not moving_image.dtype.is_floating_point:
            moving_image = moving_image.to(torch.float32)
        ddf = deformation_field
        if not self.align_corners:
            # grid_sample(align_corners=False) on coordinates normalised for align_corners=True
            shape = moving_image.shape[2:]
            nd = len(shape)
            dtype = ddf.dtype if ddf.dtype.is_floating_point else torch.float32
            parts = []
            for k, n in enumerate(shape):
                x = torch.arange(n, dtype=dtype, device=ddf.device).view((n,) + (1,) * (nd - 1 - k))
                parts.append((x + ddf[:, k]) * (n / (n - 1)) - 0.5 - x)
            ddf = torch.stack(parts, 1)
        return warp_dense(moving_image, ddf, padding_mode="zeros", mode=mode, backend=self.backend,
                          deterministic=self.deterministic)


class CoarseWarp(torch.nn.Module):
    """forward(image, coarse) = coopseg_kernels.warp(image, coarse, ...): the coarse displacement
    grid (B, nd, *s) in voxels of the image, upsampled inside the kernel as
    F.interpolate(align_corners=align_corners), never stored at full resolution."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = True, *,
                 backend: str = "auto", deterministic: bool | None = None):
        super().__init__()
        self.deterministic = _checks.deterministic_option(deterministic)
        self.mode = _choice("mode", mode, ("bilinear", "nearest"))
        self.padding_mode = _choice("padding_mode", padding_mode, _PADDINGS)
        if not isinstance(align_corners, bool):
            raise TypeError(f"align_corners must be True or False, got {align_corners!r}")
        self.align_corners = align_corners
        self.backend = backend

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, align_corners={self.align_corners}"

    def forward(self, image: Tensor, coarse: Tensor) -> Tensor:
        return warp(image, coarse, align_corners=self.align_corners, padding_mode=self.padding_mode, mode=self.mode,
                    backend=self.backend, deterministic=self.deterministic)


def _grid_sample_voxels(image: Tensor, ddf: Tensor, mode: str, padding_mode: str, align_corners: bool) -> Tensor:
    """MONAI's own computation (identity grid + ddf, normalised, xyz order, grid_sample)."""
    shape = image.shape[2:]
    mesh = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), 0).to(ddf)
    grid = (mesh.unsqueeze(0) + ddf).movedim(1, -1)
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=grid.dtype, device=grid.device)
    grid = (grid * scale - 1.0).flip(-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
