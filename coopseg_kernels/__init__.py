"""coopseg_kernels: fused CPU (C++/OpenMP) and GPU (Triton) kernels for cooperating
segmentation/registration networks, with naive torch references.

Conventions (docs/conventions.md): channel-first tensors (B, C, *S); displacements in
voxels, spatial-axis order (d, h, w); coarse grids upsampled like
F.interpolate(align_corners=...); sampling like grid_sample(align_corners=True).
"""
from . import convert, nn, reference
from ._backend import BACKENDS, HAS_CPP
from ._backend import resolve as resolve_backend
from .ops.blur import blur, blur_adjoint
from .ops.similarity_step import similarity_step
from .ops.warp import upsample_field, warp
from .similarity import SimilarityResult, dice, relative_similarity, translation_search

__all__ = ["warp", "upsample_field", "blur", "blur_adjoint", "similarity_step", "relative_similarity", "dice",
           "translation_search", "SimilarityResult", "reference", "convert", "nn", "BACKENDS", "HAS_CPP",
           "resolve_backend"]
__version__ = "0.1.0"
