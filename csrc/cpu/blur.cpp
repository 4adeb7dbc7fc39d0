// Separable banded operator on CPU: out = A_d A_h A_w x (3-D) or A_h A_w x
// (2-D), each A_k given by per-axis tables (coopseg_kernels/ops/blur.py): for
// every output index j, up to M (input index, weight) pairs, index -1 unused.
// The blur and its adjoint (its backward) are this one kernel on different
// tables.
//
// One pass over the input, cache-blocked: a task owns (b, c, slab of output
// planes). Input rows are blurred along w into a ring of M rows, combined along
// h into a ring of M planes, and output planes are combined from those along d.
// Each input row is read once per task (slab edges re-read a radius of halo),
// and the only temporaries are the per-task rings.
#include "checks.h"
#include "grid.h"

#include <torch/library.h>

namespace coopseg {
namespace {

template <typename T>
struct AxisOp {
  int64_t n = 0, M = 0;
  const int32_t* idx = nullptr;
  const T* wt = nullptr;
  // rows [a, b) are one stencil: taps at j + off[m] with weights sw[m]
  int64_t a = 0, b = 0;
  std::vector<int64_t> off;
  std::vector<T> sw;

  AxisOp(const at::Tensor& idx_t, const at::Tensor& wt_t)
      : n(idx_t.size(0)), M(idx_t.size(1)), idx(idx_t.data_ptr<int32_t>()), wt(wt_t.data_ptr<T>()) {
    const int64_t mid = n / 2;
    for (int64_t m = 0; m < M; ++m)
      if (idx[mid * M + m] >= 0) {
        off.push_back(idx[mid * M + m] - mid);
        sw.push_back(wt[mid * M + m]);
      }
    auto is_stencil = [&](int64_t j) {
      int64_t used = 0;
      for (int64_t m = 0; m < M; ++m) {
        if (idx[j * M + m] < 0) continue;
        if (used >= static_cast<int64_t>(off.size()) || idx[j * M + m] != j + off[used] ||
            wt[j * M + m] != sw[used])
          return false;
        ++used;
      }
      return used == static_cast<int64_t>(off.size());
    };
    a = mid;
    b = mid;
    if (n > 0 && is_stencil(mid)) {
      b = mid + 1;
      while (a > 0 && is_stencil(a - 1)) --a;
      while (b < n && is_stencil(b)) ++b;
    }
  }
};

// The w pass of one line: out = A_w in. Stencil rows vectorise tap by tap.
template <typename T>
void line_pass(const AxisOp<T>& A, const T* in, T* out) {
  auto table_row = [&](int64_t j) {
    T acc = T(0);
    for (int64_t m = 0; m < A.M; ++m) {
      const int32_t i = A.idx[j * A.M + m];
      if (i >= 0) acc += A.wt[j * A.M + m] * in[i];
    }
    out[j] = acc;
  };
  for (int64_t j = 0; j < A.a; ++j) table_row(j);
  if (A.b > A.a) {
    const T s0 = A.sw[0];
    const T* in0 = in + A.off[0];
#pragma omp simd
    for (int64_t j = A.a; j < A.b; ++j) out[j] = s0 * in0[j];
    for (size_t m = 1; m < A.off.size(); ++m) {
      const T s = A.sw[m];
      const T* im = in + A.off[m];
#pragma omp simd
      for (int64_t j = A.a; j < A.b; ++j) out[j] += s * im[j];
    }
  }
  for (int64_t j = A.b; j < A.n; ++j) table_row(j);
}

// out = sum_m wt[m] * src[m] over len elements (a row of the h or d pass).
template <typename T>
void combine(const AxisOp<T>& A, int64_t j, const T* const* src, int64_t len, T* __restrict out) {
  bool first = true;
  for (int64_t m = 0; m < A.M; ++m) {
    if (A.idx[j * A.M + m] < 0) continue;
    const T s = A.wt[j * A.M + m];
    const T* __restrict in = src[m];
    if (first) {
#pragma omp simd
      for (int64_t w = 0; w < len; ++w) out[w] = s * in[w];
      first = false;
    } else {
#pragma omp simd
      for (int64_t w = 0; w < len; ++w) out[w] += s * in[w];
    }
  }
  if (first) std::fill(out, out + len, T(0));
}

// A ring of M buffers keyed by index: the buffers a window of outputs needs.
template <typename T>
struct Ring {
  int64_t M, len;
  std::vector<T> data;
  std::vector<int64_t> tag;
  Ring(int64_t M_, int64_t len_) : M(M_), len(len_), data(M_ * len_), tag(M_, -1) {}
  void reset() { std::fill(tag.begin(), tag.end(), -1); }
  // the buffer of `key` and whether it must be (re)computed
  T* get(int64_t key, bool& fresh) {
    const int64_t slot = key % M;
    fresh = tag[slot] != key;
    tag[slot] = key;
    return data.data() + slot * len;
  }
};

template <typename T, int ND>
void blur_apply_impl(const at::Tensor& x, const std::vector<AxisOp<T>>& ops, at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1);
  const Dims3 S = dims3(x);
  const int64_t N = S.numel();
  const AxisOp<T>& Ah = ops[ND - 2];
  const AxisOp<T>& Aw = ops[ND - 1];
  const int64_t n_outer = ND == 3 ? S.d : S.h;
  const int64_t per_bc = std::max<int64_t>(1, std::min<int64_t>(n_outer, (at::get_num_threads() + B * C - 1) / (B * C)));
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t M = Aw.M;

  at::parallel_for(0, B * C * per_bc, 1, [&](int64_t t0, int64_t t1) {
    Ring<T> rows(M, S.w);                         // w-blurred input rows of the current plane
    Ring<T> planes(ND == 3 ? M : 1, S.h * S.w);  // (h, w)-blurred planes (3-D)
    std::vector<const T*> src_h(M), src_d(M);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bc = t / per_bc, k = t % per_bc;
      const int64_t j0 = n_outer * k / per_bc, j1 = n_outer * (k + 1) / per_bc;
      const T* xin = xp + bc * N;
      T* o = op + bc * N;
      // w-blurred row ih of plane i
      auto wrow = [&](int64_t i, int64_t ih) {
        bool fresh;
        T* r = rows.get(ih, fresh);
        if (fresh) line_pass(Aw, xin + (i * S.h + ih) * S.w, r);
        return r;
      };
      // row jh of plane i blurred along h and w, into dst
      auto hrow = [&](int64_t i, int64_t jh, T* dst) {
        for (int64_t m = 0; m < M; ++m) {
          const int32_t ih = Ah.idx[jh * M + m];
          src_h[m] = ih >= 0 ? wrow(i, ih) : nullptr;
        }
        combine(Ah, jh, src_h.data(), S.w, dst);
      };
      planes.reset();
      if (ND == 2) {
        rows.reset();
        for (int64_t j = j0; j < j1; ++j) hrow(0, j, o + j * S.w);
        continue;
      }
      const AxisOp<T>& Ad = ops[0];
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t m = 0; m < M; ++m) {
          const int32_t i = Ad.idx[j * M + m];
          src_d[m] = nullptr;
          if (i < 0) continue;
          bool fresh;
          T* p = planes.get(i, fresh);
          if (fresh) {
            rows.reset();
            for (int64_t jh = 0; jh < S.h; ++jh) hrow(i, jh, p + jh * S.w);
          }
          src_d[m] = p;
        }
        combine(Ad, j, src_d.data(), S.h * S.w, o + j * S.h * S.w);
      }
    }
  });
}

at::Tensor blur_apply(const at::Tensor& x_, at::TensorList idx, at::TensorList wt) {
  check_image(x_, "blur_apply", "x", 1);
  const int64_t nd = x_.dim() - 2;
  TORCH_CHECK(static_cast<int64_t>(idx.size()) == nd && static_cast<int64_t>(wt.size()) == nd,
              "coopseg.blur_apply: idx and wt must hold one table per spatial axis (", nd, "), got ", idx.size(),
              " and ", wt.size());
  const int64_t M = idx[0].dim() == 2 ? idx[0].size(1) : 0;
  TORCH_CHECK(M >= 1, "coopseg.blur_apply: idx[0] must be (n, M) with M >= 1, got shape ", shape_str(idx[0]));
  for (int64_t k = 0; k < nd; ++k) {
    TORCH_CHECK(idx[k].device().is_cpu() && idx[k].scalar_type() == at::kInt && idx[k].dim() == 2 &&
                    idx[k].size(0) == x_.size(2 + k) && idx[k].size(1) == M && idx[k].is_contiguous(),
                "coopseg.blur_apply: idx[", k, "] must be a contiguous int32 CPU tensor (", x_.size(2 + k), ", ", M,
                "), got ", idx[k].scalar_type(), " ", shape_str(idx[k]), " on ", idx[k].device());
    TORCH_CHECK(wt[k].device().is_cpu() && wt[k].scalar_type() == x_.scalar_type() &&
                    wt[k].sizes() == idx[k].sizes() && wt[k].is_contiguous(),
                "coopseg.blur_apply: wt[", k, "] must be a contiguous CPU tensor of x's dtype (", x_.scalar_type(),
                ") shaped like idx[", k, "], got ", wt[k].scalar_type(), " ", shape_str(wt[k]), " on ",
                wt[k].device());
    const int32_t* ip = idx[k].data_ptr<int32_t>();
    for (int64_t e = 0; e < idx[k].numel(); ++e)
      TORCH_CHECK(ip[e] >= -1 && ip[e] < x_.size(2 + k), "coopseg.blur_apply: idx[", k,
                  "] entries must be -1 (unused) or in [0, ", x_.size(2 + k), "), got ", ip[e]);
  }
  const at::Tensor x = x_.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coopseg_blur_apply", [&] {
    std::vector<AxisOp<scalar_t>> ops;
    for (int64_t k = 0; k < nd; ++k) ops.emplace_back(idx[k], wt[k]);
    if (nd == 3) blur_apply_impl<scalar_t, 3>(x, ops, out);
    else blur_apply_impl<scalar_t, 2>(x, ops, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(coopseg, CPU, m) { m.impl("blur_apply", &blur_apply); }

}  // namespace coopseg
