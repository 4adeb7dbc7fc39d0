// Warp by a full-resolution displacement field (the DDF of MONAI's Warp and
// VoxelMorph's SpatialTransformer; coopseg's warp when the coarse grid has the
// image's size).
//
// warp_dense_fwd: one pass over the output rows; each voxel reads its own
//   displacement (no interpolation of a coarse grid), then samples the image
//   (bilinear: the taps and gathers of grid.h; nearest: one read).
// warp_dense_bwd: the field gradient is written per voxel, in place, by the
//   task that owns the voxel's plane (no per-cell partial sums, no reduction).
//   The image gradient is a scatter in which each task owns a slab of the
//   gradient along the outermost axis (d in 3-D, h in 2-D) and visits, in order,
//   the output planes whose displacement can reach it (their extremes along that
//   axis, computed once per plane), so no thread writes another's voxels, no
//   per-thread copy exists and the result does not depend on the thread count.
//   Both gradients come from one pass: a task computes a row's taps once.
//
// Modes as F.grid_sample(align_corners=True) in voxel coordinates: bilinear or
// nearest (half to even); padding zeros, border (position clamped) or
// reflection (about the first and last voxel centres, then clamped). Nearest
// warps integer and bool images in their own dtype; its field gradient is zero.
// Non-finite displacements follow docs/conventions.md#non-finite-values with the
// field seen as a coarse grid of the image's size: a voxel is "bad" when a node
// of its cell (itself and its upper neighbours, clamped) is not finite.
#include "checks.h"
#include "grid.h"
#include "warp_avx512.h"

#include <torch/library.h>

namespace coopseg {
namespace {

enum class Pad { Zeros, Border, Reflection };

Pad parse_padding(c10::string_view padding_mode, const char* op) {
  TORCH_CHECK(padding_mode == "zeros" || padding_mode == "border" || padding_mode == "reflection", "coopseg.", op,
              ": padding_mode must be 'zeros', 'border' or 'reflection', got '", padding_mode, "'");
  return padding_mode == "zeros" ? Pad::Zeros : padding_mode == "border" ? Pad::Border : Pad::Reflection;
}

bool parse_nearest(c10::string_view mode, const char* op) {
  TORCH_CHECK(mode == "bilinear" || mode == "nearest", "coopseg.", op, ": mode must be 'bilinear' or 'nearest', got '",
              mode, "'");
  return mode == "nearest";
}

// The range of reflect(p) for p in [a, b] (finite, a <= b).
template <typename T>
inline void reflect_interval(T& a, T& b, T hi) {
  if (b - a >= T(2) * hi) {
    a = T(0);
    b = hi;
    return;
  }
  T s;
  const T ra = reflect(a, hi, s), rb = reflect(b, hi, s);
  T lo = std::min(ra, rb), up = std::max(ra, rb);
  // breakpoints k * hi inside (a, b): 0 for even k, hi for odd k (at most three)
  for (int64_t k = static_cast<int64_t>(std::floor(a / hi)) + 1; T(k) * hi < b; ++k) {
    if (k % 2 == 0) lo = T(0);
    else up = hi;
  }
  a = lo;
  b = up;
}

// The cell rule for non-finite displacements: which rows hold a non-finite
// value in some channel (one vectorised pass over the field; finite fields then
// pay nothing else), and for the voxels of a row whether a node of their cell
// is not finite.
template <typename T, int ND>
struct NonFinite {
  Dims3 S;
  int64_t N;
  std::vector<uint8_t> row_bad;  // [b][d][h]
  bool any = false;

  NonFinite(const T* u, int64_t B, Dims3 S_) : S(S_), N(S_.numel()), row_bad(B * S_.d * S_.h, 0) {
    at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 4096 / S.w), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (S.d * S.h), row = r % (S.d * S.h);
        bool fin = true;
        for (int j = 0; j < ND; ++j) fin &= all_finite(u + (b * ND + j) * N + row * S.w, S.w);
        row_bad[r] = !fin;
      }
    });
    any = std::any_of(row_bad.begin(), row_bad.end(), [](uint8_t v) { return v != 0; });
  }

  // bad[w] |= 1 for the voxels of row (b, d, h) with a non-finite node in their cell
  template <typename I>
  void mark(const T* u, int64_t b, int64_t d, int64_t h, I* bad) const {
    if (!any) return;
    const int64_t ds[2] = {d, std::min(d + 1, S.d - 1)}, hs[2] = {h, std::min(h + 1, S.h - 1)};
    for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
      for (int c = 0; c < 2; ++c) {
        const int64_t r = (b * S.d + ds[a]) * S.h + hs[c];
        if (!row_bad[r]) continue;
        for (int j = 0; j < ND; ++j) {
          const T* x = u + (b * ND + j) * N + (ds[a] * S.h + hs[c]) * S.w;
          for (int64_t w = 0; w < S.w; ++w)
            if (!std::isfinite(x[w])) {
              bad[w] = I(1);
              if (w > 0) bad[w - 1] = I(1);
            }
        }
      }
  }
};

// Positions of row (b, d, h) and their bilinear taps (RowTaps, as grid.h's
// row_taps for a coarse grid). Reflection folds the positions first and then
// clamps them as border does; GRAD then multiplies the weight derivatives by
// the fold's sign.
template <typename T, typename I, int ND, Pad P, bool GRAD>
void dense_row_taps(const T* u, const NonFinite<T, ND>& nf, int64_t b, int64_t d, int64_t h, RowTaps<T, I>& R,
                    std::vector<T>& sign) {
  const Dims3 S = nf.S;
  const int64_t W = S.w, N = nf.N, row = (d * S.h + h) * W;
  const T* ub = u + b * ND * N + row;
  positions_from_field<T, I, ND>(ub, ub + (ND - 2) * N, ub + (ND - 1) * N, d, h, W, R);
  nf.mark(u, b, d, h, R.bad.data());
  position_taps<T, I, ND, P == Pad::Reflection, P != Pad::Zeros, GRAD>(S, R, sign);
}

// Nearest taps of row (b, d, h): the offset of the voxel read, its index along
// the slab axis, and its state: 1 inside, 0 outside (reads 0), 2 bad.
template <typename I>
struct NearestRow {
  std::vector<I> off, lower;
  std::vector<uint8_t> state;
  std::vector<I> bad;
  explicit NearestRow(int64_t W) : off(W), lower(W), state(W), bad(W) {}
};

template <typename T, Pad P>
inline int64_t nearest_index(T p, int64_t n, bool& inside) {
  const T hi = T(n - 1);
  if constexpr (P == Pad::Border) {
    p = std::min(std::max(p, T(0)), hi);
  } else if constexpr (P == Pad::Reflection) {
    T s;
    p = std::min(std::max(reflect(p, hi, s), T(0)), hi);
  } else {
    p = std::min(std::max(p, T(-2)), hi + T(2));  // outside stays outside; keeps the conversion defined
  }
  const int64_t i = static_cast<int64_t>(std::nearbyint(p));  // half to even, as grid_sample
  inside = i >= 0 && i < n;
  return i;
}

template <typename T, typename I, int ND, Pad P>
void dense_row_nearest(const T* u, const NonFinite<T, ND>& nf, int64_t b, int64_t d, int64_t h, NearestRow<I>& R) {
  const Dims3 S = nf.S;
  const int64_t W = S.w, N = nf.N, row = (d * S.h + h) * W;
  const T* ub = u + b * ND * N + row;
  I* bad = R.bad.data();
  for (int64_t w = 0; w < W; ++w) {
    T z = ub[(ND - 2) * N + w] * T(0) + ub[(ND - 1) * N + w] * T(0);
    if (ND == 3) z += ub[w] * T(0);
    bad[w] = (z != z) ? I(1) : I(0);
  }
  nf.mark(u, b, d, h, bad);
  for (int64_t w = 0; w < W; ++w) {
    if (bad[w]) {
      R.state[w] = 2;
      R.off[w] = I(0);
      R.lower[w] = I(-1);
      continue;
    }
    bool in_d = true, in_h, in_w;
    const int64_t id = ND == 3 ? nearest_index<T, P>(T(d) + ub[w], S.d, in_d) : 0;
    const int64_t ih = nearest_index<T, P>(T(h) + ub[(ND - 2) * N + w], S.h, in_h);
    const int64_t iw = nearest_index<T, P>(T(w) + ub[(ND - 1) * N + w], S.w, in_w);
    const bool in = in_d && in_h && in_w;
    R.state[w] = in ? 1 : 0;
    R.off[w] = in ? I((id * S.h + ih) * S.w + iw) : I(0);
    R.lower[w] = in ? I(ND == 3 ? id : ih) : I(-1);
  }
}

// The AVX-512 rows of the coarse warp (warp_avx512.h) serve a dense field too: it
// is a coarse grid of the image's size, whose interpolation tables are the
// identity (i0 = x, l1 = 0; the upper node i1 = x + 1 enters as 0 * node, which
// is the cell rule along w). A row takes them when the instantiation has them
// (float, 32-bit offsets, 3-D, zeros or border) and no neighbouring row of its
// cells holds a non-finite displacement (NonFinite::mark's rows; those take the
// generic path). `rowf` receives the row's three channels (coarse_row's layout).
template <typename T, typename I, int ND, Pad P>
constexpr bool kDenseRows =
#if defined(__AVX512F__)
    avx512::kRows<T, I, ND> && P != Pad::Reflection;
#else
    false;
#endif

template <typename T, int ND>
inline bool row_clean(const NonFinite<T, ND>& nf, int64_t b, int64_t d, int64_t h) {
  if (!nf.any) return true;
  const Dims3 S = nf.S;
  const int64_t ds[2] = {d, std::min(d + 1, S.d - 1)}, hs[2] = {h, std::min(h + 1, S.h - 1)};
  for (int a = 0; a < (ND == 3 ? 2 : 1); ++a)
    for (int c = 0; c < 2; ++c)
      if (nf.row_bad[(b * S.d + ds[a]) * S.h + hs[c]]) return false;
  return true;
}

template <typename T, int ND>
inline void copy_row(const T* u, int64_t N, Dims3 S, int64_t b, int64_t d, int64_t h, T* rowf) {
  const T* src = u + b * ND * N + (d * S.h + h) * S.w;
  for (int j = 0; j < ND; ++j) std::memcpy(rowf + j * S.w, src + j * N, sizeof(T) * S.w);
}

// ------------------------------------------------------------------ forward

template <typename T, typename I, int ND, Pad P>
void forward_bilinear(const at::Tensor& moving, const at::Tensor& ddf, at::Tensor& out) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = dims3(moving);
  const int64_t N = S.numel();
  const T* mp = moving.data_ptr<T>();
  const T* up = ddf.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const NonFinite<T, ND> nf(up, B, S);
  const AxisInterp<T> Iw(S.w, S.w, true);  // the identity (kDenseRows)
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    RowTaps<T, I> R(S.w);
    std::vector<T> sign(P == Pad::Reflection ? 3 * S.w : 0), rowf(kDenseRows<T, I, ND, P> ? ND * S.w : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
#if defined(__AVX512F__)
      if constexpr (kDenseRows<T, I, ND, P>) {
        // a row whose output is not finite is recomputed below on the generic path
        if (row_clean(nf, b, d, h)) {
          copy_row<T, ND>(up, N, S, b, d, h, rowf.data());
          if (avx512::row_forward<P == Pad::Border>(mp + b * C * N, rowf.data(), Iw, S, C, N, d, h,
                                                    op + b * C * N + (d * S.h + h) * S.w))
            continue;
        }
      }
#endif
      dense_row_taps<T, I, ND, P, false>(up, nf, b, d, h, R, sign);
      const int64_t row = (d * S.h + h) * S.w;
      for (int64_t c = 0; c < C; ++c) row_sample<T, I, ND>(mp + (b * C + c) * N, R, S, op + (b * C + c) * N + row);
    }
  });
}

// V: the image's dtype (float, double or an integer/bool label type), T: the math dtype.
template <typename V, typename T, typename I, int ND, Pad P>
void forward_nearest(const at::Tensor& moving, const at::Tensor& ddf, at::Tensor& out) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = dims3(moving);
  const int64_t N = S.numel();
  const V* mp = moving.data_ptr<V>();
  const T* up = ddf.data_ptr<T>();
  V* op = out.data_ptr<V>();
  // a bad voxel: NaN for floating images, 0 (false) for label maps
  V bad_value = V(0);
  if constexpr (std::is_floating_point_v<V>) bad_value = std::numeric_limits<V>::quiet_NaN();
  const NonFinite<T, ND> nf(up, B, S);
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    NearestRow<I> R(S.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
      dense_row_nearest<T, I, ND, P>(up, nf, b, d, h, R);
      const int64_t row = (d * S.h + h) * S.w;
      for (int64_t c = 0; c < C; ++c) {
        const V* img = mp + (b * C + c) * N;
        V* o = op + (b * C + c) * N + row;
        for (int64_t w = 0; w < S.w; ++w) {
          const uint8_t st = R.state[w];
          const V x = img[R.off[w]];  // offset 0 (a safe address) when outside or bad
          o[w] = st == 1 ? x : st == 2 ? bad_value : V(0);
        }
      }
    }
  });
}

// ----------------------------------------------------------------- backward

// Which output planes (along the slab axis) can reach a slab of the image
// gradient: plane q's positions along that axis lie in [q + umin_q, q + umax_q]
// (fmin/fmax skip NaN: bad voxels scatter nothing), padded as the positions
// are; the taps of p are floor(p) and floor(p) + 1 (nearest: one of them).
template <typename T, int ND, Pad P>
struct DenseReach {
  int64_t n_sa;
  std::vector<T> lo_, hi_;  // [b][q]: the padded position range of plane q

  DenseReach(const T* u, int64_t B, Dims3 S) : n_sa(ND == 3 ? S.d : S.h), lo_(B * n_sa), hi_(B * n_sa) {
    const int64_t N = S.numel(), per_plane = N / n_sa;
    at::parallel_for(0, B * n_sa, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / n_sa, q = t % n_sa;
        const T* c = u + b * ND * N + q * per_plane;  // channel 0: the slab axis
        T mn = std::numeric_limits<T>::infinity(), mx = -mn;
        for (int64_t i = 0; i < per_plane; ++i) {
          mn = std::fmin(mn, c[i]);
          mx = std::fmax(mx, c[i]);
        }
        T a = T(q) + mn, z = T(q) + mx;
        const T hi = T(n_sa - 1);
        if (a <= z) {  // not an all-NaN plane
          if (P == Pad::Border) {
            a = std::min(std::max(a, T(0)), hi);
            z = std::min(std::max(z, T(0)), hi);
          } else if (P == Pad::Reflection) {
            if (std::isfinite(a) && std::isfinite(z)) {
              reflect_interval(a, z, hi);
            } else {
              a = T(0);
              z = hi;
            }
          }
        }
        lo_[t] = a;
        hi_[t] = z;
      }
    });
  }

  bool reaches(int64_t b, int64_t q, int64_t lo, int64_t hi) const {
    const T a = lo_[b * n_sa + q], z = hi_[b * n_sa + q];
    return z >= T(lo - 1) && a < T(hi);
  }
};

// Both gradients in one pass over slabs (see the file comment). gf: the field
// gradient (need_field), gm: the image gradient (need_moving).
template <typename T, typename I, int ND, Pad P>
void backward_bilinear(const at::Tensor& grad_out, const at::Tensor& moving, const at::Tensor& ddf, bool need_moving,
                       bool need_field, at::Tensor& gm_t, at::Tensor& gf_t) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = dims3(moving);
  const int64_t N = S.numel(), W = S.w;
  const T* mp = moving.data_ptr<T>();
  const T* up = ddf.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  T* gm = need_moving ? gm_t.data_ptr<T>() : nullptr;
  T* gf = need_field ? gf_t.data_ptr<T>() : nullptr;
  const NonFinite<T, ND> nf(up, B, S);
  const T nan = std::numeric_limits<T>::quiet_NaN();

  // the field gradient of row (b, d, h), its taps in R (with GRAD)
  auto field_row = [&](int64_t b, int64_t d, int64_t h, const RowTaps<T, I>& R, std::vector<T>& gpos) {
    T* gpd = gpos.data();
    T* gph = gpd + W;
    T* gpw = gph + W;
    std::fill(gpos.begin(), gpos.end(), T(0));
    const int64_t row = (d * S.h + h) * W;
    const T* img = mp + b * C * N;
    const T* g = gp + b * C * N + row;
    for (int64_t c = 0; c < C; ++c) row_position_grad<T, I, ND>(img + c * N, g + c * N, R, S, gpd, gph, gpw);
    if (!all_finite(gpd, 3 * W)) {  // a non-finite image value or output gradient: the exact path
      std::fill(gpos.begin(), gpos.end(), T(0));
      for (int64_t c = 0; c < C; ++c)
        row_position_grad<T, I, ND, true>(img + c * N, g + c * N, R, S, gpd, gph, gpw);
    }
    T* out = gf + b * ND * N + row;
    const T* src[3] = {gpd, gph, gpw};
    for (int j = 0; j < ND; ++j) {
      const T* s = src[3 - ND + j];
      T* o = out + j * N;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) o[w] = R.bad[w] ? nan : s[w];
    }
  };

  if (!need_moving) {
    if (!need_field) return;
    const AxisInterp<T> Iw(W, W, true);  // the identity (kDenseRows)
    at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / W), [&](int64_t r0, int64_t r1) {
      RowTaps<T, I> R(W);
      std::vector<T> sign(P == Pad::Reflection ? 3 * W : 0), gpos(3 * W), rowf(kDenseRows<T, I, ND, P> ? ND * W : 0);
#if defined(__AVX512F__)
      avx512::BackwardScratch Y(kDenseRows<T, I, ND, P> ? W : 0);
#endif
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
#if defined(__AVX512F__)
        if constexpr (kDenseRows<T, I, ND, P>) {
          if (row_clean(nf, b, d, h)) {
            const int64_t row = (d * S.h + h) * W;
            copy_row<T, ND>(up, N, S, b, d, h, rowf.data());
            const int flags = avx512::row_backward<P == Pad::Border, true, false>(
                mp + b * C * N, gp + b * C * N + row, rowf.data(), Iw, S, C, N, d, h, 0, 1, nullptr, Y);
            if (!(flags & avx512::kGposNotFinite)) {
              T* out = gf + b * ND * N + row;
              for (int j = 0; j < ND; ++j) std::memcpy(out + j * N, Y.gpos.data() + j * W, sizeof(T) * W);
              continue;
            }
          }
        }
#endif
        dense_row_taps<T, I, ND, P, true>(up, nf, b, d, h, R, sign);
        field_row(b, d, h, R, gpos);
      }
    });
    return;
  }

  const DenseReach<T, ND, P> reach(up, B, S);
  const int64_t n_sa = reach.n_sa, plane_stride = ND == 3 ? S.h * W : W;
  const int64_t nslab = slab_tasks(n_sa, B);
  const AxisInterp<T> Iw(W, W, true);  // the identity (kDenseRows)
  at::parallel_for(0, B * nslab, 1, [&](int64_t t0, int64_t t1) {
    RowTaps<T, I> R(W);
    ScatterScratch<T, I> X(W);
    std::vector<T> sign(P == Pad::Reflection ? 3 * W : 0), gpos(3 * W), rowf(kDenseRows<T, I, ND, P> ? ND * W : 0);
#if defined(__AVX512F__)
    avx512::BackwardScratch Y(kDenseRows<T, I, ND, P> ? W : 0);
    // the row in registers (warp_avx512.h); rows whose data is not finite fall back to the generic exact paths
    auto fast_row = [&](int64_t b, int64_t d, int64_t h, bool own, bool scatter, int64_t lo, int64_t hi) {
      if constexpr (kDenseRows<T, I, ND, P>) {
        constexpr bool BORDER = P == Pad::Border;
        const int64_t row = (d * S.h + h) * W;
        const T* img = mp + b * C * N;
        const T* g = gp + b * C * N + row;
        copy_row<T, ND>(up, N, S, b, d, h, rowf.data());
        int flags = 0;
        if (own && scatter)
          flags = avx512::row_backward<BORDER, true, true>(img, g, rowf.data(), Iw, S, C, N, d, h, lo, hi,
                                                            gm + b * C * N, Y);
        else if (own)
          flags = avx512::row_backward<BORDER, true, false>(img, g, rowf.data(), Iw, S, C, N, d, h, lo, hi,
                                                             gm + b * C * N, Y);
        else
          flags = avx512::row_backward<BORDER, false, true>(img, g, rowf.data(), Iw, S, C, N, d, h, lo, hi,
                                                             gm + b * C * N, Y);
        if (flags) dense_row_taps<T, I, ND, P, true>(up, nf, b, d, h, R, sign);
        if (own) {
          if (flags & avx512::kGposNotFinite) {
            field_row(b, d, h, R, gpos);
          } else {
            T* out = gf + b * ND * N + row;
            for (int j = 0; j < ND; ++j) std::memcpy(out + j * N, Y.gpos.data() + j * W, sizeof(T) * W);
          }
        }
        if (scatter) {
          if (flags & avx512::kGradNotFinite)
            row_scatter_exact<T, I, ND>(g, R, S, C, N, lo, hi, gm + b * C * N);
          else
            avx512::scatter_row(g, Y, W, C, N, gm + b * C * N);
        }
      }
    };
#endif
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, lo, hi;
      if (!slab_of(t, nslab, n_sa, b, lo, hi)) continue;
      zero_slab(gm, b, C, N, lo, hi, plane_stride);
      for (int64_t q = 0; q < n_sa; ++q) {
        const bool own = need_field && q >= lo && q < hi;
        const bool scatter = reach.reaches(b, q, lo, hi);
        if (!own && !scatter) continue;
        const int64_t h_begin = ND == 3 ? 0 : q, h_end = ND == 3 ? S.h : q + 1, d = ND == 3 ? q : 0;
        for (int64_t h = h_begin; h < h_end; ++h) {
#if defined(__AVX512F__)
          if constexpr (kDenseRows<T, I, ND, P>) {
            if (row_clean(nf, b, d, h)) {
              fast_row(b, d, h, own, scatter, lo, hi);
              continue;
            }
          }
#endif
          if (own) {
            dense_row_taps<T, I, ND, P, true>(up, nf, b, d, h, R, sign);
            field_row(b, d, h, R, gpos);
          } else {
            dense_row_taps<T, I, ND, P, false>(up, nf, b, d, h, R, sign);
          }
          if (scatter) row_scatter<T, I, ND>(gp + b * C * N + (d * S.h + h) * W, R, S, C, N, lo, hi, gm + b * C * N, X);
        }
      }
    }
  });
}

// The image gradient of nearest: gm[voxel read] += g, by slabs as above.
template <typename T, typename I, int ND, Pad P>
void backward_nearest(const at::Tensor& grad_out, const at::Tensor& ddf, at::Tensor& gm_t) {
  const int64_t B = gm_t.size(0), C = gm_t.size(1);
  const Dims3 S = dims3(gm_t);
  const int64_t N = S.numel(), W = S.w;
  const T* up = ddf.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  T* gm = gm_t.data_ptr<T>();
  const NonFinite<T, ND> nf(up, B, S);
  const DenseReach<T, ND, P> reach(up, B, S);
  const int64_t n_sa = reach.n_sa, plane_stride = ND == 3 ? S.h * W : W;
  const int64_t nslab = slab_tasks(n_sa, B);
  at::parallel_for(0, B * nslab, 1, [&](int64_t t0, int64_t t1) {
    NearestRow<I> R(W);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, lo, hi;
      if (!slab_of(t, nslab, n_sa, b, lo, hi)) continue;
      zero_slab(gm, b, C, N, lo, hi, plane_stride);
      for (int64_t q = 0; q < n_sa; ++q) {
        if (!reach.reaches(b, q, lo, hi)) continue;
        const int64_t h_begin = ND == 3 ? 0 : q, h_end = ND == 3 ? S.h : q + 1, d = ND == 3 ? q : 0;
        for (int64_t h = h_begin; h < h_end; ++h) {
          dense_row_nearest<T, I, ND, P>(up, nf, b, d, h, R);
          const int64_t row = (d * S.h + h) * W;
          for (int64_t c = 0; c < C; ++c) {
            const T* g = gp + (b * C + c) * N + row;
            T* dst = gm + (b * C + c) * N;
            for (int64_t w = 0; w < W; ++w) {
              const I z = R.lower[w];
              if (R.state[w] == 1 && z >= I(lo) && z < I(hi)) dst[R.off[w]] += g[w];
            }
          }
        }
      }
    }
  });
}

// ----------------------------------------------------------------- dispatch

// fn(T{}, I{}, nd_constant, pad_constant) for the runtime math dtype, volume
// size, dimensionality and padding.
template <typename T, typename Fn>
void dispatch_dense(const at::Tensor& moving, Pad pad, Fn&& fn) {
  const bool three = moving.dim() == 5;
  const bool small = dims3(moving).numel() < (int64_t(1) << 31) && !force_int64_index();
  auto by_pad = [&](auto i_tag, auto nd_c) {
    switch (pad) {
      case Pad::Zeros: return fn(i_tag, nd_c, std::integral_constant<Pad, Pad::Zeros>{});
      case Pad::Border: return fn(i_tag, nd_c, std::integral_constant<Pad, Pad::Border>{});
      default: return fn(i_tag, nd_c, std::integral_constant<Pad, Pad::Reflection>{});
    }
  };
  auto by_nd = [&](auto i_tag) {
    if (three) return by_pad(i_tag, std::integral_constant<int, 3>{});
    return by_pad(i_tag, std::integral_constant<int, 2>{});
  };
  if (small) return by_nd(int32_t{});
  return by_nd(int64_t{});
}

void check_ddf(const at::Tensor& ddf, const at::Tensor& moving, const char* op) {
  check_float_cpu(ddf, op, "ddf");
  const int64_t nd = moving.dim() - 2;
  TORCH_CHECK(ddf.dim() == moving.dim() && ddf.size(0) == moving.size(0) && ddf.size(1) == nd, "coopseg.", op,
              ": ddf must be (B, ", nd, ", *S) for moving of shape ", shape_str(moving), ", got shape ", shape_str(ddf));
  for (int64_t k = 2; k < ddf.dim(); ++k)
    TORCH_CHECK(ddf.size(k) == moving.size(k), "coopseg.", op, ": ddf must have the spatial size of moving ",
                shape_str(moving), ", got shape ", shape_str(ddf));
}

// A label map or float image for the forward: float images need the ddf's
// dtype; other dtypes (nearest only) a float32 ddf.
void check_moving(const at::Tensor& moving, const at::Tensor& ddf, bool nearest, const char* op) {
  check_warp_moving(moving, nearest, op);
  check_ddf(ddf, moving, op);
  check_field_dtype(ddf, moving, op, "ddf");
}

at::Tensor warp_dense_fwd(const at::Tensor& moving_, const at::Tensor& ddf_, c10::string_view padding_mode,
                          c10::string_view mode) {
  const char* op = "warp_dense_fwd";
  const Pad pad = parse_padding(padding_mode, op);
  const bool nearest = parse_nearest(mode, op);
  check_moving(moving_, ddf_, nearest, op);
  const at::Tensor moving = moving_.contiguous(), ddf = ddf_.contiguous();
  // (COOPSEG_POISON's NaN fill exists for floating outputs only)
  at::Tensor out = at::isFloatingType(moving.scalar_type()) ? new_output(moving.sizes(), moving.options())
                                                            : at::empty(moving.sizes(), moving.options());
  if (!nearest) {
    AT_DISPATCH_FLOATING_TYPES(moving.scalar_type(), "coopseg_warp_dense_fwd", [&] {
      using T = scalar_t;
      dispatch_dense<T>(moving, pad, [&](auto i_tag, auto nd_c, auto pad_c) {
        forward_bilinear<T, decltype(i_tag), decltype(nd_c)::value, decltype(pad_c)::value>(moving, ddf, out);
      });
    });
    return out;
  }
  AT_DISPATCH_ALL_TYPES_AND(at::kBool, moving.scalar_type(), "coopseg_warp_dense_fwd_nearest", [&] {
    using V = scalar_t;
    if constexpr (std::is_same_v<V, double>) {
      dispatch_dense<double>(moving, pad, [&](auto i_tag, auto nd_c, auto pad_c) {
        forward_nearest<V, double, decltype(i_tag), decltype(nd_c)::value, decltype(pad_c)::value>(moving, ddf, out);
      });
    } else if constexpr (std::is_same_v<V, int8_t>) {
      TORCH_CHECK(false, "coopseg.", op, ": int8 label maps are not supported");
    } else {
      dispatch_dense<float>(moving, pad, [&](auto i_tag, auto nd_c, auto pad_c) {
        forward_nearest<V, float, decltype(i_tag), decltype(nd_c)::value, decltype(pad_c)::value>(moving, ddf, out);
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_dense_bwd(const at::Tensor& grad_out_, const at::Tensor& moving_,
                                                  const at::Tensor& ddf_, c10::string_view padding_mode,
                                                  c10::string_view mode, bool need_moving, bool need_ddf) {
  const char* op = "warp_dense_bwd";
  const Pad pad = parse_padding(padding_mode, op);
  const bool nearest = parse_nearest(mode, op);
  check_image(moving_, op, "moving", 2);
  check_ddf(ddf_, moving_, op);
  TORCH_CHECK(ddf_.scalar_type() == moving_.scalar_type(), "coopseg.", op, ": ddf must have the dtype of moving (",
              moving_.scalar_type(), "), got ", ddf_.scalar_type());
  check_same(grad_out_, moving_, op, "grad_out", "moving");
  const at::Tensor grad_out = grad_out_.contiguous(), moving = moving_.contiguous(), ddf = ddf_.contiguous();
  at::Tensor gm = need_moving ? new_output(moving.sizes(), moving.options()) : at::empty({0}, moving.options());
  at::Tensor gf = at::empty({0}, ddf.options());
  if (need_ddf) gf = nearest ? at::zeros(ddf.sizes(), ddf.options()) : new_output(ddf.sizes(), ddf.options());
  AT_DISPATCH_FLOATING_TYPES(moving.scalar_type(), "coopseg_warp_dense_bwd", [&] {
    using T = scalar_t;
    dispatch_dense<T>(moving, pad, [&](auto i_tag, auto nd_c, auto pad_c) {
      using I = decltype(i_tag);
      constexpr int ND = decltype(nd_c)::value;
      constexpr Pad P = decltype(pad_c)::value;
      if (nearest) {
        if (need_moving) backward_nearest<T, I, ND, P>(grad_out, ddf, gm);
      } else {
        backward_bilinear<T, I, ND, P>(grad_out, moving, ddf, need_moving, need_ddf, gm, gf);
      }
    });
  });
  return {gm, gf};
}

}  // namespace

TORCH_LIBRARY_IMPL(coopseg, CPU, m) {
  m.impl("warp_dense_fwd", &warp_dense_fwd);
  m.impl("warp_dense_bwd", &warp_dense_bwd);
}

}  // namespace coopseg
