// RMSNorm with an optional residual add, torch-free: the entry points of every backend (declared once here, so the
// compiler checks each definition against them), their named parameters, and the row math the CPU and CUDA
// kernels share.
//
//   s = x + residual (rounded to the storage dtype, as the unfused add would be), or s = x without a residual
//   rstd = 1 / sqrt(mean(s²) + eps)            (per row, fp32, saved for the backward)
//   out = s · rstd · weight
//
// Backward, with x̂ = s·rstd and g = grad_out·weight:
//   grad_x = grad_residual = grad_sum + rstd·(g - x̂·mean(g·x̂)),   grad_weight = Σ_rows grad_out·x̂   (fp32)
#pragma once

#include <cmath>
#include <cstdint>

#include "mmkern/common.h"

namespace mmkern {

// ---- Entry points (the convention: see the top of csrc/bindings.cpp) ----
// Tensors are 2-D (rows, D) views but weight / rstd; an absent optional tensor is !present.

// s = x + residual (into sum_out; both absent without a residual), out = s · rstd · weight, rstd fp32 (rows,) for
// the backward (absent for inference).
struct RmsNormFwdParams {
  Tensor x, residual;   // any strides
  Tensor weight;        // (D,), or absent (ones)
  Tensor sum_out, out;  // unit column stride
  Tensor rstd;          // or absent
  double eps = 0;
  template <class F>
  void fields(F&& f) {
    f("x", x), f("residual", residual), f("weight", weight), f("sum_out", sum_out), f("out", out);
    f("rstd", rstd), f("eps", eps);
  }
};

// Gradients of RmsNormFwdParams given the normalised input s (sum_out of the forward, or x) and rstd: grad_x (of x
// and residual, grad_sum added when present; unit column stride) and grad_weight (fp32 (D,), when present). CUDA
// only: `partial`, (warps, D) fp32 contiguous scratch for the per-warp weight-gradient partials when grad_weight is
// present (its first dim sets the number of warps); absent on the CPU.
struct RmsNormBwdParams {
  Tensor grad_out, grad_sum, s, weight, rstd, grad_x, grad_weight, partial;
  template <class F>
  void fields(F&& f) {
    f("grad_out", grad_out), f("grad_sum", grad_sum), f("s", s), f("weight", weight), f("rstd", rstd);
    f("grad_x", grad_x), f("grad_weight", grad_weight), f("partial", partial);
  }
};

// CUDA (csrc/cuda/rms_norm.cu): a cudaError_t, 0 on success.
int rms_norm_fwd_cuda(const RmsNormFwdParams& p, uintptr_t stream);
int rms_norm_bwd_cuda(const RmsNormBwdParams& p, uintptr_t stream);

// 1 / sqrt(mean(s²) + eps) from Σ s² over a row of d > 0 elements.
MMK_HD float rms_rstd(float sum_sq, int64_t d, float eps) {
  return 1.0f / sqrtf(sum_sq / static_cast<float>(d) + eps);
}

// The shape checks every backend makes (ValueError through pybind11 on the host).
inline void check_rms_norm(const RmsNormFwdParams& p) {
  check_dims(p.x, 2, "x");
  check_dims(p.out, 2, "out");
  const int64_t rows = p.x.size(0), d = p.x.size(1);
  check(!p.residual.present || (p.residual.ndim == 2 && p.residual.size(0) == rows && p.residual.size(1) == d),
        "residual: shape differs from x");
  check(p.residual.present == p.sum_out.present, "sum_out: given exactly when residual is");
  check(!p.sum_out.present || (p.sum_out.ndim == 2 && p.sum_out.size(0) == rows && p.sum_out.size(1) == d &&
                               p.sum_out.stride(1) == 1),
        "sum_out: expected (rows, D), unit stride");
  check(!p.weight.present || (p.weight.ndim == 1 && p.weight.size(0) == d), "weight: expected (D,)");
  check(!p.rstd.present || (p.rstd.dtype == DType::f32 && p.rstd.ndim == 1 && p.rstd.size(0) == rows),
        "rstd: expected fp32 (rows,)");
  check(p.out.size(0) == rows && p.out.size(1) == d && p.out.stride(1) == 1, "out: expected (rows, D), unit stride");
}

inline void check_rms_norm(const RmsNormBwdParams& p) {
  check_dims(p.s, 2, "s");
  check_dims(p.grad_out, 2, "grad_out");
  check_dims(p.grad_x, 2, "grad_x");
  const int64_t rows = p.s.size(0), d = p.s.size(1);
  check(p.grad_out.size(0) == rows && p.grad_out.size(1) == d, "grad_out: shape differs from s");
  check(!p.grad_sum.present || (p.grad_sum.ndim == 2 && p.grad_sum.size(0) == rows && p.grad_sum.size(1) == d),
        "grad_sum: shape differs from s");
  check(p.grad_x.size(0) == rows && p.grad_x.size(1) == d && p.grad_x.stride(1) == 1,
        "grad_x: expected (rows, D), unit stride");
  check(!p.weight.present || (p.weight.ndim == 1 && p.weight.size(0) == d), "weight: expected (D,)");
  check(p.rstd.present && p.rstd.dtype == DType::f32 && p.rstd.size(0) == rows, "rstd: expected fp32 (rows,)");
  check(!p.grad_weight.present || (p.grad_weight.dtype == DType::f32 && p.grad_weight.size(0) == d),
        "grad_weight: expected fp32 (D,)");
}

}  // namespace mmkern

#if defined(MMKERN_CPU_NS)  // CPU (csrc/cpu/rms_norm.cpp, once per ISA level)
MMKERN_CPU_BEGIN
void rms_norm_fwd_cpu(const RmsNormFwdParams& p, int num_threads);
void rms_norm_bwd_cpu(const RmsNormBwdParams& p, int num_threads);
MMKERN_CPU_END
#endif
