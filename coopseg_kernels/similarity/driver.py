"""The relative similarity D_S(s1, s2, Omega) = max over tau in Omega of Dice(tau(s1), s2):
the public `relative_similarity`, `dice` and `SimilarityResult`. The definitions (masks,
channel pooling, the best Dice over every tau evaluated, empty masks) are in
docs/conventions.md#d_s-definitions.

Omega = "translation": the exact integer search (translation.py) over every shift within
`max_translation`; its best shift (a floor: it is a candidate) is then refined below the
voxel by the descent (descent.py) at full resolution, clamped to the bound.

Omega = "elastic": displacement grids on a coarse grid, upsampled and applied as
`warp` (align_corners=True). The translation run above is done first (same code, same
numbers, so Dice <= D_S(translation) <= D_S(elastic) for the same pair and settings);
then the descent starts from the identity (or `init`) and from the refined translation,
as one batch of 2B, coarse to fine; at the finest level the start with the lower
loss is kept and refined. Starting from the translation costs one exact search
(FFT or direct, see `translation_search`), a few full-resolution translation
steps and the second start's coarse-level steps (cheap: 1/64 and 1/8 of the
voxels); it is what makes D_S(elastic) >= D_S(translation) and finds shifts the
descent from the identity cannot reach. Default bound for elastic: one node
spacing per axis (ceil((S_k - 1) / (s_k - 1)), 16 voxels for grid_spacing=16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .. import _backend, _checks
from ..ops.warp import warp
from ._masks import _binary, _dice_bool
from .descent import CoarseToFine, _auto_levels
from .translation import _search

OMEGAS = ("elastic", "translation")


@dataclass
class SimilarityResult:
    score: Tensor       # [B] float64: D_S, the best Dice over every tau evaluated
    field: Tensor       # [B, nd, *s] coarse grid (voxels, spatial-axis order) of the tau that scored `score`
    losses: Tensor      # [K + 1, B] blurred loss at the finest level before/after each step (kept start)
    iterations: Tensor  # [B] int64: descent steps taken per item, summed over levels and starts


def dice(a: Tensor, b: Tensor, *, threshold: float = 0.5) -> Tensor:
    """Dice 2|A & B| / (|A| + |B|) per batch item of masks (B, C, *S) thresholded at
    `threshold` (bool masks as they are), channels pooled (`flatten(1)`); two empty
    masks give 1.0. float64 [B]."""
    _checks.mask_pair("a", a, "b", b)
    threshold = _checks.real("threshold", threshold)
    return _dice_bool(_binary(a, threshold), _binary(b, threshold))


def _candidate_dice(W: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """Dice of a warped s1 (W) with s2; -1 where tau moved all of a non-empty s1 out."""
    d = _dice_bool(W, B)
    gone = A.flatten(1).any(1) & ~W.flatten(1).any(1)
    return torch.where(gone, torch.full_like(d, -1.0), d)


def coarse_size_for(size: Sequence[int], spacing: float) -> tuple[int, ...]:
    """Nodes every `spacing` voxels (align_corners=True): s_k = ceil((S_k - 1) / spacing) + 1."""
    return tuple(int(math.ceil((n - 1) / spacing)) + 1 for n in size)


def _levels(levels: int | None, size: tuple[int, ...]) -> int:
    """The checked number of coarse-to-fine levels (None: auto)."""
    if levels is None:
        return _auto_levels(size)
    levels = _checks.integer("levels", levels, minimum=1)
    if levels > 1 and min(size) < 2 ** (levels - 1) + 1:
        raise ValueError(f"levels={levels} halves every axis {levels - 1} times, which needs spatial sizes "
                         f">= {2 ** (levels - 1) + 1}, got {size}")
    return levels


def _grid_and_bound(omega: str, grid, grid_spacing, max_translation, init, size: tuple[int, ...]):
    """The checked coarse grid size of Omega and the bound of the exact translation search."""
    nd = len(size)
    if omega == "elastic":
        if grid is None:
            grid_spacing = _checks.real("grid_spacing", grid_spacing, low=0, low_open=True)
            coarse_size = coarse_size_for(size, grid_spacing)
        else:
            coarse_size = _checks.coarse_grid("grid", grid, nd)
        if max_translation is None:
            max_translation = [n - 1 if s == 1 else int(math.ceil((n - 1) / (s - 1)))
                               for n, s in zip(size, coarse_size)]
    else:
        if grid is not None and _checks.coarse_grid("grid", grid, nd) != (1,) * nd:
            raise ValueError(f"omega='translation' uses a grid of ones, got grid={grid!r}")
        if init is not None:
            raise ValueError("init applies to omega='elastic' only (translations start from the exact search)")
        coarse_size = (1,) * nd
    bound = _checks.translation_bound("max_translation", max_translation, size)
    return coarse_size, bound


def relative_similarity(s1: Tensor, s2: Tensor, *, omega: str = "elastic", grid: Sequence[int] | None = None,
                        grid_spacing: float = 16, iters: int = 100, step: float = 1.0,
                        max_translation: int | Sequence[int] | None = None,
                        kernel: Sequence[float] = (1.0, 2.0, 1.0), momentum: float = 0.0, tol: float = 1e-2,
                        init: Tensor | None = None, levels: int | None = None,
                        backend: str = "auto") -> SimilarityResult:
    """D_S(s1, s2, Omega) for batches of masks (B, C, *S) (bool, uint8 or float,
    thresholded at 0.5); definitions: docs/conventions.md#d_s-definitions, the
    algorithm: this module's docstring.

    omega: "elastic" (coarse grid `grid`, or nodes every `grid_spacing` voxels) or
    "translation" (a grid of ones). max_translation: one int >= 0 or one per axis,
    the bound of the exact integer search; None: any shift for "translation", one
    node spacing per axis for "elastic" (where it bounds the translation start).
    iters: at most this many descent steps per level (and start); step: alpha
    (dimensionless, the largest one); momentum: heavy-ball factor in [0, 1); tol: the
    relative loss decrease of the stopping rule (>= 0); kernel: the blur f; init:
    elastic only, a starting coarse grid (B, nd, *s) in place of the identity;
    levels: resolutions of the coarse-to-fine descent (None: auto, 1: full only).
    Batches stay batched: every descent step is one fused call for all items.
    """
    nd = _checks.mask_pair("s1", s1, "s2", s2)
    _checks.choice("omega", omega, OMEGAS)
    size = tuple(s1.shape[2:])
    iters = _checks.integer("iters", iters, minimum=0)
    step = _checks.real("step", step, low=0, low_open=True)
    momentum = _checks.real("momentum", momentum, low=0, high=1, high_open=True)
    tol = _checks.real("tol", tol, low=0)
    k = _checks.blur_kernel(kernel)
    _backend.resolve(backend, s1.device)  # names a bad backend before any work
    levels = _levels(levels, size)
    coarse_size, bound = _grid_and_bound(omega, grid, grid_spacing, max_translation, init, size)

    dtype = torch.float64 if s1.dtype == torch.float64 else torch.float32
    B = s1.shape[0]
    device = s1.device
    if init is not None:
        _checks.tensor("init", init)
        if tuple(init.shape) != (B, nd, *coarse_size):
            raise ValueError(f"init must have the coarse grid's shape {(B, nd, *coarse_size)}, got {tuple(init.shape)}")
        _checks.same_device(s1=s1, init=init)
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init must be finite")
    A, Bm = _binary(s1, 0.5), _binary(s2, 0.5)
    f1, f2 = A.to(dtype), Bm.to(dtype)
    opts = dict(iters=iters, step=step, momentum=momentum, tol=tol, backend=backend)

    def shaped(c: Tensor, grid_size) -> Tensor:
        return c.to(dtype).view(B, nd, *([1] * nd)).expand(B, nd, *grid_size).contiguous()

    # candidates, best first kept: the identity, then every tau whose Dice is evaluated
    score = _dice_bool(A, Bm)
    field = torch.zeros(B, nd, *coarse_size, dtype=dtype, device=device)
    steps = torch.zeros(B, dtype=torch.int64, device=device)

    def consider(d: Tensor, c: Tensor) -> None:
        nonlocal score, field
        take = d > score
        score = torch.where(take, d, score)
        field = torch.where(take.view(-1, *([1] * (field.dim() - 1))), c, field)

    t, d_t = _search(A, Bm, bound, "auto")
    consider(d_t, shaped(t, coarse_size))

    c2f = CoarseToFine(f1, f2, k, levels, coarse_size, **opts)
    lim = torch.tensor(bound, dtype=dtype, device=device).view(1, nd, *([1] * nd))
    c_t, losses_t, n_t = c2f.translation(shaped(t, (1,) * nd), lim)
    steps += n_t
    W = warp(f1, c_t, align_corners=True, backend=backend) > 0.5
    consider(_candidate_dice(W, A, Bm), shaped(c_t, coarse_size))
    if omega == "translation":
        return SimilarityResult(score=score, field=field, losses=torch.stack(losses_t), iterations=steps)

    start_id = torch.zeros(B, nd, *coarse_size, dtype=dtype, device=device) if init is None else \
        init.detach().to(dtype).clone()
    c, losses, n = c2f.elastic(start_id, shaped(c_t, coarse_size))
    steps += n
    W = warp(f1, c, align_corners=True, backend=backend) > 0.5
    consider(_candidate_dice(W, A, Bm), c)
    return SimilarityResult(score=score, field=field, losses=torch.stack(losses), iterations=steps)
