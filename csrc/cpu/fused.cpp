// Fused element-wise ops on the CPU: bias + GELU and residual add + LayerNorm, forward and backward.
//
// Each op reads its inputs once, computes in fp32 and writes its outputs once, where the unfused PyTorch sequence
// makes a pass per op (add residual, LayerNorm; GELU backward, bias-gradient sum). Work is split over rows. The
// element loops run on contiguous rows of the storage type (the tensor's own memory, or a strided row gathered into
// a buffer), converting a vector at a time to fp32 and back (cpu_rows.h). They are written on whole vectors and a
// masked tail (GCC's auto-vectorised loops
// spent more time in peeling and remainder code than in the math on 64-wide rows, and could not vectorise the row
// sums at all); AVX-512 has better instructions for two of the primitives: rcp14 plus a Newton step for a division,
// scalef for 2^n. Parameter gradients are reduced into per-thread fp32 partials and summed at the end (deterministic
// for a given thread count).
// GCC 12 reports the _mm512_undefined_ps() inside AVX-512 intrinsics (min, rcp14, scalef, ...) as (maybe-)
// uninitialised (a compiler bug, fixed in GCC 13); the pragmas must precede the first include of immintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <cstring>

#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/cpu_rows.h"
#include "mmkern/fused.h"
#include "mmkern/simd_cpu.h"

MMKERN_CPU_BEGIN

namespace {

using namespace rows;

template <class F>
void with_gelu_kind(int kind, F&& f) {
  check(kind == 0 || kind == 1, "approximate: expected 'none' or 'tanh'");
  if (kind == 0) {
    f(std::integral_constant<GeluKind, GeluKind::erf>{});
  } else {
    f(std::integral_constant<GeluKind, GeluKind::tanh>{});
  }
}

// ---- row kernels on contiguous rows of the storage type T, on the level's fp32 vectors (cpu_rows.h) ----
// gelu_fwd_row: out = GELU(x + b).  gelu_bwd_row: d = go·GELU'(x + b) into gx (when given), and acc += d (when
// given). add_row_reduce (cpu_rows.h): s = x + r and Σ s.  row_sq_dev: Σ (s - mu)², mu corrected.  ln_out_row:
// out = (s - mu)·rs·w + b.  ln_bwd_row: the LayerNorm backward of one row (see add_layer_norm_bwd_cpu).

using simd::splat;
using simd::vmin;

inline vf vabs(vf x) {
  vi bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0x7fffffff;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// 1/d to ~1 ulp for d in [1, 1e30]. AVX-512: rcp14 (relative error 2^-14) and one Newton step, cheaper than a
// division; elsewhere the division.
inline vf reciprocal(vf d) {
#if defined(__AVX512F__)
  const vf t = (vf)_mm512_rcp14_ps((__m512)d);
  return t * (2.0f - d * t);
#else
  return 1.0f / d;
#endif
}

// normal_cdf_pdf of fused.h on vectors. ½·exp(-x²/2) as one exp2v (simd_cpu.h) of -x²·log2(e)/2 - 1 (an exp of
// its own, with the argument reduced in two parts and clamps, cost ~4 vector operations more per vector of a GELU
// that is bound by its ~30 arithmetic operations). The clamp of 1 + 0.4z keeps the Newton step finite at
// |x| = inf (NaN reaches the callers' results through x).
inline void normal_cdf_pdf_v(vf x, vf& cdf, vf& pdf) {
  const vf t = reciprocal(vmin(vabs(x) * (kErfcT * kSqrtHalf) + 1.0f, splat(1e30f)));
  const vf half_e = simd::exp2v(x * x * (-0.5f * simd::kLog2e) - 1.0f);
  const vf half_erfc = t * half_e * erfc_poly(t);
  cdf = x >= 0.0f ? 1.0f - half_erfc : half_erfc;
  pdf = half_e * (2.0f * kInvSqrt2Pi);
}

// For the tanh GELU: w = -v = -2√(2/π)(x + 0.044715x³) and σ(v) = 1 / (1 + exp(w)), with σ = 0 where exp(w) is
// past 1.6e38 (the reciprocal's Newton step needs it finite; as 1 / (1 + inf): GELU(-inf) = -inf·0 = NaN).
inline void tanh_sigmoid_v(vf x, vf x2, vf& w, vf& e, vf& s) {
  constexpr float k = 2.0f * kSqrt2OverPi;
  w = x * (x2 * (-k * kTanhCubic) - k);
  e = simd::exp2v(w * simd::kLog2e);
  s = w <= 88.0f ? reciprocal(e + 1.0f) : vf{};
}

template <GeluKind kKind>
inline vf gelu_v(vf x) {
  if constexpr (kKind == GeluKind::erf) {
    vf cdf, pdf;
    normal_cdf_pdf_v(x, cdf, pdf);
    return x * cdf;
  } else {
    vf w, e, s;
    tanh_sigmoid_v(x, x * x, w, e, s);
    return x * s;
  }
}

// gelu_derivative of fused.h on vectors: 1 - σ(v) = σ(v)·exp(-v) for v >= 0 (w <= 0).
template <GeluKind kKind>
inline vf gelu_grad_v(vf x) {
  if constexpr (kKind == GeluKind::erf) {
    vf cdf, pdf;
    normal_cdf_pdf_v(x, cdf, pdf);
    return x * pdf + cdf;
  } else {
    constexpr float k = 2.0f * kSqrt2OverPi;
    const vf x2 = x * x;
    vf w, e, s;
    tanh_sigmoid_v(x, x2, w, e, s);
    const vf one_minus_s = w > 0.0f ? 1.0f - s : s * e;
    return (x * s) * (one_minus_s * (x2 * (3.0f * k * kTanhCubic) + k)) + s;
  }
}

template <GeluKind kKind, typename T>
inline void gelu_fwd_row(const T* x, const float* b, T* out, int64_t n) {
  for_chunks(n, [&](int64_t j, int w) { store_as(out + j, gelu_v<kKind>(load_as(x + j, w) + load_as(b + j, w)), w); });
}

template <GeluKind kKind, typename T>
inline void gelu_bwd_row(const T* go, const T* x, const float* b, T* gx, float* acc, int64_t n) {
  for_chunks(n, [&](int64_t j, int w) {
    const vf d = load_as(go + j, w) * gelu_grad_v<kKind>(load_as(x + j, w) + load_as(b + j, w));
    if (acc) store_as(acc + j, load_as(acc + j, w) + d, w);
    if (gx) store_as(gx + j, d, w);
  });
}

// Σ (s - mu)² about the row's mean, with mu (the first-pass Σ s / d) corrected on the way: mu += Σ (s - mu) / d
// and Σ (s - mu')² = Σ (s - mu)² - (Σ (s - mu))² / d. The first pass's rounding (several ulp of |mean|) would
// otherwise reach x̂ multiplied by rstd, which is large when |mean| >> std.
template <typename T>
inline float row_sq_dev(const T* s, float& mu, int64_t d) {
  if (d == 0) return 0.0f;
  const Sum2 t = sum_chunks<Sum2>(d, [&](int64_t j, int w) {
    const vf c = simd::lanes_below(w) ? load_as(s + j, w) - mu : vf{};  // 0 in the tail lanes
    return Sum2{c * c, c};
  });
  const float sum_dev = simd::hsum(t.b);
  mu += sum_dev / static_cast<float>(d);
  return std::max(simd::hsum(t.a) - sum_dev * sum_dev / static_cast<float>(d), 0.0f);
}

template <typename T>
inline void ln_out_row(const T* s, float mu, float rs, const float* w, const float* b, T* out, int64_t d) {
  for_chunks(d, [&](int64_t j, int n) {
    const vf xh = (load_as(s + j, n) - mu) * rs;
    store_as(out + j, xh * load_as(w + j, n) + load_as(b + j, n), n);
  });
}

// Pass 1: the two row means and the parameter-gradient terms; pass 2 recomputes x̂ and g (cheaper than storing
// them) for grad_x.
template <typename T>
inline void ln_bwd_row(const T* go, const T* gs, const T* s, const float* w, float mu, float rs, float inv_d, T* gx,
                       float* accw, float* accb, int64_t d) {
  const Sum2 t = sum_chunks<Sum2>(d, [&](int64_t j, int n) {
    const vf xh = simd::lanes_below(n) ? (load_as(s + j, n) - mu) * rs : vf{}, o = load_as(go + j, n);
    const vf g = o * load_as(w + j, n);
    if (accw) {
      store_as(accw + j, o * xh + load_as(accw + j, n), n);
      store_as(accb + j, load_as(accb + j, n) + o, n);
    }
    return Sum2{g, g * xh};
  });
  if (!gx) return;
  const float mg = simd::hsum(t.a) * inv_d, mgx = simd::hsum(t.b) * inv_d;
  for_chunks(d, [&](int64_t j, int n) {
    const vf xh = (load_as(s + j, n) - mu) * rs, g = load_as(go + j, n) * load_as(w + j, n);
    const vf base = gs ? load_as(gs + j, n) : vf{};
    store_as(gx + j, ((g - xh * mgx) - mg) * rs + base, n);
  });
}

}  // namespace

// out[i, j] = GELU(x[i, j] + bias[j]); x (rows, N) any strides, out (rows, N).
void bias_gelu_fwd_cpu(const BiasGeluFwdParams& p, int num_threads) {
  const Tensor &x = p.x, &bias = p.bias, &out = p.out;
  check_dims(x, 2, "x");
  check_dims(out, 2, "out");
  const int64_t rows = x.size(0), n = x.size(1);
  check(out.size(0) == rows && out.size(1) == n, "out: shape differs from x");
  check(!bias.present || (bias.ndim == 1 && bias.size(0) == n), "bias: expected (N,) with N the last dim of x");
  with_gelu_kind(p.kind, [&](auto k) {
    constexpr GeluKind kKind = decltype(k)::value;
    dispatch_float(x.dtype, "bias_gelu", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const std::vector<float> b = vector_or<T>(bias, n, 0.f);
      parallel(threads_for(rows * n, num_threads), [&] {
        std::vector<T> xbuf = row_buffer<T>(x, n), obuf = row_buffer<T>(out, n);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
          T* o = output_row<T>(out, i, obuf.data());
          gelu_fwd_row<kKind>(input_row<T>(x, i, n, xbuf.data()), b.data(), o, n);
          finish_row<T>(out, i, n, o);
        }
      });
    });
  });
}

// grad_x[i, j] = grad_out[i, j] · GELU'(x[i, j] + bias[j]); grad_bias[j] = Σ_i grad_x[i, j] (fp32). grad_x is
// rounded to the storage dtype; grad_bias sums the unrounded fp32 values.
void bias_gelu_bwd_cpu(const BiasGeluBwdParams& p, int num_threads) {
  const Tensor &grad_out = p.grad_out, &x = p.x, &bias = p.bias, &grad_x = p.grad_x, &grad_bias = p.grad_bias;
  check_dims(x, 2, "x");
  check_dims(grad_out, 2, "grad_out");
  const int64_t rows = x.size(0), n = x.size(1);
  check(grad_out.size(0) == rows && grad_out.size(1) == n, "grad_out: shape differs from x");
  check(!grad_x.present || (grad_x.size(0) == rows && grad_x.size(1) == n), "grad_x: shape differs from x");
  check(!grad_bias.present || (grad_bias.dtype == DType::f32 && grad_bias.size(0) == n),
        "grad_bias: expected fp32 (N,)");
  with_gelu_kind(p.kind, [&](auto k) {
    constexpr GeluKind kKind = decltype(k)::value;
    dispatch_float(x.dtype, "bias_gelu", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const std::vector<float> b = vector_or<T>(bias, n, 0.f);
      const int parts = threads_for(rows * n, num_threads);
      std::vector<float> partials(grad_bias.present ? parts * n : 0, 0.f);
      parallel(parts, [&] {
        // The runtime may grant fewer threads than asked for: split rows over the team actually running.
        const int part = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t begin, end;
        row_range(rows, part, team, begin, end);
        std::vector<T> xbuf = row_buffer<T>(x, n), gbuf = row_buffer<T>(grad_out, n), dbuf = row_buffer<T>(grad_x, n);
        float* acc = grad_bias.present ? partials.data() + part * n : nullptr;
        for (int64_t i = begin; i < end; ++i) {
          T* d = grad_x.present ? output_row<T>(grad_x, i, dbuf.data()) : nullptr;
          gelu_bwd_row<kKind>(input_row<T>(grad_out, i, n, gbuf.data()), input_row<T>(x, i, n, xbuf.data()), b.data(),
                              d, acc, n);
          if (d) finish_row<T>(grad_x, i, n, d);
        }
      });
      if (grad_bias.present) reduce_partials(partials, parts, n, grad_bias);
    });
  });
}

// s = x + residual (rounded to the storage dtype, as the unfused add would be), out = LN(s)·weight + bias,
// mean / rstd (rows,) fp32 for the backward (both absent for inference). Without a residual, s is x and sum_out is
// absent. Two passes over
// the row for the variance (Σ(s - mean)², no cancellation when |mean| >> std); the row is in L1 by then.
void add_layer_norm_fwd_cpu(const AddLayerNormFwdParams& p, int num_threads) {
  const Tensor &x = p.x, &residual = p.residual, &sum_out = p.sum_out, &out = p.out, &mean = p.mean, &rstd = p.rstd;
  check_dims(x, 2, "x");
  const int64_t rows = x.size(0), d = x.size(1);
  check(!residual.present || (residual.size(0) == rows && residual.size(1) == d), "residual: shape differs from x");
  check(residual.present == sum_out.present, "sum_out: given exactly when residual is");
  check(mean.present == rstd.present, "mean, rstd: both given or both absent");
  check(!mean.present || (mean.dtype == DType::f32 && rstd.dtype == DType::f32 && mean.ndim == 1 && rstd.ndim == 1 &&
                          mean.size(0) == rows && rstd.size(0) == rows),
        "mean, rstd: expected fp32 (rows,)");
  dispatch_float(x.dtype, "add_layer_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<T>(p.weight, d, 1.f);
    const std::vector<float> b = vector_or<T>(p.bias, d, 0.f);
    const float inv_d = d ? 1.0f / static_cast<float>(d) : 0.f;
    parallel(threads_for(rows * d, num_threads), [&] {
      std::vector<T> xbuf = row_buffer<T>(x, d), rbuf = row_buffer<T>(residual, d);
      std::vector<T> sbuf = row_buffer<T>(sum_out, d), obuf = row_buffer<T>(out, d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; ++i) {
        const T* s = input_row<T>(x, i, d, xbuf.data());
        float total;
        if (!residual.present) {
          total = add_row_reduce<false, T>(s, nullptr, nullptr, d);
        } else {
          T* sum = output_row<T>(sum_out, i, sbuf.data());
          total = add_row_reduce<false>(s, input_row<T>(residual, i, d, rbuf.data()), sum, d);
          finish_row<T>(sum_out, i, d, sum);
          s = sum;
        }
        float mu = total * inv_d;
        const float rs = 1.0f / std::sqrt(row_sq_dev(s, mu, d) * inv_d + static_cast<float>(p.eps));
        T* o = output_row<T>(out, i, obuf.data());
        ln_out_row(s, mu, rs, w.data(), b.data(), o, d);
        finish_row<T>(out, i, d, o);
        if (mean.present) {
          mean.ptr<float>()[i * mean.stride(0)] = mu;
          rstd.ptr<float>()[i * rstd.stride(0)] = rs;
        }
      }
    });
  });
}

// With x̂ = (s - mean)·rstd and g = grad_out·weight:
//   grad_x = grad_residual = grad_sum + rstd·(g - mean(g) - x̂·mean(g·x̂))
//   grad_weight = Σ_rows grad_out·x̂,  grad_bias = Σ_rows grad_out   (fp32)
// s is the LayerNorm input (sum_out of the forward, or x without a residual); grad_sum may be absent (zero).
void add_layer_norm_bwd_cpu(const AddLayerNormBwdParams& p, int num_threads) {
  const Tensor &grad_out = p.grad_out, &grad_sum = p.grad_sum, &s = p.s, &mean = p.mean, &rstd = p.rstd;
  const Tensor &grad_x = p.grad_x, &grad_weight = p.grad_weight, &grad_bias = p.grad_bias;
  check_dims(s, 2, "s");
  check_dims(grad_out, 2, "grad_out");
  const int64_t rows = s.size(0), d = s.size(1);
  check(grad_out.size(0) == rows && grad_out.size(1) == d, "grad_out: shape differs from the input");
  check(!grad_sum.present || (grad_sum.size(0) == rows && grad_sum.size(1) == d), "grad_sum: shape differs");
  check(!grad_weight.present || grad_weight.dtype == DType::f32, "grad_weight: expected fp32");
  check(!grad_bias.present || grad_bias.dtype == DType::f32, "grad_bias: expected fp32");
  dispatch_float(s.dtype, "add_layer_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<T>(p.weight, d, 1.f);
    const float inv_d = d ? 1.0f / static_cast<float>(d) : 0.f;
    const int parts = threads_for(rows * d, num_threads);
    const bool params = grad_weight.present || grad_bias.present;
    std::vector<float> pw(params ? parts * d : 0, 0.f), pb(params ? parts * d : 0, 0.f);
    parallel(parts, [&] {
      const int part = omp_get_thread_num(), team = omp_get_num_threads();
      int64_t begin, end;
      row_range(rows, part, team, begin, end);
      std::vector<T> sbuf = row_buffer<T>(s, d), gobuf = row_buffer<T>(grad_out, d);
      std::vector<T> gsbuf = row_buffer<T>(grad_sum, d), gxbuf = row_buffer<T>(grad_x, d);
      float* accw = params ? pw.data() + part * d : nullptr;
      float* accb = params ? pb.data() + part * d : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const float mu = mean.ptr<float>()[i * mean.stride(0)], rs = rstd.ptr<float>()[i * rstd.stride(0)];
        T* gx = grad_x.present ? output_row<T>(grad_x, i, gxbuf.data()) : nullptr;
        const T* gs = grad_sum.present ? input_row<T>(grad_sum, i, d, gsbuf.data()) : nullptr;
        ln_bwd_row(input_row<T>(grad_out, i, d, gobuf.data()), gs, input_row<T>(s, i, d, sbuf.data()), w.data(), mu,
                   rs, inv_d, gx, accw, accb, d);
        if (gx) finish_row<T>(grad_x, i, d, gx);
      }
    });
    if (grad_weight.present) reduce_partials(pw, parts, d, grad_weight);
    if (grad_bias.present) reduce_partials(pb, parts, d, grad_bias);
  });
}

MMKERN_CPU_END
