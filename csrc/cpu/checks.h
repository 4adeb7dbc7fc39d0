// Argument checks of the raw ops. torch.ops.coopseg.* are public: anyone can
// call them without the Python layer (coopseg_kernels/_checks.py), so every
// raw op validates what its kernel relies on (device, dtype, rank, sizes,
// minimum sizes, matching shapes) and fails with a RuntimeError that names the
// op and the argument, never reads or writes out of bounds. Non-contiguous
// tensors are accepted: the ops make them contiguous.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace coopseg {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// A float32/float64 CPU tensor.
inline void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "coopseg.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "coopseg.", op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "coopseg.", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// An image batch (B, C, H, W) or (B, C, D, H, W), B, C >= 1, every spatial
// size in [min_size, 2^31).
inline void check_image(const at::Tensor& t, const char* op, const char* name, int64_t min_size) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, "coopseg.", op, ": ", name,
              " must be (B, C, H, W) or (B, C, D, H, W), got shape ", shape_str(t));
  TORCH_CHECK(t.size(0) >= 1 && t.size(1) >= 1, "coopseg.", op, ": ", name, " needs B >= 1 and C >= 1, got shape ",
              shape_str(t));
  for (int64_t k = 2; k < t.dim(); ++k)
    TORCH_CHECK(t.size(k) >= min_size && t.size(k) < (int64_t(1) << 31), "coopseg.", op, ": ", name,
                " spatial sizes must be >= ", min_size, " and < 2^31, got shape ", shape_str(t));
}

// A coarse grid (B, nd, *s) for an image `like` (B, C, *S): nd = S's rank,
// every s_k in [1, 2^31), the dtype of `like`.
inline void check_coarse(const at::Tensor& coarse, const at::Tensor& like, const char* op, const char* name,
                         const char* like_name) {
  check_float_cpu(coarse, op, name);
  const int64_t nd = like.dim() - 2;
  TORCH_CHECK(coarse.dim() == like.dim() && coarse.size(0) == like.size(0) && coarse.size(1) == nd, "coopseg.",
              op, ": ", name, " must be (B, ", nd, ", *s) for ", like_name, " of shape ", shape_str(like),
              ", got shape ", shape_str(coarse));
  for (int64_t k = 2; k < coarse.dim(); ++k)
    TORCH_CHECK(coarse.size(k) >= 1 && coarse.size(k) < (int64_t(1) << 31), "coopseg.", op, ": ", name,
                " sizes must be >= 1 and < 2^31, got shape ", shape_str(coarse));
  TORCH_CHECK(coarse.scalar_type() == like.scalar_type(), "coopseg.", op, ": ", name, " must have the dtype of ",
              like_name, " (", like.scalar_type(), "), got ", coarse.scalar_type());
}

// `t` has the shape and dtype of `like`.
inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                       const char* like_name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.sizes() == like.sizes(), "coopseg.", op, ": ", name, " must have the shape of ", like_name, " ",
              shape_str(like), ", got ", shape_str(t));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "coopseg.", op, ": ", name, " must have the dtype of ",
              like_name, " (", like.scalar_type(), "), got ", t.scalar_type());
}

// The image of a forward warp: float32/float64, or (mode='nearest' only) a
// uint8/int16/int32/int64/bool label map; (B, C, *S) with spatial sizes in [2, 2^31).
inline void check_warp_moving(const at::Tensor& moving, bool nearest, const char* op) {
  TORCH_CHECK(moving.defined(), "coopseg.", op, ": moving is undefined");
  TORCH_CHECK(moving.device().is_cpu(), "coopseg.", op, ": moving must be a CPU tensor, got one on ", moving.device());
  const auto st = moving.scalar_type();
  const bool floating = st == at::kFloat || st == at::kDouble;
  const bool label = st == at::kByte || st == at::kShort || st == at::kInt || st == at::kLong || st == at::kBool;
  TORCH_CHECK(floating || (label && nearest), "coopseg.", op, ": moving must be float32 or float64",
              nearest ? " or a uint8/int16/int32/int64/bool label map" : " (label maps need mode='nearest')",
              ", got ", st);
  TORCH_CHECK(moving.dim() == 4 || moving.dim() == 5, "coopseg.", op,
              ": moving must be (B, C, H, W) or (B, C, D, H, W), got shape ", shape_str(moving));
  TORCH_CHECK(moving.size(0) >= 1 && moving.size(1) >= 1, "coopseg.", op, ": moving needs B >= 1 and C >= 1, got shape ",
              shape_str(moving));
  for (int64_t k = 2; k < moving.dim(); ++k)
    TORCH_CHECK(moving.size(k) >= 2 && moving.size(k) < (int64_t(1) << 31), "coopseg.", op,
                ": moving spatial sizes must be >= 2 and < 2^31, got shape ", shape_str(moving));
}

// The field of a forward warp (`name`: ddf or coarse): float64 for a float64
// image, float32 for every other (float32 images and label maps).
inline void check_field_dtype(const at::Tensor& field, const at::Tensor& moving, const char* op, const char* name) {
  const auto st = moving.scalar_type();
  const auto want = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(field.scalar_type() == want, "coopseg.", op, ": ", name, " must be ", want, " for moving of dtype ", st,
              ", got ", field.scalar_type());
}

// A list of nd sizes, each in [1, 2^31).
inline void check_sizes(at::IntArrayRef size, int64_t nd, const char* op, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(size.size()) == nd, "coopseg.", op, ": ", name, " must have ", nd,
              " entries, got ", size.size());
  for (int64_t n : size)
    TORCH_CHECK(n >= 1 && n < (int64_t(1) << 31), "coopseg.", op, ": ", name, " entries must be >= 1 and < 2^31, got ",
                size);
}

}  // namespace coopseg
