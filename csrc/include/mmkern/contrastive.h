// Math shared by the CPU and CUDA contrastive-loss kernels (host and device).
//
// A kernel sees logits z_ij = s * d_ij + b with d_ij = x_i . y_j and never stores them. Per row i (and per
// column j for the symmetric CLIP loss) it keeps a running state of the softmax over the tiles seen so far:
//   m = running max of z,  l = sum exp(z - m),  e = sum exp(z - m) * d
// so that LSE = m + log(l) and dLSE/ds = e / l (the softmax-weighted mean of d) come out together; the
// second one gives the logit-scale gradient without another pass. For the sigmoid (SigLIP) loss the state
// is plain sums: softplus(z), sigmoid(z) * d and sigmoid(z), with z negated for the positives of the
// diagonal (softplus(-z)), so that no positive term is subtracted afterwards. With `diagonal` the softmax
// statistics leave the positive pairs (i, i) out (LSE over the negatives, and G = 0 there): the caller adds
// the positive as softplus(LSE_neg - z_ii), which is never negative and has no cancellation at s = 100.
#pragma once

#include <math.h>

#include "mmkern/common.h"

namespace mmkern {

// ---- Entry points (the convention: see the top of csrc/bindings.cpp) ----

// The logits every contrastive kernel sees: z_ij = s x_i . y_j + b.
struct ContrastiveParams {
  Tensor x, y;         // (B, D), (K, D) features
  Tensor scale_bias;   // fp32 (2,) [s, b]; device memory on CUDA, read there (no host sync)
  int mode = 0;        // contrastive::Mode
  bool diagonal = false;  // the positives (i, i) are left out of the softmax statistics
  template <class F>
  void fields(F&& f) {
    f("x", x), f("y", y), f("scale_bias", scale_bias), f("mode", mode), f("diagonal", diagonal);
  }
};

// The statistics: row_stats (3, B) and, for kRowsCols, col_stats (2, K) fp32 (else absent); see kRowPlanes.
struct ContrastiveFwdParams : ContrastiveParams {
  Tensor row_stats, col_stats;
  template <class F>
  void fields(F&& f) {
    ContrastiveParams::fields(f);
    f("row_stats", row_stats), f("col_stats", col_stats);
  }
};

// dx (B, D) = G y and dy (K, D) = G^T x (fp32, contiguous) for G_ij = gr_i d(row stat i)/dz_ij + gc_j d(col stat
// j)/dz_ij (grad_logit); row_lse (B,), col_lse (K,): plane 0 of the statistics; gr (B,), gc (K,) fp32. The column
// tensors are absent unless mode is kRowsCols.
struct ContrastiveBwdParams : ContrastiveParams {
  Tensor row_lse, col_lse, gr, gc, dx, dy;
  template <class F>
  void fields(F&& f) {
    ContrastiveParams::fields(f);
    f("row_lse", row_lse), f("col_lse", col_lse), f("gr", gr), f("gc", gc), f("dx", dx), f("dy", dy);
  }
};

// The forward's statistics and the unit-weight gradients (gr = gc = 1) in one call (CPU only).
struct ContrastiveFusedParams : ContrastiveParams {
  Tensor row_stats, col_stats, dx, dy;
  template <class F>
  void fields(F&& f) {
    ContrastiveParams::fields(f);
    f("row_stats", row_stats), f("col_stats", col_stats), f("dx", dx), f("dy", dy);
  }
};

// CUDA (csrc/cuda/contrastive.cu): a cudaError_t, 0 on success.
int contrastive_fwd_cuda(const ContrastiveFwdParams& p, uintptr_t stream);
int contrastive_bwd_cuda(const ContrastiveBwdParams& p, uintptr_t stream);

}  // namespace mmkern

#if defined(MMKERN_CPU_NS)  // CPU (csrc/cpu/contrastive.cpp, once per ISA level)
MMKERN_CPU_BEGIN
void contrastive_fwd_cpu(const ContrastiveFwdParams& p, int num_threads);
void contrastive_bwd_cpu(const ContrastiveBwdParams& p, int num_threads);
void contrastive_fused_cpu(const ContrastiveFusedParams& p, int num_threads);
MMKERN_CPU_END
#endif

namespace mmkern::contrastive {

// Which statistics a kernel keeps: row softmax only (InfoNCE), row and column softmax (CLIP), or row sums
// of the sigmoid loss (SigLIP). Must match mmkern/ops/contrastive.py.
enum Mode : int { kRows = 0, kRowsCols = 1, kSigmoid = 2 };

inline void check_scale_bias(const Tensor& sb) {
  check(sb.present && sb.dtype == DType::f32 && sb.ndim == 1 && sb.size(0) == 2 && sb.stride(0) == 1,
        "scale_bias: expected contiguous fp32 (2,)");
}

// Row statistics are stored as 3 planes of length n (value, d/ds, d/db), column statistics as 2 planes.
constexpr int kRowPlanes = 3;
constexpr int kColPlanes = 2;

struct SoftmaxState {
  float m, l, e;
};

MMK_HD SoftmaxState softmax_init() { return SoftmaxState{-INFINITY, 0.f, 0.f}; }

// Merges a partial state (m2, l2, e2) into s. A NaN max propagates (the comparison picks it), and two
// empty states (both -inf) stay empty instead of producing exp(-inf + inf) = NaN.
MMK_HD void softmax_merge(SoftmaxState& s, float m2, float l2, float e2) {
  const float m = s.m > m2 ? s.m : m2;
  if (m == -INFINITY) return;
  const float a = expf(s.m - m), b = expf(m2 - m);
  s.l = s.l * a + l2 * b;
  s.e = s.e * a + e2 * b;
  s.m = m;
}

MMK_HD float softmax_lse(const SoftmaxState& s) { return s.m + logf(s.l); }
MMK_HD float softmax_mean_d(const SoftmaxState& s) { return s.l == 0.f ? 0.f : s.e / s.l; }  // 0: no term

// log(1 + exp(z)) without overflow; NaN in, NaN out.
MMK_HD float softplus(float z) { return (z > 0.f ? z : 0.f) + log1pf(expf(-fabsf(z))); }
MMK_HD float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }
// d softplus(±z)/dz for a SigLIP negative (sigmoid(z)) or positive (-sigmoid(-z), no cancellation near 1).
MMK_HD float sigmoid_grad(float z, bool positive) { return positive ? -sigmoid(-z) : sigmoid(z); }

// dL/dz_ij for backward: row weight gr_i times d(row stat)/dz_ij plus column weight gc_j times
// d(col stat)/dz_ij. Softmax: P_ij = exp(z - lse_row_i), Q_ij = exp(z - lse_col_j). Sigmoid: see above.
MMK_HD float grad_logit(int mode, bool positive, float z, float row_lse, float gr, float col_lse, float gc) {
  if (mode == kSigmoid) return gr * sigmoid_grad(z, positive);
  if (positive) return 0.f;  // a softmax positive left out of the statistics: the caller adds its term
  float g = gr * expf(z - row_lse);
  if (mode == kRowsCols) g += gc * expf(z - col_lse);
  return g;
}

}  // namespace mmkern::contrastive
