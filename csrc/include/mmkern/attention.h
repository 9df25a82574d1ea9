// Attention math shared by the CPU and CUDA kernels (and mirrored line by line in the Triton kernel):
// which (query, key) pairs are visible, block skipping, the online-softmax guards and the dropout RNG.
//
// Visibility: causal masking is aligned top-left as in torch's SDPA (query i sees keys j <= i, also when
// L != S). A window (left, right) keeps keys in [i - left, i + right]; the first `num_global` queries and
// keys ignore the window (they see and are seen by every position) but never the causal mask.
#pragma once

#include <cmath>
#include <cstdint>

#include "mmkern/common.h"

namespace mmkern {

// ---- Entry points (the convention: see the top of csrc/bindings.cpp) ----
// Dense tensors are (B, H, T, D) views, any strides; packed (varlen) ones (total, H, D) with sequence b at rows
// cu[b]:cu[b+1]. Query heads are a multiple of key heads (grouped-query attention).

// out = softmax(scale q k^T + mask, visibility, dropout) v, and the row statistics lse.
struct AttentionFwdParams {
  Tensor q, k, v;
  Tensor mask;        // dense only: a (B, H, L, S) view, bool (true = visible) or fp32 (added); or absent
  Tensor cu_q, cu_k;  // packed: int32 (B + 1,) sequence offsets (device memory on CUDA); dense: absent
  Tensor out;         // like q with v's head dim
  Tensor lse;         // fp32 (m, log l) pairs: dense (B, H, L, 2), packed (H, total_q, 2); see row_stat_max
  int64_t max_len_q = 0, max_len_k = 0;  // the sequence lengths (dense) or their bound (packed)
  double scale = 1;
  bool causal = false;
  bool windowed = false;                    // keys [i - left, i + right] only, but for the first num_global
  int64_t left = 0, right = 0, num_global = 0;  // clamped by Python to the sequence lengths
  double dropout_p = 0;  // CPU only (the CUDA kernels have none)
  int64_t seed = 0;      // of the dropout mask (dropout_keep)
  template <class F>
  void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), f("mask", mask), f("cu_q", cu_q), f("cu_k", cu_k), f("out", out);
    f("lse", lse), f("max_len_q", max_len_q), f("max_len_k", max_len_k), f("scale", scale), f("causal", causal);
    f("windowed", windowed), f("left", left), f("right", right), f("num_global", num_global);
    f("dropout_p", dropout_p), f("seed", seed);
  }
};

// dq, dk, dv (like q, k, v) from grad_out, the forward's tensors and its out and lse; dmask (fp32, like mask)
// when present gets dS, the gradient of the scores.
struct AttentionBwdParams : AttentionFwdParams {
  Tensor grad_out, dq, dk, dv, dmask;
  Tensor delta;  // CUDA's workspace, fp32 laid out like lse; absent on the CPU
  template <class F>
  void fields(F&& f) {
    AttentionFwdParams::fields(f);
    f("grad_out", grad_out), f("dq", dq), f("dk", dk), f("dv", dv), f("dmask", dmask), f("delta", delta);
  }
};

// The dropout keep-mask (B, H, L, S) (bool, contiguous) that the kernels draw for `seed`.
struct AttentionDropoutMaskParams {
  Tensor keep;
  double dropout_p = 0;
  int64_t seed = 0;
  template <class F>
  void fields(F&& f) {
    f("keep", keep), f("dropout_p", dropout_p), f("seed", seed);
  }
};

// CUDA (csrc/cuda/attention.cu): a cudaError_t, 0 on success.
int attention_fwd_cuda(const AttentionFwdParams& p, uintptr_t stream);
int attention_bwd_cuda(const AttentionBwdParams& p, uintptr_t stream);

}  // namespace mmkern

#if defined(MMKERN_CPU_NS)  // CPU (csrc/cpu/attention.cpp, once per ISA level)
MMKERN_CPU_BEGIN
void attention_fwd_cpu(const AttentionFwdParams& p, int num_threads);
void attention_bwd_cpu(const AttentionBwdParams& p, int num_threads);
void attention_dropout_mask_cpu(const AttentionDropoutMaskParams& p, int num_threads);
MMKERN_CPU_END
#endif

namespace mmkern::attn {

struct Visibility {
  bool causal = false;
  bool windowed = false;
  int64_t left = 0, right = 0, num_global = 0;  // left/right clamped by Python to the sequence lengths
};

MMK_HD bool visible(const Visibility& v, int64_t i, int64_t j) {
  if (v.causal && j > i) return false;
  if (!v.windowed) return true;
  return (j >= i - v.left && j <= i + v.right) || i < v.num_global || j < v.num_global;
}

// False only if no pair of queries [i0, i1) x keys [j0, j1) is visible: such key blocks are skipped, so
// cost grows as L * window for local attention and halves for causal attention.
MMK_HD bool block_any_visible(const Visibility& v, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (v.causal && j0 > i1 - 1) return false;
  if (!v.windowed || i0 < v.num_global || j0 < v.num_global) return true;
  return j1 - 1 >= i0 - v.left && j0 <= i1 - 1 + v.right;
}

// True if every pair of the block is visible, so the kernels may skip the per-element test.
MMK_HD bool block_all_visible(const Visibility& v, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (v.causal && j1 - 1 > i0) return false;
  if (!v.windowed) return true;
  return j0 >= i1 - 1 - v.left && j1 - 1 <= i0 + v.right;
}

// Online softmax: the running max used as the exponent shift. A row that has seen only -inf scores so far
// shifts by 0, so exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN.
MMK_HD float softmax_shift(float running_max) { return running_max == -INFINITY ? 0.f : running_max; }

// Row statistics stored for the backward pass: the log-sum-exp as the pair (m, log l), m the row's max and l
// its sum of exp(s - m), adjacent in the lse tensor (..., 2). Kept apart, not summed: once |m| >= 2^24 (a row
// filled by a -1e10 or finfo.min float mask) the rounding of m + log l drops log l, and exp(s - lse) is off by
// the factor l. A row that sees no key stores (+inf, 0), so the recomputed probabilities row_prob are 0 and the
// row's output and gradients are 0, never NaN.
MMK_HD float row_stat_max(float running_max, float sum) { return sum == 0.f ? INFINITY : running_max; }
MMK_HD float row_stat_log_sum(float sum) { return sum == 0.f ? 0.f : logf(sum); }
MMK_HD float row_inv_sum(float sum) { return sum == 0.f ? 0.f : 1.f / sum; }

// Probability of score s from the row statistics: s - m first, which is exact for the scores that matter
// (Sterbenz) whatever the size of m; -inf scores and rows that see no key give 0.
MMK_HD float row_prob(float s, float m, float log_sum) {
#if defined(__CUDA_ARCH__)
  return __expf((s - m) - log_sum);
#else
  return expf((s - m) - log_sum);
#endif
}

// Dropout: one Philox-4x32-10 draw (Salmon et al., Random123) per (batch*head, query, key) element, keyed by
// a 64-bit seed, so every backend and the backward pass regenerate the same keep-mask without storing it.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

MMK_HD uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c0;
}

// True if element (bh, i, j) is kept. The top 24 bits give a uniform u in [0, 1) exactly representable in
// fp32, so every backend makes the same comparison u >= p.
MMK_HD bool dropout_keep(uint64_t seed, int64_t bh, int64_t i, int64_t j, float p) {
  const uint32_t r = philox_first_word(static_cast<uint32_t>(j), static_cast<uint32_t>(i), static_cast<uint32_t>(bh),
                                       0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(r >> 8) * (1.0f / 16777216.0f) >= p;
}

// Problem description shared by every kernel. Dense tensors are (B, H, T, D); packed (varlen) tensors
// are (total, H, D) with sequence b at rows cu[b]:cu[b+1] (then the batch stride is 0).
struct Problem {
  int64_t batch, heads_q, heads_k, dim, dim_v, max_len_q, max_len_k;
  const int32_t* cu_q = nullptr;  // null for dense inputs
  const int32_t* cu_k = nullptr;
  float scale;
  Visibility vis;
  float dropout_p = 0.f;
  uint64_t seed = 0;

  MMK_HD int64_t q_start(int64_t b) const { return cu_q ? cu_q[b] : 0; }
  MMK_HD int64_t k_start(int64_t b) const { return cu_k ? cu_k[b] : 0; }
  MMK_HD int64_t len_q(int64_t b) const { return cu_q ? cu_q[b + 1] - cu_q[b] : max_len_q; }
  MMK_HD int64_t len_k(int64_t b) const { return cu_k ? cu_k[b + 1] - cu_k[b] : max_len_k; }
};

// The problem both launchers (cpu, cuda) describe from the call's parameters (host only). Checks shapes and
// dtypes; the contents of cu_seqlens, device memory on CUDA, are left to the caller.
inline Problem make_problem(const AttentionFwdParams& p) {
  const Tensor &q = p.q, &k = p.k, &v = p.v, &cu_q = p.cu_q, &cu_k = p.cu_k;
  const bool packed = cu_q.present;
  check(q.ndim == (packed ? 3 : 4), "query: expected (B, H, L, D) or packed (total, H, D)");
  check(k.ndim == q.ndim && v.ndim == q.ndim, "key/value: rank differs from query");
  check(q.dtype == k.dtype && q.dtype == v.dtype, "key/value: dtype differs from query");
  Problem pb;
  pb.heads_q = q.size(1);
  pb.heads_k = k.size(1);
  check(pb.heads_k > 0 && pb.heads_q % pb.heads_k == 0, "key: query heads must be a multiple of key heads");
  pb.dim = q.size(-1);
  pb.dim_v = v.size(-1);
  check(k.size(-1) == pb.dim, "key: head dim differs from query");
  check(pb.dim <= 256 && pb.dim_v <= 256, "query: head dims above 256 are not supported");
  if (packed) {
    check(cu_q.dtype == DType::i32 && cu_k.present && cu_k.dtype == DType::i32, "cu_seqlens: expected int32");
    check(cu_q.size(0) == cu_k.size(0) && cu_q.size(0) >= 1, "cu_seqlens_k: length differs from cu_seqlens_q");
    pb.batch = cu_q.size(0) - 1;
    pb.cu_q = cu_q.ptr<int32_t>();
    pb.cu_k = cu_k.ptr<int32_t>();
  } else {
    pb.batch = q.size(0);
    check(k.size(0) == pb.batch && v.size(0) == pb.batch, "key: batch differs from query");
    check(v.size(2) == k.size(2), "value: length differs from key");
  }
  pb.max_len_q = p.max_len_q;
  pb.max_len_k = p.max_len_k;
  pb.scale = static_cast<float>(p.scale);
  pb.vis.causal = p.causal;
  pb.vis.windowed = p.windowed;
  pb.vis.left = p.left;
  pb.vis.right = p.right;
  pb.vis.num_global = p.num_global;
  pb.dropout_p = static_cast<float>(p.dropout_p);
  pb.seed = static_cast<uint64_t>(p.seed);
  return pb;
}

// Element (b, h, t, d) of a dense (B, H, T, D) or packed (total, H, D) tensor, t relative to the sequence.
struct Layout {
  int64_t sb = 0, sh = 0, st = 0, sd = 0;
  MMK_HD int64_t offset(int64_t b, int64_t h, int64_t t, int64_t d) const { return b * sb + h * sh + t * st + d * sd; }
};

inline Layout layout_of(const Tensor& t) {
  if (!t.present) return {};
  if (t.ndim == 3) return {0, t.stride(1), t.stride(0), t.stride(2)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Rows of the statistics (row_stat_max; and of the CUDA delta): dense (B, H, L, 2), packed (H, total_q, 2).
inline Layout row_layout_of(const Tensor& t, bool packed) {
  check(t.dtype == DType::f32 && t.ndim == (packed ? 3 : 4) && t.size(-1) == 2 && t.stride(-1) == 1,
        "lse: expected fp32 (B, H, L, 2) or packed (H, total, 2) with adjacent pairs");
  if (packed) return {0, t.stride(0), t.stride(1), 0};
  return {t.stride(0), t.stride(1), t.stride(2), 0};
}

// The forward's tensors as both launchers' kernels read them: the problem, data pointers and layouts.
struct Operands {
  Problem pb;
  const void *q, *k, *v, *o;
  const void* mask;  // (B, Hq, L, S) view, bool or fp32, or null
  bool mask_bool;
  float* lse;  // (m, log l) pairs, rows laid out by lrow
  Layout lq, lk, lv, lo, lrow, lmask;
};

inline Operands make_operands(const AttentionFwdParams& p) {
  const bool packed = p.cu_q.present;
  check(p.q.dtype == p.out.dtype, "out: dtype differs from query");
  Operands o{};
  o.pb = make_problem(p);
  o.q = p.q.data;
  o.k = p.k.data;
  o.v = p.v.data;
  o.o = p.out.data;
  o.lq = layout_of(p.q);
  o.lk = layout_of(p.k);
  o.lv = layout_of(p.v);
  o.lo = layout_of(p.out);
  o.lrow = row_layout_of(p.lse, packed);
  o.lse = p.lse.ptr<float>();
  if (p.mask.present) {
    check(!packed && p.mask.ndim == 4, "attn_mask: expected a (B, H, L, S) view");
    check(p.mask.dtype == DType::b8 || p.mask.dtype == DType::f32, "attn_mask: expected bool or float32");
    o.mask = p.mask.data;
    o.mask_bool = p.mask.dtype == DType::b8;
    o.lmask = layout_of(p.mask);
  }
  return o;
}

}  // namespace mmkern::attn
