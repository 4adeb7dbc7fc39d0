// Geometry shared by the CPU kernels: the coarse-to-fine interpolation tables,
// the per-row coarse field, bilinear/trilinear sampling taps and the
// deterministic per-cell reduction of coarse-grid gradients.
//
// Every kernel works on a 3-D view: a 2-D problem (B, C, H, W) is seen as
// (B, C, 1, H, W) with no displacement channel along d, so one code path (with
// `ND` as a template parameter) serves both.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace coopseg {

#if defined(__GNUC__) || defined(__clang__)
#define COOPSEG_NOINLINE __attribute__((noinline))
#else
#define COOPSEG_NOINLINE
#endif

// A tensor for a kernel to fill. With COOPSEG_POISON=1 (the tests set it) it
// starts as NaN, so an element a kernel forgets to write cannot pass unseen.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* v = std::getenv("COOPSEG_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return poison ? at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options) : at::empty(sizes, options);
}

struct Dims3 {
  int64_t d, h, w;
  int64_t numel() const { return d * h * w; }
};

// Spatial sizes of a (B, C, *S) tensor seen as 3-D.
inline Dims3 dims3(const at::Tensor& t) {
  if (t.dim() == 4) return {1, t.size(2), t.size(3)};
  return {t.size(2), t.size(3), t.size(4)};
}

// Linear interpolation of one axis from s coarse nodes to S voxels, with the
// arithmetic of F.interpolate(mode="linear"/"bilinear"/"trilinear") on CPU so
// that the fused kernels reproduce the reference to rounding.
template <typename T>
struct AxisInterp {
  std::vector<int32_t> i0, i1;  // lower / upper node of each voxel (coarse sizes are < 2^31)
  std::vector<T> l0, l1;        // their weights
  // voxels [cell_begin[c], cell_begin[c + 1]) have i0 == c (a "cell"); a cell
  // may be empty when the coarse axis is longer than the fine one.
  std::vector<int64_t> cell_begin;
  int64_t S = 0, s = 0;

  AxisInterp(int64_t S_, int64_t s_, bool align_corners) : S(S_), s(s_) {
    i0.resize(S);
    i1.resize(S);
    l0.resize(S);
    l1.resize(S);
    const T scale = align_corners ? (S > 1 ? T(s - 1) / T(S - 1) : T(0)) : T(s) / T(S);
    for (int64_t x = 0; x < S; ++x) {
      T src = align_corners ? scale * T(x) : std::max(scale * (T(x) + T(0.5)) - T(0.5), T(0));
      int64_t lo = std::min(static_cast<int64_t>(std::floor(src)), s - 1);
      T lam = std::min(std::max(src - T(lo), T(0)), T(1));
      i0[x] = static_cast<int32_t>(lo);
      i1[x] = static_cast<int32_t>(lo + (lo < s - 1 ? 1 : 0));
      l1[x] = lam;
      l0[x] = T(1) - lam;
    }
    cell_begin.assign(s + 1, 0);
    for (int64_t x = 0; x < S; ++x) cell_begin[i0[x] + 1]++;
    for (int64_t c = 0; c < s; ++c) cell_begin[c + 1] += cell_begin[c];
  }
  int64_t cell_size(int64_t c) const { return cell_begin[c + 1] - cell_begin[c]; }
  int64_t upper(int64_t c) const { return std::min(c + 1, s - 1); }
};

template <typename T>
struct FieldInterp {
  AxisInterp<T> d, h, w;
  FieldInterp(Dims3 S, Dims3 s, bool align_corners)
      : d(S.d, s.d, align_corners), h(S.h, s.h, align_corners), w(S.w, s.w, align_corners) {}
};

// The coarse field of batch b interpolated along d and h for one fine row
// (d, h): rowf[j * s.w + iw]. Along w each voxel then needs two taps only.
template <typename T, int ND>
inline void coarse_row(const T* coarse_b, Dims3 s, const FieldInterp<T>& I, int64_t d, int64_t h,
                       T* rowf) {
  const int64_t sc = s.numel();
  const T ld0 = I.d.l0[d], ld1 = I.d.l1[d], lh0 = I.h.l0[h], lh1 = I.h.l1[h];
  const int64_t r00 = (I.d.i0[d] * s.h + I.h.i0[h]) * s.w, r01 = (I.d.i0[d] * s.h + I.h.i1[h]) * s.w;
  const int64_t r10 = (I.d.i1[d] * s.h + I.h.i0[h]) * s.w, r11 = (I.d.i1[d] * s.h + I.h.i1[h]) * s.w;
  for (int j = 0; j < ND; ++j) {
    const T* c = coarse_b + j * sc;
    for (int64_t iw = 0; iw < s.w; ++iw)
      rowf[j * s.w + iw] = ld0 * (lh0 * c[r00 + iw] + lh1 * c[r01 + iw]) +
                           ld1 * (lh0 * c[r10 + iw] + lh1 * c[r11 + iw]);
  }
}

// Sampling taps of every voxel of one output row, in structure-of-arrays form:
// simple loops over a row vectorise (gathers) with -O3 -march=native, where one
// loop doing everything in registers was measured slower. A tap outside the
// image gets weight 0, derivative 0 and offset 0 (a safe address); `ok` keeps
// which taps are real. Sampling follows grid_sample(align_corners=True) in voxel
// units. In 2-D the d axis is one tap at offset 0 with weight 1. `I` is the
// offset type: int32 when a volume has fewer than 2^31 voxels, int64 otherwise.
enum TapBits : uint8_t { kD0 = 1, kD1 = 2, kH0 = 4, kH1 = 8, kW0 = 16, kW1 = 32 };

template <typename T, typename I>
struct RowTaps {
  std::vector<I> od0, od1, oh0, oh1, ow0, ow1;  // offsets, strides applied
  std::vector<T> wd0, wd1, wh0, wh1, ww0, ww1;  // weights
  std::vector<T> gd0, gd1, gh0, gh1, gw0, gw1;  // d(weight)/d(position), border clip applied
  std::vector<I> lower;                         // index of tap 0 along the slab axis (d in 3-D, h in 2-D)
  std::vector<I> lower_w;                       // index of tap 0 along w (in 3-D first scratch for h)
  std::vector<I> ok;                            // TapBits of the taps inside the image
  std::vector<I> bad;                           // 1 where the position is not finite
  std::vector<T> pd, ph, pw;                    // positions
  // scratch: the corner values of the row, [corner (d, h, w bits)][w], filled by row_corners_pairs
  mutable std::vector<T> corners;

  explicit RowTaps(int64_t W) : corners(8 * W) {
    for (auto* v : {&od0, &od1, &oh0, &oh1, &ow0, &ow1, &lower, &lower_w, &ok, &bad}) v->assign(W, I(0));
    for (auto* v : {&wd0, &wd1, &wh0, &wh1, &ww0, &ww1, &gd0, &gd1, &gh0, &gh1, &gw0, &gw1, &pd, &ph, &pw})
      v->assign(W, T(0));
  }
};

// The taps of one axis for positions p[0..W); branch-free so that it vectorises.
// Without GRAD the weight derivatives are not written (forward and scatter).
// It vectorises only with -fno-trapping-math (setup.py): otherwise GCC 12
// may not if-convert the float compares and conversions and leaves the loop
// scalar ("control flow in loop"), everywhere with AVX2 or SSE2 and, once
// inlined into row_taps in some translation units, with AVX-512 too (then 24
// instead of 6 TSC ticks per voxel on AMD EPYC, docs/kernels.md#build-flags). Kept out of line
// as well, which alone was enough with AVX-512.
template <typename T, typename I, bool BORDER, bool GRAD>
COOPSEG_NOINLINE void axis_taps(const T* __restrict p_, int64_t W, I n, I stride, I bit0, I bit1, I* __restrict o0,
                      I* __restrict o1, T* __restrict w0, T* __restrict w1, T* __restrict g0,
                      T* __restrict g1, I* __restrict lower, I* __restrict ok) {
  const T hi = T(n - 1);
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) {
    T p = p_[w];
    p = (p == p) ? p : T(0);  // NaN is flagged separately; keep the integer conversion defined
    T clip = T(1);
    if (BORDER) {
      // grid_sample's clip: the border itself counts as outside for the gradient
      clip = ((p > T(0)) & (p < hi)) ? T(1) : T(0);
      p = std::min(std::max(p, T(0)), hi);
    } else {
      // beyond one voxel outside both taps are out anyway; also bounds huge values
      p = std::min(std::max(p, T(-2)), hi + T(2));
    }
    // floor through truncation (p is clamped, so it fits I): std::floor does not vectorise
    I i = static_cast<I>(p);
    i -= (T(i) > p) ? I(1) : I(0);
    const T f = p - T(i);
    const bool k0 = (i >= 0) & (i < n);
    const bool k1 = (i >= -1) & (i < n - 1);
    lower[w] = i;
    o0[w] = k0 ? i * stride : I(0);
    o1[w] = k1 ? (i + 1) * stride : I(0);
    w0[w] = k0 ? T(1) - f : T(0);
    w1[w] = k1 ? f : T(0);
    if (GRAD) {
      g0[w] = k0 ? -clip : T(0);
      g1[w] = k1 ? clip : T(0);
    }
    ok[w] |= (k0 ? bit0 : I(0)) | (k1 ? bit1 : I(0));
  }
}

// The taps along each axis (axis_taps) of the row's positions R.pd, R.ph, R.pw, whose tap bits
// go to R.ok; in 2-D one d plane of weight 1. BORDER: clamp the positions first.
template <typename T, typename I, int ND, bool BORDER, bool GRAD>
inline void row_axis_taps(Dims3 S, RowTaps<T, I>& R) {
  const int64_t W = S.w;
  I* ok = R.ok.data();
  axis_taps<T, I, BORDER, GRAD>(R.ph.data(), W, I(S.h), I(S.w), kH0, kH1, R.oh0.data(), R.oh1.data(),
                                R.wh0.data(), R.wh1.data(), R.gh0.data(), R.gh1.data(),
                                ND == 3 ? R.lower_w.data() : R.lower.data(), ok);
  axis_taps<T, I, BORDER, GRAD>(R.pw.data(), W, I(S.w), I(1), kW0, kW1, R.ow0.data(), R.ow1.data(),
                                R.ww0.data(), R.ww1.data(), R.gw0.data(), R.gw1.data(), R.lower_w.data(), ok);
  if (ND == 3) {
    axis_taps<T, I, BORDER, GRAD>(R.pd.data(), W, I(S.d), I(S.h * S.w), kD0, kD1, R.od0.data(), R.od1.data(),
                                  R.wd0.data(), R.wd1.data(), R.gd0.data(), R.gd1.data(), R.lower.data(), ok);
  } else {
    std::fill(R.od0.begin(), R.od0.end(), I(0));
    std::fill(R.od1.begin(), R.od1.end(), I(0));
    std::fill(R.wd0.begin(), R.wd0.end(), T(1));
    std::fill(R.wd1.begin(), R.wd1.end(), T(0));
    std::fill(R.gd0.begin(), R.gd0.end(), T(0));
    std::fill(R.gd1.begin(), R.gd1.end(), T(0));
  }
}

// The slabs of an image-gradient scatter: each of B * nslab tasks owns planes [lo, hi) of the
// slab axis (the outermost spatial axis) of one batch item and is the only writer of those
// planes of the gradient, so the sums do not depend on the schedule. slab_tasks: tasks per
// item, one per thread, at most `units`.
inline int64_t slab_tasks(int64_t units, int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(units, (at::get_num_threads() + B - 1) / B));
}

// Task t of nslab per item over n_sa planes: its item b and planes [lo, hi); false when empty.
inline bool slab_of(int64_t t, int64_t nslab, int64_t n_sa, int64_t& b, int64_t& lo, int64_t& hi) {
  b = t / nslab;
  const int64_t k = t % nslab;
  lo = n_sa * k / nslab;
  hi = n_sa * (k + 1) / nslab;
  return lo < hi;
}

// Zero planes [lo, hi) (plane voxels each) of every channel of item b of gm (B, C, N).
template <typename T>
inline void zero_slab(T* gm, int64_t b, int64_t C, int64_t N, int64_t lo, int64_t hi, int64_t plane) {
  for (int64_t c = 0; c < C; ++c) std::fill(gm + (b * C + c) * N + lo * plane, gm + (b * C + c) * N + hi * plane, T(0));
}

// grid_sample's reflection about 0 and hi = n - 1 (align_corners=True): |p|
// modulo 2 hi, folded back; `sign` is d(result)/dp (+-1).
template <typename T>
inline T reflect(T p, T hi, T& sign) {
  const T span2 = T(2) * hi;
  const T e = std::fmod(std::abs(p), span2);
  sign = (p < T(0) ? T(-1) : T(1)) * (e > hi ? T(-1) : T(1));
  return std::min(e, span2 - e);
}

// The positions (d, h, w) + u of row (d, h) in R.pd/ph/pw, from the row's
// displacement components ud (unused in 2-D), uh, uw; R.bad where a position
// is not finite; R.ok's tap bits reset (in 2-D the one d plane's set).
template <typename T, typename I, int ND>
inline void positions_from_field(const T* ud, const T* uh, const T* uw, int64_t d, int64_t h, int64_t W,
                                 RowTaps<T, I>& R) {
  T* __restrict pd = R.pd.data();
  T* __restrict ph = R.ph.data();
  T* __restrict pw = R.pw.data();
  I* __restrict ok = R.ok.data();
  I* __restrict bad = R.bad.data();
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) {
    pd[w] = ND == 3 ? T(d) + ud[w] : T(0);
    ph[w] = T(h) + uh[w];
    pw[w] = T(w) + uw[w];
    const T z = pd[w] * T(0) + ph[w] * T(0) + pw[w] * T(0);
    bad[w] = (z != z) ? I(1) : I(0);
    ok[w] = ND == 3 ? I(0) : I(kD0);
  }
}

// The taps of a row of full-resolution positions R.pd/ph/pw (R.bad marks the
// non-finite ones; the dense and the B-spline warps). REFLECT folds the
// positions first (a bad one to 0; `sign`: 3 * W scratch) and then clamps them
// as border does (CLAMP); GRAD then multiplies the weight derivatives by the
// fold's sign.
template <typename T, typename I, int ND, bool REFLECT, bool CLAMP, bool GRAD>
inline void position_taps(Dims3 S, RowTaps<T, I>& R, std::vector<T>& sign) {
  const int64_t W = S.w;
  T* sd = sign.data();
  T* sh = sd + W;
  T* sw = sh + W;
  if constexpr (REFLECT) {
    T* pd = R.pd.data();
    T* ph = R.ph.data();
    T* pw = R.pw.data();
    const T hd = T(S.d - 1), hh = T(S.h - 1), hw = T(S.w - 1);
    for (int64_t w = 0; w < W; ++w) {
      if (R.bad[w]) {
        pd[w] = ph[w] = pw[w] = T(0);
        continue;
      }
      if (ND == 3) pd[w] = reflect(pd[w], hd, sd[w]);
      ph[w] = reflect(ph[w], hh, sh[w]);
      pw[w] = reflect(pw[w], hw, sw[w]);
    }
  }
  row_axis_taps<T, I, ND, CLAMP, GRAD>(S, R);
  if constexpr (GRAD && REFLECT) {
    for (int64_t w = 0; w < W; ++w) {
      if (ND == 3) {
        R.gd0[w] *= sd[w];
        R.gd1[w] *= sd[w];
      }
      R.gh0[w] *= sh[w];
      R.gh1[w] *= sh[w];
      R.gw0[w] *= sw[w];
      R.gw1[w] *= sw[w];
    }
  }
}

// Positions x + u(x) of row (d, h) and their taps. Along w the field is linear
// inside each coarse cell, so a cell's two node values are broadcast. GRAD: also
// the weight derivatives (for gradients w.r.t. the positions).
template <typename T, typename I, int ND, bool BORDER, bool GRAD>
inline void row_taps(const T* rowf, Dims3 s, const AxisInterp<T>& Iw, Dims3 S, int64_t d, int64_t h,
                     RowTaps<T, I>& R) {
  const T* l1 = Iw.l1.data();
  T* __restrict pd = R.pd.data();
  T* __restrict ph = R.ph.data();
  T* __restrict pw = R.pw.data();
  I* __restrict ok = R.ok.data();
  I* __restrict bad = R.bad.data();
  for (int64_t cw = 0; cw < s.w; ++cw) {
    const int64_t up = Iw.upper(cw);
    T a[3] = {0, 0, 0}, b[3] = {0, 0, 0};  // u_j = a_j + b_j * l1(w) inside the cell
    for (int j = 0; j < ND; ++j) {
      a[3 - ND + j] = rowf[j * s.w + cw];
      b[3 - ND + j] = rowf[j * s.w + up] - a[3 - ND + j];
    }
#pragma omp simd
    for (int64_t w = Iw.cell_begin[cw]; w < Iw.cell_begin[cw + 1]; ++w) {
      pd[w] = T(d) + (a[0] + b[0] * l1[w]);
      ph[w] = T(h) + (a[1] + b[1] * l1[w]);
      pw[w] = T(w) + (a[2] + b[2] * l1[w]);
      // a non-finite (NaN or infinite) position: x * 0 is NaN exactly then
      const T z = pd[w] * T(0) + ph[w] * T(0) + pw[w] * T(0);
      bad[w] = (z != z) ? I(1) : I(0);
      ok[w] = ND == 3 ? I(0) : I(kD0);
    }
  }
  row_axis_taps<T, I, ND, BORDER, GRAD>(S, R);
}

// Multilinear value of voxel w from its corner values v[d][h][w].
template <typename T, typename I, int ND>
inline T interp(const RowTaps<T, I>& R, int64_t w, T v000, T v001, T v010, T v011, T v100, T v101, T v110,
                T v111) {
  T v = R.wh0[w] * (R.ww0[w] * v000 + R.ww1[w] * v001) + R.wh1[w] * (R.ww0[w] * v010 + R.ww1[w] * v011);
  if (ND == 3) {
    const T v1 = R.wh0[w] * (R.ww0[w] * v100 + R.ww1[w] * v101) + R.wh1[w] * (R.ww0[w] * v110 + R.ww1[w] * v111);
    v = R.wd0[w] * v + R.wd1[w] * v1;
  }
  return v;
}

// g times the gradient of the value w.r.t. the position, added to gp{d,h,w}.
template <typename T, typename I, int ND>
inline void interp_grad(const RowTaps<T, I>& R, int64_t w, T g, T v000, T v001, T v010, T v011, T v100,
                        T v101, T v110, T v111, T& gpd, T& gph, T& gpw) {
  const T vs[2][4] = {{v000, v001, v010, v011}, {v100, v101, v110, v111}};
  T th[2], dh[2], tw[2];
  for (int a = 0; a < (ND == 3 ? 2 : 1); ++a) {
    const T* v = vs[a];
    const T l0 = R.ww0[w] * v[0] + R.ww1[w] * v[1], l1 = R.ww0[w] * v[2] + R.ww1[w] * v[3];
    const T d0 = R.gw0[w] * v[0] + R.gw1[w] * v[1], d1 = R.gw0[w] * v[2] + R.gw1[w] * v[3];
    th[a] = R.wh0[w] * l0 + R.wh1[w] * l1;
    dh[a] = R.gh0[w] * l0 + R.gh1[w] * l1;
    tw[a] = R.wh0[w] * d0 + R.wh1[w] * d1;
  }
  if (ND == 3) {
    gpd += g * (R.gd0[w] * th[0] + R.gd1[w] * th[1]);
    gph += g * (R.wd0[w] * dh[0] + R.wd1[w] * dh[1]);
    gpw += g * (R.wd0[w] * tw[0] + R.wd1[w] * tw[1]);
  } else {
    gph += g * dh[0];
    gpw += g * tw[0];
  }
}

// Calls fn(w, v000, ..., v111) for every voxel of the row with its corner
// values v[d][h][w] (in 2-D the d = 1 corners are 0). A tap outside the image
// gets the value 0 by selection, never by a zero weight times what lies at a
// safe address, so an inf or NaN elsewhere in the image cannot reach a voxel
// whose taps do not cover it.
//
// Generic version: one gather per corner and voxel (with AVX-512, a 16-lane
// gather per corner and 16 voxels), the values used in the same loop.
template <typename T, typename I, int ND, typename Fn>
inline void for_each_corners_generic(const T* img, const RowTaps<T, I>& R, Dims3 S, Fn&& fn) {
#pragma omp simd
  for (int64_t w = 0; w < S.w; ++w) {
    const I ok = R.ok[w];
    const I a = R.od0[w] + R.oh0[w], c = R.od0[w] + R.oh1[w];
    const I e = R.od1[w] + R.oh0[w], f = R.od1[w] + R.oh1[w];
    // a tap outside the image has offset 0: a safe address, its value is dropped
    auto tap = [&](I off, I bits) { const T x = img[off]; return (ok & bits) == bits ? x : T(0); };
    fn(w, tap(a + R.ow0[w], kD0 | kH0 | kW0), tap(a + R.ow1[w], kD0 | kH0 | kW1), tap(c + R.ow0[w], kD0 | kH1 | kW0),
       tap(c + R.ow1[w], kD0 | kH1 | kW1), ND == 3 ? tap(e + R.ow0[w], kD1 | kH0 | kW0) : T(0),
       ND == 3 ? tap(e + R.ow1[w], kD1 | kH0 | kW1) : T(0), ND == 3 ? tap(f + R.ow0[w], kD1 | kH1 | kW0) : T(0),
       ND == 3 ? tap(f + R.ow1[w], kD1 | kH1 | kW1) : T(0));
  }
}

#if defined(__AVX512F__)
// AVX-512, float, 32-bit offsets, W >= 2: fills v[k * W + w], k = (a * 2 + b)
// * 2 + e the d, h, w tap bits (k < 4 in 2-D), with the corner values of the
// row. A voxel's two w taps lie side by side, so each corner row is one 64-bit
// load of the pair [pb, pb + 1], pb = the lower w tap clamped to [0, W - 2]:
// per 16 voxels two 8-lane gathers of pairs per corner row instead of two
// 16-lane gathers, half the gathered elements (measured 10-13 % faster sampling
// on AMD EPYC Zen 4; docs/notes.md#2026-11-24-the-cpu-warp-where-the-time-went). Rows outside the image are masked out of the
// gather (not read); w taps outside are selected to 0.
template <int ND>
inline void row_corners_pairs(const float* img, const RowTaps<float, int32_t>& R, int64_t W, float* v) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i zero_i = _mm512_setzero_si512(), one = _mm512_set1_epi32(1), last = _mm512_set1_epi32(int32_t(W - 2));
  const __m512d zero_d = _mm512_setzero_pd();
  for (int64_t w = 0; w < W; w += 16) {
    const __mmask16 m = W - w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - w)) - 1u);
    const __m512i i = _mm512_maskz_loadu_epi32(m, R.lower_w.data() + w);
    const __m512i ok = _mm512_maskz_loadu_epi32(m, R.ok.data() + w);
    const __m512i pb = _mm512_min_epi32(_mm512_max_epi32(i, zero_i), last);
    // which pair element each w tap is: both (inside), x0 as tap 1 (i = -1), x1 as tap 0 (i = W - 1)
    const __mmask16 both = _mm512_cmpeq_epi32_mask(i, pb);
    const __mmask16 t1_is_x0 = _mm512_cmpeq_epi32_mask(_mm512_add_epi32(i, one), pb);
    const __mmask16 t0_is_x1 = _mm512_cmpeq_epi32_mask(i, _mm512_add_epi32(pb, one));
    const __m512i od[2] = {_mm512_maskz_loadu_epi32(m, R.od0.data() + w), _mm512_maskz_loadu_epi32(m, R.od1.data() + w)};
    const __m512i oh[2] = {_mm512_maskz_loadu_epi32(m, R.oh0.data() + w), _mm512_maskz_loadu_epi32(m, R.oh1.data() + w)};
    for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
      for (int b = 0; b < 2; ++b) {
        const __m512i bits = _mm512_set1_epi32((a ? kD1 : kD0) | (b ? kH1 : kH0));
        const __mmask16 row = _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(ok, bits), bits);
        const __m512i off = _mm512_add_epi32(_mm512_add_epi32(od[a], oh[b]), pb);
        const __m512d p0 = _mm512_mask_i32gather_pd(zero_d, __mmask8(row), _mm512_castsi512_si256(off), img, 4);
        const __m512d p1 =
            _mm512_mask_i32gather_pd(zero_d, __mmask8(row >> 8), _mm512_extracti64x4_epi64(off, 1), img, 4);
        const __m512 x0 = _mm512_permutex2var_ps(_mm512_castpd_ps(p0), even, _mm512_castpd_ps(p1));
        const __m512 x1 = _mm512_permutex2var_ps(_mm512_castpd_ps(p0), odd, _mm512_castpd_ps(p1));
        const __m512 t0 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(both, x0), t0_is_x1, x1);
        const __m512 t1 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(both, x1), t1_is_x0, x0);
        _mm512_mask_storeu_ps(v + ((a * 2 + b) * 2) * W + w, m, t0);
        _mm512_mask_storeu_ps(v + ((a * 2 + b) * 2 + 1) * W + w, m, t1);
      }
  }
}
#endif

// Calls fn(w, v000, ..., v111) for every voxel of the row with its corner
// values (see for_each_corners_generic). The fast paths already select 0 for
// the corners outside the image; MASKED is the scalar path that the callers
// re-run for the rare rows whose result is not finite (see all_finite), where
// they also skip voxels with no corner inside (any_corner_inside).
template <typename T, typename I, int ND, bool MASKED = false, typename Fn>
inline void for_each_corners(const T* img, const RowTaps<T, I>& R, Dims3 S, Fn&& fn) {
  if constexpr (MASKED) {
    for (int64_t w = 0; w < S.w; ++w) {
      const I ok = R.ok[w];
      auto at = [&](I od, I oh, I ow, I bits) { return (ok & bits) == bits ? img[od + oh + ow] : T(0); };
      fn(w, at(R.od0[w], R.oh0[w], R.ow0[w], kD0 | kH0 | kW0), at(R.od0[w], R.oh0[w], R.ow1[w], kD0 | kH0 | kW1),
         at(R.od0[w], R.oh1[w], R.ow0[w], kD0 | kH1 | kW0), at(R.od0[w], R.oh1[w], R.ow1[w], kD0 | kH1 | kW1),
         ND == 3 ? at(R.od1[w], R.oh0[w], R.ow0[w], kD1 | kH0 | kW0) : T(0),
         ND == 3 ? at(R.od1[w], R.oh0[w], R.ow1[w], kD1 | kH0 | kW1) : T(0),
         ND == 3 ? at(R.od1[w], R.oh1[w], R.ow0[w], kD1 | kH1 | kW0) : T(0),
         ND == 3 ? at(R.od1[w], R.oh1[w], R.ow1[w], kD1 | kH1 | kW1) : T(0));
    }
    return;
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<I, int32_t>) {
    const int64_t W = S.w;
    if (W >= 2) {
      T* v = R.corners.data();
      row_corners_pairs<ND>(img, R, W, v);
#pragma omp simd
      for (int64_t w = 0; w < W; ++w)
        fn(w, v[w], v[W + w], v[2 * W + w], v[3 * W + w], ND == 3 ? v[4 * W + w] : T(0),
           ND == 3 ? v[5 * W + w] : T(0), ND == 3 ? v[6 * W + w] : T(0), ND == 3 ? v[7 * W + w] : T(0));
      return;
    }
  }
#endif
  for_each_corners_generic<T, I, ND>(img, R, S, fn);
}

// Whether x[0..n) is all finite: one vectorised pass (x - x is 0 exactly for
// finite x). The kernels take their exact, slower path only for rows where it
// is not, so finite data pays one pass over a row in cache.
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] - x[i];
  return acc == T(0);
}

// Whether some corner of voxel w lies inside the image (its sample depends on
// its position). A voxel with none passes no gradient to its position, even
// for an infinite or NaN output gradient (grid_sample skips such corners).
template <typename T, typename I, int ND>
inline bool any_corner_inside(const RowTaps<T, I>& R, int64_t w) {
  const I ok = R.ok[w];
  return (ok & (kD0 | kD1)) && (ok & (kH0 | kH1)) && (ok & (kW0 | kW1));
}

// out[w] = image sampled at the row's positions (NaN where the position is NaN).
template <typename T, typename I, int ND>
inline void row_sample(const T* img, const RowTaps<T, I>& R, Dims3 S, T* out) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  auto sample = [&](int64_t w, T a, T b, T c, T d, T e, T f, T g, T h) {
    out[w] = R.bad[w] ? nan : interp<T, I, ND>(R, w, a, b, c, d, e, f, g, h);
  };
  for_each_corners<T, I, ND>(img, R, S, sample);
  // a non-finite image value must not reach the voxels whose taps outside the
  // image read it with weight 0
  if (!all_finite(out, S.w)) for_each_corners<T, I, ND, true>(img, R, S, sample);
}

// gp{d,h,w}[w] += g[w] * d(sample)/d(position) for one channel.
// MASKED: the exact path for non-finite data (for_each_corners; voxels with no
// corner inside the image are skipped).
template <typename T, typename I, int ND, bool MASKED = false>
inline void row_position_grad(const T* img, const T* g, const RowTaps<T, I>& R, Dims3 S, T* gpd, T* gph,
                              T* gpw) {
  for_each_corners<T, I, ND, MASKED>(img, R, S, [&](int64_t w, T a, T b, T c, T d, T e, T f, T gg, T h) {
    if (MASKED && !any_corner_inside<T, I, ND>(R, w)) return;
    interp_grad<T, I, ND>(R, w, g[w], a, b, c, d, e, f, gg, h, gpd[w], gph[w], gpw[w]);
  });
}

// row_scatter for rows whose gradient holds a non-finite value: voxel by
// voxel, real taps only.
template <typename T, typename I, int ND>
inline void row_scatter_exact(const T* g, const RowTaps<T, I>& R, Dims3 S, int64_t C, int64_t N,
                              int64_t lo, int64_t hi, T* gm) {
  for (int64_t w = 0; w < S.w; ++w) {
    if (R.bad[w]) continue;
    const int64_t z = R.lower[w];
    const bool m0 = z >= lo && z < hi, m1 = z + 1 >= lo && z + 1 < hi;
    if (!m0 && !m1) continue;
    const I ok = R.ok[w];
    const I od[2] = {R.od0[w], R.od1[w]}, oh[2] = {R.oh0[w], R.oh1[w]}, ow[2] = {R.ow0[w], R.ow1[w]};
    const T wd[2] = {R.wd0[w], R.wd1[w]}, wh[2] = {R.wh0[w], R.wh1[w]}, ww[2] = {R.ww0[w], R.ww1[w]};
    for (int a = 0; a < (ND == 3 ? 2 : 1); ++a) {
      if (!(ok & (a ? kD1 : kD0))) continue;
      for (int b = 0; b < 2; ++b) {
        if (!(ok & (b ? kH1 : kH0))) continue;
        if (!((ND == 3 ? a : b) ? m1 : m0)) continue;  // the slab-axis tap is another task's
        for (int e = 0; e < 2; ++e) {
          if (!(ok & (e ? kW1 : kW0))) continue;
          const I off = od[a] + oh[b] + ow[e];
          for (int64_t c = 0; c < C; ++c) gm[c * N + off] += (wd[a] * wh[b] * ww[e]) * g[c * N + w];
        }
      }
    }
  }
}

// The image-gradient scatter of one row for the task owning the slab [lo, hi)
// along the slab axis (d in 3-D, h in 2-D): gm[tap] += weight * g[x] over the
// C channels (stride N), for the taps of x that lie in the slab. A task never
// writes outside its slab, so tasks need no atomics and no private copies.
//
// One vectorised loop forms, for each of a voxel's 2^(ND-1) corner rows, a
// pair of neighbouring elements [base, base + 1] inside the row that holds
// both w taps (a tap outside the image gets weight 0; a corner row outside the
// image or the slab writes zeros to the slab's first two elements). Then one
// minimal scalar loop per corner row does 2-element read-modify-writes, even
// voxels first: neighbouring voxels' pairs overlap, and a load overlapping the
// previous store would stall. Each target receives a row's contributions in
// the same order, with the same arithmetic, whichever task adds them, so the
// result does not depend on the thread count. Rows whose gradient holds a
// non-finite value take row_scatter_exact, which touches real taps only.
template <typename T, typename I>
struct ScatterScratch {
  std::vector<I> base;  // [corner row][w]
  std::vector<T> wt;    // [corner row][w][2]
  explicit ScatterScratch(int64_t W) : base(4 * W), wt(8 * W) {}
};

//
// Needs lo < hi (the task owns a plane) and W >= 2: the zero-weight writes go
// to the pair [safe, safe + 1] at the slab's first element, which must be the
// task's own. A task that owns no plane does not call it.
template <typename T, typename I, int ND>
inline void row_scatter(const T* g, const RowTaps<T, I>& R, Dims3 S, int64_t C, int64_t N, int64_t lo,
                        int64_t hi, T* gm, ScatterScratch<T, I>& X) {
  const int64_t W = S.w;
  bool finite = true;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) finite &= std::isfinite(g[c * N + w]);
  if (!finite) {
    row_scatter_exact<T, I, ND>(g, R, S, C, N, lo, hi, gm);
    return;
  }
  const I safe = I(lo * (ND == 3 ? S.h * S.w : S.w));
  I* __restrict base = X.base.data();
  T* __restrict wt = X.wt.data();
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) {
    const I z = R.lower[w];
    const I live = R.bad[w] == 0;
    const I ok = R.ok[w];
    // the slab-axis taps that are this task's
    const I s0 = live & (z >= I(lo)) & (z < I(hi));
    const I s1 = live & (z + 1 >= I(lo)) & (z + 1 < I(hi));
    // the w pair and the weights of its two elements
    const I i = R.lower_w[w];
    const I pb = std::min(std::max(i, I(0)), I(W - 2));
    const T same = T(i == pb), left = T(i + 1 == pb), right = T(i == pb + 1);
    const T pw0 = same * R.ww0[w] + left * R.ww1[w], pw1 = same * R.ww1[w] + right * R.ww0[w];
    const I od[2] = {R.od0[w], R.od1[w]}, oh[2] = {R.oh0[w], R.oh1[w]};
    const T wd[2] = {R.wd0[w], R.wd1[w]}, wh[2] = {R.wh0[w], R.wh1[w]};
    for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
      for (int b = 0; b < 2; ++b) {
        const int k = a * 2 + b;
        const I bits = I((a ? kD1 : kD0) | (b ? kH1 : kH0));
        const I mine = ((ok & bits) == bits) & ((ND == 3 ? a : b) ? s1 : s0);
        const T wab = wd[a] * wh[b];
        base[k * W + w] = mine ? od[a] + oh[b] + pb : safe;
        wt[(k * W + w) * 2] = mine ? wab * pw0 : T(0);
        wt[(k * W + w) * 2 + 1] = mine ? wab * pw1 : T(0);
      }
  }
  const int64_t n_even = (W + 1) / 2;
  for (int64_t c = 0; c < C; ++c) {
    const T* gc = g + c * N;
    T* out = gm + c * N;
    for (int k = 0; k < (ND == 3 ? 4 : 2); ++k) {
      const I* bk = base + k * W;
      const T* wk = wt + k * W * 2;
      for (int64_t j = 0; j < W; ++j) {
        const int64_t w = j < n_even ? 2 * j : 2 * (j - n_even) + 1;
        T* p = out + bk[w];
        const T gv = gc[w];
        T v[2];
        std::memcpy(v, p, sizeof(v));
        v[0] += wk[2 * w] * gv;
        v[1] += wk[2 * w + 1] * gv;
        std::memcpy(p, v, sizeof(v));
      }
    }
  }
}

// Channel j of a row's Alo/Ahi (as CellPartials::add_row takes them): per
// w-cell, the sums of l0w * g[w] and l1w * g[w] over the cell's voxels.
template <typename T, int ND>
inline void cell_channel_sums(const T* g, const AxisInterp<T>& Iw, int j, T* Alo, T* Ahi) {
  const T* l0 = Iw.l0.data();
  const T* l1 = Iw.l1.data();
  for (int64_t cw = 0; cw < Iw.s; ++cw) {
    T lo = 0, hi = 0;
#pragma omp simd simdlen(8) reduction(+ : lo, hi)
    for (int64_t w = Iw.cell_begin[cw]; w < Iw.cell_begin[cw + 1]; ++w) {
      lo += l0[w] * g[w];
      hi += l1[w] * g[w];
    }
    Alo[cw * ND + j] = lo;
    Ahi[cw * ND + j] = hi;
  }
}

// Alo/Ahi of the position gradients gpos (3 rows: d, h, w) of one row. A NaN
// position has a NaN gradient (documented).
template <typename T, typename I, int ND>
inline void cell_sums(const RowTaps<T, I>& R, std::vector<T>& gpos, Dims3 S, const AxisInterp<T>& Iw, T* Alo,
                      T* Ahi) {
  T* gpd = gpos.data();
  T* gph = gpd + S.w;
  T* gpw = gph + S.w;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t w = 0; w < S.w; ++w)
    if (R.bad[w]) gpd[w] = gph[w] = gpw[w] = nan;
  for (int j = 0; j < ND; ++j) cell_channel_sums<T, ND>(gpos.data() + (3 - ND + j) * S.w, Iw, j, Alo, Ahi);
}

// Alo/Ahi of one output row for CellPartials::add_row: the gradient of the
// loss w.r.t. each voxel's displacement (summed over channels), reduced per
// w-cell with the two interpolation weights.
template <typename T, typename I, int ND>
inline void row_coarse_sums(const RowTaps<T, I>& R, const T* img, const T* g, int64_t C, int64_t N, Dims3 S,
                     const AxisInterp<T>& Iw, std::vector<T>& gpos, T* Alo, T* Ahi) {
  T* gpd = gpos.data();
  T* gph = gpd + S.w;
  T* gpw = gph + S.w;
  std::fill(gpos.begin(), gpos.end(), T(0));
  for (int64_t c = 0; c < C; ++c) row_position_grad<T, I, ND>(img + c * N, g + c * N, R, S, gpd, gph, gpw);
  if (!all_finite(gpd, 3 * S.w)) {  // a non-finite image value or output gradient: the exact path
    std::fill(gpos.begin(), gpos.end(), T(0));
    for (int64_t c = 0; c < C; ++c)
      row_position_grad<T, I, ND, true>(img + c * N, g + c * N, R, S, gpd, gph, gpw);
  }
  cell_sums<T, I, ND>(R, gpos, S, Iw, Alo, Ahi);
}

// Alo/Ahi of one output row for the D_S optimizer step: the loss is
// scale/2 * sum (tau(s1)(x) - s2(x))^2, so each voxel's position gradient is
// scale * residual * d(s1 sampled)/d(position). Returns the row's sum of
// squared residuals (in double).
template <typename T, typename I, int ND>
inline double row_similarity_sums(const RowTaps<T, I>& R, const T* s1, const T* s2, int64_t C, int64_t N, Dims3 S,
                                  const AxisInterp<T>& Iw, T scale, std::vector<T>& gpos, std::vector<T>& resid,
                                  T* Alo, T* Ahi) {
  T* gpd = gpos.data();
  T* gph = gpd + S.w;
  T* gpw = gph + S.w;
  T* r = resid.data();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  auto pass = [&](auto masked) {
    constexpr bool MASKED = decltype(masked)::value;
    std::fill(gpos.begin(), gpos.end(), T(0));
    double loss = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const T* s2c = s2 + c * N;
      // value and position gradient from one read of the corners
      for_each_corners<T, I, ND, MASKED>(s1 + c * N, R, S, [&](int64_t w, T a, T b, T cc, T d, T e, T f, T g, T h) {
        const T res = R.bad[w] ? nan : interp<T, I, ND>(R, w, a, b, cc, d, e, f, g, h) - s2c[w];
        r[w] = res;
        if (MASKED && !any_corner_inside<T, I, ND>(R, w)) return;
        interp_grad<T, I, ND>(R, w, scale * res, a, b, cc, d, e, f, g, h, gpd[w], gph[w], gpw[w]);
      });
#pragma omp simd reduction(+ : loss)
      for (int64_t w = 0; w < S.w; ++w) loss += double(r[w]) * double(r[w]);
    }
    return loss;
  };
  double loss = pass(std::false_type{});
  // a non-finite value in s1 or s2 (NaN positions alone keep the fast path's
  // position gradient finite): the exact path
  if (!all_finite(gpd, 3 * S.w) || !std::isfinite(loss)) loss = pass(std::true_type{});
  cell_sums<T, I, ND>(R, gpos, S, Iw, Alo, Ahi);
  return loss;
}

// Test-only switch: COOPSEG_FORCE_INT64=1 makes dispatch_warp take the 64-bit
// index path on any volume, so that the tests run that instantiation on small
// inputs (a real one needs 2^31 voxels, see tests/test_int64.py). Read per
// call (cheap next to any kernel) so a test can set it for one call.
inline bool force_int64_index() {
  const char* v = std::getenv("COOPSEG_FORCE_INT64");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Calls fn.template operator()<T, I, ND, BORDER>() for the runtime dtype,
// volume size, dimensionality and padding mode.
template <typename Fn>
auto dispatch_warp(const at::Tensor& moving, bool border, Fn&& fn) {
  const bool three = moving.dim() == 5;
  const bool small = dims3(moving).numel() < (int64_t(1) << 31) && !force_int64_index();
  return AT_DISPATCH_FLOATING_TYPES(moving.scalar_type(), "coopseg_warp", [&] {
    using T = scalar_t;
    if (small) {
      if (three) return border ? fn.template operator()<T, int32_t, 3, true>() : fn.template operator()<T, int32_t, 3, false>();
      return border ? fn.template operator()<T, int32_t, 2, true>() : fn.template operator()<T, int32_t, 2, false>();
    }
    if (three) return border ? fn.template operator()<T, int64_t, 3, true>() : fn.template operator()<T, int64_t, 3, false>();
    return border ? fn.template operator()<T, int64_t, 2, true>() : fn.template operator()<T, int64_t, 2, false>();
  });
}

// Partial sums of the coarse-grid gradient. A set holds, for one row of
// coarse cells (b, cell_d, cell_h) and one chunk of its fine rows, 2^ND corner
// sums of each of the ND channels per w-cell, in fp64. Whoever fills a set
// visits its fine rows in order; fold() adds the sets into the nodes in one
// fixed order. So the gradient is bitwise reproducible and, as long as the
// chunking depends on shapes only, independent of the thread count.
template <typename T, int ND>
struct CellPartials {
  static constexpr int64_t kCorners = ND == 3 ? 8 : 4;
  int64_t B, nchunk, per_set;
  Dims3 s;
  std::vector<double> sums;

  CellPartials(int64_t B_, Dims3 s_, int64_t nchunk_)
      : B(B_), nchunk(nchunk_), per_set(s_.w * kCorners * ND), s(s_),
        sums(static_cast<size_t>(B_ * s_.d * s_.h * nchunk_ * per_set), 0.0) {}

  int64_t nsets() const { return B * s.d * s.h * nchunk; }
  double* set(int64_t b, int64_t cd, int64_t ch, int64_t chunk) {
    return sums.data() + (((b * s.d + cd) * s.h + ch) * nchunk + chunk) * per_set;
  }

  // Adds fine row (d, h): Alo/Ahi[cw * ND + j] are the sums over the row's voxels
  // of w-cell cw of l0w * g_j and l1w * g_j (g_j = dLoss/du_j).
  static void add_row(double* part, const FieldInterp<T>& I, int64_t d, int64_t h, const T* Alo,
                      const T* Ahi, int64_t sw) {
    const T ld[2] = {I.d.l0[d], I.d.l1[d]}, lh[2] = {I.h.l0[h], I.h.l1[h]};
    for (int64_t cw = 0; cw < sw; ++cw)
      for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
        for (int b = 0; b < 2; ++b) {
          const double wdh = double(ND == 3 ? ld[a] : T(1)) * double(lh[b]);
          double* pc = part + ((cw * kCorners) + (a * 2 + b) * 2) * ND;
          for (int j = 0; j < ND; ++j) {
            pc[j] += wdh * double(Alo[cw * ND + j]);
            pc[ND + j] += wdh * double(Ahi[cw * ND + j]);
          }
        }
  }

  // The gradient (B, ND, *s) with the options of `like`.
  at::Tensor fold(const FieldInterp<T>& I, const at::TensorOptions& like) const {
    std::vector<double> nodes(static_cast<size_t>(B * ND * s.numel()), 0.0);
    for (int64_t t = 0; t < nsets(); ++t) {
      int64_t r = t / nchunk;
      const int64_t ch = r % s.h;
      r /= s.h;
      const int64_t cd = r % s.d;
      const int64_t b = r / s.d;
      const int64_t nd_[2] = {cd, I.d.upper(cd)}, nh_[2] = {ch, I.h.upper(ch)};
      const double* part = sums.data() + t * per_set;
      for (int64_t cw = 0; cw < s.w; ++cw) {
        const int64_t nw_[2] = {cw, I.w.upper(cw)};
        for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
          for (int bb = 0; bb < 2; ++bb)
            for (int cc = 0; cc < 2; ++cc) {
              const double* pc = part + (cw * kCorners + (a * 2 + bb) * 2 + cc) * ND;
              const int64_t node = (nd_[a] * s.h + nh_[bb]) * s.w + nw_[cc];
              for (int j = 0; j < ND; ++j) nodes[(b * ND + j) * s.numel() + node] += pc[j];
            }
      }
    }
    std::vector<int64_t> shape = {B, ND};
    if (ND == 3) shape.push_back(s.d);
    shape.push_back(s.h);
    shape.push_back(s.w);
    at::Tensor grad = new_output(shape, like);
    T* gp = grad.data_ptr<T>();
    for (size_t i = 0; i < nodes.size(); ++i) gp[i] = static_cast<T>(nodes[i]);
    return grad;
  }
};

// Deterministic gradient of the coarse grid by cells: tasks own (b, cell_d,
// cell_h, chunk of rows). `make_visitor()` gives each parallel chunk its own
// row visitor; `visit(b, d, h, rowf, Alo, Ahi)` fills Alo/Ahi for row (d, h) as
// CellPartials::add_row takes them and returns a number (a row's share of a
// loss, say) that is summed per batch item, also in a fixed order, into
// `per_batch` when given.
template <typename T, int ND, typename MakeVisitor>
at::Tensor reduce_coarse_grad(const at::Tensor& coarse, const FieldInterp<T>& I, bool with_rows,
                              MakeVisitor make_visitor, std::vector<double>* per_batch = nullptr) {
  const Dims3 s = dims3(coarse);
  const int64_t B = coarse.size(0);
  int64_t max_rows = 1;
  for (int64_t cd = 0; cd < s.d; ++cd)
    for (int64_t ch = 0; ch < s.h; ++ch)
      max_rows = std::max(max_rows, I.d.cell_size(cd) * I.h.cell_size(ch));
  // Split the rows of a cell into chunks when there are few cells (a
  // translation has one), so that every thread gets work. The split depends on
  // shapes only, never on the thread count.
  constexpr int64_t kMinTasks = 64;
  const int64_t ncell_rows = B * s.d * s.h;
  const int64_t nchunk = std::min(max_rows, (kMinTasks + ncell_rows - 1) / ncell_rows);
  const int64_t rows_per_task = (max_rows + nchunk - 1) / nchunk;
  CellPartials<T, ND> P(B, s, nchunk);
  std::vector<double> extra(P.nsets(), 0.0);
  const T* cp = coarse.data_ptr<T>();

  at::parallel_for(0, P.nsets(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> rowf(ND * s.w), Alo(s.w * ND), Ahi(s.w * ND);
    auto visit_row = make_visitor();
    for (int64_t t = t0; t < t1; ++t) {
      int64_t r = t;
      const int64_t chunk = r % nchunk;
      r /= nchunk;
      const int64_t ch = r % s.h;
      r /= s.h;
      const int64_t cd = r % s.d;
      const int64_t b = r / s.d;
      const int64_t nh = I.h.cell_size(ch);
      const int64_t nrows = I.d.cell_size(cd) * nh;
      double* part = P.set(b, cd, ch, chunk);
      const int64_t row_end = std::min(nrows, (chunk + 1) * rows_per_task);
      for (int64_t row = chunk * rows_per_task; row < row_end; ++row) {
        const int64_t d = I.d.cell_begin[cd] + row / nh;
        const int64_t h = I.h.cell_begin[ch] + row % nh;
        if (with_rows) coarse_row<T, ND>(cp + b * ND * s.numel(), s, I, d, h, rowf.data());
        extra[t] += visit_row(b, d, h, rowf.data(), Alo.data(), Ahi.data());
        CellPartials<T, ND>::add_row(part, I, d, h, Alo.data(), Ahi.data(), s.w);
      }
    }
  });
  if (per_batch) {
    const int64_t per_b = P.nsets() / B;
    per_batch->assign(B, 0.0);
    for (int64_t t = 0; t < P.nsets(); ++t) (*per_batch)[t / per_b] += extra[t];
  }
  return P.fold(I, coarse.options());
}

// Which output planes (along the slab axis: d in 3-D, h in 2-D) can reach a
// slab of the image gradient. Positions along that axis in plane q lie in
// [q + umin, q + umax], the extremes of the displacement channel over the coarse
// nodes of q's cell; the taps of p are floor(p) and floor(p) + 1, so plane q can
// reach [lo, hi) only if some p lies in [lo - 1, hi).
template <typename T, int ND, bool BORDER>
struct SlabReach {
  const AxisInterp<T>& Isa;
  int64_t s_sa, n_sa;
  std::vector<T> umin, umax;  // [b][node index along the slab axis]

  SlabReach(const T* coarse, int64_t B, Dims3 s, const FieldInterp<T>& I)
      : Isa(ND == 3 ? I.d : I.h), s_sa(ND == 3 ? s.d : s.h), n_sa(Isa.S), umin(B * s_sa), umax(B * s_sa) {
    const int64_t inner = s.numel() / s_sa;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < s_sa; ++k) {
        const T* c = coarse + b * ND * s.numel() + k * inner;  // channel 0: the slab axis
        T lo = std::numeric_limits<T>::infinity(), hi = -lo;
        for (int64_t i = 0; i < inner; ++i) {  // fmin/fmax skip NaN nodes: NaN voxels scatter nothing
          lo = std::fmin(lo, c[i]);
          hi = std::fmax(hi, c[i]);
        }
        umin[b * s_sa + k] = lo;
        umax[b * s_sa + k] = hi;
      }
  }

  bool reaches(int64_t b, int64_t q, int64_t lo, int64_t hi) const {
    const int64_t n0 = Isa.i0[q], n1 = Isa.i1[q];
    T pmin = T(q) + std::fmin(umin[b * s_sa + n0], umin[b * s_sa + n1]);
    T pmax = T(q) + std::fmax(umax[b * s_sa + n0], umax[b * s_sa + n1]);
    if (BORDER) {
      pmin = std::min(std::max(pmin, T(0)), T(n_sa - 1));
      pmax = std::min(std::max(pmax, T(0)), T(n_sa - 1));
    }
    return pmax >= T(lo - 1) && pmin < T(hi);
  }
};

}  // namespace coopseg
