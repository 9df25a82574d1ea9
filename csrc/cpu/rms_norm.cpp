// RMSNorm with an optional residual add on the CPU, forward and backward (math: mmkern/rms_norm.h).
//
// One pass over the inputs and one over the outputs, where the PyTorch path makes one per op (add, square, mean,
// rsqrt, two products; more in its backward). Work is split over rows; each row is processed in its storage type,
// converted a vector at a time to the level's fp32 vectors (cpu_rows.h). The weight gradient is summed into
// per-thread fp32 partials, reduced at the end (deterministic for a given thread count).
// GCC 12 reports the _mm512_undefined_ps() inside the F16C / AVX-512 conversions of cpu_rows.h as maybe-uninitialised
// (see fused.cpp); the pragma must precede the first include of immintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <omp.h>

#include <vector>

#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/cpu_rows.h"
#include "mmkern/rms_norm.h"
#include "mmkern/simd_cpu.h"

MMKERN_CPU_BEGIN

namespace {

using namespace rows;

template <typename T>
inline void rms_out_row(const T* s, float rs, const float* w, T* out, int64_t d) {
  for_chunks(d, [&](int64_t j, int n) { store_as(out + j, load_as(s + j, n) * rs * load_as(w + j, n), n); });
}

// Pass 1: Σ g·x̂ and the weight-gradient terms; pass 2: grad_x (x̂ and g recomputed, cheaper than storing them).
template <typename T>
inline void rms_bwd_row(const T* go, const T* gs, const T* s, const float* w, float rs, float inv_d, T* gx,
                        float* accw, int64_t d) {
  const vf sum_gx = sum_chunks(d, [&](int64_t j, int n) {
    const vf xh = load_as(s + j, n) * rs, o = load_as(go + j, n);
    if (accw) store_as(accw + j, o * xh + load_as(accw + j, n), n);
    return o * load_as(w + j, n) * xh;
  });
  const float mgx = simd::hsum(sum_gx) * inv_d;
  for_chunks(d, [&](int64_t j, int n) {
    const vf xh = load_as(s + j, n) * rs, g = load_as(go + j, n) * load_as(w + j, n);
    const vf base = gs ? load_as(gs + j, n) : vf{};
    store_as(gx + j, (g - xh * mgx) * rs + base, n);
  });
}

}  // namespace

void rms_norm_fwd_cpu(const RmsNormFwdParams& p, int num_threads) {
  check_rms_norm(p);
  const int64_t n_rows = p.x.size(0), d = p.x.size(1);
  if (d == 0) return;
  dispatch_float(p.x.dtype, "rms_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<T>(p.weight, d, 1.f);
    parallel(threads_for(n_rows * d, num_threads), [&] {
      std::vector<T> xbuf = row_buffer<T>(p.x, d), rbuf = row_buffer<T>(p.residual, d);
      std::vector<T> sbuf = row_buffer<T>(p.sum_out, d), obuf = row_buffer<T>(p.out, d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n_rows; ++i) {
        const T* s = input_row<T>(p.x, i, d, xbuf.data());
        float sum_sq;
        if (!p.residual.present) {
          sum_sq = add_row_reduce<true, T>(s, nullptr, nullptr, d);
        } else {
          T* sum = output_row<T>(p.sum_out, i, sbuf.data());
          sum_sq = add_row_reduce<true>(s, input_row<T>(p.residual, i, d, rbuf.data()), sum, d);
          finish_row<T>(p.sum_out, i, d, sum);
          s = sum;
        }
        const float rs = rms_rstd(sum_sq, d, static_cast<float>(p.eps));
        T* o = output_row<T>(p.out, i, obuf.data());
        rms_out_row(s, rs, w.data(), o, d);
        finish_row<T>(p.out, i, d, o);
        if (p.rstd.present) p.rstd.ptr<float>()[i * p.rstd.stride(0)] = rs;
      }
    });
  });
}

void rms_norm_bwd_cpu(const RmsNormBwdParams& p, int num_threads) {
  check_rms_norm(p);
  const int64_t n_rows = p.s.size(0), d = p.s.size(1);
  if (d == 0) return;
  dispatch_float(p.s.dtype, "rms_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<T>(p.weight, d, 1.f);
    const float inv_d = 1.0f / static_cast<float>(d);
    const int parts = threads_for(n_rows * d, num_threads);
    std::vector<float> pw(p.grad_weight.present ? parts * d : 0, 0.f);
    parallel(parts, [&] {
      // The runtime may grant fewer threads than asked for: split rows over the team actually running.
      const int part = omp_get_thread_num(), team = omp_get_num_threads();
      int64_t begin, end;
      row_range(n_rows, part, team, begin, end);
      std::vector<T> sbuf = row_buffer<T>(p.s, d), gobuf = row_buffer<T>(p.grad_out, d);
      std::vector<T> gsbuf = row_buffer<T>(p.grad_sum, d), gxbuf = row_buffer<T>(p.grad_x, d);
      float* accw = p.grad_weight.present ? pw.data() + part * d : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const float rs = p.rstd.ptr<float>()[i * p.rstd.stride(0)];
        T* gx = output_row<T>(p.grad_x, i, gxbuf.data());
        const T* gs = p.grad_sum.present ? input_row<T>(p.grad_sum, i, d, gsbuf.data()) : nullptr;
        rms_bwd_row(input_row<T>(p.grad_out, i, d, gobuf.data()), gs, input_row<T>(p.s, i, d, sbuf.data()), w.data(),
                    rs, inv_d, gx, accw, d);
        finish_row<T>(p.grad_x, i, d, gx);
      }
    });
    if (p.grad_weight.present) reduce_partials(pw, parts, d, p.grad_weight);
  });
}

MMKERN_CPU_END
