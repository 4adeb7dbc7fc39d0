"""The exact integer translation search behind D_S(translation) (definitions:
docs/conventions.md#d_s-definitions); `translation_search` below describes the methods.

In this file, in order: the FFT counter (`_overlap_fft`), the torch direct counter
(`_counts_direct_torch`: any device, no C++ extension; the C++ bit-packed counter is
csrc/cpu/overlap.cpp, `torch.ops.coopseg.overlap_counts`), the cost model of
method="auto" and the memory budget, the search of one batch item (`_search_one`:
crops, packing axis, method, chunks of shifts, ties) and the public `translation_search`.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks
from ._masks import _binary, _count

SEARCH_METHODS = ("auto", "direct", "fft")


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
        for k, (lo, h) in enumerate(ranges):
            take_hi = not (corner >> k) & 1
            i = (h if take_hi else lo) - 1
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
    ac = a[(slice(None), *[slice(lo, hi) for lo, hi in zip(lo_a, hi_a)])]
    bc = b[(slice(None), *[slice(lo, hi) for lo, hi in zip(lo_b, hi_b)])]
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
    moves all of s1 out is no candidate; empty masks follow D_S's rules
    (docs/conventions.md#d_s-definitions). Ties go to the smallest |t|_1, then the
    lexicographically smallest t.
    Returns (t (B, nd) float64 voxels, Dice (B,) float64).
    """
    _checks.mask_pair("s1", s1, "s2", s2)
    bound = _checks.translation_bound("max_translation", max_translation, tuple(s1.shape[2:]))
    _checks.choice("method", method, SEARCH_METHODS)
    return _search(_binary(s1, 0.5), _binary(s2, 0.5), bound, method)
