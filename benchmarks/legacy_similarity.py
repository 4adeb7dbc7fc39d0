"""FROZEN COPY of coopseg_kernels/similarity.py as of commit 6859ea6 (before issue 8),
kept only so that `make bench` can time today's optimizer beside the new one on the
same pair. Not part of the library; do not use.

The relative similarity D_S(s1, s2, Omega) = max over tau in Omega of Dice(tau(s1), s2).

Omega = "elastic": displacement fields on a coarse grid, upsampled and applied as
`warp` (align_corners=True). As in the paper, both masks are blurred with a
separable kernel ([1, 2, 1]) and tau is found by gradient descent on
L(tau) = mean((tau(s1 * f) - s2 * f)^2) from the identity; each iteration is one
fused `similarity_step`.

Omega = "translation": a constant field (a coarse grid of ones). All integer
shifts within the bound are searched exactly first -- the overlap |tau(s1) & s2|
and the size |tau(s1)| under zero padding are both cross-correlations, computed
with torch.fft -- then the best shift is refined below the voxel by the same
gradient descent.

The step. A node's gradient is g = 2/N sum_x w(x) r(x) grad(s1b)(p(x)) (w: its
interpolation weight, r: the residual), which shrinks with the volume and with
the share of mask edges near the node, so a fixed step would not suit every
size. Each node's step is therefore divided by
h = 2/N sum_x w(x) |d_j s1b(x)|^2, the row sum of the Gauss-Newton matrix (a
Jacobi-type preconditioner that bounds it): the update
tau <- tau - alpha * g / h is in voxels, and alpha is dimensionless (alpha = 1 is
a full Gauss-Newton-like step on the linearised problem). A step that raises
the loss of a batch item is undone and that item's alpha halved; an item stops
when an accepted step lowers its loss by less than `tol` (relative), or when its
alpha falls below 1e-4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from coopseg_kernels import _checks
from coopseg_kernels.ops.blur import blur
from coopseg_kernels.ops.similarity import similarity_step
from coopseg_kernels.ops.warp import upsample_field, warp

OMEGAS = ("elastic", "translation")


@dataclass
class SimilarityResult:
    score: Tensor   # [B] D_S = max(Dice(s1, s2), Dice(tau(s1) > 0.5, s2))
    field: Tensor   # [B, nd, *s] the final coarse displacement grid, voxels, spatial-axis order
    losses: Tensor  # [K + 1, B] the loss before each accepted/rejected step and at the end


def _binary(x: Tensor, threshold: float) -> Tensor:
    return x if x.dtype == torch.bool else x > threshold


def dice(a: Tensor, b: Tensor, *, threshold: float = 0.5) -> Tensor:
    """Dice 2|A & B| / (|A| + |B|) per batch item of masks thresholded at
    `threshold` (bool masks as they are); two empty masks give 1.0."""
    _checks.mask("a", a)
    _checks.mask("b", b)
    _checks.same_shape(a=a, b=b)
    A = _binary(a, threshold).flatten(1)
    B = _binary(b, threshold).flatten(1)
    inter = (A & B).sum(1, dtype=torch.float64)
    total = A.sum(1, dtype=torch.float64) + B.sum(1, dtype=torch.float64)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def coarse_size_for(size: Sequence[int], spacing: float) -> tuple[int, ...]:
    """Nodes every `spacing` voxels (align_corners=True): s_k = ceil((S_k - 1) / spacing) + 1."""
    return tuple(int(math.ceil((n - 1) / spacing)) + 1 for n in size)


def _preconditioner(s1b: Tensor, coarse_size: Sequence[int], backend: str) -> Tensor:
    """h (B, nd, *s): 2/N sum_x w_node(x) (d_j s1b(x))^2, floored so that nodes far
    from any edge take bounded steps."""
    nd = s1b.dim() - 2
    N = s1b[0].numel()
    grads = torch.gradient(s1b, dim=tuple(range(2, 2 + nd)))
    sq = torch.stack([g.square().sum(1) for g in grads], 1)  # (B, nd, *S), channels summed
    z = torch.zeros(s1b.shape[0], nd, *coarse_size, dtype=s1b.dtype, device=s1b.device, requires_grad=True)
    with torch.enable_grad():
        field = upsample_field(z, s1b.shape[2:], align_corners=True, backend=backend)
        (h,) = torch.autograd.grad(field, z, sq)
    h = h * (2.0 / N)
    floor = 1e-3 * h.flatten(1).amax(1).clamp_min(1e-12)
    return h + floor.view(-1, *([1] * (h.dim() - 1)))


def translation_search(s1: Tensor, s2: Tensor, max_translation: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Exact search of the integer shift t (|t_k| <= max_translation[k]) maximising
    Dice(s1(x + t), s2) (zero padding), by FFT cross-correlation in float64.
    Returns (t (B, nd) in voxels, its Dice (B,)); ties go to the smallest |t|."""
    nd = s1.dim() - 2
    size = s1.shape[2:]
    T = [min(int(t), n - 1) for t, n in zip(max_translation, size)]
    pad = [n + t for n, t in zip(size, T)]  # no wrap-around for |shift| <= T
    dims = tuple(range(-nd, 0))
    a = _binary(s1, 0.5).to(torch.float64).sum(1)  # channels are pooled into one mask
    b = _binary(s2, 0.5).to(torch.float64).sum(1)
    ones = torch.ones(size, dtype=torch.float64, device=s1.device)
    Fa = torch.fft.rfftn(a, s=pad, dim=dims)

    def corr(Fx, y):  # sum_y x(y) y_(y - t), indexed by t mod pad
        return torch.fft.irfftn(Fx * torch.fft.rfftn(y, s=pad, dim=dims).conj(), s=pad, dim=dims).round()

    overlap = corr(Fa, b)
    size1 = corr(Fa, ones.expand_as(b))
    size2 = b.flatten(1).sum(1).view(-1, *([1] * nd))
    total = size1 + size2
    d = torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))
    # the shifts within the bound, in the FFT's wrapped order
    axes = [torch.cat([torch.arange(0, t + 1), torch.arange(-t, 0)]).to(s1.device) for t in T]
    idx = [torch.remainder(ax, p) for ax, p in zip(axes, pad)]
    d = d[(slice(None), *torch.meshgrid(*idx, indexing="ij"))].reshape(d.shape[0], -1)
    shifts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, nd)
    # the best Dice (exact: ratios of integers), then the smallest |t|_1 (the identity first)
    top = d == d.amax(1, keepdim=True)
    size_t = shifts.abs().sum(1).to(torch.float64)
    best = torch.where(top, -size_t, torch.full_like(d, -math.inf)).argmax(1)
    return shifts[best].to(torch.float64), d.gather(1, best[:, None])[:, 0]


def relative_similarity(s1: Tensor, s2: Tensor, *, omega: str = "elastic", grid: Sequence[int] | None = None,
                        grid_spacing: float = 16, iters: int = 300, step: float = 1.0,
                        max_translation: int | Sequence[int] | None = None,
                        kernel: Sequence[float] = (1.0, 2.0, 1.0), momentum: float = 0.0, tol: float = 1e-3,
                        init: Tensor | None = None, backend: str = "auto") -> SimilarityResult:
    """D_S(s1, s2, Omega) for batches of masks (B, C, *S) (bool, uint8 or float).

    omega: "elastic" (coarse grid `grid`, or nodes every `grid_spacing` voxels) or
    "translation" (`max_translation` voxels per axis at most; None: any shift).
    iters: at most this many gradient steps; step: alpha (dimensionless, see the
    module docstring); momentum: heavy-ball factor in [0, 1); tol: relative loss
    decrease under which an item stops; kernel: the blur f; init: elastic only,
    a starting coarse grid (B, nd, *s) instead of the identity.
    """
    _checks.mask("s1", s1)
    _checks.mask("s2", s2)
    _checks.same_shape(s1=s1, s2=s2)
    _checks.same_device(s1=s1, s2=s2)
    _checks.choice("omega", omega, OMEGAS)
    nd = s1.dim() - 2
    size = tuple(s1.shape[2:])
    if not (isinstance(iters, int) and iters >= 0):
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if omega == "elastic":
        if max_translation is not None:
            raise ValueError("max_translation applies to omega='translation' only")
        if grid is None:
            if not grid_spacing > 0:
                raise ValueError(f"grid_spacing must be > 0, got {grid_spacing!r}")
            coarse_size = coarse_size_for(size, grid_spacing)
        else:
            coarse_size = tuple(int(v) for v in grid)
            if len(coarse_size) != nd or min(coarse_size) < 1:
                raise ValueError(f"grid must be {nd} coarse sizes >= 1, got {grid!r}")
    else:
        if grid is not None and any(int(v) != 1 for v in grid):
            raise ValueError(f"omega='translation' uses a grid of ones, got grid={grid!r}")
        coarse_size = (1,) * nd
        if max_translation is None:
            bound = [n - 1 for n in size]
        else:
            bound = [max_translation] * nd if isinstance(max_translation, (int, float)) else list(max_translation)
            if len(bound) != nd or min(bound) < 0:
                raise ValueError(f"max_translation must be >= 0 (one value or {nd}), got {max_translation!r}")

    dtype = torch.float64 if s1.dtype == torch.float64 else torch.float32
    f1, f2 = s1.to(dtype), s2.to(dtype)
    s1b = blur(f1, kernel=kernel, backend=backend)
    s2b = blur(f2, kernel=kernel, backend=backend)
    B = s1.shape[0]
    bshape = (B,) + (1,) * (nd + 1)
    c = torch.zeros(B, nd, *coarse_size, dtype=dtype, device=s1.device)
    if init is not None:
        if omega != "elastic":
            raise ValueError("init applies to omega='elastic' only (translations start from the exact search)")
        _checks.tensor("init", init)
        if tuple(init.shape) != tuple(c.shape):
            raise ValueError(f"init must have the coarse grid's shape {tuple(c.shape)}, got {tuple(init.shape)}")
        c = init.detach().to(dtype=dtype, device=s1.device).clone()
    if omega == "translation":
        t, _ = translation_search(s1, s2, bound)
        c += t.to(dtype).view(B, nd, *coarse_size)
        lim = torch.tensor(bound, dtype=dtype, device=s1.device).view(1, nd, *coarse_size)

    h = _preconditioner(s1b, coarse_size, backend)
    loss, g = similarity_step(s1b, s2b, c, backend=backend)
    losses = [loss]
    alpha = torch.full(bshape, float(step), dtype=dtype, device=s1.device)
    active = torch.ones(B, dtype=torch.bool, device=s1.device)
    velocity = torch.zeros_like(c)
    for _ in range(iters):
        if not bool(active.any()):
            break
        velocity = momentum * velocity - alpha * g / h
        trial = c + velocity
        if omega == "translation":
            trial = torch.maximum(torch.minimum(trial, lim), -lim)
        new_loss, new_g = similarity_step(s1b, s2b, trial, backend=backend)
        better = active & (new_loss <= loss)
        worse = active & ~better
        gain = (loss - new_loss) / loss.clamp_min(1e-30)
        b_ = better.view(bshape)
        c = torch.where(b_, trial, c)
        g = torch.where(b_, new_g, g)
        velocity = torch.where(b_, velocity, torch.zeros_like(velocity))
        loss = torch.where(better, new_loss, loss)
        alpha = torch.where(worse.view(bshape), alpha / 2, alpha)
        active &= ~(better & (gain < tol)) & (alpha.flatten() >= 1e-4) & (loss > 0)
        losses.append(loss)

    warped = warp(f1, c, align_corners=True, backend=backend)
    score = torch.maximum(dice(s1, s2), dice(warped, s2))
    return SimilarityResult(score=score, field=c, losses=torch.stack(losses))
