// Where the CPU warp's time goes: the per-row phases of the forward and of the
// one-pass backward (both gradients) at 256x256x128, coarse /16, fp32, C=1,
// on one thread, timed with the TSC around each phase of each output row.
// Each row keeps its minimum over the runs (a row takes a few microseconds, so
// the minimum drops the preemptions of a shared machine), and the table sums
// the minima. Built and run by tools/warp_phases.py (`make warp-phases`)
// with the extension's compiler flags, so it times the code of csrc/cpu/grid.h
// (the generic rows, every build) and, with AVX-512, of csrc/cpu/warp_avx512.h
// (the rows the extension runs for float / 32-bit offsets / 3-D). Each of the
// AVX-512 sweeps runs on its own, so that no other phase warms the cache for
// it, and its results are checked against the generic rows' at the end.
#include "grid.h"
#include "warp_avx512.h"

#include <x86intrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

using namespace coopseg;
using T = float;
using I = int32_t;
constexpr int ND = 3;
constexpr bool BORDER = false;
constexpr int kPhases = 11;

// TSC ticks per second, against the steady clock
static double tsc_hz() {
  const auto c0 = std::chrono::steady_clock::now();
  const uint64_t t0 = __rdtsc();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const uint64_t t1 = __rdtsc();
  const auto c1 = std::chrono::steady_clock::now();
  return double(t1 - t0) / std::chrono::duration<double>(c1 - c0).count();
}

int main(int argc, char** argv) {
  const int runs = argc > 1 ? std::atoi(argv[1]) : 10;
  at::set_num_threads(1);
  const Dims3 S{256, 256, 128}, s{16, 16, 8};  // as benchmarks/cases.py: (1, 1, 256, 256, 128), S // 16
  const int64_t C = 1, N = S.numel();
  at::manual_seed(1);
  at::Tensor moving = at::rand({1, C, S.d, S.h, S.w});
  at::Tensor coarse = at::randn({1, 3, s.d, s.h, s.w}) * 3.0;  // N(0, 3^2) voxels, as the benchmark
  at::Tensor grad_out = at::rand({1, C, S.d, S.h, S.w});
  at::Tensor out = at::empty_like(moving), grad_moving = at::zeros_like(moving);
  const FieldInterp<T> I3(S, s, true);
  const T *mp = moving.data_ptr<T>(), *cp = coarse.data_ptr<T>(), *gp = grad_out.data_ptr<T>();
  T *op = out.data_ptr<T>(), *gm = grad_moving.data_ptr<T>();
  at::Tensor out2 = at::empty_like(moving);
  T* out2p = out2.data_ptr<T>();
  int64_t ok_rows = 0;
  at::Tensor grad_moving2 = at::zeros_like(moving);
  T* gm2 = grad_moving2.data_ptr<T>();
  CellPartials<T, ND> P2(1, s, 1);
  int flags = 0;
#if defined(__AVX512F__)
  avx512::BackwardScratch Y(S.w);
#endif
  std::vector<T> rowf(ND * s.w), gpos(3 * S.w), Alo(s.w * ND), Ahi(s.w * ND);
  RowTaps<T, I> R(S.w);
  ScatterScratch<T, I> X(S.w);
  CellPartials<T, ND> P(1, s, 1);
  const char* names[kPhases] = {"forward: coarse_row + row_taps", "forward: row_sample",
                                "backward: coarse_row + row_taps<GRAD>", "backward: row_position_grad",
                                "backward: cell_sums", "backward: CellPartials::add_row",
                                "backward: row_scatter (image gradient)",
                                "forward, AVX-512 rows: coarse_row + avx512::row_forward",
                                "backward, AVX-512 rows: coarse_row + avx512::row_backward",
                                "backward, AVX-512 rows: avx512::cell_sums + add_row",
                                "backward, AVX-512 rows: avx512::scatter_row"};
  const int64_t nrows = S.d * S.h;
  std::vector<uint64_t> best(kPhases * nrows, ~uint64_t(0));
  auto keep = [&](int64_t r, int k, uint64_t t) { best[r * kPhases + k] = std::min(best[r * kPhases + k], t); };
  for (int run = 0; run < runs; ++run) {
    for (int64_t d = 0; d < S.d; ++d)
      for (int64_t h = 0; h < S.h; ++h) {
        const int64_t r = d * S.h + h;
        const uint64_t t0 = __rdtsc();
        coarse_row<T, ND>(cp, s, I3, d, h, rowf.data());
        row_taps<T, I, ND, BORDER, false>(rowf.data(), s, I3.w, S, d, h, R);
        const uint64_t t1 = __rdtsc();
        row_sample<T, I, ND>(mp, R, S, op + r * S.w);
        const uint64_t t2 = __rdtsc();
        keep(r, 0, t1 - t0);
        keep(r, 1, t2 - t1);
      }
#if defined(__AVX512F__)
    // a sweep of its own, so that no other phase warms the cache for it
    for (int64_t d = 0; d < S.d; ++d)
      for (int64_t h = 0; h < S.h; ++h) {
        const int64_t r = d * S.h + h;
        const uint64_t t0 = __rdtsc();
        coarse_row<T, ND>(cp, s, I3, d, h, rowf.data());
        ok_rows += avx512::row_forward<BORDER>(mp, rowf.data(), I3.w, S, C, N, d, h, out2p + r * S.w);
        keep(r, 7, __rdtsc() - t0);
      }
#endif
    for (int64_t d = 0; d < S.d; ++d)
      for (int64_t h = 0; h < S.h; ++h) {
        const int64_t r = d * S.h + h;
        const uint64_t t0 = __rdtsc();
        coarse_row<T, ND>(cp, s, I3, d, h, rowf.data());
        row_taps<T, I, ND, BORDER, true>(rowf.data(), s, I3.w, S, d, h, R);
        const uint64_t t1 = __rdtsc();
        std::fill(gpos.begin(), gpos.end(), T(0));
        row_position_grad<T, I, ND>(mp, gp + r * S.w, R, S, gpos.data(), gpos.data() + S.w, gpos.data() + 2 * S.w);
        const uint64_t t2 = __rdtsc();
        cell_sums<T, I, ND>(R, gpos, S, I3.w, Alo.data(), Ahi.data());
        const uint64_t t3 = __rdtsc();
        CellPartials<T, ND>::add_row(P.set(0, I3.d.i0[d], I3.h.i0[h], 0), I3, d, h, Alo.data(), Ahi.data(), s.w);
        const uint64_t t4 = __rdtsc();
        row_scatter<T, I, ND>(gp + r * S.w, R, S, C, N, 0, S.d, gm, X);
        const uint64_t t5 = __rdtsc();
        keep(r, 2, t1 - t0);
        keep(r, 3, t2 - t1);
        keep(r, 4, t3 - t2);
        keep(r, 5, t4 - t3);
        keep(r, 6, t5 - t4);
      }
#if defined(__AVX512F__)
    for (int64_t d = 0; d < S.d; ++d)
      for (int64_t h = 0; h < S.h; ++h) {
        const int64_t r = d * S.h + h;
        const uint64_t t0 = __rdtsc();
        coarse_row<T, ND>(cp, s, I3, d, h, rowf.data());
        flags |= avx512::row_backward<BORDER, true, true>(mp, gp + r * S.w, rowf.data(), I3.w, S, C, N, d, h, 0, S.d, gm2, Y);
        const uint64_t t1 = __rdtsc();
        avx512::cell_sums(Y.gpos.data(), I3.w, Alo.data(), Ahi.data());
        CellPartials<T, ND>::add_row(P2.set(0, I3.d.i0[d], I3.h.i0[h], 0), I3, d, h, Alo.data(), Ahi.data(), s.w);
        const uint64_t t2 = __rdtsc();
        avx512::scatter_row(gp + r * S.w, Y, S.w, C, N, gm2);
        const uint64_t t3 = __rdtsc();
        keep(r, 8, t1 - t0);
        keep(r, 9, t2 - t1);
        keep(r, 10, t3 - t2);
      }
#endif
  }
  const double hz = tsc_hz();
  double total[4] = {0, 0, 0, 0};
  std::printf("| phase | ms (one thread) | TSC ticks / voxel |\n|---|---|---|\n");
#if defined(__AVX512F__)
  const int shown = kPhases;
#else
  const int shown = 7;  // no AVX-512 rows in this build
#endif
  for (int k = 0; k < shown; ++k) {
    double ticks = 0;
    for (int64_t r = 0; r < nrows; ++r) ticks += double(best[r * kPhases + k]);
    const double ms = 1e3 * ticks / hz;
    total[k < 2 ? 0 : k < 7 ? 1 : k < 8 ? 2 : 3] += ms;
    std::printf("| %s | %.1f | %.1f |\n", names[k], ms, ticks / double(N));
  }
  std::printf("| forward total | %.1f | |\n| backward total | %.1f | |\n", total[0], total[1]);
#if defined(__AVX512F__)
  std::printf("| forward total, AVX-512 rows | %.1f | |\n| backward total, AVX-512 rows | %.1f | |\n", total[2], total[3]);
#endif
  std::printf("(per-row minimum over %d runs; TSC %.3f GHz; checksums %.6g %.6g)\n", runs, hz / 1e9,
              out.sum().item<double>(), grad_moving.sum().item<double>());
#if defined(__AVX512F__)
  std::printf("AVX-512 rows: %lld of %lld finite, max |difference| to the generic forward %.3g\n",
              (long long)ok_rows, (long long)(runs * nrows), (out2 - out).abs().max().item<double>());
  // both backward loops ran `runs` times over the same rows: compare the sums
  std::printf("AVX-512 backward: flags %d, image gradient max |difference| %.3g (max %.3g), coarse gradient max |difference| %.3g (max %.3g)\n",
              flags, (grad_moving2 - grad_moving).abs().max().item<double>(), grad_moving.abs().max().item<double>(),
              (P2.fold(I3, coarse.options()) - P.fold(I3, coarse.options())).abs().max().item<double>(),
              P.fold(I3, coarse.options()).abs().max().item<double>());
#endif
  return 0;
}
