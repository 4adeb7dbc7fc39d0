"""The relative similarity D_S(s1, s2, Omega) = max over tau in Omega of Dice(tau(s1), s2).

Definitions (the README states the same):

- Masks are (B, C, *S) batches, thresholded at 0.5 (bool as they are). One tau per
  batch item moves every channel; Dice pools the channels exactly as `dice` does
  (`flatten(1)`): 2 sum_c |tau(A_c) & B_c| / (sum_c |tau(A_c)| + sum_c |B_c|).
- The reported D_S is the best Dice over every tau the method evaluated (the
  identity always among them), so it is never below one it has seen:
  Dice <= D_S(translation, m) <= D_S(elastic, m) for the same pair and settings,
  because the elastic run performs the whole translation run first (same code,
  same numbers) and only adds candidates.
- Empty masks: D_S(empty, empty) = 1; D_S(non-empty, empty) = D_S(empty, non-empty)
  = 0. A tau that moves all of s1 out of the volume is no candidate (otherwise
  "two empty masks give 1" would score a non-empty s1 against an empty s2 as 1).

Omega = "translation": every integer shift t with |t_k| <= max_translation[k] is
scored exactly (`translation_search`: overlap counts per channel, summed, as
ratios of integers); the best shift (a floor: it is a candidate) is then refined
below the voxel by the descent below at full resolution, clamped to the bound.

Omega = "elastic": displacement grids on a coarse grid, upsampled and applied as
`warp` (align_corners=True). The translation run above is done first; then the
descent starts from the identity (or `init`) and from the refined translation, as
one batch of 2B, coarse to fine; at the finest level the start with the lower
loss is kept and refined. Starting from the translation costs one exact search
(FFT or direct, see `translation_search`), a few full-resolution translation
steps and the second start's coarse-level steps (cheap: 1/64 and 1/8 of the
voxels); it is what makes D_S(elastic) >= D_S(translation) and finds shifts the
descent from the identity cannot reach. Default bound for elastic: one node
spacing per axis (ceil((S_k - 1) / (s_k - 1)), 16 voxels for grid_spacing=16).

The descent (the paper's tau_{k+1} = tau_k - alpha dL/dtau on blurred masks,
L = mean((tau(s1 * f) - s2 * f)^2), one fused `similarity_step` per iteration):

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
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks
from .ops.blur import blur
from .ops.similarity import similarity_step
from .ops.warp import upsample_field, warp

OMEGAS = ("elastic", "translation")
SEARCH_METHODS = ("auto", "direct", "fft")
_STALL = 2            # consecutive accepted steps gaining < tol that stop an item
_ALPHA_MIN = 1e-4
_MIN_LEVEL = 24       # auto levels: every axis of the coarsest level keeps >= this many voxels
_MAX_LEVELS = 3


@dataclass
class SimilarityResult:
    score: Tensor       # [B] float64: D_S, the best Dice over every tau evaluated
    field: Tensor       # [B, nd, *s] coarse grid (voxels, spatial-axis order) of the tau that scored `score`
    losses: Tensor      # [K + 1, B] blurred loss at the finest level before/after each step (kept start)
    iterations: Tensor  # [B] int64: descent steps taken per item, summed over levels and starts


def _binary(x: Tensor, threshold: float) -> Tensor:
    return x if x.dtype == torch.bool else x > threshold


def _count(X: Tensor) -> Tensor:
    """Set voxels per batch item of a bool batch, int64 (summed as bytes: ~2x faster than bool)."""
    X = X.flatten(1)
    acc = torch.int32 if X.shape[1] < 2**31 else torch.int64
    return X.view(torch.uint8).sum(1, dtype=acc).to(torch.int64)


def _dice_bool(A: Tensor, B: Tensor) -> Tensor:
    """Pooled Dice of bool batches (integer counts, one float64 division)."""
    A, B = A.flatten(1), B.flatten(1)
    inter = _count(A & B)
    total = _count(A) + _count(B)
    return torch.where(total > 0, 2 * inter.double() / total.clamp_min(1).double(),
                       torch.ones(total.shape, dtype=torch.float64, device=A.device))


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


# ----------------------------------------------------------------------------------------------
# the exact integer translation search


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (pocketfft is fastest on those)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _bbox(m: Tensor) -> tuple[list[int], list[int]]:
    """Per spatial axis [lo, hi) of the voxels set in any channel of m (C, *S)."""
    nd = m.dim() - 1
    u = m.view(torch.uint8)                    # amax over bytes: ~3x faster than any() on bool
    head = u.amax(dim=-1).amax(dim=0)           # (*S[:-1]): one pass over the volume
    last = u.amax(dim=tuple(range(nd)))         # (S[-1],): the second pass
    lo, hi = [], []
    for k in range(nd):
        if k == nd - 1:
            proj = last
        else:
            proj = head.any(dim=tuple(j for j in range(nd - 1) if j != k)) if nd > 2 else head
        nz = proj.nonzero()
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]) + 1)
    return lo, hi


def _box_sums(a: Tensor, ranges: list[tuple[Tensor, Tensor]]) -> Tensor:
    """sum of a (*m) over the boxes prod_k [l_k, h_k) for every combination of the
    per-axis interval lists `ranges` (each (l, h), int64 vectors), via the summed
    table and inclusion-exclusion; exact integers."""
    nd = a.dim()
    # the crop's summed table, int32 (4 bytes a voxel) while the sums fit
    acc = torch.int32 if a.numel() < 2**31 else torch.int64
    P = a
    for k in range(nd):
        P = torch.cumsum(P, k, dtype=acc)
    out = None
    for corner in range(1 << nd):
        idx, valid, sign = [], None, 1
        for k, (l, h) in enumerate(ranges):
            take_hi = not (corner >> k) & 1
            i = (h if take_hi else l) - 1
            sign = sign if take_hi else -sign
            shape = [1] * nd
            shape[k] = -1
            v = (i >= 0).view(shape)
            valid = v if valid is None else valid & v
            idx.append(i.clamp_min(0).view(shape))
        term = P[tuple(idx)].to(torch.int64) * valid
        out = sign * term if out is None else out + sign * term
    return out


def _overlap_fft(ac: Tensor, bc: Tensor, d_ranges: list[range]) -> Tensor:
    """The overlap counts sum_c sum_y ac(y + d) bc(y) of every crop offset d in the box, by
    FFT cross-correlation in float64 (rounded: exact below 2^52), channel by channel,
    periods chosen so that no offset in the box wraps around."""
    nd = ac.dim() - 1
    ma, mb = ac.shape[1:], bc.shape[1:]
    pad = _fft_pad(ma, mb, d_ranges)
    dims = tuple(range(-nd, 0))
    acc = None
    for c in range(ac.shape[0]):
        Fa = torch.fft.rfftn(ac[c].to(torch.float64), s=pad, dim=dims)
        Fa.mul_(torch.fft.rfftn(bc[c].to(torch.float64), s=pad, dim=dims).conj().resolve_conj())
        acc = Fa if acc is None else acc.add_(Fa)
        del Fa
    corr = torch.fft.irfftn(acc, s=pad, dim=dims)
    del acc
    idx = [torch.remainder(torch.arange(r[0], r[-1] + 1, device=ac.device), p) for r, p in zip(d_ranges, pad)]
    return corr[torch.meshgrid(*idx, indexing="ij")].round_().to(torch.int64)


def _fft_pad(ma, mb, d_ranges) -> list[int]:
    return [_fast_len(max(r[-1] + nb, na - r[0])) for r, na, nb in zip(d_ranges, ma, mb)]


def _counts_direct_torch(a3: Tensor, b3: Tensor, d_lo, d_n, box_lo, box_len) -> tuple[Tensor, Tensor]:
    """overlap(d) and size1(d) as `coopseg.overlap_counts` (csrc/cpu/overlap.cpp) returns
    them, for the offsets d_lo + [0, d_n) of 3-D crops (C, *3), in torch ops on any device
    (CUDA tensors, no C++ extension): per (d0, d1), the overlaps of every d2 at once are one
    conv1d of the overlapping rows (a cross-correlation summed over rows as channels; exact:
    float32 while the counts stay below 2^24), in blocks of rows whose float copies take at
    most one input volume; size1 from the prefix sums of the box's column histogram.
    The conv1d computes only the offsets asked for (the rows of a are cut to the window
    those offsets read), so its work is rows x n2 x B2 multiply-adds -- what slicing each
    shift costs -- instead of the full correlation's rows x A2 x B2."""
    n0, n1, n2 = d_n
    dev = a3.device
    overlap = torch.zeros(n0, n1, n2, dtype=torch.int64, device=dev)
    size1 = torch.zeros_like(overlap)
    C, A, B = a3.shape[0], a3.shape[1:], b3.shape[1:]
    d2 = torch.arange(d_lo[2], d_lo[2] + n2, device=dev)
    l2 = (d2 + box_lo[2]).clamp(0, A[2])
    h2 = torch.maximum((d2 + box_lo[2] + box_len[2]).clamp(0, A[2]), l2)
    j2 = d2 + B[2] - 1                                   # full-correlation output index of offset d2
    valid2 = (j2 >= 0) & (j2 < A[2] + B[2] - 1)
    # the valid outputs, the only ones computed (j_hi < j_lo: no d2 offset overlaps, every overlap is 0)
    j_lo, j_hi = max(0, d_lo[2] + B[2] - 1), min(A[2] + B[2] - 2, d_lo[2] + n2 + B[2] - 2)
    j2.sub_(j_lo).clamp_(0, max(0, j_hi - j_lo))        # now the index into the computed outputs
    # output j of the full correlation reads a's padded row at [j, j + B2): a[j - B2 + 1, j + 1)
    a_lo, a_hi = max(0, j_lo - B[2] + 1), min(A[2], j_hi + 1)
    pad = (max(0, B[2] - 1 - j_lo), max(0, j_hi - A[2] + 1))
    # float32 is exact while the counts stay below 2^24 -- with a direct summation; on CUDA
    # cuDNN may pick an FFT or Winograd convolution (rounding errors), so float64 there, where
    # it has none of those
    exact32 = C * min(A[0], B[0]) * min(A[1], B[1]) * min(A[2], B[2]) < 2 ** 24 and dev.type == "cpu"
    dtype = torch.float32 if exact32 else torch.float64
    volume = C * A[0] * A[1] * A[2]
    # rows of one conv1d call: the bool and float copies of a's window and of b's rows and the
    # padded float window (j_hi - j_lo + B2 long) take <= 2 (crop) volumes (+ one row of each)
    i = dtype.itemsize
    row_bytes = (1 + i) * (a_hi - a_lo) + i * (j_hi - j_lo + B[2]) + (1 + i) * B[2]
    block = max(1, 2 * volume // max(1, row_bytes))

    def clamp(k, d):
        lo = min(max(d + box_lo[k], 0), A[k])
        return lo, max(lo, min(max(d + box_lo[k] + box_len[k], 0), A[k]))

    for i0 in range(n0):
        d0 = d_lo[0] + i0
        x0 = clamp(0, d0)
        y0 = (max(0, -d0), min(B[0], A[0] - d0))
        for i1 in range(n1):
            d1 = d_lo[1] + i1
            x1 = clamp(1, d1)
            if x0[0] < x0[1] and x1[0] < x1[1]:
                hist = a3[:, x0[0]:x0[1], x1[0]:x1[1]].sum(dim=(0, 1, 2), dtype=torch.int64)
                pref = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
                size1[i0, i1] = pref[h2] - pref[l2]
            y1 = (max(0, -d1), min(B[1], A[1] - d1))
            if y0[0] >= y0[1] or y1[0] >= y1[1] or j_hi < j_lo:
                continue
            corr = None
            ny1 = y1[1] - y1[0]
            # a block: whole planes of rows where they fit, else part of one plane's rows
            step0, step1 = (block // (C * ny1), ny1) if block >= C * ny1 else (1, max(1, block // C))
            for p0, q0 in itertools.product(range(y0[0], y0[1], step0), range(y1[0], y1[1], step1)):
                p1, q1 = min(y0[1], p0 + step0), min(y1[1], q0 + step1)
                ra = a3[:, p0 + d0:p1 + d0, q0 + d1:q1 + d1, a_lo:a_hi].reshape(1, -1, a_hi - a_lo).to(dtype)
                rb = b3[:, p0:p1, q0:q1].reshape(1, -1, B[2]).to(dtype)
                out = F.conv1d(F.pad(ra, pad), rb)[0, 0]     # outputs j_lo .. j_hi
                del ra, rb
                corr = out if corr is None else corr.add_(out)
            overlap[i0, i1] = torch.where(valid2, corr[j2].round().to(torch.int64), 0)
    return overlap, size1


# the cost model of method="auto", in seconds on one core of this project's CPU (AMD EPYC,
# fitted to benchmarks/table.py's translation-search rows, 64x64x32 and 128x128x64, bounds
# 3, 16 and any): the C++ direct counter costs _WORD_COST per 64-voxel word AND+popcount and
# _SHIFT_COST per shift (scoring included); the torch fallback _SLICE_COST per (d0, d1) pair
# plus _DIRECT_COST per voxel pair of its row correlations; the FFT _FFT_COST per point and
# log2(points) of each of its 2C + 1 transforms
_WORD_COST = 2.0e-10
_SHIFT_COST = 1.5e-7
_SLICE_COST = 1.0e-3
_DIRECT_COST = 3.0e-9
_FFT_COST = 3.0e-9
# the peak-memory target: at most this many input volumes (one item's bool masks, C * prod(S)
# bytes) above the inputs, at any bound; the score arrays of one chunk of shifts take at most
# _CHUNK_VOLUMES of it (_SHIFT_BYTES a shift: the int64 overlap and size1, the float64 score
# and its temporaries)
_BUDGET_VOLUMES = 4
_CHUNK_VOLUMES = 1
_SHIFT_BYTES = 48
# the FFT path's peak in bytes a padded point (float64 input, two complex spectra, the
# irfftn output and its copy of the spectrum) -- it is taken only where it fits the budget
_FFT_BYTES_PER_POINT = 40


def _overlap_len(A: int, B: int, d: int) -> int:
    """The overlap length of [0, A) shifted by -d with [0, B) (b's indices y with y + d in a)."""
    return max(0, min(B, A - d) - max(0, -d))


def _overlap_sum(A: int, B: int, r: range) -> int:
    """sum over offsets d in r of _overlap_len(A, B, d)."""
    return sum(_overlap_len(A, B, d) for d in r)


def _best(score: Tensor, shift0: Sequence[int], perm: Sequence[int]):
    """(best score, t) of one chunk of scores (axes in `perm` order, index 0 = shift0);
    ties: the smallest |t|_1, then the lexicographically smallest t in the original axis
    order; None when no score is > 0."""
    best = score.max()
    if best <= 0:
        return None
    cand = (score == best).nonzero() + torch.tensor(shift0, device=score.device)
    key = cand.abs().sum(1)
    cand = cand[key == key.min()].tolist()
    inv = [perm.index(k) for k in range(len(perm))]
    t = min(tuple(c[j] for j in inv) for c in cand)
    return float(best), t


def _search_one(a: Tensor, b: Tensor, bound: Sequence[int], method: str) -> tuple[list[int], float]:
    """(best shift, its Dice) for one item: a, b (C, *S) bool."""
    nd = a.dim() - 1
    size = a.shape[1:]
    n1, n2 = int(_count(a[None])), int(_count(b[None]))
    zero = [0] * nd
    if n1 == 0:
        return zero, 1.0 if n2 == 0 else 0.0
    if n2 == 0:  # every candidate keeps part of s1 against an empty s2: Dice 0; the identity is smallest
        return zero, 0.0
    lo_a, hi_a = _bbox(a)
    lo_b, hi_b = _bbox(b)
    ac = a[(slice(None), *[slice(l, h) for l, h in zip(lo_a, hi_a)])]
    bc = b[(slice(None), *[slice(l, h) for l, h in zip(lo_b, hi_b)])]
    ma, mb = ac.shape[1:], bc.shape[1:]
    # shift t <-> crop offset d = t + lo_b - lo_a; crops overlap only for -mb < d < ma
    t_ranges = []
    for T, la, lb, na, nb in zip(bound, lo_a, lo_b, ma, mb):
        off = lb - la
        t_lo, t_hi = max(-T, -nb + 1 - off), min(T, na - 1 - off)
        if t_lo > t_hi:
            return zero, 0.0  # no shift in the bound overlaps: every candidate scores 0
        t_ranges.append(range(t_lo, t_hi + 1))
    d_ranges = [range(r[0] + lb - la, r[-1] + lb - la + 1) for r, la, lb in zip(t_ranges, lo_a, lo_b)]
    n_shift = math.prod(len(r) for r in t_ranges)
    C = a.shape[0]
    volume = C * math.prod(size)            # bytes of one bool mask of this item: "an input volume"
    cpp = a.device.type == "cpu" and _backend.HAS_CPP
    # 3-D views ((C, 1, H, W) for 2-D masks) whose last axis is the packed one: the axis whose
    # packed copies (a's, b's, and the counter's copy of a's rows shifted onto b's words) take
    # the fewest 64-bit words, i.e. the least memory and AND + popcount work -- a row of L voxels
    # takes ceil(L / 64) words, so packing a short axis costs up to 8 bytes a voxel (an axis of
    # 2 voxels: 4 volumes a copy); among equals, one whose crops fit one word (the counter's
    # fastest case), then the longest
    def packed_words(k: int) -> int:
        rows_a, rows_b = math.prod(ma) // ma[k], math.prod(mb) // mb[k]
        wa, wb = -(-ma[k] // 64), -(-mb[k] // 64)
        return rows_a * wa + rows_b * wb + rows_a * wb

    p = min(range(nd), key=lambda k: (packed_words(k), max(ma[k], mb[k]) > 64, -(ma[k] + mb[k]), k))
    perm = [k for k in range(nd) if k != p] + [p]
    a3 = ac.permute(0, *[k + 1 for k in perm])
    b3 = bc.permute(0, *[k + 1 for k in perm])
    dr3 = [d_ranges[k] for k in perm]
    box_lo = [-lo_b[k] for k in perm]
    box_len = [size[k] for k in perm]
    if nd == 2:
        a3, b3 = a3.unsqueeze(1), b3.unsqueeze(1)
        dr3, box_lo, box_len = [range(0, 1)] + dr3, [0] + box_lo, [1] + box_len
        perm3 = [None] + perm
    else:
        perm3 = perm
    A3, B3 = a3.shape[1:], b3.shape[1:]

    if method == "auto":
        if cpp:
            words = C * _overlap_sum(A3[0], B3[0], dr3[0]) * _overlap_sum(A3[1], B3[1], dr3[1]) * \
                sum((_overlap_len(A3[2], B3[2], d) + 63) // 64 + 1 for d in dr3[2])
            direct = words * _WORD_COST + n_shift * _SHIFT_COST
        else:
            rows = C * _overlap_sum(A3[0], B3[0], dr3[0]) * _overlap_sum(A3[1], B3[1], dr3[1])
            direct = len(dr3[0]) * len(dr3[1]) * _SLICE_COST + \
                rows * min(len(dr3[2]), A3[2] + B3[2] - 1) * B3[2] * _DIRECT_COST
        pts = math.prod(_fft_pad(ma, mb, d_ranges))
        fft = (2 * C + 1) * pts * math.log2(max(pts, 2)) * _FFT_COST
        fft_bytes = _FFT_BYTES_PER_POINT * pts + _SHIFT_BYTES * n_shift + 8 * ac[0].numel()
        method = "fft" if fft < direct and fft_bytes <= _BUDGET_VOLUMES * volume else "direct"

    # |s1 shifted by t| inside the volume: voxels x of the crop with 0 <= x_k + lo_a_k - t_k < S_k,
    # i.e. d_k - lo_b_k <= x_k < d_k - lo_b_k + S_k
    if method == "fft":
        overlap = _overlap_fft(ac, bc, d_ranges)
        ranges = []
        for r, la, n, na in zip(t_ranges, lo_a, size, ma):
            t = torch.arange(r[0], r[-1] + 1, device=a.device)
            ranges.append(((t - la).clamp(0, na), (t + n - la).clamp(0, na)))
        size1 = _box_sums(ac.sum(0, dtype=torch.int32) if C > 1 else ac[0], ranges)
        found = [_best(_score(overlap, size1, n2), [r[0] for r in t_ranges], list(range(nd)))]
    else:
        if cpp:
            ops = torch.ops.coopseg
            pa, pb = ops.pack_bits(a3), ops.pack_bits(b3)
            counts = lambda lo, n: ops.overlap_counts(pa, pb, A3[2], B3[2], lo, n, box_lo, box_len)  # noqa: E731
        else:
            counts = lambda lo, n: _counts_direct_torch(a3, b3, lo, n, box_lo, box_len)  # noqa: E731
        # boxes of shifts (whole rows of the packed axis' shifts where they fit, then whole
        # planes, ...) whose score arrays never exceed _CHUNK_VOLUMES input volumes at any bound
        n0, n1_, n2_ = (len(r) for r in dr3)
        per_chunk = max(1, _CHUNK_VOLUMES * volume // _SHIFT_BYTES)
        c2 = min(n2_, per_chunk)
        c1 = min(n1_, max(1, per_chunk // n2_)) if c2 == n2_ else 1
        c0 = max(1, per_chunk // (c1 * n2_)) if c1 == n1_ and c2 == n2_ else 1
        to_t = [(lo_b[k] - lo_a[k]) if k is not None else 0 for k in perm3]  # d - t per permuted axis
        found = []
        for i0, i1, i2 in itertools.product(range(0, n0, c0), range(0, n1_, c1), range(0, n2_, c2)):
            lo = [dr3[0][0] + i0, dr3[1][0] + i1, dr3[2][0] + i2]
            n = [min(c0, n0 - i0), min(c1, n1_ - i1), min(c2, n2_ - i2)]
            overlap, size1 = counts(lo, n)
            score = _score(overlap, size1, n2)
            del overlap, size1
            if nd == 2:
                score = score[0]
            found.append(_best(score, [v - o for v, o in zip(lo, to_t)][3 - nd:], perm))
            del score
    found = [f for f in found if f is not None]
    if not found:
        return zero, 0.0
    best, t = min(found, key=lambda f: (-f[0], sum(map(abs, f[1])), f[1]))
    return list(t), best


def _score(overlap: Tensor, size1: Tensor, n2: int) -> Tensor:
    """Dice 2 overlap / (size1 + n2) in float64 (exact integers in, one rounding), -1 where
    the shift moved all of s1 out of the volume (size1 = 0: no candidate)."""
    score = overlap.to(torch.float64).mul_(2).div_((size1 + n2).to(torch.float64))
    return score.masked_fill_(size1 == 0, -1.0)


def _search(A: Tensor, B: Tensor, bound: Sequence[int], method: str) -> tuple[Tensor, Tensor]:
    ts, ds = [], []
    for i in range(A.shape[0]):
        t, d = _search_one(A[i], B[i], bound, method)
        ts.append(t)
        ds.append(d)
    return (torch.tensor(ts, dtype=torch.float64, device=A.device),
            torch.tensor(ds, dtype=torch.float64, device=A.device))


def translation_search(s1: Tensor, s2: Tensor, max_translation: int | Sequence[int] | None = None, *,
                       method: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact search of the integer shift t (|t_k| <= max_translation[k]; None: any)
    maximising Dice(s1(x + t), s2) (zero padding, channels pooled: overlap and sizes
    summed over channels). max_translation: one int >= 0 for every axis or one per axis.

    Both masks are cropped to their bounding boxes first; the overlap counts of all
    shifts come from `method`: "direct" (exact counts per shift: on CPU the C++ counter
    on masks packed 64 voxels a word, elsewhere a conv1d of rows per shift pair; the
    shifts are scored in chunks, so the peak stays <= 4 input volumes at any bound)
    or "fft" (float64 cross-correlation of the crops: time ~ crop log crop whatever the
    bound, memory ~30-40 bytes a padded point, many volumes at large bounds); "auto"
    picks the cheaper by a cost model among those whose peak fits 4 input volumes (one
    item's bool masks), i.e. the FFT only where it fits. |s1 shifted| inside the volume
    comes with the counts (direct) or from the crop's summed table (fft). A shift that
    moves all of s1 out is no candidate; empty masks follow D_S's rules (module
    docstring). Ties go to the smallest |t|_1, then the lexicographically smallest t.
    Returns (t (B, nd) float64 voxels, Dice (B,) float64).
    """
    _checks.mask_pair("s1", s1, "s2", s2)
    bound = _checks.translation_bound("max_translation", max_translation, tuple(s1.shape[2:]))
    _checks.choice("method", method, SEARCH_METHODS)
    return _search(_binary(s1, 0.5), _binary(s2, 0.5), bound, method)


# ----------------------------------------------------------------------------------------------
# the descent


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


def relative_similarity(s1: Tensor, s2: Tensor, *, omega: str = "elastic", grid: Sequence[int] | None = None,
                        grid_spacing: float = 16, iters: int = 100, step: float = 1.0,
                        max_translation: int | Sequence[int] | None = None,
                        kernel: Sequence[float] = (1.0, 2.0, 1.0), momentum: float = 0.0, tol: float = 1e-2,
                        init: Tensor | None = None, levels: int | None = None,
                        backend: str = "auto") -> SimilarityResult:
    """D_S(s1, s2, Omega) for batches of masks (B, C, *S) (bool, uint8 or float,
    thresholded at 0.5); see the module docstring for the definitions.

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
    if levels is None:
        levels = _auto_levels(size)
    else:
        levels = _checks.integer("levels", levels, minimum=1)
        if levels > 1 and min(size) < 2 ** (levels - 1) + 1:
            raise ValueError(f"levels={levels} halves every axis {levels - 1} times, which needs spatial sizes "
                             f">= {2 ** (levels - 1) + 1}, got {size}")
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

    p1 = _pyramid(blur(f1, kernel=k, backend=backend), levels, k, backend)
    p2 = _pyramid(blur(f2, kernel=k, backend=backend), levels, k, backend)

    # step caps: `iters` at the coarsest level, divided by 2^nd (the cost ratio of one
    # step) at every finer level, so that each level gets about the same time
    caps = [int(math.ceil(iters / (2 ** nd) ** (levels - 1 - lvl))) for lvl in range(levels)]
    # h is formed at the coarsest level only (at full resolution it would cost more than the
    # steps): h ~ (d_k s)^2 scales to a finer level by the squared per-axis resampling factor
    top = levels - 1
    h_top = {g: _preconditioner(p1[top], g, backend) for g in {coarse_size, (1,) * nd}}

    def precond(lvl: int, grid_size) -> Tensor:
        h = h_top[grid_size]
        return h if lvl == top else h * _scale(p1[top].shape[2:], p1[lvl].shape[2:], h).square()

    # the sub-voxel translation refinement, at full resolution only: the exact shift is
    # already within half a voxel of the optimum, which coarser levels cannot resolve
    lim = torch.tensor(bound, dtype=dtype, device=device).view(1, nd, *([1] * nd))
    ones = (1,) * nd
    c_t, losses_t, n_t = _descend(p1[0], p2[0], shaped(t, ones), precond(0, ones), lim=lim,
                                  **dict(opts, iters=caps[0]))
    steps += n_t
    W = warp(f1, c_t, align_corners=True, backend=backend) > 0.5
    consider(_candidate_dice(W, A, Bm), shaped(c_t, coarse_size))
    if omega == "translation":
        return SimilarityResult(score=score, field=field, losses=torch.stack(losses_t), iterations=steps)

    # elastic: both starts, as one batch of 2B, at the coarsest level; then per item the one
    # with the lower loss there goes on through the finer levels
    start_id = torch.zeros(B, nd, *coarse_size, dtype=dtype, device=device) if init is None else \
        init.detach().to(dtype).clone()
    starts = torch.cat([start_id, shaped(c_t, coarse_size)])
    r = _scale(size, p1[top].shape[2:], starts)
    h = precond(top, coarse_size)
    if top > 0:
        c2, losses2, n2 = _descend(_expand_batch(p1[top], 2), _expand_batch(p2[top], 2), starts * r,
                                   _expand_batch(h, 2), lim=None, **dict(opts, iters=caps[top]))
        last = losses2[-1]
    else:  # one level: compare the two starts' losses before descending
        c2 = starts * r
        last = torch.cat([similarity_step(p1[0], p2[0], c2[:B], backend=backend)[0],
                          similarity_step(p1[0], p2[0], c2[B:], backend=backend)[0]])
        n2 = torch.zeros(2 * B, dtype=torch.int64, device=device)
    steps += n2[:B] + n2[B:]
    use_tr = (last[B:] < last[:B]).view(-1, *([1] * nd + [1]))
    c = torch.where(use_tr, c2[B:], c2[:B]) / r
    losses = []
    for lvl in range(top if top > 0 else 0, -1, -1):
        if top > 0 and lvl == top:
            continue
        r = _scale(size, p1[lvl].shape[2:], c)
        cl, losses, n = _descend(p1[lvl], p2[lvl], c * r, precond(lvl, coarse_size) if lvl != top else h,
                                 lim=None, **dict(opts, iters=caps[lvl]))
        c = cl / r
        steps += n
    W = warp(f1, c, align_corners=True, backend=backend) > 0.5
    consider(_candidate_dice(W, A, Bm), c)
    return SimilarityResult(score=score, field=field, losses=torch.stack(losses), iterations=steps)
