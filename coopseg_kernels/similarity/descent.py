"""The coarse-to-fine descent of D_S: the paper's tau_{k+1} = tau_k - alpha dL/dtau on
blurred masks, L = mean((tau(s1 * f) - s2 * f)^2), one fused `similarity_step` per
iteration (definitions: docs/conventions.md#d_s-definitions).

- Coarse to fine: `levels` resolutions, each half the previous one (the blurred
  masks blurred again with the kernel and resampled at align_corners=True
  positions), the coarse grid the same at every level (its values scaled to the
  level's voxels). Auto: up to 3 levels while every axis keeps >= 24 voxels.
- The step. A node's gradient g shrinks with the volume and with the share of
  mask edges near the node, so each node's step is divided by
  h = 2/N sum_x w(x) |d_j s1b(x)|^2, the row sum of the Gauss-Newton matrix (a
  Jacobi-type preconditioner that bounds it): tau <- tau - alpha * g / h is in
  voxels and alpha is dimensionless (alpha = 1 a full Gauss-Newton-like step).
- Step control and stopping rule, per batch item: a step that raises the loss is
  undone and alpha halved; an accepted step doubles alpha again, up to `step`.
  An item stops at a level when two consecutive accepted steps (no rejected step
  between them) each lowered its loss by less than `tol` (relative) -- so a tiny
  gain right after rejected steps never stops it --, when alpha < 1e-4, when its
  loss is 0, or after `iters` steps at that level.

`CoarseToFine` holds one call's pyramid, step caps and preconditioners and runs the
translation refinement and the elastic descent from two starts (see driver.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.blur import blur
from ..ops.similarity_step import similarity_step
from ..ops.warp import upsample_field

_STALL = 2            # consecutive accepted steps gaining < tol that stop an item
_ALPHA_MIN = 1e-4
_MIN_LEVEL = 24       # auto levels: every axis of the coarsest level keeps >= this many voxels
_MAX_LEVELS = 3


def _level_size(size: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(math.ceil((n - 1) / 2)) + 1 for n in size)


def _auto_levels(size: Sequence[int]) -> int:
    levels = 1
    while levels < _MAX_LEVELS and min(_level_size(size)) >= _MIN_LEVEL:
        size = _level_size(size)
        levels += 1
    return levels


def _pyramid(x: Tensor, levels: int, kernel, backend: str) -> list[Tensor]:
    """[x, x at half resolution, ...]: blurred again, then sampled at align_corners=True positions."""
    out = [x]
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    for _ in range(levels - 1):
        y = blur(out[-1], kernel=kernel, backend=backend)
        out.append(F.interpolate(y, size=_level_size(y.shape[2:]), mode=mode, align_corners=True))
    return out


def _scale(full: Sequence[int], level: Sequence[int], like: Tensor) -> Tensor:
    """Per-axis factor from full-resolution voxels to level voxels, shaped for a coarse grid."""
    r = [(m - 1) / (n - 1) for n, m in zip(full, level)]
    return torch.tensor(r, dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.dim() - 2)))


def _preconditioner(s1b: Tensor, coarse_size: Sequence[int], backend: str) -> Tensor:
    """h (B, nd, *s): 2/N sum_x w_node(x) (d_j s1b(x))^2, floored so that nodes far
    from any edge take bounded steps."""
    nd = s1b.dim() - 2
    N = s1b[0].numel()
    # central differences (one-sided ones at the faces are left at 0: h is a bound, not exact)
    sq = s1b.new_zeros(s1b.shape[0], nd, *s1b.shape[2:])  # (B, nd, *S), channels summed
    for k in range(nd):
        hi = s1b.narrow(2 + k, 2, s1b.shape[2 + k] - 2)
        lo = s1b.narrow(2 + k, 0, s1b.shape[2 + k] - 2)
        sq[:, k].narrow(1 + k, 1, s1b.shape[2 + k] - 2).copy_(((hi - lo) * 0.5).square_().sum(1))
    z = torch.zeros(s1b.shape[0], nd, *coarse_size, dtype=s1b.dtype, device=s1b.device, requires_grad=True)
    with torch.enable_grad():
        field = upsample_field(z, s1b.shape[2:], align_corners=True, backend=backend)
        (h,) = torch.autograd.grad(field, z, sq)
    h = h * (2.0 / N)
    floor = 1e-3 * h.flatten(1).amax(1).clamp_min(1e-12)
    return h + floor.view(-1, *([1] * (h.dim() - 1)))


def _descend(s1b: Tensor, s2b: Tensor, c: Tensor, h: Tensor, *, iters: int, step: float, momentum: float,
             tol: float, lim: Tensor | None, backend: str) -> tuple[Tensor, list[Tensor], Tensor]:
    """Preconditioned descent of every batch item from c; (c, losses, steps per item)."""
    B = c.shape[0]
    bshape = (B,) + (1,) * (c.dim() - 1)
    loss, g = similarity_step(s1b, s2b, c, backend=backend)
    losses = [loss]
    alpha = torch.full(bshape, float(step), dtype=c.dtype, device=c.device)
    active = loss > 0
    small = torch.zeros(B, dtype=torch.int64, device=c.device)
    steps = torch.zeros(B, dtype=torch.int64, device=c.device)
    velocity = torch.zeros_like(c)
    for _ in range(iters):
        if not bool(active.any()):
            break
        velocity = momentum * velocity - alpha * g / h
        trial = c + velocity
        if lim is not None:
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
        alpha = torch.where(worse.view(bshape), alpha / 2, torch.where(b_, (2 * alpha).clamp_max(step), alpha))
        # the stopping rule: _STALL consecutive accepted steps that each gained < tol
        small = torch.where(worse, torch.zeros_like(small), torch.where(better & (gain < tol), small + 1,
                                                                         torch.where(better, 0, small)))
        steps += active.to(torch.int64)
        active = active & (small < _STALL) & (alpha.flatten() >= _ALPHA_MIN) & (loss > 0)
        losses.append(loss)
    return c, losses, steps


def _expand_batch(x: Tensor, k: int) -> Tensor:
    return x.repeat(k, *([1] * (x.dim() - 1)))


class CoarseToFine:
    """The pyramids of the blurred masks f1, f2 (B, C, *S), the step caps per level and the
    preconditioners of one `relative_similarity` call, for the coarse grid `coarse_size`
    and for a translation (a grid of ones)."""

    def __init__(self, f1: Tensor, f2: Tensor, kernel, levels: int, coarse_size: tuple[int, ...], *, iters: int,
                 step: float, momentum: float, tol: float, backend: str):
        nd = f1.dim() - 2
        self.coarse_size = coarse_size
        self.backend = backend
        self.opts = dict(step=step, momentum=momentum, tol=tol, backend=backend)
        self.p1 = p1 = _pyramid(blur(f1, kernel=kernel, backend=backend), levels, kernel, backend)
        self.p2 = _pyramid(blur(f2, kernel=kernel, backend=backend), levels, kernel, backend)
        # step caps: `iters` at the coarsest level, divided by 2^nd (the cost ratio of one
        # step) at every finer level, so that each level gets about the same time
        self.caps = [int(math.ceil(iters / (2 ** nd) ** (levels - 1 - lvl))) for lvl in range(levels)]
        # h is formed at the coarsest level only (at full resolution it would cost more than the
        # steps): h ~ (d_k s)^2 scales to a finer level by the squared per-axis resampling factor
        self.top = top = levels - 1
        self.h_top = {g: _preconditioner(p1[top], g, backend) for g in {coarse_size, (1,) * nd}}

    def precond(self, lvl: int, grid_size) -> Tensor:
        h = self.h_top[grid_size]
        return h if lvl == self.top else h * _scale(self.p1[self.top].shape[2:], self.p1[lvl].shape[2:], h).square()

    def translation(self, start: Tensor, lim: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """The sub-voxel translation refinement from `start` (B, nd, 1, ..., 1), clamped to
        [-lim, lim], at full resolution only: the exact shift is already within half a voxel
        of the optimum, which coarser levels cannot resolve. (c, losses, steps per item)."""
        ones = (1,) * (start.dim() - 2)
        return _descend(self.p1[0], self.p2[0], start, self.precond(0, ones), lim=lim, iters=self.caps[0],
                        **self.opts)

    def elastic(self, start_id: Tensor, start_tr: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Both starts (B, nd, *s) (the identity or `init`, and the refined translation), as one
        batch of 2B, at the coarsest level; then per item the one with the lower loss there goes
        on through the finer levels. (c, losses at the finest level, steps per item)."""
        p1, p2, top, coarse_size, backend = self.p1, self.p2, self.top, self.coarse_size, self.backend
        B, nd = start_id.shape[0], start_id.dim() - 2
        size = p1[0].shape[2:]
        starts = torch.cat([start_id, start_tr])
        r = _scale(size, p1[top].shape[2:], starts)
        h = self.precond(top, coarse_size)
        if top > 0:
            c2, losses2, n2 = _descend(_expand_batch(p1[top], 2), _expand_batch(p2[top], 2), starts * r,
                                       _expand_batch(h, 2), lim=None, iters=self.caps[top], **self.opts)
            last = losses2[-1]
        else:  # one level: compare the two starts' losses before descending
            c2 = starts * r
            last = torch.cat([similarity_step(p1[0], p2[0], c2[:B], backend=backend)[0],
                              similarity_step(p1[0], p2[0], c2[B:], backend=backend)[0]])
            n2 = torch.zeros(2 * B, dtype=torch.int64, device=starts.device)
        steps = n2[:B] + n2[B:]
        use_tr = (last[B:] < last[:B]).view(-1, *([1] * nd + [1]))
        c = torch.where(use_tr, c2[B:], c2[:B]) / r
        losses = []
        for lvl in range(top if top > 0 else 0, -1, -1):
            if top > 0 and lvl == top:
                continue
            r = _scale(size, p1[lvl].shape[2:], c)
            cl, losses, n = _descend(p1[lvl], p2[lvl], c * r, self.precond(lvl, coarse_size) if lvl != top else h,
                                     lim=None, iters=self.caps[lvl], **self.opts)
            c = cl / r
            steps = steps + n
        return c, losses, steps
