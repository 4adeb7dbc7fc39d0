// The warp's other modes on CPU: mode="nearest" (any padding, floating images and
// integer/bool label maps) and mode="bilinear" with padding_mode="reflection".
// Bilinear with zeros/border padding keeps its own fast paths (warp.cpp, grid.h,
// warp_avx512.h); these modes take this generic, per-voxel path, on the same
// interpolation tables (coarse_row) and the same deterministic reductions.
//
// Positions follow F.grid_sample(align_corners=True) in voxel units:
//   zeros       p as it is; taps (or the nearest voxel) outside the image read 0
//   border      p clamped to [0, n - 1]; d/dp = 0 at and beyond the border
//   reflection  |p| modulo 2(n - 1) folded back about n - 1 (exact in floating
//               point), then clamped; d/dp = +-1 (the reflection's sign), 0 where
//               the result is 0 or n - 1 (grid_sample's clip)
//   nearest     the padded position rounded half to even (std::nearbyint)
#pragma once

#include "grid.h"

#include <c10/util/string_view.h>

namespace coopseg {
namespace modes {

enum class Pad : int { kZeros = 0, kBorder = 1, kReflection = 2 };

template <typename T, Pad P>
inline T pad_position(T p, int64_t n, T& dpad) {
  const T hi = T(n - 1);
  if constexpr (P == Pad::kZeros) {
    dpad = T(1);
    return p;
  } else if constexpr (P == Pad::kBorder) {
    dpad = (p > T(0) && p < hi) ? T(1) : T(0);
    return std::min(std::max(p, T(0)), hi);
  } else {
    const T span2 = T(2) * hi;
    const T a = std::fabs(p);
    const T extra = a < span2 ? a : std::fmod(a, span2);  // fmod is exact, and needed only for |p| >= 2(n - 1)
    const T other = span2 - extra;
    const bool flip = extra > other;
    const T r = std::min(std::max(flip ? other : extra, T(0)), hi);
    dpad = (r > T(0) && r < hi) ? ((flip != (p < T(0))) ? T(-1) : T(1)) : T(0);
    return r;
  }
}

// The two bilinear taps of one axis: lower index, fraction, which taps are
// inside, d(padded position)/d(position).
template <typename T>
struct Tap {
  int64_t i0;
  T f, dpad;
  bool ok0, ok1;
};

template <typename T, Pad P>
inline Tap<T> linear_tap(T p, int64_t n) {
  Tap<T> t;
  T q = pad_position<T, P>(p, n, t.dpad);
  if constexpr (P == Pad::kZeros) q = std::min(std::max(q, T(-2)), T(n + 1));  // bounds huge values
  const T fl = std::floor(q);
  t.i0 = static_cast<int64_t>(fl);
  t.f = q - fl;
  t.ok0 = t.i0 >= 0 && t.i0 < n;
  t.ok1 = t.i0 + 1 >= 0 && t.i0 + 1 < n;
  return t;
}

// The nearest voxel along one axis, or -1 when it lies outside (zeros padding).
template <typename T, Pad P>
inline int64_t nearest_index(T p, int64_t n) {
  T dpad;
  T q = pad_position<T, P>(p, n, dpad);
  if constexpr (P == Pad::kZeros) q = std::min(std::max(q, T(-2)), T(n + 1));
  const int64_t r = static_cast<int64_t>(std::nearbyint(q));  // half to even (default rounding mode)
  return (r >= 0 && r < n) ? r : int64_t(-1);
}

// Positions x + u(x) of row (d, h) and whether each is non-finite, with the
// arithmetic of row_taps (grid.h).
template <typename T, int ND>
inline void row_positions(const T* rowf, Dims3 s, const AxisInterp<T>& Iw, int64_t d, int64_t h, T* pd, T* ph,
                          T* pw, uint8_t* bad) {
  const T* l1 = Iw.l1.data();
  for (int64_t cw = 0; cw < s.w; ++cw) {
    const int64_t up = Iw.upper(cw);
    T a[3] = {0, 0, 0}, b[3] = {0, 0, 0};
    for (int j = 0; j < ND; ++j) {
      a[3 - ND + j] = rowf[j * s.w + cw];
      b[3 - ND + j] = rowf[j * s.w + up] - a[3 - ND + j];
    }
    for (int64_t w = Iw.cell_begin[cw]; w < Iw.cell_begin[cw + 1]; ++w) {
      pd[w] = T(d) + (a[0] + b[0] * l1[w]);
      ph[w] = T(h) + (a[1] + b[1] * l1[w]);
      pw[w] = T(w) + (a[2] + b[2] * l1[w]);
      const T z = pd[w] * T(0) + ph[w] * T(0) + pw[w] * T(0);
      bad[w] = z != z;
    }
  }
}

// Per-row scratch of positions.
template <typename T>
struct RowPos {
  std::vector<T> rowf, pd, ph, pw;
  std::vector<uint8_t> bad;
  RowPos(int64_t nd, Dims3 s, int64_t W) : rowf(nd * s.w), pd(W), ph(W), pw(W), bad(W) {}
};

template <typename T, int ND>
inline void fill_row(RowPos<T>& R, const T* coarse_b, Dims3 s, const FieldInterp<T>& I3, int64_t d, int64_t h) {
  coarse_row<T, ND>(coarse_b, s, I3, d, h, R.rowf.data());
  row_positions<T, ND>(R.rowf.data(), s, I3.w, d, h, R.pd.data(), R.ph.data(), R.pw.data(), R.bad.data());
}

// The 2^ND bilinear corners of one voxel: flat offsets, weights, and the
// weights' derivatives along d, h, w (padding derivative included). A corner
// outside the image has ok = false.
template <typename T>
struct Corners {
  int64_t off[8];
  T wt[8], gd[8], gh[8], gw[8];
  bool ok[8];
  int n;
  bool any_inside;
};

template <typename T, int ND, Pad P, bool GRAD = false>
inline void voxel_corners(T pd, T ph, T pw, Dims3 S, Corners<T>& K) {
  Tap<T> td{0, T(0), T(0), true, false};
  if constexpr (ND == 3) td = linear_tap<T, P>(pd, S.d);
  const Tap<T> th = linear_tap<T, P>(ph, S.h), tw = linear_tap<T, P>(pw, S.w);
  K.n = ND == 3 ? 8 : 4;
  K.any_inside = (td.ok0 || td.ok1) && (th.ok0 || th.ok1) && (tw.ok0 || tw.ok1);
  const T wd[2] = {ND == 3 ? T(1) - td.f : T(1), td.f}, wh[2] = {T(1) - th.f, th.f}, ww[2] = {T(1) - tw.f, tw.f};
  const T sd[2] = {-td.dpad, td.dpad}, sh[2] = {-th.dpad, th.dpad}, sw[2] = {-tw.dpad, tw.dpad};
  const bool okd[2] = {td.ok0, td.ok1}, okh[2] = {th.ok0, th.ok1}, okw[2] = {tw.ok0, tw.ok1};
  for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
    for (int b = 0; b < 2; ++b)
      for (int e = 0; e < 2; ++e) {
        const int k = (a * 2 + b) * 2 + e;
        K.ok[k] = okd[a] && okh[b] && okw[e];
        K.off[k] = K.ok[k] ? ((td.i0 + a) * S.h + (th.i0 + b)) * S.w + (tw.i0 + e) : 0;
        K.wt[k] = wd[a] * wh[b] * ww[e];
        if constexpr (GRAD) {
          K.gd[k] = sd[a] * wh[b] * ww[e];
          K.gh[k] = wd[a] * sh[b] * ww[e];
          K.gw[k] = wd[a] * wh[b] * sw[e];
        }
      }
}

// The nearest voxel's flat offset, or -1 outside the image.
template <typename T, int ND, Pad P>
inline int64_t voxel_nearest(T pd, T ph, T pw, Dims3 S) {
  const int64_t id = ND == 3 ? nearest_index<T, P>(pd, S.d) : int64_t(0);
  const int64_t ih = nearest_index<T, P>(ph, S.h), iw = nearest_index<T, P>(pw, S.w);
  if (id < 0 || ih < 0 || iw < 0) return -1;
  return (id * S.h + ih) * S.w + iw;
}

// What a voxel with a non-finite displacement holds: NaN, or 0 for label maps.
template <typename V>
inline V no_position() {
  if constexpr (std::is_floating_point_v<V>) return std::numeric_limits<V>::quiet_NaN();
  else return V(0);
}

// Forward: M the math (and coarse) dtype, V the image dtype (M itself except
// for label maps under NEAREST).
template <typename M, typename V, int ND, Pad P, bool NEAREST>
void forward(const at::Tensor& moving, const at::Tensor& coarse, bool align_corners, at::Tensor& out) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = dims3(moving), s = dims3(coarse);
  const int64_t N = S.numel();
  const FieldInterp<M> I3(S, s, align_corners);
  const V* mp = moving.data_ptr<V>();
  const M* cp = coarse.data_ptr<M>();
  V* op = out.data_ptr<V>();
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    RowPos<M> R(ND, s, S.w);
    Corners<M> K;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
      fill_row<M, ND>(R, cp + b * ND * s.numel(), s, I3, d, h);
      const V* img = mp + b * C * N;
      V* o = op + b * C * N + (d * S.h + h) * S.w;
      for (int64_t w = 0; w < S.w; ++w) {
        if (R.bad[w]) {
          for (int64_t c = 0; c < C; ++c) o[c * N + w] = no_position<V>();
          continue;
        }
        if constexpr (NEAREST) {
          const int64_t off = voxel_nearest<M, ND, P>(R.pd[w], R.ph[w], R.pw[w], S);
          for (int64_t c = 0; c < C; ++c) o[c * N + w] = off >= 0 ? img[c * N + off] : V(0);
        } else {
          voxel_corners<M, ND, P>(R.pd[w], R.ph[w], R.pw[w], S, K);
          for (int64_t c = 0; c < C; ++c) {
            M v = M(0);
            for (int k = 0; k < K.n; ++k)
              if (K.ok[k]) v += K.wt[k] * M(img[c * N + K.off[k]]);
            o[c * N + w] = V(v);
          }
        }
      }
    }
  });
}

// The image gradient: tasks own slabs of it along the outermost axis (d in 3-D,
// h in 2-D), zero them, and visit every output row in order, adding the
// contributions whose target lies in their slab. Each target receives its
// contributions in the same order whatever the partition: the result does not
// depend on the thread count.
template <typename M, int ND, Pad P, bool NEAREST>
void image_grad(const at::Tensor& grad_out, const at::Tensor& coarse, bool align_corners, at::Tensor& gm) {
  const int64_t B = gm.size(0), C = gm.size(1);
  const Dims3 S = dims3(gm), s = dims3(coarse);
  const int64_t N = S.numel();
  const FieldInterp<M> I3(S, s, align_corners);
  const M* cp = coarse.data_ptr<M>();
  const M* gp = grad_out.data_ptr<M>();
  M* gmp = gm.data_ptr<M>();
  const int64_t n_sa = ND == 3 ? S.d : S.h;
  const int64_t plane = ND == 3 ? S.h * S.w : S.w;
  const int64_t nslab = slab_tasks(n_sa, B);
  at::parallel_for(0, B * nslab, 1, [&](int64_t t0, int64_t t1) {
    RowPos<M> R(ND, s, S.w);
    Corners<M> K;
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, lo, hi;
      if (!slab_of(t, nslab, n_sa, b, lo, hi)) continue;
      zero_slab(gmp, b, C, N, lo, hi, plane);
      M* g_b = gmp + b * C * N;
      const int64_t olo = lo * plane, ohi = hi * plane;  // the slab's flat offsets
      for (int64_t d = 0; d < S.d; ++d)
        for (int64_t h = 0; h < S.h; ++h) {
          fill_row<M, ND>(R, cp + b * ND * s.numel(), s, I3, d, h);
          const M* g = gp + b * C * N + (d * S.h + h) * S.w;
          for (int64_t w = 0; w < S.w; ++w) {
            if (R.bad[w]) continue;
            if constexpr (NEAREST) {
              const int64_t off = voxel_nearest<M, ND, P>(R.pd[w], R.ph[w], R.pw[w], S);
              if (off < olo || off >= ohi) continue;
              for (int64_t c = 0; c < C; ++c) g_b[c * N + off] += g[c * N + w];
            } else {
              voxel_corners<M, ND, P>(R.pd[w], R.ph[w], R.pw[w], S, K);
              for (int q = 0; q < K.n; ++q) {
                if (!K.ok[q] || K.off[q] < olo || K.off[q] >= ohi) continue;
                for (int64_t c = 0; c < C; ++c) g_b[c * N + K.off[q]] += K.wt[q] * g[c * N + w];
              }
            }
          }
        }
    }
  });
}

// The coarse-grid gradient of the bilinear modes, by cells (reduce_coarse_grad).
template <typename M, int ND, Pad P>
at::Tensor coarse_grad(const at::Tensor& grad_out, const at::Tensor& moving, const at::Tensor& coarse,
                       bool align_corners) {
  const int64_t C = moving.size(1);
  const Dims3 S = dims3(moving), s = dims3(coarse);
  const int64_t N = S.numel();
  const FieldInterp<M> I3(S, s, align_corners);
  const M* mp = moving.data_ptr<M>();
  const M* gp = grad_out.data_ptr<M>();
  const M nan = std::numeric_limits<M>::quiet_NaN();
  return reduce_coarse_grad<M, ND>(coarse, I3, true, [&] {
    return [&, R = RowPos<M>(ND, s, S.w), gpos = std::vector<M>(3 * S.w), K = Corners<M>()](
               int64_t b, int64_t d, int64_t h, const M* rowf, M* Alo, M* Ahi) mutable {
      row_positions<M, ND>(rowf, s, I3.w, d, h, R.pd.data(), R.ph.data(), R.pw.data(), R.bad.data());
      std::fill(gpos.begin(), gpos.end(), M(0));
      M* gpd = gpos.data();
      M* gph = gpd + S.w;
      M* gpw = gph + S.w;
      const M* img = mp + b * C * N;
      const M* g = gp + b * C * N + (d * S.h + h) * S.w;
      for (int64_t w = 0; w < S.w; ++w) {
        if (R.bad[w]) {
          gpd[w] = gph[w] = gpw[w] = nan;
          continue;
        }
        voxel_corners<M, ND, P, true>(R.pd[w], R.ph[w], R.pw[w], S, K);
        if (!K.any_inside) continue;  // no corner inside: the sample does not depend on the position
        for (int64_t c = 0; c < C; ++c) {
          M vd = 0, vh = 0, vw = 0;
          for (int q = 0; q < K.n; ++q) {
            if (!K.ok[q]) continue;
            const M v = img[c * N + K.off[q]];
            vd += K.gd[q] * v;
            vh += K.gh[q] * v;
            vw += K.gw[q] * v;
          }
          const M gc = g[c * N + w];
          gpd[w] += gc * vd;
          gph[w] += gc * vh;
          gpw[w] += gc * vw;
        }
      }
      for (int j = 0; j < ND; ++j) cell_channel_sums<M, ND>(gpos.data() + (3 - ND + j) * S.w, I3.w, j, Alo, Ahi);
      return 0.0;
    };
  });
}

inline Pad parse_pad(c10::string_view padding_mode, const char* op) {
  if (padding_mode == "zeros") return Pad::kZeros;
  if (padding_mode == "border") return Pad::kBorder;
  TORCH_CHECK(padding_mode == "reflection", "coopseg.", op,
              ": padding_mode must be 'zeros', 'border' or 'reflection', got '", padding_mode, "'");
  return Pad::kReflection;
}

inline bool parse_nearest(c10::string_view mode, const char* op) {
  TORCH_CHECK(mode == "bilinear" || mode == "nearest", "coopseg.", op,
              ": mode must be 'bilinear' or 'nearest', got '", mode, "'");
  return mode == "nearest";
}

// Calls fn.template operator()<ND, P>() for the runtime rank and padding.
template <typename Fn>
auto dispatch_nd_pad(const at::Tensor& moving, Pad pad, Fn&& fn) {
  if (moving.dim() == 5) {
    if (pad == Pad::kZeros) return fn.template operator()<3, Pad::kZeros>();
    if (pad == Pad::kBorder) return fn.template operator()<3, Pad::kBorder>();
    return fn.template operator()<3, Pad::kReflection>();
  }
  if (pad == Pad::kZeros) return fn.template operator()<2, Pad::kZeros>();
  if (pad == Pad::kBorder) return fn.template operator()<2, Pad::kBorder>();
  return fn.template operator()<2, Pad::kReflection>();
}

}  // namespace modes
}  // namespace coopseg
