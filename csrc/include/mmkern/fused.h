// Torch-free math of the fused element-wise ops (bias + GELU, residual add + LayerNorm), shared by the CPU and
// CUDA kernels. Everything is fp32 and branch-free (selects, not jumps), so that the CPU loops over a row
// vectorise to AVX-512 without a vector math library.
#pragma once

#include <cmath>
#include <cstdint>

#include "mmkern/common.h"

namespace mmkern {

// GELU variants, as in torch's nn.GELU(approximate=...). Must match mmkern/ops/fused.py.
enum class GeluKind : int { erf = 0, tanh = 1 };

// exp(r) for |r| <= ln2/2 as 1 + r + r²·P(r), P cubic (fitted here for minimax relative error): relative error
// below 2e-7 (3 ulp), enough for the GELUs (the erf tail is good to 3e-7 anyway) at two FMAs fewer than a 1-ulp
// polynomial. For a float or a SIMD vector of floats (the CPU kernels evaluate it on __m512).
template <typename V>
MMK_HD V exp_reduced(V r) {
  V p = r * 8.3116293e-3f + 4.1898899e-2f;
  p = p * r + 1.6667151e-1f;
  p = p * r + 4.9999171e-1f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// ln 2 split into a part with few mantissa bits (n·kLn2Hi exact for |n| < 2^12) and the rest.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

// exp(c) in fp32 with ~3 ulp error for c in [-87, 88]: c = n·ln2 + r, |r| <= ln2/2, 2^n by writing the exponent
// bits. Host only (CUDA uses expf).
inline float fused_exp_in_range(float c) {
  // Adding 1.5·2^23 rounds to an integer (round-half-even) and leaves n in the low mantissa bits.
  const float magic = 12582912.0f;
  const float t = c * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = c - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t) - float_to_bits(magic));
  return exp_reduced(r) * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
}

// exp(x): inputs below -87 give 0 (no subnormals), above 88 give inf; NaN stays NaN.
MMK_HD float fused_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float lo = -87.0f, hi = 88.0f;
  float c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const float e = fused_exp_in_range(c);
  return x > hi ? INFINITY : (x < lo ? 0.0f : e);
#endif
}

// exp(a) for a <= 0 (or NaN, which the callers' products carry through anyway): fused_exp without the overflow
// branch, for the Gaussian factor exp(-x²/2) of the erf GELU.
MMK_HD float fused_exp_nonpositive(float a) {
#if defined(__CUDA_ARCH__)
  return expf(a);
#else
  const float lo = -87.0f;
  const float e = fused_exp_in_range(a > lo ? a : lo);
  return a < lo ? 0.0f : e;
#endif
}

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // √(2/π)
constexpr float kTanhCubic = 0.044715f;

// The tail of Φ is erfc(z), z = |x|/√2, written as t·exp(-z²)·Q(t) with t = 1 / (1 + 0.4z) and Q the degree-8
// polynomial below, fitted here (weighted least squares on exp(z²)·erfc(z)/t over t in (0, 1]): relative error
// below 3e-7 for every z, so Φ keeps full relative precision far into the negative tail, where 1 + erf(x/√2)
// would cancel. Q(0) = 0.4/√π gives the asymptote. For a float or a SIMD vector of floats.
template <typename V>
MMK_HD V erfc_poly(V t) {
  V q = t * 0.050189096f - 0.18262291f;
  q = q * t + 0.1686568f;
  q = q * t - 0.0052670646f;
  q = q * t + 0.14128326f;
  q = q * t + 0.16857648f;
  q = q * t + 0.20783883f;
  q = q * t + 0.22566976f;
  return q * t + 0.22567587f;
}

// The 0.4 of t = 1 / (1 + 0.4z) in erfc_poly.
constexpr float kErfcT = 0.4f;

// Φ(x) and φ(x) of the standard normal distribution, sharing one exp.
MMK_HD void normal_cdf_pdf(float x, float& cdf, float& pdf) {
  const float z = fabsf(x) * kSqrtHalf;
  const float t = 1.0f / (1.0f + kErfcT * z);
  const float q = erfc_poly(t);
  const float e = fused_exp_nonpositive(-z * z);  // exp(-x²/2)
  const float half_erfc = 0.5f * t * e * q;
  cdf = x < 0.0f ? half_erfc : 1.0f - half_erfc;
  pdf = kInvSqrt2Pi * e;
}

// GELU(x): x·Φ(x) (erf), or 0.5·x·(1 + tanh(u)) = x·σ(2u) with u = √(2/π)(x + 0.044715x³) (tanh). The σ form is
// the same function without tanh's cancellation near u = 0; σ(v) = 1 / (1 + exp(-v)), exp overflow giving 0.
template <GeluKind kKind>
MMK_HD float gelu_value(float x) {
  if constexpr (kKind == GeluKind::erf) {
    float cdf, pdf;
    normal_cdf_pdf(x, cdf, pdf);
    return x * cdf;
  } else {
    const float v = 2.0f * kSqrt2OverPi * (x + kTanhCubic * x * x * x);
    return x / (1.0f + fused_exp(-v));
  }
}

// dGELU/dx: Φ(x) + x·φ(x) (erf), or σ + x·σ(1 - σ)·2u' (tanh), with 1 - σ(v) = σ(v)·exp(-v) for v >= 0 so that
// it keeps its precision where σ is close to 1.
template <GeluKind kKind>
MMK_HD float gelu_derivative(float x) {
  if constexpr (kKind == GeluKind::erf) {
    float cdf, pdf;
    normal_cdf_pdf(x, cdf, pdf);
    return cdf + x * pdf;
  } else {
    const float x2 = x * x;
    const float v = 2.0f * kSqrt2OverPi * (x + kTanhCubic * x2 * x);
    const float e = fused_exp(-v);
    const float s = 1.0f / (1.0f + e);
    const float one_minus_s = v < 0.0f ? 1.0f - s : s * e;
    const float dv = 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x2);
    return s + x * s * one_minus_s * dv;
  }
}

// ---- Entry points (the convention: see the top of csrc/bindings.cpp) ----
// Tensors are 2-D (rows, N) views, any strides unless said; an absent optional tensor is !present.

// out = gelu(x + bias).
struct BiasGeluFwdParams {
  Tensor x, bias, out;  // x, out (rows, N); bias (N,) or absent
  int kind = 0;         // GeluKind
  template <class F>
  void fields(F&& f) {
    f("x", x), f("bias", bias), f("out", out), f("kind", kind);
  }
};

// grad_x = grad_out * gelu'(x + bias); grad_bias = its column sums (fp32, contiguous), when present.
struct BiasGeluBwdParams {
  Tensor grad_out, x, bias, grad_x, grad_bias;
  int kind = 0;  // GeluKind
  template <class F>
  void fields(F&& f) {
    f("grad_out", grad_out), f("x", x), f("bias", bias), f("grad_x", grad_x), f("grad_bias", grad_bias);
    f("kind", kind);
  }
};

// s = x + residual (into sum_out; both absent without a residual), out = LayerNorm(s) * weight + bias, and the
// row statistics mean, rstd (fp32, (rows,)) for the backward (both absent for inference).
struct AddLayerNormFwdParams {
  Tensor x, residual, weight, bias, sum_out, out, mean, rstd;
  double eps = 0;
  template <class F>
  void fields(F&& f) {
    f("x", x), f("residual", residual), f("weight", weight), f("bias", bias), f("sum_out", sum_out);
    f("out", out), f("mean", mean), f("rstd", rstd), f("eps", eps);
  }
};

// Gradients of AddLayerNormFwdParams given the saved sum s: grad_x (of x and residual, grad_sum added when
// present), and grad_weight, grad_bias (fp32, contiguous; both present or both absent).
struct AddLayerNormBwdParams {
  Tensor grad_out, grad_sum, s, weight, mean, rstd, grad_x, grad_weight, grad_bias;
  Tensor partial;  // CUDA only: (blocks, 2, D) fp32 contiguous scratch for the per-block parameter-gradient sums
                   // when grad_weight is present (its first dim sets the number of blocks); absent on the CPU
  template <class F>
  void fields(F&& f) {
    f("grad_out", grad_out), f("grad_sum", grad_sum), f("s", s), f("weight", weight), f("mean", mean);
    f("rstd", rstd), f("grad_x", grad_x), f("grad_weight", grad_weight), f("grad_bias", grad_bias);
    f("partial", partial);
  }
};

// CUDA (csrc/cuda/fused.cu): a cudaError_t, 0 on success.
int bias_gelu_fwd_cuda(const BiasGeluFwdParams& p, uintptr_t stream);
int bias_gelu_bwd_cuda(const BiasGeluBwdParams& p, uintptr_t stream);
int add_layer_norm_fwd_cuda(const AddLayerNormFwdParams& p, uintptr_t stream);
int add_layer_norm_bwd_cuda(const AddLayerNormBwdParams& p, uintptr_t stream);

}  // namespace mmkern

#if defined(MMKERN_CPU_NS)  // CPU (csrc/cpu/fused.cpp, once per ISA level)
MMKERN_CPU_BEGIN
void bias_gelu_fwd_cpu(const BiasGeluFwdParams& p, int num_threads);
void bias_gelu_bwd_cpu(const BiasGeluBwdParams& p, int num_threads);
void add_layer_norm_fwd_cpu(const AddLayerNormFwdParams& p, int num_threads);
void add_layer_norm_bwd_cpu(const AddLayerNormBwdParams& p, int num_threads);
MMKERN_CPU_END
#endif
