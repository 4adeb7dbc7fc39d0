// Cubic B-spline free-form deformation fused with the warp on CPU
// (warp(..., upsample="bspline"); the spec: reference.bspline_upsample and
// docs/conventions.md#cubic-b-spline-control-grids).
//
// Tables: per axis and voxel x, the first of its 4 control points and their 4
//   weights (BAxis: S_k x 4, computed in double as reference.bspline_axis_table,
//   the weights rounded to the math dtype). No full-resolution field is stored.
// Positions of one output row (d, h): the control points are contracted along d
//   (4 taps), then h (4 taps) into one control row per channel (zero-padded at
//   both ends, so that taps beyond the array read 0), then each voxel takes its 4
//   taps along w -- the order of the reference's separable gathers. A non-finite
//   control point reaches every voxel whose 4^nd support holds it (0 * NaN).
// Sampling: the taps and gathers of grid.h (bilinear; reflection folds the
//   positions first, as warp_dense.cpp) or warp_modes.h's nearest voxel; float
//   3-D zeros/border rows take the coarse warp's AVX-512 rows (warp_avx512.h)
//   on the row's displacements, as warp_dense.cpp.
// warp_bspline_bwd: one pass over slabs of the image gradient along the
//   outermost axis (d in 3-D, h in 2-D), as warp_dense.cpp: a task zeroes its
//   slab and visits the output planes that can reach it (bounded by the control
//   points of each plane's support: the B-spline is a convex combination). The
//   control-point gradient: each output plane q, visited by the one task that
//   owns it, reduces its voxels' position gradients along w and h into a
//   partial Q_q (fp64, the control points of its plane, not yet weighted along
//   the slab axis); the partials are then folded into the control points with
//   the slab-axis weights in plane order. Bitwise reproducible, independent of
//   the thread count.
// upsample_bspline_fwd / _bwd: the materialised field and its adjoint, on the
//   same rows and partials.
#include "checks.h"
#include "grid.h"
#include "warp_avx512.h"
#include "warp_modes.h"

#include <torch/library.h>

namespace coopseg {
namespace {

using modes::Pad;

constexpr int64_t kPadLo = 4, kPadHi = 5;  // control-row padding: first in [-4, n + 1], taps up to n + 4

// One axis's taps (reference.bspline_axis_table): voxel x reads control points
// first[x] .. first[x] + 3 with weights w[4x .. 4x + 3]; K = 1 for the d axis of
// a 2-D problem (one point, weight 1).
template <typename T>
struct BAxis {
  int64_t S = 1, n = 1, K = 1;
  std::vector<int64_t> first;
  std::vector<T> w;

  BAxis() : first(1, 0), w(4, T(0)) { w[0] = T(1); }
  BAxis(int64_t S_, int64_t n_, double origin, double spacing) : S(S_), n(n_), K(4), first(S_), w(4 * S_) {
    for (int64_t x = 0; x < S; ++x) {
      const double u = std::min(std::max((double(x) - origin) / spacing, -3.0), double(n) + 2.0);
      const double i = std::floor(u), t = u - i;
      const double s = 1.0 - t, t2 = t * t, t3 = t2 * t;
      first[x] = static_cast<int64_t>(i) - 1;
      w[4 * x] = T(s * s * s / 6.0);
      w[4 * x + 1] = T((3.0 * t3 - 6.0 * t2 + 4.0) / 6.0);
      w[4 * x + 2] = T((-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0);
      w[4 * x + 3] = T(t3 / 6.0);
    }
  }
  bool valid(int64_t x, int m) const {
    const int64_t c = first[x] + m;
    return c >= 0 && c < n;
  }
};

template <typename T, int ND>
struct BGeom {
  Dims3 S, s;
  BAxis<T> d, h, w;
  BGeom(Dims3 S_, Dims3 s_, const std::vector<double>& origin, const std::vector<double>& spacing)
      : S(S_), s(s_), h(S_.h, s_.h, origin[ND - 2], spacing[ND - 2]), w(S_.w, s_.w, origin[ND - 1], spacing[ND - 1]) {
    if (ND == 3) d = BAxis<T>(S_.d, s_.d, origin[0], spacing[0]);
  }
  int64_t stride() const { return s.w + kPadLo + kPadHi; }
  const BAxis<T>& slab() const { return ND == 3 ? d : h; }
};

// Scratch of one task: the d-contracted control row per channel, the padded
// (d, h)-contracted row, and the fp64 w-reduction of the backward.
template <typename T>
struct BScratch {
  std::vector<T> tmp, rowc;
  std::vector<double> rowg;
  BScratch(int nd, Dims3 s) : tmp(nd * s.w), rowc(nd * (s.w + kPadLo + kPadHi)), rowg(nd * (s.w + kPadLo + kPadHi)) {}
};

// The displacement of row (d, h) of batch item cb (B's coarse block, (ND, *s)):
// u[j * W + w] for channel j.
template <typename T, int ND>
void bspline_row(const T* cb, const BGeom<T, ND>& G, int64_t d, int64_t h, BScratch<T>& X, T* u) {
  const Dims3 s = G.s;
  const int64_t sw = s.w, st = G.stride(), W = G.S.w, plane = s.h * sw, chan = s.d * plane;
  T* rowc = X.rowc.data();
  T* tmp = X.tmp.data();
  std::fill(X.rowc.begin(), X.rowc.end(), T(0));
  for (int mh = 0; mh < 4; ++mh) {
    if (!G.h.valid(h, mh)) continue;
    const int64_t ch = G.h.first[h] + mh;
    bool any = false;
    for (int md = 0; md < G.d.K; ++md) {
      if (ND == 3 && !G.d.valid(d, md)) continue;
      const int64_t cd = G.d.first[d] + md;
      const T wd = G.d.w[4 * d + md];
      for (int j = 0; j < ND; ++j) {
        const T* src = cb + j * chan + cd * plane + ch * sw;
        T* t = tmp + j * sw;
        if (!any) {
          for (int64_t cw = 0; cw < sw; ++cw) t[cw] = wd * src[cw];
        } else {
          for (int64_t cw = 0; cw < sw; ++cw) t[cw] += wd * src[cw];
        }
      }
      any = true;
    }
    if (!any) continue;  // no d tap in the array: this h tap adds 0
    const T wh = G.h.w[4 * h + mh];
    for (int j = 0; j < ND; ++j)
      for (int64_t cw = 0; cw < sw; ++cw) rowc[j * st + kPadLo + cw] += wh * tmp[j * sw + cw];
  }
  const int64_t* fw = G.w.first.data();
  const T* ww = G.w.w.data();
  for (int j = 0; j < ND; ++j) {
    const T* r = rowc + j * st + kPadLo;
    T* o = u + j * W;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      const T* c = r + fw[w];
      o[w] = ww[4 * w] * c[0] + ww[4 * w + 1] * c[1] + ww[4 * w + 2] * c[2] + ww[4 * w + 3] * c[3];
    }
  }
}

// Positions x + u(x) of row (b, d, h) in R.pd/ph/pw, R.bad where one is not
// finite.
template <typename T, typename I, int ND>
void bspline_positions(const T* coarse, const BGeom<T, ND>& G, int64_t b, int64_t d, int64_t h, BScratch<T>& X,
                       RowTaps<T, I>& R, std::vector<T>& u) {
  const int64_t W = G.S.w;
  bspline_row<T, ND>(coarse + b * ND * G.s.numel(), G, d, h, X, u.data());
  const T* ud = u.data();
  positions_from_field<T, I, ND>(ud, ud + (ND - 2) * W, ud + (ND - 1) * W, d, h, W, R);
}

// The bilinear taps of the row's positions (grid.h's position_taps).
template <typename T, typename I, int ND, Pad P, bool GRAD>
void row_taps_from_positions(Dims3 S, RowTaps<T, I>& R, std::vector<T>& sign) {
  position_taps<T, I, ND, P == Pad::kReflection, P != Pad::kZeros, GRAD>(S, R, sign);
}

// The control-point partials of output plane q (along the slab axis): Q[j][c]
// with c the control points of the plane's non-slab axes (3-D: (ch, cw); 2-D:
// cw), the gradient of plane q's voxels w.r.t. their displacements gpos (rows
// of ND * W) reduced with the w (and in 3-D h) weights, in fp64.
template <typename T, int ND>
struct PlanePartials {
  int64_t B, n_sa, inner;
  std::vector<double> Q;  // [b][q][j][inner]
  PlanePartials(int64_t B_, const BGeom<T, ND>& G)
      : B(B_), n_sa(ND == 3 ? G.S.d : G.S.h), inner(ND == 3 ? G.s.h * G.s.w : G.s.w),
        Q(static_cast<size_t>(B_ * n_sa * ND * inner), 0.0) {}
  double* plane(int64_t b, int64_t q) { return Q.data() + (b * n_sa + q) * ND * inner; }

  // Adds row h of the plane (3-D) or the plane itself (2-D): g[j * W + w].
  static void add_row(double* Qq, const BGeom<T, ND>& G, int64_t h, const T* g, BScratch<T>& X, int64_t inner) {
    const int64_t W = G.S.w, st = G.stride(), sw = G.s.w;
    double* rowg = X.rowg.data();
    std::fill(X.rowg.begin(), X.rowg.end(), 0.0);
    const int64_t* fw = G.w.first.data();
    const T* ww = G.w.w.data();
    for (int j = 0; j < ND; ++j) {
      double* r = rowg + j * st + kPadLo;
      const T* gj = g + j * W;
      for (int64_t w = 0; w < W; ++w) {
        const double gv = gj[w];
        double* c = r + fw[w];
        c[0] += double(ww[4 * w]) * gv;
        c[1] += double(ww[4 * w + 1]) * gv;
        c[2] += double(ww[4 * w + 2]) * gv;
        c[3] += double(ww[4 * w + 3]) * gv;
      }
    }
    if (ND == 2) {
      for (int j = 0; j < ND; ++j)
        for (int64_t cw = 0; cw < sw; ++cw) Qq[j * inner + cw] += rowg[j * st + kPadLo + cw];
      return;
    }
    for (int mh = 0; mh < 4; ++mh) {
      if (!G.h.valid(h, mh)) continue;
      const int64_t ch = G.h.first[h] + mh;
      const double wh = G.h.w[4 * h + mh];
      for (int j = 0; j < ND; ++j)
        for (int64_t cw = 0; cw < sw; ++cw) Qq[j * inner + ch * sw + cw] += wh * rowg[j * st + kPadLo + cw];
    }
  }

  // The control-point gradient (B, ND, *s): the planes' partials with their
  // slab-axis weights, in plane order.
  at::Tensor fold(const BGeom<T, ND>& G, const at::Tensor& coarse) const {
    at::Tensor out = new_output(coarse.sizes(), coarse.options());
    const BAxis<T>& A = G.slab();
    const int64_t n = ND == 3 ? G.s.d : G.s.h;
    T* op = out.data_ptr<T>();
    at::parallel_for(0, B * ND, 1, [&](int64_t t0, int64_t t1) {
      std::vector<double> acc(n * inner);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / ND, j = t % ND;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t q = 0; q < n_sa; ++q) {
          const double* Qq = Q.data() + ((b * n_sa + q) * ND + j) * inner;
          for (int m = 0; m < 4; ++m) {
            if (!A.valid(q, m)) continue;
            const double wq = A.w[4 * q + m];
            double* a = acc.data() + (A.first[q] + m) * inner;
            for (int64_t i = 0; i < inner; ++i) a[i] += wq * Qq[i];
          }
        }
        T* o = op + (b * ND + j) * n * inner;
        for (int64_t i = 0; i < n * inner; ++i) o[i] = T(acc[i]);
      }
    });
    return out;
  }
};

// Which output planes can reach a slab of the image gradient: plane q's
// displacements along the slab axis are convex combinations of its support's
// control points (with 0 where a point lies beyond the array), so its
// positions lie in [q + min(0, cmin), q + max(0, cmax)], widened by a voxel for
// rounding and padded as the positions are.
template <typename T, int ND, Pad P>
struct BReach {
  int64_t n_sa;
  std::vector<double> lo_, hi_;
  BReach(const T* coarse, int64_t B, const BGeom<T, ND>& G) : n_sa(ND == 3 ? G.S.d : G.S.h), lo_(B * n_sa), hi_(B * n_sa) {
    const BAxis<T>& A = G.slab();
    const int64_t n = ND == 3 ? G.s.d : G.s.h, per = G.s.numel() / n;
    std::vector<double> cmin(B * n), cmax(B * n);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < n; ++c) {
        const T* x = coarse + b * ND * G.s.numel() + c * per;  // channel 0: the slab axis
        double mn = std::numeric_limits<double>::infinity(), mx = -mn;
        for (int64_t i = 0; i < per; ++i) {
          mn = std::fmin(mn, double(x[i]));
          mx = std::fmax(mx, double(x[i]));
        }
        cmin[b * n + c] = mn;
        cmax[b * n + c] = mx;
      }
    const double hi = double(n_sa - 1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t q = 0; q < n_sa; ++q) {
        double mn = 0.0, mx = 0.0;
        for (int m = 0; m < 4; ++m)
          if (A.valid(q, m)) {
            mn = std::fmin(mn, cmin[b * n + A.first[q] + m]);
            mx = std::fmax(mx, cmax[b * n + A.first[q] + m]);
          }
        const double margin = 1.0 + 1e-5 * std::max(std::fabs(mn), std::fabs(mx));
        double a = double(q) + mn - margin, z = double(q) + mx + margin;
        if (P == Pad::kBorder) {
          a = std::min(std::max(a, 0.0), hi);
          z = std::min(std::max(z, 0.0), hi);
        } else if (P == Pad::kReflection && !(a >= 0.0 && z <= hi)) {
          a = 0.0;
          z = hi;
        }
        lo_[b * n_sa + q] = a;
        hi_[b * n_sa + q] = z + 1.0;  // the upper tap
      }
  }
  bool reaches(int64_t b, int64_t q, int64_t lo, int64_t hi) const {
    return hi_[b * n_sa + q] >= double(lo) && lo_[b * n_sa + q] < double(hi);
  }
};

// ------------------------------------------------------------------ forward

template <typename T, typename I, int ND, Pad P>
void forward_bilinear(const at::Tensor& moving, const at::Tensor& coarse, const BGeom<T, ND>& G, at::Tensor& out) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = G.S;
  const int64_t N = S.numel();
  const T* mp = moving.data_ptr<T>();
  const T* cp = coarse.data_ptr<T>();
  T* op = out.data_ptr<T>();
#if defined(__AVX512F__)
  const AxisInterp<T> Iw(S.w, S.w, true);  // the identity: a row of displacements read as a coarse row
#endif
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    RowTaps<T, I> R(S.w);
    BScratch<T> X(ND, G.s);
    std::vector<T> u(ND * S.w), sign(P == Pad::kReflection ? 3 * S.w : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
#if defined(__AVX512F__)
      // float 3-D zeros/border rows with finite displacements: the coarse warp's AVX-512 rows on the
      // row's displacements with identity tables, as warp_dense.cpp (the upper node enters as
      // 0 * node, exact for finite rows); a row whose output is not finite takes the generic path
      if constexpr (avx512::kRows<T, I, ND> && P != Pad::kReflection) {
        if (S.w >= 2) {
          bspline_row<T, ND>(cp + b * ND * G.s.numel(), G, d, h, X, u.data());
          if (all_finite(u.data(), ND * S.w) &&
              avx512::row_forward<P == Pad::kBorder>(mp + b * C * N, u.data(), Iw, S, C, N, d, h,
                                                     op + b * C * N + (d * S.h + h) * S.w))
            continue;
        }
      }
#endif
      bspline_positions<T, I, ND>(cp, G, b, d, h, X, R, u);
      row_taps_from_positions<T, I, ND, P, false>(S, R, sign);
      const int64_t row = (d * S.h + h) * S.w;
      for (int64_t c = 0; c < C; ++c) row_sample<T, I, ND>(mp + (b * C + c) * N, R, S, op + (b * C + c) * N + row);
    }
  });
}

// V: the image's dtype (T itself, or an integer/bool label map with T = float).
template <typename V, typename T, typename I, int ND, Pad P>
void forward_nearest(const at::Tensor& moving, const at::Tensor& coarse, const BGeom<T, ND>& G, at::Tensor& out) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = G.S;
  const int64_t N = S.numel();
  const V* mp = moving.data_ptr<V>();
  const T* cp = coarse.data_ptr<T>();
  V* op = out.data_ptr<V>();
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    RowTaps<T, I> R(S.w);
    BScratch<T> X(ND, G.s);
    std::vector<T> u(ND * S.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
      bspline_positions<T, I, ND>(cp, G, b, d, h, X, R, u);
      const V* img = mp + b * C * N;
      V* o = op + b * C * N + (d * S.h + h) * S.w;
      for (int64_t w = 0; w < S.w; ++w) {
        if (R.bad[w]) {
          for (int64_t c = 0; c < C; ++c) o[c * N + w] = modes::no_position<V>();
          continue;
        }
        const int64_t off = modes::voxel_nearest<T, ND, P>(R.pd[w], R.ph[w], R.pw[w], S);
        for (int64_t c = 0; c < C; ++c) o[c * N + w] = off >= 0 ? img[c * N + off] : V(0);
      }
    }
  });
}

// ----------------------------------------------------------------- backward

// Both gradients in one pass over slabs (see the file comment): gm the image
// gradient (need_moving), the control-point partials in Q (need_coarse).
template <typename T, typename I, int ND, Pad P>
void backward_bilinear(const at::Tensor& grad_out, const at::Tensor& moving, const at::Tensor& coarse,
                       const BGeom<T, ND>& G, bool need_moving, bool need_coarse, at::Tensor& gm_t,
                       PlanePartials<T, ND>& Q) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = G.S;
  const int64_t N = S.numel(), W = S.w;
  const T* mp = moving.data_ptr<T>();
  const T* cp = coarse.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  T* gm = need_moving ? gm_t.data_ptr<T>() : nullptr;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const BReach<T, ND, P> reach(cp, B, G);
  const int64_t n_sa = reach.n_sa, plane_stride = ND == 3 ? S.h * W : W;
  // coarse gradient alone: one plane a task; otherwise slabs, one per thread and item
  const int64_t nslab = need_moving ? slab_tasks(n_sa, B) : n_sa;
  at::parallel_for(0, B * nslab, 1, [&](int64_t t0, int64_t t1) {
    RowTaps<T, I> R(W);
    BScratch<T> X(ND, G.s);
    ScatterScratch<T, I> Y(W);
    std::vector<T> u(ND * W), sign(P == Pad::kReflection ? 3 * W : 0), gpos(3 * W), grow(ND * W);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, lo, hi;
      if (!slab_of(t, nslab, n_sa, b, lo, hi)) continue;
      if (need_moving) zero_slab(gm, b, C, N, lo, hi, plane_stride);
      for (int64_t q = 0; q < n_sa; ++q) {
        const bool own = need_coarse && q >= lo && q < hi;
        const bool scatter = need_moving && reach.reaches(b, q, lo, hi);
        if (!own && !scatter) continue;
        const int64_t h_begin = ND == 3 ? 0 : q, h_end = ND == 3 ? S.h : q + 1, d = ND == 3 ? q : 0;
        for (int64_t h = h_begin; h < h_end; ++h) {
          bspline_positions<T, I, ND>(cp, G, b, d, h, X, R, u);
          if (own) row_taps_from_positions<T, I, ND, P, true>(S, R, sign);
          else row_taps_from_positions<T, I, ND, P, false>(S, R, sign);
          const int64_t row = (d * S.h + h) * W;
          if (own) {
            T* gpd = gpos.data();
            T* gph = gpd + W;
            T* gpw = gph + W;
            std::fill(gpos.begin(), gpos.end(), T(0));
            const T* img = mp + b * C * N;
            const T* g = gp + b * C * N + row;
            for (int64_t c = 0; c < C; ++c) row_position_grad<T, I, ND>(img + c * N, g + c * N, R, S, gpd, gph, gpw);
            if (!all_finite(gpd, 3 * W)) {  // a non-finite image value or output gradient: the exact path
              std::fill(gpos.begin(), gpos.end(), T(0));
              for (int64_t c = 0; c < C; ++c)
                row_position_grad<T, I, ND, true>(img + c * N, g + c * N, R, S, gpd, gph, gpw);
            }
            for (int j = 0; j < ND; ++j) {
              const T* src = gpos.data() + (3 - ND + j) * W;
              T* dst = grow.data() + j * W;
              for (int64_t w = 0; w < W; ++w) dst[w] = R.bad[w] ? nan : src[w];
            }
            PlanePartials<T, ND>::add_row(Q.plane(b, q), G, h, grow.data(), X, Q.inner);
          }
          if (scatter) row_scatter<T, I, ND>(gp + b * C * N + row, R, S, C, N, lo, hi, gm + b * C * N, Y);
        }
      }
    }
  });
}

// The image gradient of nearest: gm[voxel read] += g, by slabs as above.
template <typename T, typename I, int ND, Pad P>
void backward_nearest(const at::Tensor& grad_out, const at::Tensor& coarse, const BGeom<T, ND>& G, at::Tensor& gm_t) {
  const int64_t B = gm_t.size(0), C = gm_t.size(1);
  const Dims3 S = G.S;
  const int64_t N = S.numel(), W = S.w;
  const T* cp = coarse.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  T* gm = gm_t.data_ptr<T>();
  const BReach<T, ND, P> reach(cp, B, G);
  const int64_t n_sa = reach.n_sa, plane_stride = ND == 3 ? S.h * W : W;
  const int64_t nslab = slab_tasks(n_sa, B);
  at::parallel_for(0, B * nslab, 1, [&](int64_t t0, int64_t t1) {
    RowTaps<T, I> R(W);
    BScratch<T> X(ND, G.s);
    std::vector<T> u(ND * W);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, lo, hi;
      if (!slab_of(t, nslab, n_sa, b, lo, hi)) continue;
      zero_slab(gm, b, C, N, lo, hi, plane_stride);
      for (int64_t q = 0; q < n_sa; ++q) {
        if (!reach.reaches(b, q, lo, hi)) continue;
        const int64_t h_begin = ND == 3 ? 0 : q, h_end = ND == 3 ? S.h : q + 1, d = ND == 3 ? q : 0;
        for (int64_t h = h_begin; h < h_end; ++h) {
          bspline_positions<T, I, ND>(cp, G, b, d, h, X, R, u);
          const int64_t row = (d * S.h + h) * W;
          for (int64_t w = 0; w < W; ++w) {
            if (R.bad[w]) continue;
            const int64_t off = modes::voxel_nearest<T, ND, P>(R.pd[w], R.ph[w], R.pw[w], S);
            if (off < lo * plane_stride || off >= hi * plane_stride) continue;
            for (int64_t c = 0; c < C; ++c) gm[(b * C + c) * N + off] += gp[(b * C + c) * N + row + w];
          }
        }
      }
    }
  });
}

// ----------------------------------------------------------------- upsample

template <typename T, int ND>
void upsample_forward(const at::Tensor& coarse, const BGeom<T, ND>& G, at::Tensor& out) {
  const int64_t B = coarse.size(0);
  const Dims3 S = G.S;
  const int64_t N = S.numel();
  const T* cp = coarse.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    BScratch<T> X(ND, G.s);
    std::vector<T> u(ND * S.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
      bspline_row<T, ND>(cp + b * ND * G.s.numel(), G, d, h, X, u.data());
      for (int j = 0; j < ND; ++j)
        std::memcpy(op + (b * ND + j) * N + (d * S.h + h) * S.w, u.data() + j * S.w, sizeof(T) * S.w);
    }
  });
}

template <typename T, int ND>
void upsample_backward(const at::Tensor& grad_field, const BGeom<T, ND>& G, PlanePartials<T, ND>& Q) {
  const int64_t B = grad_field.size(0);
  const Dims3 S = G.S;
  const int64_t N = S.numel(), W = S.w, n_sa = Q.n_sa;
  const T* gp = grad_field.data_ptr<T>();
  at::parallel_for(0, B * n_sa, 1, [&](int64_t t0, int64_t t1) {
    BScratch<T> X(ND, G.s);
    std::vector<T> grow(ND * W);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_sa, q = t % n_sa;
      const int64_t h_begin = ND == 3 ? 0 : q, h_end = ND == 3 ? S.h : q + 1, d = ND == 3 ? q : 0;
      for (int64_t h = h_begin; h < h_end; ++h) {
        for (int j = 0; j < ND; ++j)
          std::memcpy(grow.data() + j * W, gp + (b * ND + j) * N + (d * S.h + h) * W, sizeof(T) * W);
        PlanePartials<T, ND>::add_row(Q.plane(b, q), G, h, grow.data(), X, Q.inner);
      }
    }
  });
}

// ----------------------------------------------------------------- dispatch

// fn(I{}, nd_constant, pad_constant) for the runtime volume size, rank and padding.
template <typename Fn>
void dispatch_bspline(int64_t dim, Dims3 S, Pad pad, Fn&& fn) {
  const bool small = S.numel() < (int64_t(1) << 31) && !force_int64_index();
  auto by_pad = [&](auto i_tag, auto nd_c) {
    switch (pad) {
      case Pad::kZeros: return fn(i_tag, nd_c, std::integral_constant<Pad, Pad::kZeros>{});
      case Pad::kBorder: return fn(i_tag, nd_c, std::integral_constant<Pad, Pad::kBorder>{});
      default: return fn(i_tag, nd_c, std::integral_constant<Pad, Pad::kReflection>{});
    }
  };
  auto by_nd = [&](auto i_tag) {
    if (dim == 5) return by_pad(i_tag, std::integral_constant<int, 3>{});
    return by_pad(i_tag, std::integral_constant<int, 2>{});
  };
  if (small) return by_nd(int32_t{});
  return by_nd(int64_t{});
}

// origin / spacing: nd finite floats, spacing > 0.
std::vector<double> check_geometry(at::ArrayRef<double> v, int64_t nd, bool positive, const char* op,
                                   const char* name) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == nd, "coopseg.", op, ": ", name, " must have ", nd, " entries, got ",
              v.size());
  for (double x : v)
    TORCH_CHECK(std::isfinite(x) && (!positive || x > 0.0), "coopseg.", op, ": ", name, " entries must be finite",
                positive ? " and > 0" : "", ", got ", v);
  return std::vector<double>(v.begin(), v.end());
}

// A B-spline control grid for an image `like`: (B, nd, *s), every s_k in [4, 2^31).
void check_control(const at::Tensor& coarse, const at::Tensor& like, const char* op) {
  check_float_cpu(coarse, op, "coarse");
  const int64_t nd = like.dim() - 2;
  TORCH_CHECK(coarse.dim() == like.dim() && coarse.size(0) == like.size(0) && coarse.size(1) == nd, "coopseg.", op,
              ": coarse must be (B, ", nd, ", *s) for an image of shape ", shape_str(like), ", got shape ",
              shape_str(coarse));
  for (int64_t k = 2; k < coarse.dim(); ++k)
    TORCH_CHECK(coarse.size(k) >= 4 && coarse.size(k) < (int64_t(1) << 31), "coopseg.", op,
                ": coarse sizes must be >= 4 (cubic B-spline control points) and < 2^31, got shape ",
                shape_str(coarse));
}

void check_moving(const at::Tensor& moving, const at::Tensor& coarse, bool nearest, const char* op) {
  check_warp_moving(moving, nearest, op);
  check_control(coarse, moving, op);
  check_field_dtype(coarse, moving, op, "coarse");
}

at::Tensor warp_bspline_fwd(const at::Tensor& moving_, const at::Tensor& coarse_, at::ArrayRef<double> origin_,
                            at::ArrayRef<double> spacing_, c10::string_view padding_mode, c10::string_view mode) {
  const char* op = "warp_bspline_fwd";
  const Pad pad = modes::parse_pad(padding_mode, op);
  const bool nearest = modes::parse_nearest(mode, op);
  check_moving(moving_, coarse_, nearest, op);
  const int64_t nd = moving_.dim() - 2;
  const auto origin = check_geometry(origin_, nd, false, op, "origin");
  const auto spacing = check_geometry(spacing_, nd, true, op, "spacing");
  const at::Tensor moving = moving_.contiguous(), coarse = coarse_.contiguous();
  at::Tensor out = at::isFloatingType(moving.scalar_type()) ? new_output(moving.sizes(), moving.options())
                                                            : at::empty(moving.sizes(), moving.options());
  const Dims3 S = dims3(moving), s = dims3(coarse);
  AT_DISPATCH_FLOATING_TYPES(coarse.scalar_type(), "coopseg_warp_bspline_fwd", [&] {
    using T = scalar_t;
    dispatch_bspline(moving.dim(), S, pad, [&](auto i_tag, auto nd_c, auto pad_c) {
      using I = decltype(i_tag);
      constexpr int ND = decltype(nd_c)::value;
      constexpr Pad P = decltype(pad_c)::value;
      const BGeom<T, ND> G(S, s, origin, spacing);
      if (!nearest) {
        forward_bilinear<T, I, ND, P>(moving, coarse, G, out);
        return;
      }
      AT_DISPATCH_ALL_TYPES_AND(at::kBool, moving.scalar_type(), "coopseg_warp_bspline_fwd_nearest", [&] {
        using V = scalar_t;
        if constexpr (std::is_same_v<V, int8_t> || (std::is_floating_point_v<V> && !std::is_same_v<V, T>) ||
                      (!std::is_floating_point_v<V> && !std::is_same_v<T, float>)) {
          TORCH_CHECK(false, "coopseg.", op, ": moving of dtype ", moving.scalar_type(), " with coarse of dtype ",
                      coarse.scalar_type(), " is not supported");
        } else {
          forward_nearest<V, T, I, ND, P>(moving, coarse, G, out);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_bspline_bwd(const at::Tensor& grad_out_, const at::Tensor& moving_,
                                                    const at::Tensor& coarse_, at::ArrayRef<double> origin_,
                                                    at::ArrayRef<double> spacing_, c10::string_view padding_mode,
                                                    c10::string_view mode, bool need_moving, bool need_coarse) {
  const char* op = "warp_bspline_bwd";
  const Pad pad = modes::parse_pad(padding_mode, op);
  const bool nearest = modes::parse_nearest(mode, op);
  check_image(moving_, op, "moving", 2);
  check_control(coarse_, moving_, op);
  TORCH_CHECK(coarse_.scalar_type() == moving_.scalar_type(), "coopseg.", op, ": coarse must have the dtype of moving (",
              moving_.scalar_type(), "), got ", coarse_.scalar_type());
  check_same(grad_out_, moving_, op, "grad_out", "moving");
  const int64_t nd = moving_.dim() - 2;
  const auto origin = check_geometry(origin_, nd, false, op, "origin");
  const auto spacing = check_geometry(spacing_, nd, true, op, "spacing");
  const at::Tensor grad_out = grad_out_.contiguous(), moving = moving_.contiguous(), coarse = coarse_.contiguous();
  at::Tensor gm = need_moving ? new_output(moving.sizes(), moving.options()) : at::empty({0}, moving.options());
  at::Tensor gc = at::empty({0}, coarse.options());
  const Dims3 S = dims3(moving), s = dims3(coarse);
  AT_DISPATCH_FLOATING_TYPES(moving.scalar_type(), "coopseg_warp_bspline_bwd", [&] {
    using T = scalar_t;
    dispatch_bspline(moving.dim(), S, pad, [&](auto i_tag, auto nd_c, auto pad_c) {
      using I = decltype(i_tag);
      constexpr int ND = decltype(nd_c)::value;
      constexpr Pad P = decltype(pad_c)::value;
      const BGeom<T, ND> G(S, s, origin, spacing);
      if (nearest) {
        if (need_moving) backward_nearest<T, I, ND, P>(grad_out, coarse, G, gm);
        if (need_coarse) gc = at::zeros(coarse.sizes(), coarse.options());
        return;
      }
      PlanePartials<T, ND> Q(need_coarse ? moving.size(0) : 0, G);
      backward_bilinear<T, I, ND, P>(grad_out, moving, coarse, G, need_moving, need_coarse, gm, Q);
      if (need_coarse) gc = Q.fold(G, coarse);
    });
  });
  return {gm, gc};
}

at::Tensor upsample_bspline_fwd(const at::Tensor& coarse_, at::IntArrayRef size, at::ArrayRef<double> origin_,
                                at::ArrayRef<double> spacing_) {
  const char* op = "upsample_bspline_fwd";
  check_float_cpu(coarse_, op, "coarse");
  TORCH_CHECK(coarse_.dim() == 4 || coarse_.dim() == 5, "coopseg.", op,
              ": coarse must be (B, 2, h, w) or (B, 3, d, h, w), got shape ", shape_str(coarse_));
  const int64_t nd = coarse_.dim() - 2;
  check_sizes(size, nd, op, "size");
  std::vector<int64_t> shape = {coarse_.size(0), coarse_.size(1)};
  shape.insert(shape.end(), size.begin(), size.end());
  const at::Tensor like = at::empty(shape, coarse_.options().device(at::kMeta));
  check_control(coarse_, like, op);
  const auto origin = check_geometry(origin_, nd, false, op, "origin");
  const auto spacing = check_geometry(spacing_, nd, true, op, "spacing");
  const at::Tensor coarse = coarse_.contiguous();
  at::Tensor out = new_output(shape, coarse.options());
  const Dims3 S = dims3(like), s = dims3(coarse);
  AT_DISPATCH_FLOATING_TYPES(coarse.scalar_type(), "coopseg_upsample_bspline_fwd", [&] {
    using T = scalar_t;
    if (nd == 3) upsample_forward<T, 3>(coarse, BGeom<T, 3>(S, s, origin, spacing), out);
    else upsample_forward<T, 2>(coarse, BGeom<T, 2>(S, s, origin, spacing), out);
  });
  return out;
}

at::Tensor upsample_bspline_bwd(const at::Tensor& grad_field_, at::IntArrayRef coarse_size,
                                at::ArrayRef<double> origin_, at::ArrayRef<double> spacing_) {
  const char* op = "upsample_bspline_bwd";
  check_float_cpu(grad_field_, op, "grad_field");
  TORCH_CHECK(grad_field_.dim() == 4 || grad_field_.dim() == 5, "coopseg.", op,
              ": grad_field must be (B, 2, H, W) or (B, 3, D, H, W), got shape ", shape_str(grad_field_));
  const int64_t nd = grad_field_.dim() - 2;
  TORCH_CHECK(grad_field_.size(0) >= 1 && grad_field_.size(1) == nd, "coopseg.", op, ": grad_field must be (B, ", nd,
              ", *S), got shape ", shape_str(grad_field_));
  check_sizes(coarse_size, nd, op, "coarse_size");
  for (int64_t n : coarse_size)
    TORCH_CHECK(n >= 4, "coopseg.", op, ": coarse_size entries must be >= 4, got ", coarse_size);
  const auto origin = check_geometry(origin_, nd, false, op, "origin");
  const auto spacing = check_geometry(spacing_, nd, true, op, "spacing");
  const at::Tensor grad_field = grad_field_.contiguous();
  std::vector<int64_t> shape = {grad_field.size(0), nd};
  shape.insert(shape.end(), coarse_size.begin(), coarse_size.end());
  const at::Tensor like = at::empty(shape, grad_field.options().device(at::kMeta));
  const Dims3 S = dims3(grad_field), s = dims3(like);
  at::Tensor gc;
  AT_DISPATCH_FLOATING_TYPES(grad_field.scalar_type(), "coopseg_upsample_bspline_bwd", [&] {
    using T = scalar_t;
    if (nd == 3) {
      const BGeom<T, 3> G(S, s, origin, spacing);
      PlanePartials<T, 3> Q(grad_field.size(0), G);
      upsample_backward<T, 3>(grad_field, G, Q);
      gc = Q.fold(G, at::empty(shape, grad_field.options()));
    } else {
      const BGeom<T, 2> G(S, s, origin, spacing);
      PlanePartials<T, 2> Q(grad_field.size(0), G);
      upsample_backward<T, 2>(grad_field, G, Q);
      gc = Q.fold(G, at::empty(shape, grad_field.options()));
    }
  });
  return gc;
}

}  // namespace

TORCH_LIBRARY_IMPL(coopseg, CPU, m) {
  m.impl("warp_bspline_fwd", &warp_bspline_fwd);
  m.impl("warp_bspline_bwd", &warp_bspline_bwd);
  m.impl("upsample_bspline_fwd", &upsample_bspline_fwd);
  m.impl("upsample_bspline_bwd", &upsample_bspline_bwd);
}

}  // namespace coopseg
