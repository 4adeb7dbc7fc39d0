// One step of the D_S optimizer on CPU: for blurred masks s1b, s2b and a
// coarse displacement grid tau, the loss mean((tau(s1b) - s2b)^2) per batch
// item and its gradient w.r.t. tau, in one pass over the voxels: each row's
// taps serve the sample, the residual and its position gradient, which is
// reduced per coarse cell (CellPartials, deterministic). Nothing
// full-resolution is stored and no autograd graph is built.
#include "checks.h"
#include "grid.h"

#include <torch/library.h>

namespace coopseg {
namespace {

struct StepFn {
  const at::Tensor &s1, &s2, &coarse;
  bool align_corners;
  template <typename T, typename I, int ND, bool BORDER>
  std::tuple<at::Tensor, at::Tensor> operator()() const {
    const int64_t C = s1.size(1);
    const Dims3 S = dims3(s1), s = dims3(coarse);
    const int64_t N = S.numel();
    const FieldInterp<T> I3(S, s, align_corners);
    const T scale = T(2.0 / double(N * C));
    const T* p1 = s1.data_ptr<T>();
    const T* p2 = s2.data_ptr<T>();
    std::vector<double> sums;
    at::Tensor grad = reduce_coarse_grad<T, ND>(
        coarse, I3, true,
        [&] {
          return [&, R = RowTaps<T, I>(S.w), gpos = std::vector<T>(3 * S.w), resid = std::vector<T>(S.w)](
                     int64_t b, int64_t d, int64_t h, const T* rowf, T* Alo, T* Ahi) mutable {
            row_taps<T, I, ND, false, true>(rowf, s, I3.w, S, d, h, R);
            const int64_t row = (d * S.h + h) * S.w;
            return row_similarity_sums<T, I, ND>(R, p1 + b * C * N, p2 + b * C * N + row, C, N, S, I3.w, scale,
                                                 gpos, resid, Alo, Ahi);
          };
        },
        &sums);
    at::Tensor loss = at::empty({s1.size(0)}, s1.options());
    for (int64_t b = 0; b < s1.size(0); ++b) loss[b] = sums[b] / double(N * C);
    return {loss, grad};
  }
};

std::tuple<at::Tensor, at::Tensor> similarity_step_fwd(const at::Tensor& s1_, const at::Tensor& s2_,
                                                       const at::Tensor& coarse_, bool align_corners) {
  check_image(s1_, "similarity_step_fwd", "s1_blurred", 2);
  check_same(s2_, s1_, "similarity_step_fwd", "s2_blurred", "s1_blurred");
  check_coarse(coarse_, s1_, "similarity_step_fwd", "coarse", "s1_blurred");
  const at::Tensor s1 = s1_.contiguous(), s2 = s2_.contiguous(), coarse = coarse_.contiguous();
  return dispatch_warp(s1, false, StepFn{s1, s2, coarse, align_corners});
}

}  // namespace

TORCH_LIBRARY_IMPL(coopseg, CPU, m) { m.impl("similarity_step_fwd", &similarity_step_fwd); }

}  // namespace coopseg
