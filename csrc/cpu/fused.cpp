// Fused element-wise ops on the CPU: bias + GELU and residual add + LayerNorm, forward and backward.
//
// Both are memory-bound: each reads its inputs once, computes in fp32 and writes its outputs once, where the
// unfused PyTorch sequence makes a pass per op (add bias, GELU; add residual, LayerNorm). Work is split over
// rows; a row is staged in an fp32 buffer, so the element loops run on contiguous fp32 data and vectorise to
// AVX-512 whatever the storage dtype and strides. Parameter gradients are reduced into per-thread fp32
// partials and summed at the end (deterministic for a given thread count).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "mmkern/common.h"
#include "mmkern/fused.h"

namespace mmkern {

namespace {

// Below this many elements a single thread is faster than waking the team.
constexpr int64_t kMinElemsPerThread = 1 << 14;

int threads_for(int64_t elems, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, elems / kMinElemsPerThread)));
}

// Row `i` of a 2-D view into fp32 dst[0:n].
template <typename T>
inline void load_row(const Tensor& t, int64_t i, int64_t n, float* __restrict dst) {
  const T* src = t.ptr<T>() + i * t.stride(0);
  const int64_t s = t.stride(1);
  if (s == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j * s]);
  }
}

template <typename T>
inline void store_row(const Tensor& t, int64_t i, int64_t n, const float* __restrict src) {
  T* dst = t.ptr<T>() + i * t.stride(0);
  const int64_t s = t.stride(1);
  if (s == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = from_float<T>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j * s] = from_float<T>(src[j]);
  }
}

template <typename T>
std::vector<float> vector_or(const Tensor& t, int64_t n, float fill) {
  std::vector<float> v(n, fill);
  if (t.present)
    for (int64_t j = 0; j < n; ++j) v[j] = to_float(t.ptr<T>()[j * t.stride(0)]);
  return v;
}

// Rows [begin, end) of thread `part` out of `parts`.
inline void row_range(int64_t rows, int part, int parts, int64_t& begin, int64_t& end) {
  begin = rows * part / parts;
  end = rows * (part + 1) / parts;
}

// Sums per-thread fp32 partials (parts, n) into dst (n,), fp32 with stride.
void reduce_partials(const std::vector<float>& partials, int parts, int64_t n, const Tensor& dst) {
  float* out = dst.ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    float acc = 0.f;
    for (int p = 0; p < parts; ++p) acc += partials[p * n + j];
    out[j * dst.stride(0)] = acc;
  }
}

template <class F>
void with_gelu_kind(int kind, F&& f) {
  check(kind == 0 || kind == 1, "approximate: expected 'none' or 'tanh'");
  if (kind == 0) {
    f(std::integral_constant<GeluKind, GeluKind::erf>{});
  } else {
    f(std::integral_constant<GeluKind, GeluKind::tanh>{});
  }
}

}  // namespace

// out[i, j] = GELU(x[i, j] + bias[j]); x (rows, N) any strides, out (rows, N).
void bias_gelu_fwd_cpu(const Tensor& x, const Tensor& bias, const Tensor& out, int kind, int num_threads) {
  check_dims(x, 2, "x");
  check_dims(out, 2, "out");
  const int64_t rows = x.size(0), n = x.size(1);
  check(out.size(0) == rows && out.size(1) == n, "out: shape differs from x");
  check(!bias.present || (bias.ndim == 1 && bias.size(0) == n), "bias: expected (N,) with N the last dim of x");
  with_gelu_kind(kind, [&](auto k) {
    constexpr GeluKind kKind = decltype(k)::value;
    dispatch_float(x.dtype, "bias_gelu", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      const std::vector<float> b = vector_or<scalar_t>(bias, n, 0.f);
#pragma omp parallel num_threads(threads_for(rows * n, num_threads))
      {
        std::vector<float> buf(n);
        float* __restrict v = buf.data();
        const float* __restrict bp = b.data();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
          load_row<scalar_t>(x, i, n, v);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) v[j] = gelu_value<kKind>(v[j] + bp[j]);
          store_row<scalar_t>(out, i, n, v);
        }
      }
    });
  });
}

// grad_x[i, j] = grad_out[i, j] · GELU'(x[i, j] + bias[j]); grad_bias[j] = Σ_i grad_x[i, j] (fp32). grad_x is
// rounded to the storage dtype; grad_bias sums the unrounded fp32 values.
void bias_gelu_bwd_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& bias, const Tensor& grad_x,
                       const Tensor& grad_bias, int kind, int num_threads) {
  check_dims(x, 2, "x");
  check_dims(grad_out, 2, "grad_out");
  const int64_t rows = x.size(0), n = x.size(1);
  check(grad_out.size(0) == rows && grad_out.size(1) == n, "grad_out: shape differs from x");
  check(!grad_x.present || (grad_x.size(0) == rows && grad_x.size(1) == n), "grad_x: shape differs from x");
  check(!grad_bias.present || (grad_bias.dtype == DType::f32 && grad_bias.size(0) == n),
        "grad_bias: expected fp32 (N,)");
  with_gelu_kind(kind, [&](auto k) {
    constexpr GeluKind kKind = decltype(k)::value;
    dispatch_float(x.dtype, "bias_gelu", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      const std::vector<float> b = vector_or<scalar_t>(bias, n, 0.f);
      const int parts = threads_for(rows * n, num_threads);
      std::vector<float> partials(grad_bias.present ? parts * n : 0, 0.f);
#pragma omp parallel num_threads(parts)
      {
        // The runtime may grant fewer threads than asked for: split rows over the team actually running.
        const int part = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t begin, end;
        row_range(rows, part, team, begin, end);
        std::vector<float> v(n), g(n);
        float* __restrict vp = v.data();
        float* __restrict gp = g.data();
        const float* __restrict bp = b.data();
        float* __restrict acc = grad_bias.present ? partials.data() + part * n : nullptr;
        for (int64_t i = begin; i < end; ++i) {
          load_row<scalar_t>(x, i, n, vp);
          load_row<scalar_t>(grad_out, i, n, gp);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) vp[j] = gp[j] * gelu_derivative<kKind>(vp[j] + bp[j]);
          if (acc) {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) acc[j] += vp[j];
          }
          if (grad_x.present) store_row<scalar_t>(grad_x, i, n, vp);
        }
      }
      if (grad_bias.present) reduce_partials(partials, parts, n, grad_bias);
    });
  });
}

// s = x + residual (rounded to the storage dtype, as the unfused add would be), out = LN(s)·weight + bias,
// mean / rstd (rows,) fp32 saved for backward. Without a residual, s is x and sum_out is absent.
void add_layer_norm_fwd_cpu(const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& bias,
                            const Tensor& sum_out, const Tensor& out, const Tensor& mean, const Tensor& rstd, double eps,
                            int num_threads) {
  check_dims(x, 2, "x");
  const int64_t rows = x.size(0), d = x.size(1);
  check(!residual.present || (residual.size(0) == rows && residual.size(1) == d), "residual: shape differs from x");
  check(residual.present == sum_out.present, "sum_out: given exactly when residual is");
  check(mean.dtype == DType::f32 && rstd.dtype == DType::f32, "mean, rstd: expected fp32");
  dispatch_float(x.dtype, "add_layer_norm", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<scalar_t>(weight, d, 1.f);
    const std::vector<float> b = vector_or<scalar_t>(bias, d, 0.f);
    const float inv_d = d ? 1.0f / static_cast<float>(d) : 0.f;
#pragma omp parallel num_threads(threads_for(rows * d, num_threads))
    {
      std::vector<float> s_buf(d), r_buf(d);
      float* __restrict sv = s_buf.data();
      float* __restrict rv = r_buf.data();
      const float* __restrict wp = w.data();
      const float* __restrict bp = b.data();
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; ++i) {
        load_row<scalar_t>(x, i, d, sv);
        if (residual.present) {
          load_row<scalar_t>(residual, i, d, rv);
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) sv[j] = to_float(from_float<scalar_t>(sv[j] + rv[j]));
          store_row<scalar_t>(sum_out, i, d, sv);
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < d; ++j) sum += sv[j];
        const float mu = sum * inv_d;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t j = 0; j < d; ++j) sq += (sv[j] - mu) * (sv[j] - mu);
        const float rs = 1.0f / std::sqrt(sq * inv_d + static_cast<float>(eps));
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) rv[j] = (sv[j] - mu) * rs * wp[j] + bp[j];
        store_row<scalar_t>(out, i, d, rv);
        mean.ptr<float>()[i * mean.stride(0)] = mu;
        rstd.ptr<float>()[i * rstd.stride(0)] = rs;
      }
    }
  });
}

// With x̂ = (s - mean)·rstd and g = grad_out·weight:
//   grad_x = grad_residual = grad_sum + rstd·(g - mean(g) - x̂·mean(g·x̂))
//   grad_weight = Σ_rows grad_out·x̂,  grad_bias = Σ_rows grad_out   (fp32)
// s is the LayerNorm input (sum_out of the forward, or x without a residual); grad_sum may be absent (zero).
void add_layer_norm_bwd_cpu(const Tensor& grad_out, const Tensor& grad_sum, const Tensor& s, const Tensor& weight,
                            const Tensor& mean, const Tensor& rstd, const Tensor& grad_x, const Tensor& grad_weight,
                            const Tensor& grad_bias, int num_threads) {
  check_dims(s, 2, "s");
  check_dims(grad_out, 2, "grad_out");
  const int64_t rows = s.size(0), d = s.size(1);
  check(grad_out.size(0) == rows && grad_out.size(1) == d, "grad_out: shape differs from the input");
  check(!grad_sum.present || (grad_sum.size(0) == rows && grad_sum.size(1) == d), "grad_sum: shape differs");
  check(!grad_weight.present || grad_weight.dtype == DType::f32, "grad_weight: expected fp32");
  check(!grad_bias.present || grad_bias.dtype == DType::f32, "grad_bias: expected fp32");
  dispatch_float(s.dtype, "add_layer_norm", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const std::vector<float> w = vector_or<scalar_t>(weight, d, 1.f);
    const float inv_d = d ? 1.0f / static_cast<float>(d) : 0.f;
    const int parts = threads_for(rows * d, num_threads);
    const bool params = grad_weight.present || grad_bias.present;
    std::vector<float> pw(params ? parts * d : 0, 0.f), pb(params ? parts * d : 0, 0.f);
#pragma omp parallel num_threads(parts)
    {
      const int part = omp_get_thread_num(), team = omp_get_num_threads();
      int64_t begin, end;
      row_range(rows, part, team, begin, end);
      std::vector<float> xh_buf(d), go_buf(d), g_buf(d), gs_buf(d);
      // Restrict-qualified views of the row buffers: without them GCC versions the loops on a run-time alias
      // check and ends up in the scalar version.
      float* __restrict xh = xh_buf.data();
      float* __restrict go = go_buf.data();
      float* __restrict g = g_buf.data();
      float* __restrict gs = gs_buf.data();
      const float* __restrict wp = w.data();
      float* __restrict accw = params ? pw.data() + part * d : nullptr;
      float* __restrict accb = params ? pb.data() + part * d : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const float mu = mean.ptr<float>()[i * mean.stride(0)], rs = rstd.ptr<float>()[i * rstd.stride(0)];
        load_row<scalar_t>(s, i, d, xh);
        load_row<scalar_t>(grad_out, i, d, go);
        float sum_g = 0.f, sum_gx = 0.f;
        // g = grad_out·weight is rounded once and reused below, so that the mean subtraction cancels exactly
        // where it should (D = 1) instead of meeting an FMA-contracted, unrounded product.
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (int64_t j = 0; j < d; ++j) {
          xh[j] = (xh[j] - mu) * rs;
          g[j] = go[j] * wp[j];
          sum_g += g[j];
          sum_gx += g[j] * xh[j];
        }
        if (params) {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            accw[j] += go[j] * xh[j];
            accb[j] += go[j];
          }
        }
        if (!grad_x.present) continue;
        const float mg = sum_g * inv_d, mgx = sum_gx * inv_d;
        if (grad_sum.present) {
          load_row<scalar_t>(grad_sum, i, d, gs);
        } else {
          std::fill(gs, gs + d, 0.f);
        }
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) gs[j] += rs * (g[j] - mg - xh[j] * mgx);
        store_row<scalar_t>(grad_x, i, d, gs);
      }
    }
    if (grad_weight.present) reduce_partials(pw, parts, d, grad_weight);
    if (grad_bias.present) reduce_partials(pb, parts, d, grad_bias);
  });
}

}  // namespace mmkern
