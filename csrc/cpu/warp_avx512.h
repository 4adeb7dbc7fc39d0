// Hand-written AVX-512 rows of the CPU warp for its hot instantiation: float
// data, 32-bit offsets, 3-D, either padding. Everything one voxel needs stays
// in registers for 16 voxels at a time: positions from the cell's two node
// values, floor, weights, in-image masks, offsets, the four corner-row pair
// gathers and the interpolation (or, backward, the position gradient and the
// scatter weights). The generic path (grid.h: row_taps writes ~19
// structure-of-arrays rows that row_sample / row_position_grad / row_scatter
// read back) keeps serving every other instantiation and every build without
// AVX-512, and is also the fallback of these rows when their result is not
// finite (the exact non-finite rules live there only).
//
// Arithmetic is that of the generic path (same formulas, same order), so the
// results agree with it to rounding (FMA contraction may differ; the per-cell
// sums reduce in another order). Everything a row computes depends on that
// row's data only, and warp_slab_pass visits rows in a fixed order, so the
// coarse gradient stays bitwise reproducible and independent of the thread
// count. The rows are bound by the gathers' cache misses, which software
// prefetches of the rows and planes ahead partly hide (prefetch_ahead;
// docs/kernels.md#avx-512-rows).
#pragma once

#include "grid.h"

#include <type_traits>

#if defined(__AVX512F__)

namespace coopseg {
namespace avx512 {

// The instantiation these rows implement (float images, 32-bit offsets, 3-D); every
// other one runs the generic rows of grid.h.
template <typename T, typename I, int ND>
inline constexpr bool kRows = std::is_same_v<T, float> && std::is_same_v<I, int32_t> && ND == 3;

// The row's coarse field along w (coarse_row's rowf, ND = 3 channels): in
// registers when the coarse w axis has at most 16 nodes, else gathered.
struct RowField {
  const float* rowf;
  int64_t sw;
  __m512 r[3];
  RowField(const float* rowf_, int64_t sw_) : rowf(rowf_), sw(sw_) {
    if (sw <= 16) {
      const __mmask16 m = __mmask16((1u << sw) - 1u);
      for (int j = 0; j < 3; ++j) r[j] = _mm512_maskz_loadu_ps(m, rowf + j * sw);
    }
  }
  __m512 node(int j, __m512i idx) const {
    return sw <= 16 ? _mm512_permutexvar_ps(idx, r[j]) : _mm512_i32gather_ps(idx, rowf + j * sw, 4);
  }
};

// The taps of one axis for 16 positions (as axis_taps): the lower index, the
// in-image masks of both taps, their weights and, GRAD, weight derivatives.
struct Axis {
  __m512i i;
  __mmask16 k0, k1;
  __m512 w0, w1, g0, g1;
};

template <bool BORDER, bool GRAD>
inline Axis axis(__m512 p, int32_t n) {
  Axis A;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(p, p, _CMP_ORD_Q), p);  // NaN -> 0 (flagged as bad)
  const __m512 hi = _mm512_set1_ps(float(n - 1));
  __mmask16 clip = 0xFFFF;
  if (BORDER) {
    // grid_sample's clip: the border itself counts as outside for the gradient
    clip = _mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(p, hi, _CMP_LT_OQ);
    p = _mm512_min_ps(_mm512_max_ps(p, zero), hi);
  } else {
    p = _mm512_min_ps(_mm512_max_ps(p, _mm512_set1_ps(-2.f)), _mm512_add_ps(hi, _mm512_set1_ps(2.f)));
  }
  const __m512 fl = _mm512_roundscale_ps(p, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(p, fl);
  A.i = _mm512_cvttps_epi32(fl);
  const __m512i nn = _mm512_set1_epi32(n);
  A.k0 = _mm512_cmplt_epu32_mask(A.i, nn);                                      // 0 <= i < n
  A.k1 = _mm512_cmplt_epu32_mask(_mm512_add_epi32(A.i, _mm512_set1_epi32(1)), nn);  // -1 <= i < n - 1
  A.w0 = _mm512_maskz_sub_ps(A.k0, one, f);
  A.w1 = _mm512_maskz_mov_ps(A.k1, f);
  if (GRAD) {
    A.g0 = _mm512_maskz_mov_ps(A.k0 & clip, _mm512_set1_ps(-1.f));
    A.g1 = _mm512_maskz_mov_ps(A.k1 & clip, one);
  }
  return A;
}

// Everything about 16 voxels of a row but the image values. Corner row k =
// a * 2 + b (a: d tap, b: h tap) is read as the pair [pb, pb + 1] of
// neighbouring elements (pb = the lower w tap clamped to [0, W - 2], as
// row_corners_pairs); pw0/pw1 (pg0/pg1) are the w weights (derivatives) of
// the pair's two elements, zero for an element that is not a tap.
struct Taps16 {
  Axis d, h, w;
  __mmask16 bad;          // position not finite
  __mmask16 row[4];       // corner row inside the image (and lane inside the row)
  __m512i off[4];         // element offset of each corner row's pair
  __m512 pw0, pw1, pg0, pg1;
};

template <bool BORDER, bool GRAD>
inline void taps16(const RowField& F, const AxisInterp<float>& Iw, Dims3 S, float d, float h, int64_t w,
                   __mmask16 m, Taps16& t) {
  const __m512i i0 = _mm512_maskz_loadu_epi32(m, Iw.i0.data() + w);
  const __m512i i1 = _mm512_maskz_loadu_epi32(m, Iw.i1.data() + w);
  const __m512 l1 = _mm512_maskz_loadu_ps(m, Iw.l1.data() + w);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 base[3] = {_mm512_set1_ps(d), _mm512_set1_ps(h), _mm512_add_ps(_mm512_set1_ps(float(w)), iota)};
  __m512 p[3];
  for (int j = 0; j < 3; ++j) {
    const __m512 a = F.node(j, i0);
    const __m512 b = _mm512_sub_ps(F.node(j, i1), a);
    p[j] = _mm512_add_ps(base[j], _mm512_fmadd_ps(b, l1, a));
  }
  // a non-finite (NaN or infinite) position: x * 0 is NaN exactly then
  const __m512 zero = _mm512_setzero_ps();
  const __m512 z =
      _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p[0], zero), _mm512_mul_ps(p[1], zero)), _mm512_mul_ps(p[2], zero));
  t.bad = _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q);
  t.d = axis<BORDER, GRAD>(p[0], int32_t(S.d));
  t.h = axis<BORDER, GRAD>(p[1], int32_t(S.h));
  t.w = axis<BORDER, GRAD>(p[2], int32_t(S.w));
  const __m512i plane = _mm512_set1_epi32(int32_t(S.h * S.w)), rowstride = _mm512_set1_epi32(int32_t(S.w));
  const __m512i od0 = _mm512_mullo_epi32(t.d.i, plane), oh0 = _mm512_mullo_epi32(t.h.i, rowstride);
  const __m512i od[2] = {od0, _mm512_add_epi32(od0, plane)}, oh[2] = {oh0, _mm512_add_epi32(oh0, rowstride)};
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i pb = _mm512_min_epi32(_mm512_max_epi32(t.w.i, _mm512_setzero_si512()), _mm512_set1_epi32(int32_t(S.w - 2)));
  // which pair element each w tap is: both (inside), x0 as tap 1 (i = -1), x1 as tap 0 (i = W - 1)
  const __mmask16 both = _mm512_cmpeq_epi32_mask(t.w.i, pb);
  const __mmask16 left = _mm512_cmpeq_epi32_mask(_mm512_add_epi32(t.w.i, one), pb);
  const __mmask16 right = _mm512_cmpeq_epi32_mask(t.w.i, _mm512_add_epi32(pb, one));
  t.pw0 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(both, t.w.w0), left, t.w.w1);
  t.pw1 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(both, t.w.w1), right, t.w.w0);
  if (GRAD) {
    t.pg0 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(both, t.w.g0), left, t.w.g1);
    t.pg1 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(both, t.w.g1), right, t.w.g0);
  }
  const __mmask16 kd[2] = {__mmask16(m & t.d.k0), __mmask16(m & t.d.k1)};
  const __mmask16 kh[2] = {t.h.k0, t.h.k1};
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      t.row[a * 2 + b] = kd[a] & kh[b];
      t.off[a * 2 + b] = _mm512_add_epi32(_mm512_add_epi32(od[a], oh[b]), pb);
    }
}

// The four corner rows' pairs of channel image `img`: x0[k], x1[k] the pair
// elements (0 for a corner row outside the image, which is not read).
inline void pairs16(const float* img, const Taps16& t, __m512 x0[4], __m512 x1[4]) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512d zero = _mm512_setzero_pd();
  for (int k = 0; k < 4; ++k) {
    const __m512d p0 = _mm512_mask_i32gather_pd(zero, __mmask8(t.row[k]), _mm512_castsi512_si256(t.off[k]), img, 4);
    const __m512d p1 =
        _mm512_mask_i32gather_pd(zero, __mmask8(t.row[k] >> 8), _mm512_extracti64x4_epi64(t.off[k], 1), img, 4);
    x0[k] = _mm512_permutex2var_ps(_mm512_castpd_ps(p0), even, _mm512_castpd_ps(p1));
    x1[k] = _mm512_permutex2var_ps(_mm512_castpd_ps(p0), odd, _mm512_castpd_ps(p1));
  }
}

// Software prefetch of what the rows ahead will read: the image data a voxel
// needs moves by about one row per output row and one plane per output plane
// (the displacement is smooth), and the gathers' addresses are too irregular
// for the hardware prefetchers. Per corner row, the lines of its first and last
// lane (16 voxels span about one or two lines per image row): kAheadRows rows
// ahead into L1 and kAheadPlanes planes ahead into L2. Measured on AMD EPYC
// (Zen 4): forward rows ~15 -> ~10 TSC ticks per voxel (benchmarks/README.md#warp-phases). Prefetches
// never fault; the addresses are formed as integers so that one past the
// volume is no pointer arithmetic out of bounds.
constexpr int64_t kAheadRows = 2, kAheadPlanes = 2;

template <int RW>
inline void prefetch_ahead(const float* base, const Taps16& t, int64_t W, int64_t plane) {
  const uintptr_t rows = uintptr_t(kAheadRows * W * 4), planes = uintptr_t(kAheadPlanes * plane * 4);
  for (int k = 0; k < 4; ++k) {
    const uintptr_t a = uintptr_t(base) + uintptr_t(int64_t(_mm_cvtsi128_si32(_mm512_castsi512_si128(t.off[k]))) * 4);
    const uintptr_t b =
        uintptr_t(base) + uintptr_t(int64_t(_mm_extract_epi32(_mm512_extracti32x4_epi32(t.off[k], 3), 3)) * 4);
    __builtin_prefetch(reinterpret_cast<const void*>(a + rows), RW, 3);
    __builtin_prefetch(reinterpret_cast<const void*>(b + rows), RW, 3);
    __builtin_prefetch(reinterpret_cast<const void*>(a + planes), RW, 2);
    __builtin_prefetch(reinterpret_cast<const void*>(b + planes), RW, 2);
  }
}

// lanes of v that are not finite
inline __mmask16 not_finite(__m512 v) {
  const __m512 z = _mm512_sub_ps(v, v);
  return _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q);
}

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

inline __mmask16 tail_mask(int64_t W, int64_t w) {
  return W - w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - w)) - 1u);
}

// The forward of row (d, h) of batch item b for all C channels (channel
// stride N): out[c * N + w]. Returns false, having written garbage, when some
// output is not finite; the caller then recomputes the row on the generic
// path (whose exact path handles non-finite data and NaN positions).
template <bool BORDER>
inline bool row_forward(const float* img, const float* rowf, const AxisInterp<float>& Iw, Dims3 S, int64_t C,
                        int64_t N, int64_t d, int64_t h, float* out) {
  const int64_t W = S.w;
  const RowField F(rowf, Iw.s);
  __mmask16 nonfinite = 0;
  for (int64_t w = 0; w < W; w += 16) {
    const __mmask16 m = tail_mask(W, w);
    Taps16 t;
    taps16<BORDER, false>(F, Iw, S, float(d), float(h), w, m, t);
    for (int64_t c = 0; c < C; ++c) {
      __m512 x0[4], x1[4];
      prefetch_ahead<0>(img + c * N, t, W, S.h * W);
      pairs16(img + c * N, t, x0, x1);
      __m512 r[4];
      for (int k = 0; k < 4; ++k) r[k] = _mm512_fmadd_ps(t.pw0, x0[k], _mm512_mul_ps(t.pw1, x1[k]));
      const __m512 v0 = _mm512_fmadd_ps(t.h.w0, r[0], _mm512_mul_ps(t.h.w1, r[1]));
      const __m512 v1 = _mm512_fmadd_ps(t.h.w0, r[2], _mm512_mul_ps(t.h.w1, r[3]));
      const __m512 v = _mm512_fmadd_ps(t.d.w0, v0, _mm512_mul_ps(t.d.w1, v1));
      nonfinite |= not_finite(v) & m;
      _mm512_mask_storeu_ps(out + c * N + w, m, v);
    }
    nonfinite |= t.bad & m;
  }
  return (nonfinite & 0xFFFF) == 0;
}

// Per-row scratch of the fused backward: the position gradient (3 rows: d, h,
// w) and, for the scatter, each corner row's pair base offsets and the two
// pair elements' weights, [corner row k][w].
struct BackwardScratch {
  std::vector<float> gpos, wt;  // wt: [k][w][2], times g[w] when C == 1
  std::vector<int32_t> base;
  explicit BackwardScratch(int64_t W) : gpos(3 * W), wt(8 * W), base(4 * W) {}
};

enum BackwardFlags : int { kGposNotFinite = 1, kGradNotFinite = 2 };

// The per-row work of the one-pass backward (warp_slab_pass) for row (d, h):
// OWN: the position gradient summed over the C channels into X.gpos (NaN
// where the position is not finite, as cell_sums); SCATTER: X.base/wt as
// row_scatter's first loop forms them for the task owning the slab [lo, hi)
// along d. `g` is the row's output gradient (channel stride N), `gm` the
// image gradient of the batch item (only prefetched here). Returns
// BackwardFlags: kGposNotFinite (X.gpos is then garbage; the caller takes the
// generic exact path) and kGradNotFinite (g holds a non-finite value: the
// caller scatters with row_scatter_exact).
template <bool BORDER, bool OWN, bool SCATTER>
inline int row_backward(const float* img, const float* g, const float* rowf, const AxisInterp<float>& Iw, Dims3 S,
                        int64_t C, int64_t N, int64_t d, int64_t h, int64_t lo, int64_t hi, const float* gm,
                        BackwardScratch& X) {
  const int64_t W = S.w;
  const RowField F(rowf, Iw.s);
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const __m512i lo_v = _mm512_set1_epi32(int32_t(lo)), n_v = _mm512_set1_epi32(int32_t(hi - lo));
  const __m512i safe = _mm512_set1_epi32(int32_t(lo * S.h * S.w));
  __mmask16 gp_bad = 0, g_bad = 0;
  for (int64_t w = 0; w < W; w += 16) {
    const __mmask16 m = tail_mask(W, w);
    Taps16 t;
    taps16<BORDER, OWN>(F, Iw, S, float(d), float(h), w, m, t);
    if (OWN) {
      __m512 gpd = _mm512_setzero_ps(), gph = gpd, gpw = gpd;
      for (int64_t c = 0; c < C; ++c) {
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + c * N + w);
        g_bad |= not_finite(gv) & m;
        __m512 x0[4], x1[4], r[4], q[4];
        prefetch_ahead<0>(img + c * N, t, W, S.h * W);
        pairs16(img + c * N, t, x0, x1);
        for (int k = 0; k < 4; ++k) {
          r[k] = _mm512_fmadd_ps(t.pw0, x0[k], _mm512_mul_ps(t.pw1, x1[k]));  // value along w
          q[k] = _mm512_fmadd_ps(t.pg0, x0[k], _mm512_mul_ps(t.pg1, x1[k]));  // its w derivative
        }
        __m512 th[2], dh[2], tw[2];
        for (int a = 0; a < 2; ++a) {
          th[a] = _mm512_fmadd_ps(t.h.w0, r[2 * a], _mm512_mul_ps(t.h.w1, r[2 * a + 1]));
          dh[a] = _mm512_fmadd_ps(t.h.g0, r[2 * a], _mm512_mul_ps(t.h.g1, r[2 * a + 1]));
          tw[a] = _mm512_fmadd_ps(t.h.w0, q[2 * a], _mm512_mul_ps(t.h.w1, q[2 * a + 1]));
        }
        gpd = _mm512_fmadd_ps(gv, _mm512_fmadd_ps(t.d.g0, th[0], _mm512_mul_ps(t.d.g1, th[1])), gpd);
        gph = _mm512_fmadd_ps(gv, _mm512_fmadd_ps(t.d.w0, dh[0], _mm512_mul_ps(t.d.w1, dh[1])), gph);
        gpw = _mm512_fmadd_ps(gv, _mm512_fmadd_ps(t.d.w0, tw[0], _mm512_mul_ps(t.d.w1, tw[1])), gpw);
      }
      gp_bad |= (not_finite(gpd) | not_finite(gph) | not_finite(gpw)) & m;
      // a NaN position has a NaN gradient (documented)
      _mm512_mask_storeu_ps(X.gpos.data() + w, m, _mm512_mask_mov_ps(gpd, t.bad, nan));
      _mm512_mask_storeu_ps(X.gpos.data() + W + w, m, _mm512_mask_mov_ps(gph, t.bad, nan));
      _mm512_mask_storeu_ps(X.gpos.data() + 2 * W + w, m, _mm512_mask_mov_ps(gpw, t.bad, nan));
    } else {
      for (int64_t c = 0; c < C; ++c) g_bad |= not_finite(_mm512_maskz_loadu_ps(m, g + c * N + w)) & m;
    }
    if (SCATTER) {
      for (int64_t c = 0; c < C; ++c) prefetch_ahead<1>(gm + c * N, t, W, S.h * W);  // for scatter_row
      // the d taps that are this task's (lo <= z < hi, unsigned compare), finite positions only
      const __mmask16 live = m & __mmask16(~t.bad);
      const __mmask16 s[2] = {
          __mmask16(live & _mm512_cmplt_epu32_mask(_mm512_sub_epi32(t.d.i, lo_v), n_v)),
          __mmask16(live & _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_add_epi32(t.d.i, _mm512_set1_epi32(1)), lo_v), n_v))};
      const __m512 wd[2] = {t.d.w0, t.d.w1}, wh[2] = {t.h.w0, t.h.w1};
      const __m512 g0 = _mm512_maskz_loadu_ps(m, g + w);
      const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) {
          const int k = a * 2 + b;
          const __mmask16 mine = t.row[k] & s[a];
          const __m512 wab = _mm512_mul_ps(wd[a], wh[b]);
          _mm512_mask_storeu_epi32(X.base.data() + k * W + w, m, _mm512_mask_mov_epi32(safe, mine, t.off[k]));
          __m512 w0 = _mm512_maskz_mul_ps(mine, wab, t.pw0), w1 = _mm512_maskz_mul_ps(mine, wab, t.pw1);
          if (C == 1) {  // the weights times g: scatter_row then only adds
            w0 = _mm512_mul_ps(w0, g0);
            w1 = _mm512_mul_ps(w1, g0);
          }
          // interleaved [w][2]
          float* q = X.wt.data() + (k * W + w) * 2;
          _mm512_mask_storeu_ps(q, first_n(2 * (W - w)), _mm512_permutex2var_ps(w0, ilo, w1));
          _mm512_mask_storeu_ps(q + 16, first_n(2 * (W - w) - 16), _mm512_permutex2var_ps(w0, ihi, w1));
        }
    }
  }
  return (gp_bad ? kGposNotFinite : 0) | (g_bad ? kGradNotFinite : 0);
}

// The scatter of a row prepared by row_backward<SCATTER>: gm[base + e] +=
// wt_e * g over the corner rows and channels (with C == 1 the weights already
// hold the factor g), corner rows in turn, even voxels first: neighbouring
// voxels' pairs overlap and a load overlapping the previous store would stall.
// Each target receives a row's contributions in the same order, with the same
// arithmetic, whichever task adds them. One 64-bit load, add and store per
// pair.
inline void scatter_row(const float* g, const BackwardScratch& X, int64_t W, int64_t C, int64_t N, float* gm) {
  for (int64_t c = 0; c < C; ++c) {
    const float* gc = g + c * N;
    float* out = gm + c * N;
    for (int k = 0; k < 4; ++k) {
      const int32_t* bk = X.base.data() + k * W;
      const float* wk = X.wt.data() + k * W * 2;
      for (int64_t start = 0; start < 2; ++start)
        for (int64_t w = start; w < W; w += 2) {
          // 64-bit loads and stores that need no alignment (_mm_load_sd would
          // need 8-byte aligned doubles; pairs start at any float)
          __m128i* p = reinterpret_cast<__m128i*>(out + bk[w]);
          __m128 add = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wk + 2 * w)));
          if (C != 1) add = _mm_mul_ps(add, _mm_set1_ps(gc[w]));
          _mm_storel_epi64(p, _mm_castps_si128(_mm_add_ps(_mm_castsi128_ps(_mm_loadl_epi64(p)), add)));
        }
    }
  }
}

// The sums of the 16 lanes of each of v[0..8), in lanes 0..7 of the result:
// a tree of 128-bit block shuffles shared by the eight vectors (23
// instructions, where eight separate reductions take about 80).
inline __m256 sum8(const __m512 v[8]) {
  __m512 t[4], u[2];
  for (int i = 0; i < 4; ++i)  // blocks 0, 1: v[2i]; 2, 3: v[2i + 1]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // block j: v[4i + j]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // block j: [u0 + u2, u'0 + u'2, u1 + u3, u'1 + u'3], then the halves added
  const __m512 x = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 y = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
  // lanes 4j, 4j + 1 hold the sums of v[j], v[4 + j]
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(pick, y));
}

// Alo/Ahi of one row as CellPartials::add_row takes them (the AVX-512 form of
// cell_sums on X.gpos): per w-cell and channel the sums of l0w * gpos and
// l1w * gpos, 16 voxels at a time, the six sums of a cell reduced together.
inline void cell_sums(const float* gpos, const AxisInterp<float>& Iw, float* Alo, float* Ahi) {
  const int64_t W = Iw.S;
  const float* l0 = Iw.l0.data();
  const float* l1 = Iw.l1.data();
  for (int64_t cw = 0; cw < Iw.s; ++cw) {
    __m512 acc[8];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t w = Iw.cell_begin[cw]; w < Iw.cell_begin[cw + 1]; w += 16) {
      const __mmask16 m = tail_mask(Iw.cell_begin[cw + 1], w);
      const __m512 a0 = _mm512_maskz_loadu_ps(m, l0 + w), a1 = _mm512_maskz_loadu_ps(m, l1 + w);
      for (int j = 0; j < 3; ++j) {
        const __m512 gj = _mm512_maskz_loadu_ps(m, gpos + j * W + w);
        acc[j] = _mm512_fmadd_ps(a0, gj, acc[j]);
        acc[4 + j] = _mm512_fmadd_ps(a1, gj, acc[4 + j]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum8(acc));
    for (int j = 0; j < 3; ++j) {
      Alo[cw * 3 + j] = sums[j];
      Ahi[cw * 3 + j] = sums[4 + j];
    }
  }
}

}  // namespace avx512
}  // namespace coopseg

#endif
