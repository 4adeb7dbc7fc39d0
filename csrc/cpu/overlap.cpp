// The direct counter of the exact translation search (coopseg_kernels/similarity/translation.py:
// translation_search): for every crop offset d of a box, the overlap
//   overlap(d) = sum_c sum_y a[c, y + d] b[c, y]
// and the size of s1 left inside the volume after the shift,
//   size1(d)   = sum_c #{x set in a[c] : box_lo_k + d_k <= x_k < box_lo_k + d_k + box_len_k}.
// The masks are bit-packed along the last axis (pack_bits: 64 voxels a word), so one
// shift of a row pair costs ~len/64 AND + popcount instructions and the scratch is
// 1/8 of a bool volume: the search never holds a float copy of the volume, whatever
// the bound. Every count is an exact integer.
#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace coopseg {
namespace {

inline uint64_t word_at(const uint64_t* row, int64_t nw, int64_t i) { return (i >= 0 && i < nw) ? row[i] : 0; }

// (C, D0, D1, D2) bool, any strides -> (C, D0, D1, ceil(D2 / 64)) int64, bit j of word w = voxel 64 w + j.
at::Tensor pack_bits(const at::Tensor& m) {
  TORCH_CHECK(m.defined() && m.device().is_cpu() && m.scalar_type() == at::kBool,
              "coopseg.pack_bits: mask must be a bool CPU tensor");
  TORCH_CHECK(m.dim() == 4, "coopseg.pack_bits: mask must be (C, D0, D1, D2), got shape ", shape_str(m));
  for (int64_t k = 0; k < 4; ++k)
    TORCH_CHECK(m.size(k) >= 1 && m.size(k) < (int64_t(1) << 31), "coopseg.pack_bits: sizes must be >= 1 and < 2^31, ",
                "got shape ", shape_str(m));
  const int64_t C = m.size(0), D0 = m.size(1), D1 = m.size(2), D2 = m.size(3), W = (D2 + 63) / 64;
  at::Tensor out = at::empty({C, D0, D1, W}, m.options().dtype(at::kLong));
  const bool* p = m.data_ptr<bool>();
  const int64_t s0 = m.stride(0), s1 = m.stride(1), s2 = m.stride(2), s3 = m.stride(3);
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  // grains of ~64K voxels or word operations a task: small searches run on the calling
  // thread (on a busy machine every parallel region can wait for a descheduled thread)
  at::parallel_for(0, C * D0 * D1, std::max<int64_t>(1, (int64_t(1) << 16) / D2), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / (D0 * D1), i = (r / D1) % D0, j = r % D1;
      const bool* row = p + c * s0 + i * s1 + j * s2;
      uint64_t* dst = o + r * W;
      for (int64_t w = 0; w < W; ++w) {
        uint64_t v = 0;
        const int64_t n = std::min<int64_t>(64, D2 - 64 * w);
        if (s3 == 1)  // contiguous rows (the usual case): a loop the compiler vectorizes
          for (int64_t t = 0; t < n; ++t) v |= uint64_t(row[64 * w + t] ? 1 : 0) << t;
        else
          for (int64_t t = 0; t < n; ++t) v |= uint64_t(row[(64 * w + t) * s3] ? 1 : 0) << t;
        dst[w] = v;
      }
    }
  });
  return out;
}

void check_packed(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 4 && t.is_contiguous(),
              "coopseg.overlap_counts: ", name, " must be a contiguous (C, D0, D1, words) int64 CPU tensor from ",
              "pack_bits");
}

void check_triple(at::IntArrayRef v, const char* name, int64_t min, int64_t max) {
  TORCH_CHECK(v.size() == 3, "coopseg.overlap_counts: ", name, " must have 3 entries, got ", v);
  for (int64_t x : v)
    TORCH_CHECK(x >= min && x <= max, "coopseg.overlap_counts: ", name, " entries must be in [", min, ", ", max,
                "], got ", v);
}

std::tuple<at::Tensor, at::Tensor> overlap_counts(const at::Tensor& pa, const at::Tensor& pb, int64_t a_bits,
                                                  int64_t b_bits, at::IntArrayRef d_lo, at::IntArrayRef d_n,
                                                  at::IntArrayRef box_lo, at::IntArrayRef box_len) {
  check_packed(pa, "packed_a");
  check_packed(pb, "packed_b");
  TORCH_CHECK(pa.size(0) == pb.size(0), "coopseg.overlap_counts: packed_a and packed_b must have the same channels, ",
              "got ", shape_str(pa), " and ", shape_str(pb));
  TORCH_CHECK(a_bits >= 1 && (a_bits + 63) / 64 == pa.size(3), "coopseg.overlap_counts: a_bits must be in [",
              64 * pa.size(3) - 63, ", ", 64 * pa.size(3), "] for packed_a ", shape_str(pa), ", got ", a_bits);
  TORCH_CHECK(b_bits >= 1 && (b_bits + 63) / 64 == pb.size(3), "coopseg.overlap_counts: b_bits must be in [",
              64 * pb.size(3) - 63, ", ", 64 * pb.size(3), "] for packed_b ", shape_str(pb), ", got ", b_bits);
  const int64_t big = int64_t(1) << 31;
  check_triple(d_lo, "d_lo", -big, big);
  check_triple(d_n, "d_n", 1, big);
  check_triple(box_lo, "box_lo", -big, big);
  check_triple(box_len, "box_len", 0, big);
  const int64_t C = pa.size(0);
  const int64_t A[3] = {pa.size(1), pa.size(2), a_bits}, B[3] = {pb.size(1), pb.size(2), b_bits};
  const int64_t Wa = pa.size(3), Wb = pb.size(3);
  const int64_t n0 = d_n[0], n1 = d_n[1], n2 = d_n[2];
  TORCH_CHECK(double(n0) * double(n1) * double(n2) <= double(int64_t(1) << 32),
              "coopseg.overlap_counts: d_n asks for ", d_n, " offsets: at most 2^32 in all (chunk the box)");
  // bits past a_bits / b_bits in a row's last word must be clear (pack_bits leaves them so):
  // the AND + popcount would count them in overlap while size1 ignores them
  auto check_padding = [](const at::Tensor& t, int64_t bits, const char* name, const char* bits_name) {
    if (bits % 64 == 0) return;
    const auto* w = reinterpret_cast<const uint64_t*>(t.data_ptr<int64_t>());
    const int64_t W = t.size(3), rows = t.numel() / W;
    const uint64_t pad = ~((uint64_t(1) << (bits % 64)) - 1);
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK((w[r * W + W - 1] & pad) == 0, "coopseg.overlap_counts: ", name, " has bits set past ", bits_name,
                  " = ", bits, " (pack it with pack_bits from a mask of ", bits_name, " voxels a row)");
  };
  check_padding(pa, a_bits, "packed_a", "a_bits");
  check_padding(pb, b_bits, "packed_b", "b_bits");
  at::Tensor overlap = at::empty({n0, n1, n2}, pa.options());
  at::Tensor size1 = at::empty({n0, n1, n2}, pa.options());
  const auto* wa = reinterpret_cast<const uint64_t*>(pa.data_ptr<int64_t>());
  const auto* wb = reinterpret_cast<const uint64_t*>(pb.data_ptr<int64_t>());
  int64_t* po = overlap.data_ptr<int64_t>();
  int64_t* ps = size1.data_ptr<int64_t>();
  const int64_t planeA = A[0] * A[1] * Wa, planeB = B[0] * B[1] * Wb;

  // overlap: one task per d2. The task first shifts a's packed rows by d2 onto b's word
  // grid (bit y of row r = a[r, y + d2], zero outside a; one copy of the crop's rows, 1/8
  // of a crop), then for every (d0, d1) the overlapping rows of a run of y1 are contiguous
  // in both arrays: one AND + popcount loop over whole rows, which the compiler vectorizes
  // (bits outside either crop are zero in one of the two words)
  const int64_t rowsA = A[0] * A[1];
  const int64_t d2_work = C * rowsA * Wb + n0 * n1 * C * std::min(A[0], B[0]) * std::min(A[1], B[1]) * Wb;
  // each task holds its own shifted copy (8 C rowsA Wb bytes): at most as many tasks at once as
  // keep these copies within one bool crop of a (C rowsA a_bits bytes), so the scratch stays
  // inside the caller's memory budget whatever the thread count
  const int64_t max_tasks = std::max<int64_t>(1, a_bits / (8 * Wb));
  const int64_t grain = std::max({int64_t(1), (int64_t(1) << 16) / std::max<int64_t>(1, d2_work),
                                  (n2 + max_tasks - 1) / max_tasks});
  at::parallel_for(0, n2, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> sh(C * rowsA * Wb);
    for (int64_t i2 = begin; i2 < end; ++i2) {
      const int64_t d2 = d_lo[2] + i2;
      const int64_t q = d2 >> 6;  // floor(d2 / 64)
      const int r = int(d2 & 63);
      for (int64_t row = 0; row < C * rowsA; ++row) {
        const uint64_t* ra = wa + row * Wa;
        uint64_t* dst = sh.data() + row * Wb;
        for (int64_t w = 0; w < Wb; ++w)
          dst[w] = r == 0 ? word_at(ra, Wa, w + q)
                          : (word_at(ra, Wa, w + q) >> r) | (word_at(ra, Wa, w + q + 1) << (64 - r));
      }
      const bool none = std::max<int64_t>(0, -d2) >= std::min(B[2], A[2] - d2);  // no overlap along axis 2
      for (int64_t p = 0; p < n0 * n1; ++p) {
        const int64_t d0 = d_lo[0] + p / n1, d1 = d_lo[1] + p % n1;
        const int64_t y0lo = std::max<int64_t>(0, -d0), y0hi = std::min(B[0], A[0] - d0);
        const int64_t y1lo = std::max<int64_t>(0, -d1), y1hi = std::min(B[1], A[1] - d1);
        int64_t sum = 0;
        if (!none && y0lo < y0hi && y1lo < y1hi) {
          const int64_t n = (y1hi - y1lo) * Wb;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t y0 = y0lo; y0 < y0hi; ++y0) {
              const uint64_t* xa = sh.data() + (c * rowsA + (y0 + d0) * A[1] + y1lo + d1) * Wb;
              const uint64_t* xb = wb + c * planeB + (y0 * B[1] + y1lo) * Wb;
              for (int64_t i = 0; i < n; ++i) sum += __builtin_popcountll(xa[i] & xb[i]);
            }
        }
        po[p * n2 + i2] = sum;
      }
    }
  });

  // size1: one task per d0; the column histogram of the box's rows (x0, x1) slides with d1
  // (its x1 range only moves forward), so each row enters and leaves it once per d0
  const uint64_t last = (a_bits & 63) ? (uint64_t(1) << (a_bits & 63)) - 1 : ~uint64_t(0);  // bits past a_bits
  auto lo_of = [&](int k, int64_t d) { return std::clamp<int64_t>(d + box_lo[k], 0, A[k]); };
  auto hi_of = [&](int k, int64_t d) { return std::clamp<int64_t>(d + box_lo[k] + box_len[k], 0, A[k]); };
  const int64_t d0_work = C * A[0] * A[1] * Wa + n1 * (A[2] + n2);
  at::parallel_for(0, n0, std::max<int64_t>(1, (int64_t(1) << 16) / d0_work), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hist(A[2]), pref(A[2] + 1);
    for (int64_t i0 = begin; i0 < end; ++i0) {
      const int64_t d0 = d_lo[0] + i0;
      const int64_t x0lo = lo_of(0, d0), x0hi = std::max(x0lo, hi_of(0, d0));
      std::fill(hist.begin(), hist.end(), 0);
      auto add_row = [&](int64_t x1, int64_t sign) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t x0 = x0lo; x0 < x0hi; ++x0) {
            const uint64_t* ra = wa + c * planeA + (x0 * A[1] + x1) * Wa;
            for (int64_t w = 0; w < Wa; ++w)
              for (uint64_t v = w == Wa - 1 ? ra[w] & last : ra[w]; v; v &= v - 1)
                hist[64 * w + __builtin_ctzll(v)] += sign;
          }
      };
      int64_t cur_lo = 0, cur_hi = 0;  // rows [cur_lo, cur_hi) are in hist
      for (int64_t i1 = 0; i1 < n1; ++i1) {
        const int64_t d1 = d_lo[1] + i1;
        const int64_t l = lo_of(1, d1), h = std::max(l, hi_of(1, d1));
        // the window only moves forward: drop rows below l, add rows up to h
        if (l >= cur_hi) {
          for (int64_t x1 = cur_lo; x1 < cur_hi; ++x1) add_row(x1, -1);
          cur_lo = cur_hi = l;
        }
        for (int64_t x1 = cur_lo; x1 < l; ++x1) add_row(x1, -1);
        cur_lo = l;
        for (int64_t x1 = cur_hi; x1 < h; ++x1) add_row(x1, +1);
        cur_hi = std::max(cur_hi, h);
        pref[0] = 0;
        for (int64_t x2 = 0; x2 < A[2]; ++x2) pref[x2 + 1] = pref[x2] + hist[x2];
        int64_t* out = ps + (i0 * n1 + i1) * n2;
        for (int64_t i2 = 0; i2 < n2; ++i2) {
          const int64_t d2 = d_lo[2] + i2;
          const int64_t l2 = lo_of(2, d2), h2 = std::max(l2, hi_of(2, d2));
          out[i2] = pref[h2] - pref[l2];
        }
      }
    }
  });
  return {overlap, size1};
}

}  // namespace

TORCH_LIBRARY_IMPL(coopseg, CPU, m) {
  m.impl("pack_bits", &pack_bits);
  m.impl("overlap_counts", &overlap_counts);
}

}  // namespace coopseg
