// RMSNorm with an optional residual add on the CPU, forward and backward (math: mmkern/rms_norm.h).
//
// One pass over the inputs and one over the outputs, where the PyTorch path makes one per op (add, square, mean,
// rsqrt, two products; more in its backward). Work is split over rows; each row is processed as contiguous fp32
// (cpu_rows.h) on the level's vectors. The weight gradient is summed into per-thread fp32 partials, reduced at the
// end (deterministic for a given thread count).
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
using simd::vf;

inline void rms_out_row(const float* s, float rs, const float* w, float* out, int64_t d) {
  for_chunks(d, [&](int64_t j, int n) { store(out + j, load(s + j, n) * rs * load(w + j, n), n); });
}

// Pass 1: Σ g·x̂ and the weight-gradient terms; pass 2: grad_x (x̂ and g recomputed, cheaper than storing them).
inline void rms_bwd_row(const float* go, const float* gs, const float* s, const float* w, float rs, float inv_d,
                        float* gx, float* accw, int64_t d) {
  vf sum_gx = vf{};
  for_chunks(d, [&](int64_t j, int n) {
    const vf xh = load(s + j, n) * rs, o = load(go + j, n);
    sum_gx = o * load(w + j, n) * xh + sum_gx;
    if (accw) store(accw + j, o * xh + load(accw + j, n), n);
  });
  const float mgx = simd::hsum(sum_gx) * inv_d;
  for_chunks(d, [&](int64_t j, int n) {
    const vf xh = load(s + j, n) * rs, g = load(go + j, n) * load(w + j, n);
    const vf base = gs ? load(gs + j, n) : vf{};
    store(gx + j, (g - xh * mgx) * rs + base, n);
  });
}

}  // namespace

void rms_norm_fwd_cpu(const RmsNormFwdParams& p, int num_threads) {
  check_rms_norm(p);
  const int64_t n_rows = p.x.size(0), d = p.x.size(1);
  if (d == 0) return;
  dispatch_float(p.x.dtype, "rms_norm", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<scalar_t>(p.weight, d, 1.f);
#pragma omp parallel num_threads(threads_for(n_rows * d, num_threads))
    {
      std::vector<float> xbuf(d), rbuf(d), sbuf(d), obuf(d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n_rows; ++i) {
        const float* s = input_row<scalar_t>(p.x, i, d, xbuf.data());
        float sum_sq;
        if (!p.residual.present) {
          sum_sq = add_row_reduce<true>(s, nullptr, nullptr, d);
        } else {
          float* sum = output_row<scalar_t>(p.sum_out, i, sbuf.data());
          sum_sq = add_row_reduce<true>(s, input_row<scalar_t>(p.residual, i, d, rbuf.data()), sum, d);
          if (!direct<scalar_t>(p.sum_out)) {  // normalise s as stored
            store_row<scalar_t>(p.sum_out, i, d, sum);
            load_row<scalar_t>(p.sum_out, i, d, sum);
            sum_sq = add_row_reduce<true>(sum, nullptr, nullptr, d);
          }
          s = sum;
        }
        const float rs = rms_rstd(sum_sq, d, static_cast<float>(p.eps));
        float* o = output_row<scalar_t>(p.out, i, obuf.data());
        rms_out_row(s, rs, w.data(), o, d);
        finish_row<scalar_t>(p.out, i, d, o);
        p.rstd.ptr<float>()[i * p.rstd.stride(0)] = rs;
      }
    }
  });
}

void rms_norm_bwd_cpu(const RmsNormBwdParams& p, int num_threads) {
  check_rms_norm(p);
  const int64_t n_rows = p.s.size(0), d = p.s.size(1);
  if (d == 0) return;
  dispatch_float(p.s.dtype, "rms_norm", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<scalar_t>(p.weight, d, 1.f);
    const float inv_d = 1.0f / static_cast<float>(d);
    const int parts = threads_for(n_rows * d, num_threads);
    std::vector<float> pw(p.grad_weight.present ? parts * d : 0, 0.f);
#pragma omp parallel num_threads(parts)
    {
      // The runtime may grant fewer threads than asked for: split rows over the team actually running.
      const int part = omp_get_thread_num(), team = omp_get_num_threads();
      int64_t begin, end;
      row_range(n_rows, part, team, begin, end);
      std::vector<float> sbuf(d), gobuf(d), gsbuf(d), gxbuf(d);
      float* accw = p.grad_weight.present ? pw.data() + part * d : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const float rs = p.rstd.ptr<float>()[i * p.rstd.stride(0)];
        float* gx = output_row<scalar_t>(p.grad_x, i, gxbuf.data());
        const float* gs = p.grad_sum.present ? input_row<scalar_t>(p.grad_sum, i, d, gsbuf.data()) : nullptr;
        rms_bwd_row(input_row<scalar_t>(p.grad_out, i, d, gobuf.data()), gs,
                    input_row<scalar_t>(p.s, i, d, sbuf.data()), w.data(), rs, inv_d, gx, accw, d);
        finish_row<scalar_t>(p.grad_x, i, d, gx);
      }
    }
    if (p.grad_weight.present) reduce_partials(pw, parts, d, p.grad_weight);
  });
}

MMKERN_CPU_END
