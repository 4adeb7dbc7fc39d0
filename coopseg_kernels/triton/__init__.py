"""Triton kernels and their launchers; each launcher has the signature of the
C++ op of the same name (torch.ops.coopseg.<name>)."""
from .blur import blur_apply
from .similarity_step import similarity_step_fwd
from .warp import upsample_field_bwd, upsample_field_fwd, warp_fwd
from .warp_bspline import upsample_bspline_bwd, upsample_bspline_fwd, warp_bspline_bwd, warp_bspline_fwd
from .warp_dense import warp_dense_fwd
from .warp_gather import warp_bwd, warp_dense_bwd  # with `deterministic`: the gather, else the atomic scatter

__all__ = ["warp_fwd", "warp_bwd", "upsample_field_fwd", "upsample_field_bwd", "blur_apply", "similarity_step_fwd",
           "warp_dense_fwd", "warp_dense_bwd", "warp_bspline_fwd", "warp_bspline_bwd", "upsample_bspline_fwd",
           "upsample_bspline_bwd"]
