"""The three losses of the paper (§2.1) and where their gradients go.

With ŝ = sigmoid(logits) and ŝ2' = warp(detach(ŝ1), coarse) (one fused warp,
coopseg_kernels.warp: the full-resolution field is never stored):

    L_r = BCE(ŝ1, s1) + BCE(ŝ2, s2)                 (from logits) -> segmentor
    L_g = MSE(blur(v ŝ2'), blur(v s2))               (fused blur)  -> registor only
    L_p = Σ v (detach(ŝ2') - ŝ2)² / Σ v                            -> segmentor, through ŝ2 only
    total = λ_r L_r + λ_g L_g + λ_p L_p

v (`inside_only=True`, the default) is 1 where the sampled position x + u(x) lies inside
the moving crop and 0 elsewhere: there ŝ2' reads the zero padding, not ŝ1, and without v
L_p would push ŝ2 to empty and L_g teach the registor the truncation. v is the warp of a
volume of ones through the same fused kernel (no full-resolution field is stored), no
gradient. `inside_only=False` gives the paper's plain means (v = 1).

The stop-gradients are the diodes of the paper's Fig. 1: L_g must not move the
segmentor (it would learn to predict twice the same mask), and "the similarity loss
only affects the second channel" so L_p moves neither ŝ1 nor the registor. Two
options lift them for ablations:

    sim_to_s1=True        L_p also reaches ŝ1 (through the warp's moving image)
    sim_to_registor=True  L_p also reaches the registor (through the coarse grid)

(L_g still stops at ŝ1 either way). All terms are computed in float32, also under
bf16 autocast. `backend` goes to coopseg_kernels.warp/blur ("reference" = the naive
torch ops, the memory benchmark's baseline).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

import coopseg_kernels as ck


class LossTerms(NamedTuple):
    total: torch.Tensor
    seg: torch.Tensor   # L_r
    reg: torch.Tensor   # L_g
    sim: torch.Tensor   # L_p


def _check_mask(name: str, s, like: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if s.shape != like.shape:
        raise ValueError(f"{name} must have the shape of the logits {tuple(like.shape)}, got {tuple(s.shape)}")


def _check_lambda(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    return float(v)


def segmentation_loss(logits1: torch.Tensor, logits2: torch.Tensor, s1: torch.Tensor,
                      s2: torch.Tensor) -> torch.Tensor:
    """L_r = BCE(ŝ1, s1) + BCE(ŝ2, s2), from logits (each BCE a mean over voxels)."""
    return (F.binary_cross_entropy_with_logits(logits1.float(), s1.float())
            + F.binary_cross_entropy_with_logits(logits2.float(), s2.float()))


PAPER_KERNEL = (1.0, 2.0, 1.0)
BLUR_SIGMA_MAX = 1000.0  # voxels: 6001 taps, far wider than any crop; larger ones only burn time and memory


def blur_kernel(sigma: float) -> tuple[float, ...]:
    """The 1-D kernel of L_g's blur: sigma = 0 is the paper's [1, 2, 1]; sigma > 0 a
    Gaussian of that standard deviation (pixels) truncated at ceil(3 sigma), odd length,
    normalised to sum 1. A wide one lets L_g see shifts larger than the masks' edges:
    with [1, 2, 1] the warped and target masks of a pair shifted by tens of pixels barely
    overlap and L_g is nearly flat in the shift."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 <= sigma <= BLUR_SIGMA_MAX):
        raise ValueError(f"sigma must be a number in [0, {BLUR_SIGMA_MAX:g}] (voxels), got {sigma!r}")
    if sigma == 0:
        return PAPER_KERNEL
    r = max(1, math.ceil(3 * sigma))
    k = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    total = sum(k)
    return tuple(v / total for v in k)


INSIDE_TOL = 1e-3  # voxels: a position this far past the last voxel centre still counts as inside


def inside_mask(coarse: torch.Tensor, size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """v (B, 1, *size), float32: 1 where x + u(x) (u = the upsampled `coarse`) lies inside the
    volume [0, n - 1] on every axis (up to INSIDE_TOL voxels), else 0. The bilinear warp of
    ones with zero padding is 1 exactly there and < 1 elsewhere; no gradient."""
    with torch.no_grad():
        ones = torch.ones((coarse.shape[0], 1, *size), dtype=torch.float32, device=coarse.device)
        return (ck.warp(ones, coarse.detach().float(), backend=backend) > 1.0 - INSIDE_TOL).float()


def registration_loss(moved: torch.Tensor, s2: torch.Tensor, *, kernel: Sequence[float] = (1.0, 2.0, 1.0),
                      backend: str = "auto", inside: torch.Tensor | None = None) -> torch.Tensor:
    """L_g = MSE(blur(moved), blur(s2)): `moved` is ŝ2' (or a warped annotation in stage 2).
    `inside` (inside_mask): both sides are multiplied by it before the blur, so what the
    warp read from outside the moving volume is compared with nothing."""
    if inside is not None:
        moved, s2 = moved * inside, s2 * inside
    return F.mse_loss(ck.blur(moved, kernel=kernel, backend=backend), ck.blur(s2, kernel=kernel, backend=backend))


def cooperative_loss(outputs, s1: torch.Tensor, s2: torch.Tensor, *, lambda_r: float, lambda_g: float,
                     lambda_p: float, backend: str = "auto", sim_to_s1: bool = False,
                     sim_to_registor: bool = False, kernel: Sequence[float] = (1.0, 2.0, 1.0),
                     inside_only: bool = True) -> LossTerms:
    """outputs = CooperativeNet(x1, x2) = (logits1, logits2, coarse); s1, s2: annotation
    masks (B, 1, *S) in {0, 1}. Returns LossTerms(total, seg, reg, sim) of 0-d tensors.
    inside_only: L_p and L_g ignore the voxels whose sample lies outside the moving volume."""
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 3):
        raise TypeError("outputs must be the (logits1, logits2, coarse) tuple of CooperativeNet")
    logits1, logits2, coarse = (t.float() for t in outputs)
    _check_mask("s1", s1, logits1)
    _check_mask("s2", s2, logits2)
    lambda_r = _check_lambda("lambda_r", lambda_r)
    lambda_g = _check_lambda("lambda_g", lambda_g)
    lambda_p = _check_lambda("lambda_p", lambda_p)
    if not isinstance(inside_only, bool):
        raise TypeError(f"inside_only must be True or False, got {inside_only!r}")
    s1, s2 = s1.float(), s2.float()
    inside = inside_mask(coarse, s1.shape[2:], backend=backend) if inside_only else None

    seg = segmentation_loss(logits1, logits2, s1, s2)
    p1, p2 = torch.sigmoid(logits1), torch.sigmoid(logits2)
    moved = ck.warp(p1.detach(), coarse, backend=backend)          # ŝ2': grad to the registor only
    reg = registration_loss(moved, s2, kernel=kernel, backend=backend, inside=inside)
    if sim_to_s1 or sim_to_registor:                                # ablation: a second warp, other diodes
        target = ck.warp(p1 if sim_to_s1 else p1.detach(), coarse if sim_to_registor else coarse.detach(),
                         backend=backend)
    else:
        target = moved.detach()
    if inside is None:
        sim = F.mse_loss(p2, target)
    else:  # the mean over the voxels inside (0 when there are none)
        sim = (inside * (p2 - target) ** 2).sum() / inside.sum().clamp_min(1.0) / p2.shape[1]
    total = lambda_r * seg + lambda_g * reg + lambda_p * sim
    return LossTerms(total, seg, reg, sim)
