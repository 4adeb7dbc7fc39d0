// Fused coarse-field upsampling + multilinear warping on CPU.
//
// warp_fwd: one pass over the output rows; each row interpolates the coarse
//   field along d and h once, then every voxel needs two taps along w.
// warp_bwd: the coarse-grid gradient is reduced per coarse cell
//   (reduce_coarse_grad, deterministic); the image gradient is a scatter in which
//   each task owns a slab of the gradient along the outermost axis and visits only
//   the output planes whose displacement can reach it, so no thread writes
//   another's voxels and no per-thread copy of the image exists.
// upsample_field_fwd / _bwd: the materialised field and its adjoint, on the
//   same interpolation tables and reduction.
#include "checks.h"
#include "grid.h"
#include "warp_avx512.h"
#include "warp_modes.h"

#include <torch/library.h>

namespace coopseg {
namespace {

template <typename T, typename I, int ND, bool BORDER>
void warp_forward_impl(const at::Tensor& moving, const at::Tensor& coarse, bool align_corners,
                       at::Tensor& out) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = dims3(moving), s = dims3(coarse);
  const int64_t N = S.numel();
  const FieldInterp<T> I3(S, s, align_corners);
  const T* mp = moving.data_ptr<T>();
  const T* cp = coarse.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    std::vector<T> rowf(ND * s.w);
    RowTaps<T, I> R(S.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
      coarse_row<T, ND>(cp + b * ND * s.numel(), s, I3, d, h, rowf.data());
      const int64_t row = (d * S.h + h) * S.w;
#if defined(__AVX512F__)
      // the hot instantiation in registers (warp_avx512.h); a row whose output
      // is not finite is recomputed below on the generic path
      if constexpr (avx512::kRows<T, I, ND>) {
        if (S.w >= 2 && avx512::row_forward<BORDER>(mp + b * C * N, rowf.data(), I3.w, S, C, N, d, h,
                                                    op + b * C * N + row))
          continue;
      }
#endif
      row_taps<T, I, ND, BORDER, false>(rowf.data(), s, I3.w, S, d, h, R);
      for (int64_t c = 0; c < C; ++c)
        row_sample<T, I, ND>(mp + (b * C + c) * N, R, S, op + (b * C + c) * N + row);
    }
  });
}

// Coarse gradient alone: tasks by cells (reduce_coarse_grad).
template <typename T, typename I, int ND, bool BORDER>
at::Tensor warp_coarse_grad_impl(const at::Tensor& grad_out, const at::Tensor& moving,
                                 const at::Tensor& coarse, const FieldInterp<T>& I3) {
  const int64_t C = moving.size(1);
  const Dims3 S = dims3(moving), s = dims3(coarse);
  const int64_t N = S.numel();
  const T* mp = moving.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  return reduce_coarse_grad<T, ND>(coarse, I3, true, [&] {
    return [&, R = RowTaps<T, I>(S.w), gpos = std::vector<T>(3 * S.w)](
               int64_t b, int64_t d, int64_t h, const T* rowf, T* Alo, T* Ahi) mutable {
      row_taps<T, I, ND, BORDER, true>(rowf, s, I3.w, S, d, h, R);
      row_coarse_sums<T, I, ND>(R, mp + b * C * N, gp + b * C * N + (d * S.h + h) * S.w, C, N, S, I3.w, gpos,
                                Alo, Ahi);
      return 0.0;
    };
  });
}

// The image gradient by slabs (see row_scatter): each task zeroes and owns a
// slab along the slab axis (d in 3-D, h in 2-D) and visits the output planes
// that can reach it. With `P`, the same pass also gives the coarse gradient:
// slabs are then unions of coarse cells along the slab axis and each task
// also adds its own planes' rows to their cells' partial sums -- one set per
// cell row, filled by one task in row order, so the result does not depend on
// the partition. The taps of a row are then computed once for both gradients.
template <typename T, typename I, int ND, bool BORDER>
void warp_slab_pass(const at::Tensor& grad_out, const at::Tensor& moving, const at::Tensor& coarse,
                    const FieldInterp<T>& I3, at::Tensor& grad_moving, CellPartials<T, ND>* P) {
  const int64_t B = moving.size(0), C = moving.size(1);
  const Dims3 S = dims3(moving), s = dims3(coarse);
  const int64_t N = S.numel();
  const AxisInterp<T>& Isa = (ND == 3 ? I3.d : I3.h);
  const int64_t n_sa = Isa.S, s_sa = Isa.s;
  const int64_t plane_stride = (ND == 3 ? S.h * S.w : S.w);
  const T* mp = moving.data_ptr<T>();
  const T* cp = coarse.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  T* gm = grad_moving.data_ptr<T>();
  const SlabReach<T, ND, BORDER> reach(cp, B, s, I3);
  const int64_t units = P ? s_sa : n_sa;  // slabs are made of cells (fused) or of planes
  const int64_t nslab = slab_tasks(units, B);

  at::parallel_for(0, B * nslab, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> rowf(ND * s.w), gpos(3 * S.w), Alo(s.w * ND), Ahi(s.w * ND);
    RowTaps<T, I> R(S.w);
    ScatterScratch<T, I> X(S.w);
#if defined(__AVX512F__)
    // the hot instantiation in registers (warp_avx512.h); rows whose data is
    // not finite fall back to the generic exact paths
    avx512::BackwardScratch Y(avx512::kRows<T, I, ND> ? S.w : 0);
    auto fused_row = [&](int64_t b, int64_t d, int64_t h, bool own, bool scatter, int64_t lo, int64_t hi) {
      if constexpr (avx512::kRows<T, I, ND>) {
        const int64_t row = (d * S.h + h) * S.w;
        const T* img = mp + b * C * N;
        const T* g = gp + b * C * N + row;
        int flags = 0;
        if (own && scatter)
          flags = avx512::row_backward<BORDER, true, true>(img, g, rowf.data(), I3.w, S, C, N, d, h, lo, hi,
                                                                   gm + b * C * N, Y);
        else if (own)
          flags = avx512::row_backward<BORDER, true, false>(img, g, rowf.data(), I3.w, S, C, N, d, h, lo, hi,
                                                                   gm + b * C * N, Y);
        else
          flags = avx512::row_backward<BORDER, false, true>(img, g, rowf.data(), I3.w, S, C, N, d, h, lo, hi,
                                                                   gm + b * C * N, Y);
        if (flags) row_taps<T, I, ND, BORDER, true>(rowf.data(), s, I3.w, S, d, h, R);
        if (own) {
          if (flags & avx512::kGposNotFinite) {
            row_coarse_sums<T, I, ND>(R, img, g, C, N, S, I3.w, gpos, Alo.data(), Ahi.data());
          } else {
            avx512::cell_sums(Y.gpos.data(), I3.w, Alo.data(), Ahi.data());
          }
          CellPartials<T, ND>::add_row(P->set(b, I3.d.i0[d], I3.h.i0[h], 0), I3, d, h, Alo.data(), Ahi.data(), s.w);
        }
        if (scatter) {
          if (flags & avx512::kGradNotFinite)
            row_scatter_exact<T, I, ND>(g, R, S, C, N, lo, hi, gm + b * C * N);
          else
            avx512::scatter_row(g, Y, S.w, C, N, gm + b * C * N);
        }
      }
    };
#endif
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nslab, k = t % nslab;
      const int64_t u0 = units * k / nslab, u1 = units * (k + 1) / nslab;
      const int64_t lo = P ? Isa.cell_begin[u0] : u0, hi = P ? Isa.cell_begin[u1] : u1;
      // A slab may own no planes (more slabs than planes, or only empty cells:
      // a coarse axis longer than the image). It has nothing to zero, scatter or
      // reduce; row_scatter must not run for it, as its scratch address
      // lo * plane_stride would lie in another slab or past the channel.
      if (lo >= hi) continue;
      zero_slab(gm, b, C, N, lo, hi, plane_stride);
      for (int64_t q = 0; q < n_sa; ++q) {
        const bool own = P && q >= lo && q < hi;
        const bool scatter = reach.reaches(b, q, lo, hi);
        if (!own && !scatter) continue;
        const int64_t h_begin = (ND == 3 ? 0 : q), h_end = (ND == 3 ? S.h : q + 1);
        const int64_t d = (ND == 3 ? q : 0);
        for (int64_t h = h_begin; h < h_end; ++h) {
          coarse_row<T, ND>(cp + b * ND * s.numel(), s, I3, d, h, rowf.data());
#if defined(__AVX512F__)
          if constexpr (avx512::kRows<T, I, ND>) {
            if (S.w >= 2) {
              fused_row(b, d, h, own, scatter, lo, hi);
              continue;
            }
          }
#endif
          if (own)
            row_taps<T, I, ND, BORDER, true>(rowf.data(), s, I3.w, S, d, h, R);
          else
            row_taps<T, I, ND, BORDER, false>(rowf.data(), s, I3.w, S, d, h, R);
          const int64_t row = (d * S.h + h) * S.w;
          if (own) {
            row_coarse_sums<T, I, ND>(R, mp + b * C * N, gp + b * C * N + row, C, N, S, I3.w, gpos, Alo.data(),
                                      Ahi.data());
            CellPartials<T, ND>::add_row(P->set(b, I3.d.i0[d], I3.h.i0[h], 0), I3, d, h, Alo.data(), Ahi.data(),
                                         s.w);
          }
          if (scatter) row_scatter<T, I, ND>(gp + b * C * N + row, R, S, C, N, lo, hi, gm + b * C * N, X);
        }
      }
    }
  });
}

template <typename T, typename I, int ND, bool BORDER>
std::tuple<at::Tensor, at::Tensor> warp_backward_typed(const at::Tensor& grad_out, const at::Tensor& moving,
                                                       const at::Tensor& coarse, bool align_corners,
                                                       bool need_moving, bool need_coarse) {
  at::Tensor gm = need_moving ? new_output(moving.sizes(), moving.options()) : at::empty({0}, moving.options());
  at::Tensor gc = at::empty({0}, coarse.options());
  const FieldInterp<T> I3(dims3(moving), dims3(coarse), align_corners);
  const int64_t cells_sa = ND == 3 ? I3.d.s : I3.h.s;
  if (need_moving && need_coarse && cells_sa >= 2) {
    // one pass for both; chosen from shapes only, so results never depend on the thread count
    CellPartials<T, ND> P(moving.size(0), dims3(coarse), 1);
    warp_slab_pass<T, I, ND, BORDER>(grad_out, moving, coarse, I3, gm, &P);
    return {gm, P.fold(I3, coarse.options())};
  }
  if (need_coarse) gc = warp_coarse_grad_impl<T, I, ND, BORDER>(grad_out, moving, coarse, I3);
  if (need_moving) warp_slab_pass<T, I, ND, BORDER>(grad_out, moving, coarse, I3, gm, nullptr);
  return {gm, gc};
}

struct ForwardFn {
  const at::Tensor &moving, &coarse;
  bool align_corners;
  at::Tensor& out;
  template <typename T, typename I, int ND, bool BORDER>
  void operator()() const {
    warp_forward_impl<T, I, ND, BORDER>(moving, coarse, align_corners, out);
  }
};

struct BackwardFn {
  const at::Tensor &grad_out, &moving, &coarse;
  bool align_corners, need_moving, need_coarse;
  template <typename T, typename I, int ND, bool BORDER>
  std::tuple<at::Tensor, at::Tensor> operator()() const {
    return warp_backward_typed<T, I, ND, BORDER>(grad_out, moving, coarse, align_corners, need_moving,
                                                 need_coarse);
  }
};

bool is_border(c10::string_view padding_mode) {
  TORCH_CHECK(padding_mode == "zeros" || padding_mode == "border",
              "coopseg: padding_mode must be 'zeros' or 'border', got '", padding_mode, "'");
  return padding_mode == "border";
}

bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong || t == at::kBool;
}

// A float32 stand-in with the shape of a label map (no data: zero strides), for the shape checks.
at::Tensor float_stand_in(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "coopseg.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "coopseg.", op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  return at::empty_strided(t.sizes(), std::vector<int64_t>(t.dim(), 0), t.options().dtype(at::kFloat));
}

// The other modes (warp_modes.h): nearest (floating images and label maps) and bilinear reflection.
at::Tensor warp_fwd_modes(const at::Tensor& moving_, const at::Tensor& coarse_, bool align_corners, modes::Pad pad,
                          bool nearest) {
  const bool labels = is_label_dtype(moving_.scalar_type());
  if (labels) {
    TORCH_CHECK(nearest, "coopseg.warp_fwd: moving of dtype ", moving_.scalar_type(),
                " (a label map) needs mode='nearest'");
    const at::Tensor like = float_stand_in(moving_, "warp_fwd", "moving");
    check_image(like, "warp_fwd", "moving", 2);
    check_coarse(coarse_, like, "warp_fwd", "coarse", "moving (float32 for a label map)");
  } else {
    check_image(moving_, "warp_fwd", "moving", 2);
    check_coarse(coarse_, moving_, "warp_fwd", "coarse", "moving");
  }
  const at::Tensor moving = moving_.contiguous(), coarse = coarse_.contiguous();
  at::Tensor out = labels ? at::empty(moving.sizes(), moving.options()) : new_output(moving.sizes(), moving.options());
  modes::dispatch_nd_pad(moving, pad, [&]<int ND, modes::Pad P>() {
    if (!nearest) {
      AT_DISPATCH_FLOATING_TYPES(moving.scalar_type(), "coopseg_warp_modes", [&] {
        modes::forward<scalar_t, scalar_t, ND, P, false>(moving, coarse, align_corners, out);
      });
      return;
    }
    switch (moving.scalar_type()) {
      case at::kFloat: return modes::forward<float, float, ND, P, true>(moving, coarse, align_corners, out);
      case at::kDouble: return modes::forward<double, double, ND, P, true>(moving, coarse, align_corners, out);
      case at::kByte: return modes::forward<float, uint8_t, ND, P, true>(moving, coarse, align_corners, out);
      case at::kShort: return modes::forward<float, int16_t, ND, P, true>(moving, coarse, align_corners, out);
      case at::kInt: return modes::forward<float, int32_t, ND, P, true>(moving, coarse, align_corners, out);
      case at::kLong: return modes::forward<float, int64_t, ND, P, true>(moving, coarse, align_corners, out);
      case at::kBool: return modes::forward<float, bool, ND, P, true>(moving, coarse, align_corners, out);
      default: TORCH_CHECK(false, "coopseg.warp_fwd: unsupported moving dtype ", moving.scalar_type());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_bwd_modes(const at::Tensor& grad_out, const at::Tensor& moving,
                                                  const at::Tensor& coarse, bool align_corners, modes::Pad pad,
                                                  bool nearest, bool need_moving, bool need_coarse) {
  at::Tensor gm = need_moving ? new_output(moving.sizes(), moving.options()) : at::empty({0}, moving.options());
  at::Tensor gc = at::empty({0}, coarse.options());
  AT_DISPATCH_FLOATING_TYPES(moving.scalar_type(), "coopseg_warp_modes_bwd", [&] {
    using T = scalar_t;
    modes::dispatch_nd_pad(moving, pad, [&]<int ND, modes::Pad P>() {
      if (need_moving) {
        if (nearest) modes::image_grad<T, ND, P, true>(grad_out, coarse, align_corners, gm);
        else modes::image_grad<T, ND, P, false>(grad_out, coarse, align_corners, gm);
      }
      if (need_coarse)  // nearest sampling is piecewise constant in the position: no field gradient
        gc = nearest ? at::zeros_like(coarse) : modes::coarse_grad<T, ND, P>(grad_out, moving, coarse, align_corners);
    });
  });
  return {gm, gc};
}

at::Tensor warp_fwd(const at::Tensor& moving_, const at::Tensor& coarse_, bool align_corners,
                    c10::string_view padding_mode, c10::string_view mode) {
  const bool nearest = modes::parse_nearest(mode, "warp_fwd");
  const modes::Pad pad = modes::parse_pad(padding_mode, "warp_fwd");
  if (nearest || pad == modes::Pad::kReflection || (moving_.defined() && is_label_dtype(moving_.scalar_type())))
    return warp_fwd_modes(moving_, coarse_, align_corners, pad, nearest);
  check_image(moving_, "warp_fwd", "moving", 2);
  check_coarse(coarse_, moving_, "warp_fwd", "coarse", "moving");
  const at::Tensor moving = moving_.contiguous(), coarse = coarse_.contiguous();
  at::Tensor out = new_output(moving.sizes(), moving.options());
  dispatch_warp(moving, is_border(padding_mode), ForwardFn{moving, coarse, align_corners, out});
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_bwd(const at::Tensor& grad_out_, const at::Tensor& moving_,
                                            const at::Tensor& coarse_, bool align_corners,
                                            c10::string_view padding_mode, c10::string_view mode,
                                            bool need_moving, bool need_coarse) {
  const bool nearest = modes::parse_nearest(mode, "warp_bwd");
  const modes::Pad pad = modes::parse_pad(padding_mode, "warp_bwd");
  check_image(moving_, "warp_bwd", "moving", 2);  // label maps have no gradient
  check_coarse(coarse_, moving_, "warp_bwd", "coarse", "moving");
  check_same(grad_out_, moving_, "warp_bwd", "grad_out", "moving");
  const at::Tensor grad_out = grad_out_.contiguous(), moving = moving_.contiguous(),
                   coarse = coarse_.contiguous();
  if (nearest || pad == modes::Pad::kReflection)
    return warp_bwd_modes(grad_out, moving, coarse, align_corners, pad, nearest, need_moving, need_coarse);
  return dispatch_warp(moving, is_border(padding_mode),
                       BackwardFn{grad_out, moving, coarse, align_corners, need_moving, need_coarse});
}

template <typename T, int ND>
void upsample_forward_impl(const at::Tensor& coarse, at::Tensor& field, bool align_corners) {
  const int64_t B = coarse.size(0);
  const Dims3 S = dims3(field), s = dims3(coarse);
  const int64_t N = S.numel();
  const FieldInterp<T> I(S, s, align_corners);
  const T* cp = coarse.data_ptr<T>();
  T* fp = field.data_ptr<T>();
  at::parallel_for(0, B * S.d * S.h, std::max<int64_t>(1, 2048 / S.w), [&](int64_t r0, int64_t r1) {
    std::vector<T> rowf(ND * s.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % S.h, d = (r / S.h) % S.d, b = r / (S.h * S.d);
      coarse_row<T, ND>(cp + b * ND * s.numel(), s, I, d, h, rowf.data());
      T* f = fp + b * ND * N + (d * S.h + h) * S.w;
      const int32_t* i0 = I.w.i0.data();
      const int32_t* i1 = I.w.i1.data();
      const T* l0 = I.w.l0.data();
      const T* l1 = I.w.l1.data();
      for (int j = 0; j < ND; ++j) {
        const T* fj = rowf.data() + j * s.w;
#pragma omp simd
        for (int64_t w = 0; w < S.w; ++w) f[j * N + w] = l0[w] * fj[i0[w]] + l1[w] * fj[i1[w]];
      }
    }
  });
}

at::Tensor upsample_field_fwd(const at::Tensor& coarse_, at::IntArrayRef size, bool align_corners) {
  check_image(coarse_, "upsample_field_fwd", "coarse", 1);
  const int64_t nd = coarse_.dim() - 2;
  TORCH_CHECK(coarse_.size(1) == nd, "coopseg.upsample_field_fwd: coarse must have ", nd, " channels, got shape ",
              shape_str(coarse_));
  check_sizes(size, nd, "upsample_field_fwd", "size");
  const at::Tensor coarse = coarse_.contiguous();
  std::vector<int64_t> shape = {coarse.size(0), nd};
  for (int64_t n : size) shape.push_back(n);
  at::Tensor field = new_output(shape, coarse.options());
  AT_DISPATCH_FLOATING_TYPES(coarse.scalar_type(), "coopseg_upsample_fwd", [&] {
    if (nd == 3) upsample_forward_impl<scalar_t, 3>(coarse, field, align_corners);
    else upsample_forward_impl<scalar_t, 2>(coarse, field, align_corners);
  });
  return field;
}

template <typename T, int ND>
at::Tensor upsample_backward_impl(const at::Tensor& grad_field, const at::Tensor& shape_of_coarse,
                                  bool align_corners) {
  const Dims3 S = dims3(grad_field), s = dims3(shape_of_coarse);
  const int64_t N = S.numel();
  const FieldInterp<T> I(S, s, align_corners);
  const T* gp = grad_field.data_ptr<T>();
  return reduce_coarse_grad<T, ND>(shape_of_coarse, I, false, [&] {
    return [&](int64_t b, int64_t d, int64_t h, const T*, T* Alo, T* Ahi) {
      const T* g = gp + b * ND * N + (d * S.h + h) * S.w;
      for (int j = 0; j < ND; ++j) cell_channel_sums<T, ND>(g + j * N, I.w, j, Alo, Ahi);
      return 0.0;
    };
  });
}

at::Tensor upsample_field_bwd(const at::Tensor& grad_field_, at::IntArrayRef coarse_size,
                              bool align_corners) {
  check_image(grad_field_, "upsample_field_bwd", "grad_field", 1);
  const int64_t nd = grad_field_.dim() - 2;
  TORCH_CHECK(grad_field_.size(1) == nd, "coopseg.upsample_field_bwd: grad_field must have ", nd,
              " channels, got shape ", shape_str(grad_field_));
  check_sizes(coarse_size, nd, "upsample_field_bwd", "coarse_size");
  const at::Tensor grad_field = grad_field_.contiguous();
  std::vector<int64_t> shape = {grad_field.size(0), nd};
  for (int64_t n : coarse_size) shape.push_back(n);
  // Only the shape of the coarse grid is needed: an uninitialised carrier.
  const at::Tensor shape_of_coarse = at::empty(shape, grad_field.options());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(grad_field.scalar_type(), "coopseg_upsample_bwd", [&] {
    out = nd == 3 ? upsample_backward_impl<scalar_t, 3>(grad_field, shape_of_coarse, align_corners)
                  : upsample_backward_impl<scalar_t, 2>(grad_field, shape_of_coarse, align_corners);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(coopseg, CPU, m) {
  m.impl("warp_fwd", &warp_fwd);
  m.impl("warp_bwd", &warp_bwd);
  m.impl("upsample_field_fwd", &upsample_field_fwd);
  m.impl("upsample_field_bwd", &upsample_field_bwd);
}

}  // namespace coopseg
