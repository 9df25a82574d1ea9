// Fused attention on the CPU: blocked online softmax (forward) and tile recomputation (backward).
//
// Forward, per task (batch, head, block of kBM queries):  S = (scale Q) K^T tile by tile (kBN keys), the
// running max m and sum l per row, acc = sum P V rescaled when m grows; out = acc / l, lse = m + log l.
// Backward recomputes P = exp(S - lse) per tile:  dV += (P o Z)^T dO,  dS = P o (Z o dO V^T - delta) with
// delta = rowsum(dO o O) and Z the dropout scale,  dK += dS^T (scale Q),  dQ += scale dS K.
//
// K and V are packed once per call into the GEMM B-panel layout of cpu_gemm.h (extra memory the size of K
// and V: O(L)); every tile product is then one micro-kernel sweep whose A operand (Q, dO, P, P^T, dS,
// dS^T) is read in place by micro_kernel_a, so no tile is ever packed or transposed. Parallelism: the forward runs over
// batch x heads x query blocks. The backward runs over batch x kv-heads with a private dQ tile when that
// gives every thread several tasks; otherwise it runs in two passes, over key blocks (dK, dV) and over
// query blocks (dQ), recomputing the tile products once more but keeping all threads busy (ATen
// parallelises its backward over batch x heads only). Each output element is written by one task in a
// fixed order, so the backward is deterministic.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "mmkern/attention.h"
#include "mmkern/common.h"
#include "mmkern/cpu_gemm.h"

namespace mmkern {

namespace {

using attn::Layout;
using attn::Problem;

constexpr int64_t kBM = 64;   // queries per block: the S tile (kBM x kBN fp32, 32 KiB) stays in L1/L2
constexpr int64_t kBN = 128;  // keys per block: a multiple of cpu::kNR

// exp for the softmax loops, written on GCC vector types so that it runs 16 lanes wide (the compiler does
// not vectorise the reductions around it without -ffast-math): |relative error| < 2e-7, exactly 0 for
// x < -87 (also for -inf), NaN stays NaN. The scalar twin below handles row tails with the same formula.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

template <typename V, typename I>
inline V exp_poly(V x) {
  const V xc = x < -87.f ? V{} - 87.f : (x > 88.f ? V{} + 88.f : x);
  const V n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest via 1.5 * 2^23
  const V r = xc - n * 0.693145751953125f - n * 1.42860682030941723e-06f;
  V p = V{} + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p;
}

inline vf16 exp16(vf16 x) {
  const vf16 xc = x < -87.f ? vf16{} - 87.f : (x > 88.f ? vf16{} + 88.f : x);
  const vf16 n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  vf16 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const vf16 y = exp_poly<vf16, vi16>(x) * scale;
  return x < -87.f ? vf16{} : (x != x ? x : y);
}

inline float fast_exp(float x) {
  const float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = xc - n * 0.693145751953125f - n * 1.42860682030941723e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float y = p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.f ? 0.f : (x != x ? x : y);
}

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

// Horizontal max / sum of 16 lanes as a halving tree (4 vector steps instead of 16 scalar ones).
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
template <bool kMax>
inline float reduce16(vf16 x) {
  auto op = [](auto u, auto v) { return kMax ? (u > v ? u : v) : u + v; };
  const vf8 a = op(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  const vf4 c = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  const float lo = kMax ? std::max(c[0], c[2]) : c[0] + c[2], hi = kMax ? std::max(c[1], c[3]) : c[1] + c[3];
  return kMax ? std::max(lo, hi) : lo + hi;
}

inline float row_max(const float* row, int64_t n) {
  vf16 m = vf16{} - INFINITY;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const vf16 x = load16(row + j);
    m = x > m ? x : m;
  }
  float mx = reduce16<true>(m);
  for (; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  return mx;
}

// row[j] = exp(row[j] - shift); returns the sum.
inline float exp_row(float* row, int64_t n, float shift) {
  vf16 s = vf16{};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const vf16 p = exp16(load16(row + j) - shift);
    store16(row + j, p);
    s += p;
  }
  float sum = reduce16<false>(s);
  for (; j < n; ++j) {
    row[j] = fast_exp(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

// C (kMR x kNR tile, row stride ldc) (+)= A B where A is read in place and B is a packed kNR-wide panel:
// a(i, k) = A[i * lda + k], or A[k * lda + i] when kTrans (A given as its transpose, e.g. P^T from the
// row-major P tile). The A values are broadcast from memory anyway, so reading them from mr rows (or one
// row of 8 columns) costs the same as a packed panel, and no operand is ever copied or transposed. Rows
// i >= mr of the tile reuse row 0 (in bounds; their results are discarded).
template <bool kTrans>
inline void micro_kernel_a(int64_t K, const float* A, int64_t lda, const float* __restrict__ Bp, float* C,
                           int64_t ldc, int mr, int nr, bool accumulate) {
  vf16 c0[cpu::kMR], c1[cpu::kMR];
  for (int i = 0; i < cpu::kMR; ++i) c0[i] = c1[i] = vf16{};
  const float* a[cpu::kMR];
  int64_t col[cpu::kMR];
  for (int i = 0; i < cpu::kMR; ++i) {
    a[i] = A + (i < mr ? i : 0) * lda;
    col[i] = i < mr ? i : 0;
  }
  for (int64_t k = 0; k < K; ++k) {
    const vf16 b0 = load16(Bp + k * cpu::kNR), b1 = load16(Bp + k * cpu::kNR + 16);
    const float* ak = A + k * lda;
#pragma GCC unroll 8
    for (int i = 0; i < cpu::kMR; ++i) {
      const float x = kTrans ? ak[col[i]] : a[i][k];
      c0[i] += x * b0;
      c1[i] += x * b1;
    }
  }
  if (nr == cpu::kNR) {
    for (int i = 0; i < mr; ++i) {
      float* row = C + i * ldc;
      store16(row, accumulate ? load16(row) + c0[i] : c0[i]);
      store16(row + 16, accumulate ? load16(row + 16) + c1[i] : c1[i]);
    }
    return;
  }
  for (int i = 0; i < mr; ++i) {
    float* row = C + i * ldc;
    for (int j = 0; j < nr; ++j) {
      const float v = j < 16 ? c0[i][j] : c1[i][j - 16];
      row[j] = accumulate ? row[j] + v : v;
    }
  }
}

// C (M x N, row stride ldc) (+)= A B: A (M x K) read in place with row stride lda (kTrans: A^T is given,
// K x M with row stride lda); B packed by pack_b_all (K <= kKC).
template <bool kTrans = false>
inline void gemm_a(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, float* C,
                   int64_t ldc, bool accumulate) {
  for (int64_t i0 = 0; i0 < M; i0 += cpu::kMR)
    for (int64_t j0 = 0; j0 < N; j0 += cpu::kNR)
      micro_kernel_a<kTrans>(K, kTrans ? A + i0 : A + i0 * lda, lda, Bp + j0 * K, C + i0 * ldc + j0, ldc,
                             static_cast<int>(std::min<int64_t>(cpu::kMR, M - i0)),
                             static_cast<int>(std::min<int64_t>(cpu::kNR, N - j0)), accumulate);
}

// Packs rows x cols of a strided array (row stride st, column stride sd) as B panels (cpu::pack_b_all
// layout, rows <= kKC), with a unit-stride copy loop for the common layout.
template <typename T>
void pack_rows_b(const T* src, int64_t st, int64_t sd, int64_t rows, int64_t cols, float* dst) {
  for (int64_t j0 = 0; j0 < cols; j0 += cpu::kNR) {
    const int64_t nr = std::min<int64_t>(cpu::kNR, cols - j0);
    float* panel = dst + j0 * rows;
    for (int64_t k = 0; k < rows; ++k) {
      const T* s = src + k * st + j0 * sd;
      float* d = panel + k * cpu::kNR;
      if (sd == 1) {
        for (int64_t j = 0; j < nr; ++j) d[j] = to_float(s[j]);
      } else {
        for (int64_t j = 0; j < nr; ++j) d[j] = to_float(s[j * sd]);
      }
      for (int64_t j = nr; j < cpu::kNR; ++j) d[j] = 0.f;
    }
  }
}

// Everything a kernel needs about one call.
struct Call {
  Problem pb;
  const void *q, *k, *v, *o, *go;
  Layout lq, lk, lv, lo, lgo, lrow, lmask, ldmask;
  const void* mask = nullptr;  // (B, Hq, L, S) view, bool or fp32
  bool mask_bool = false;
  float* dmask = nullptr;  // (B, Hq, L, S) fp32 contiguous, or null
  float* lse = nullptr;
  std::vector<int64_t> kblock_base;  // key blocks before sequence b (for the packed K/V arrays)
  int64_t num_kblocks = 0, num_qblocks_max = 0;
  int64_t d_pad = 0, dv_pad = 0;

  void init_blocks() {
    kblock_base.resize(pb.batch + 1);
    kblock_base[0] = 0;
    for (int64_t b = 0; b < pb.batch; ++b) kblock_base[b + 1] = kblock_base[b] + (pb.len_k(b) + kBN - 1) / kBN;
    num_kblocks = kblock_base[pb.batch];
    num_qblocks_max = (pb.max_len_q + kBM - 1) / kBM;
    d_pad = cpu::round_up(pb.dim, cpu::kNR);
    dv_pad = cpu::round_up(pb.dim_v, cpu::kNR);
  }
  int64_t lrow_offset(int64_t b, int64_t h, int64_t i) const { return lrow.offset(b, h, pb.q_start(b) + i, 0); }
};

// Score tile post-processing: add the float mask / apply the bool mask and the structural visibility.
template <bool kFloatMask>
inline void mask_row(const Call& c, int64_t b, int64_t h, int64_t qi, int64_t k0, int64_t bn, bool all_visible,
                     float* row) {
  if (c.mask) {
    const int64_t base = c.lmask.offset(b, h, qi, 0);
    if (kFloatMask) {
      const float* m = static_cast<const float*>(c.mask) + base;
      for (int64_t j = 0; j < bn; ++j) row[j] += m[(k0 + j) * c.lmask.sd];
    } else {
      const uint8_t* m = static_cast<const uint8_t*>(c.mask) + base;
      for (int64_t j = 0; j < bn; ++j) row[j] = m[(k0 + j) * c.lmask.sd] ? row[j] : -INFINITY;
    }
  }
  if (!all_visible)
    for (int64_t j = 0; j < bn; ++j)
      if (!attn::visible(c.pb.vis, qi, k0 + j)) row[j] = -INFINITY;
}

inline void mask_row_any(const Call& c, int64_t b, int64_t h, int64_t qi, int64_t k0, int64_t bn, bool all_visible,
                         float* row) {
  if (c.mask && !c.mask_bool)
    mask_row<true>(c, b, h, qi, k0, bn, all_visible, row);
  else
    mask_row<false>(c, b, h, qi, k0, bn, all_visible, row);
}

// Packed K^T (D x kBN), K (kBN x D), V (kBN x Dv) and V^T (Dv x kBN) panels per (key block, kv head).
// A float buffer that keeps its memory between calls of one Python thread: packing K and V into fresh
// pages each call cost as much as the score products at ViT sizes (page faults of zero-filled memory).
struct Workspace {
  std::vector<float> data;
  float* get(int64_t n) {
    if (static_cast<int64_t>(data.size()) < n) data.resize(n);
    return data.data();
  }
};

struct Buffer {
  float* p = nullptr;
  float* data() const { return p; }
};

struct PackedKV {
  Buffer kt, kn, vt, v;
  int64_t kt_sz = 0, kn_sz = 0, vt_sz = 0, v_sz = 0;
  const float* at(const Buffer& a, int64_t sz, int64_t blk, int64_t hk, int64_t heads_k) const {
    return a.data() + (blk * heads_k + hk) * sz;
  }
};

// Which packings a pass needs (all as B panels): K^T (scores), V^T (dO V^T), K (dS K), V (P V).
struct KVWant {
  bool kt = false, kn = false, vt = false, v = false;
};

template <typename T>
PackedKV pack_kv(const Call& c, KVWant want, int num_threads) {
  const Problem& pb = c.pb;
  PackedKV p;
  p.kt_sz = pb.dim * kBN;
  p.kn_sz = kBN * c.d_pad;
  p.vt_sz = pb.dim_v * kBN;
  p.v_sz = kBN * c.dv_pad;
  const int64_t n = c.num_kblocks * pb.heads_k;
  thread_local Workspace ws[4];
  if (want.kt) p.kt.p = ws[0].get(n * p.kt_sz);
  if (want.kn) p.kn.p = ws[1].get(n * p.kn_sz);
  if (want.vt) p.vt.p = ws[2].get(n * p.vt_sz);
  if (want.v) p.v.p = ws[3].get(n * p.v_sz);
  const T* K = static_cast<const T*>(c.k);
  const T* V = static_cast<const T*>(c.v);
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
  for (int64_t b = 0; b < pb.batch; ++b) {
    for (int64_t hk = 0; hk < pb.heads_k; ++hk) {
      const int64_t S = pb.len_k(b), s0 = pb.k_start(b);
      for (int64_t kb = 0; kb * kBN < S; ++kb) {
        const int64_t blk = c.kblock_base[b] + kb, j0 = kb * kBN, bn = std::min(kBN, S - j0);
        const T* kbase = K + c.lk.offset(b, hk, s0 + j0, 0);
        const T* vbase = V + c.lv.offset(b, hk, s0 + j0, 0);
        const int64_t kst = c.lk.st, ksd = c.lk.sd, vst = c.lv.st, vsd = c.lv.sd;
        auto k_at = [=](int64_t s, int64_t d) { return to_float(kbase[s * kst + d * ksd]); };
        auto v_at = [=](int64_t s, int64_t d) { return to_float(vbase[s * vst + d * vsd]); };
        auto vt_at = [&](int64_t d, int64_t s) { return v_at(s, d); };
        const int64_t idx = blk * pb.heads_k + hk;
        if (want.kt)
          cpu::pack_b_all([&](int64_t d, int64_t s) { return k_at(s, d); }, pb.dim, bn, p.kt.data() + idx * p.kt_sz);
        if (want.kn) cpu::pack_b_all(k_at, bn, pb.dim, p.kn.data() + idx * p.kn_sz);
        if (want.vt) cpu::pack_b_all(vt_at, pb.dim_v, bn, p.vt.data() + idx * p.vt_sz);
        if (want.v) pack_rows_b(vbase, vst, vsd, bn, pb.dim_v, p.v.data() + idx * p.v_sz);
      }
    }
  }
  return p;
}

// Loads rows [i0, i0 + bm) of the query (times scale) into a contiguous fp32 buffer.
template <typename T>
void load_q(const Call& c, int64_t b, int64_t h, int64_t i0, int64_t bm, float* qs) {
  const T* Q = static_cast<const T*>(c.q) + c.lq.offset(b, h, c.pb.q_start(b) + i0, 0);
  const int64_t st = c.lq.st, sd = c.lq.sd, D = c.pb.dim;
  const float scale = c.pb.scale;
  for (int64_t i = 0; i < bm; ++i) {
    if (sd == 1) {  // the common layout: a unit-stride loop the compiler vectorises
      for (int64_t d = 0; d < D; ++d) qs[i * D + d] = to_float(Q[i * st + d]) * scale;
    } else {
      for (int64_t d = 0; d < D; ++d) qs[i * D + d] = to_float(Q[i * st + d * sd]) * scale;
    }
  }
}

// dst (rows x cols, strides st / sd) = src (row-major fp32), converted to T.
template <typename T>
void store_rows(T* dst, int64_t st, int64_t sd, int64_t rows, int64_t cols, const float* src) {
  for (int64_t i = 0; i < rows; ++i) {
    if (sd == 1) {
      for (int64_t d = 0; d < cols; ++d) dst[i * st + d] = from_float<T>(src[i * cols + d]);
    } else {
      for (int64_t d = 0; d < cols; ++d) dst[i * st + d * sd] = from_float<T>(src[i * cols + d]);
    }
  }
}

template <typename T>
void forward(const Call& c, T* out, int num_threads) {
  const Problem& pb = c.pb;
  KVWant want;
  want.kt = want.v = true;
  const PackedKV kv = pack_kv<T>(c, want, num_threads);
  const int64_t D = pb.dim, Dv = pb.dim_v, group = pb.heads_q / pb.heads_k;
  const float keep_scale = pb.dropout_p > 0.f ? 1.f / (1.f - pb.dropout_p) : 1.f;
  const int64_t tasks = pb.batch * pb.heads_q * c.num_qblocks_max;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> qs(kBM * D), st(kBM * kBN), acc(kBM * Dv), m(kBM), l(kBM);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = task % c.num_qblocks_max, bh = task / c.num_qblocks_max;
      const int64_t b = bh / pb.heads_q, h = bh % pb.heads_q, hk = h / group;
      const int64_t L = pb.len_q(b), S = pb.len_k(b), i0 = qb * kBM;
      if (i0 >= L) continue;
      const int64_t bm = std::min(kBM, L - i0);
      load_q<T>(c, b, h, i0, bm, qs.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t j0 = 0; j0 < S; j0 += kBN) {
        const int64_t bn = std::min(kBN, S - j0);
        if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
        const bool all_visible = attn::block_all_visible(pb.vis, i0, i0 + bm, j0, j0 + bn);
        const int64_t blk = c.kblock_base[b] + j0 / kBN;
        gemm_a(bm, bn, D, qs.data(), D, kv.at(kv.kt, kv.kt_sz, blk, hk, pb.heads_k), st.data(), kBN, false);
        const int64_t bn16 = cpu::round_up(bn, 16);  // -inf padding: whole vectors only, and exp(-inf) = 0
        for (int64_t i = 0; i < bm; ++i) {
          float* row = st.data() + i * kBN;
          if (c.mask || !all_visible) mask_row_any(c, b, h, i0 + i, j0, bn, all_visible, row);
          std::fill(row + bn, row + bn16, -INFINITY);
          const float m_new = std::max(m[i], row_max(row, bn16)), shift = attn::softmax_shift(m_new);
          const float alpha = fast_exp(m[i] - shift);
          const float sum = exp_row(row, bn16, shift);
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
          if (alpha != 1.f)
            for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= alpha;
          if (pb.dropout_p > 0.f)
            for (int64_t j = 0; j < bn; ++j)
              row[j] *= attn::dropout_keep(pb.seed, bh, i0 + i, j0 + j, pb.dropout_p) ? keep_scale : 0.f;
        }
        gemm_a(bm, Dv, bn, st.data(), kBN, kv.at(kv.v, kv.v_sz, blk, hk, pb.heads_k), acc.data(), Dv, true);
      }
      for (int64_t i = 0; i < bm; ++i) {
        const float inv = attn::row_inv_sum(l[i]);
        for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= inv;
        c.lse[c.lrow_offset(b, h, i0 + i)] = attn::row_lse(m[i], l[i]);
      }
      store_rows(out + c.lo.offset(b, h, pb.q_start(b) + i0, 0), c.lo.st, c.lo.sd, bm, Dv, acc.data());
    }
  }
}

// Per-thread buffers of the backward pass and the work on one (query block, key block) tile.
struct BwdScratch {
  std::vector<float> qs, qs_packed, dout, dout_packed, st, dpt, dq_acc, lse, delta;
  BwdScratch(const Call& c)
      : qs(kBM * c.pb.dim), qs_packed(kBM * c.d_pad), dout(kBM * c.pb.dim_v), dout_packed(kBM * c.dv_pad),
        st(kBM * kBN + cpu::kMR), dpt(kBM * kBN + cpu::kMR), dq_acc(kBM * c.pb.dim), lse(kBM), delta(kBM) {}
};

// Loads query block (b, h, i0) and its dO, lse and delta = rowsum(dO o O); packs Q and dO as GEMM B
// operands when dK/dV are wanted.
template <typename T>
void load_query_block(const Call& c, int64_t b, int64_t h, int64_t i0, int64_t bm, bool for_dkdv, BwdScratch& w) {
  const Problem& pb = c.pb;
  load_q<T>(c, b, h, i0, bm, w.qs.data());
  const T* O = static_cast<const T*>(c.o);
  const T* GO = static_cast<const T*>(c.go);
  const int64_t t0 = pb.q_start(b) + i0;
  const T* gbase = GO + c.lgo.offset(b, h, t0, 0);
  const T* obase = O + c.lo.offset(b, h, t0, 0);
  for (int64_t i = 0; i < bm; ++i) {
    float delta = 0.f;
    for (int64_t d = 0; d < pb.dim_v; ++d) {
      const float g = to_float(gbase[i * c.lgo.st + d * c.lgo.sd]);
      w.dout[i * pb.dim_v + d] = g;
      delta += g * to_float(obase[i * c.lo.st + d * c.lo.sd]);
    }
    w.delta[i] = delta;
    w.lse[i] = c.lse[c.lrow_offset(b, h, i0 + i)];
  }
  if (for_dkdv) {
    pack_rows_b(w.qs.data(), pb.dim, 1, bm, pb.dim, w.qs_packed.data());
    pack_rows_b(w.dout.data(), pb.dim_v, 1, bm, pb.dim_v, w.dout_packed.data());
  }
}

// One tile: accumulates into dk/dv (bn x D / bn x Dv, fp32) and/or w.dq_acc, writes dS into dmask.
void backward_tile(const Call& c, const PackedKV& kv, int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0,
                   int64_t bn, float* dk, float* dv, bool want_dq, BwdScratch& w) {
  const Problem& pb = c.pb;
  const int64_t D = pb.dim, Dv = pb.dim_v, hk = h / (pb.heads_q / pb.heads_k), bh = b * pb.heads_q + h;
  const int64_t blk = c.kblock_base[b] + j0 / kBN;
  const bool all_visible = attn::block_all_visible(pb.vis, i0, i0 + bm, j0, j0 + bn);
  const float keep_scale = pb.dropout_p > 0.f ? 1.f / (1.f - pb.dropout_p) : 1.f;
  float* st = w.st.data();
  float* dpt = w.dpt.data();
  gemm_a(bm, bn, D, w.qs.data(), D, kv.at(kv.kt, kv.kt_sz, blk, hk, pb.heads_k), st, kBN, false);
  gemm_a(bm, bn, Dv, w.dout.data(), Dv, kv.at(kv.vt, kv.vt_sz, blk, hk, pb.heads_k), dpt, kBN, false);
  for (int64_t i = 0; i < bm; ++i) {
    float* srow = st + i * kBN;
    float* drow = dpt + i * kBN;
    mask_row_any(c, b, h, i0 + i, j0, bn, all_visible, srow);
    const float lse = w.lse[i], delta = w.delta[i];
    if (pb.dropout_p > 0.f) {
      for (int64_t j = 0; j < bn; ++j) {
        const float p = fast_exp(srow[j] - lse);
        const float z = attn::dropout_keep(pb.seed, bh, i0 + i, j0 + j, pb.dropout_p) ? keep_scale : 0.f;
        srow[j] = p * z;                      // dropped probabilities, for dV
        drow[j] = p * (drow[j] * z - delta);  // dS
      }
    } else {
      exp_row(srow, bn, lse);
      int64_t j = 0;
      for (; j + 16 <= bn; j += 16) store16(drow + j, load16(srow + j) * (load16(drow + j) - delta));
      for (; j < bn; ++j) drow[j] = srow[j] * (drow[j] - delta);
    }
    if (c.dmask && want_dq) {
      float* dm = c.dmask + c.ldmask.offset(b, h, i0 + i, j0);
      for (int64_t j = 0; j < bn; ++j) dm[j * c.ldmask.sd] = drow[j];
    }
  }
  if (dk) {
    gemm_a<true>(bn, Dv, bm, st, kBN, w.dout_packed.data(), dv, Dv, true);
    gemm_a<true>(bn, D, bm, dpt, kBN, w.qs_packed.data(), dk, D, true);
  }
  if (want_dq) gemm_a(bm, D, bn, dpt, kBN, kv.at(kv.kn, kv.kn_sz, blk, hk, pb.heads_k), w.dq_acc.data(), D, true);
}

template <typename T>
void write_rows(T* dst, const Layout& lay, int64_t b, int64_t h, int64_t t0, int64_t rows, int64_t cols,
                const float* src, float factor) {
  T* base = dst + lay.offset(b, h, t0, 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < cols; ++d) base[i * lay.st + d * lay.sd] = from_float<T>(src[i * cols + d] * factor);
}

template <typename T>
void backward(const Call& c, T* dq, const Layout& ldq, T* dk, const Layout& ldk, T* dv, const Layout& ldv,
              int num_threads) {
  const Problem& pb = c.pb;
  KVWant want;
  want.kt = want.kn = want.vt = true;
  const PackedKV kv = pack_kv<T>(c, want, num_threads);
  const int64_t D = pb.dim, Dv = pb.dim_v, group = pb.heads_q / pb.heads_k;
  const int64_t kv_tasks = pb.batch * pb.heads_k;
  const bool one_pass = kv_tasks >= 4 * static_cast<int64_t>(num_threads);

  auto dq_block = [&](int64_t b, int64_t h, int64_t i0, int64_t bm, BwdScratch& w) {
    write_rows(dq, ldq, b, h, pb.q_start(b) + i0, bm, D, w.dq_acc.data(), pb.scale);
  };

  if (one_pass) {
    // Task = (batch, kv head): every query block of the head group against every key block.
#pragma omp parallel num_threads(num_threads)
    {
      BwdScratch w(c);
      std::vector<float> dk_acc(pb.max_len_k * D), dv_acc(pb.max_len_k * Dv);
#pragma omp for schedule(dynamic)
      for (int64_t task = 0; task < kv_tasks; ++task) {
        const int64_t b = task / pb.heads_k, hk = task % pb.heads_k, L = pb.len_q(b), S = pb.len_k(b);
        std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t i0 = 0; i0 < L; i0 += kBM) {
            const int64_t bm = std::min(kBM, L - i0);
            load_query_block<T>(c, b, h, i0, bm, true, w);
            std::fill(w.dq_acc.begin(), w.dq_acc.end(), 0.f);
            for (int64_t j0 = 0; j0 < S; j0 += kBN) {
              const int64_t bn = std::min(kBN, S - j0);
              if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
              backward_tile(c, kv, b, h, i0, bm, j0, bn, dk_acc.data() + j0 * D, dv_acc.data() + j0 * Dv, true, w);
            }
            dq_block(b, h, i0, bm, w);
          }
        }
        write_rows(dk, ldk, b, hk, pb.k_start(b), S, D, dk_acc.data(), 1.f);
        write_rows(dv, ldv, b, hk, pb.k_start(b), S, Dv, dv_acc.data(), 1.f);
      }
    }
    return;
  }

  // Pass 1, task = (batch, kv head, key block): dK and dV of the block.
  const int64_t nkb_max = (pb.max_len_k + kBN - 1) / kBN;
#pragma omp parallel num_threads(num_threads)
  {
    BwdScratch w(c);
    std::vector<float> dk_acc(kBN * D), dv_acc(kBN * Dv);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < kv_tasks * nkb_max; ++task) {
      const int64_t kb = task % nkb_max, b = task / nkb_max / pb.heads_k, hk = task / nkb_max % pb.heads_k;
      const int64_t L = pb.len_q(b), S = pb.len_k(b), j0 = kb * kBN;
      if (j0 >= S) continue;
      const int64_t bn = std::min(kBN, S - j0);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < L; i0 += kBM) {
          const int64_t bm = std::min(kBM, L - i0);
          if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
          load_query_block<T>(c, b, h, i0, bm, true, w);
          backward_tile(c, kv, b, h, i0, bm, j0, bn, dk_acc.data(), dv_acc.data(), false, w);
        }
      }
      write_rows(dk, ldk, b, hk, pb.k_start(b) + j0, bn, D, dk_acc.data(), 1.f);
      write_rows(dv, ldv, b, hk, pb.k_start(b) + j0, bn, Dv, dv_acc.data(), 1.f);
    }
  }
  // Pass 2, task = (batch, query head, query block): dQ (and dS into the mask gradient).
  const int64_t q_tasks = pb.batch * pb.heads_q * c.num_qblocks_max;
#pragma omp parallel num_threads(num_threads)
  {
    BwdScratch w(c);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < q_tasks; ++task) {
      const int64_t qb = task % c.num_qblocks_max, bh = task / c.num_qblocks_max;
      const int64_t b = bh / pb.heads_q, h = bh % pb.heads_q, L = pb.len_q(b), S = pb.len_k(b), i0 = qb * kBM;
      if (i0 >= L) continue;
      const int64_t bm = std::min(kBM, L - i0);
      load_query_block<T>(c, b, h, i0, bm, false, w);
      std::fill(w.dq_acc.begin(), w.dq_acc.end(), 0.f);
      for (int64_t j0 = 0; j0 < S; j0 += kBN) {
        const int64_t bn = std::min(kBN, S - j0);
        if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
        backward_tile(c, kv, b, h, i0, bm, j0, bn, nullptr, nullptr, true, w);
      }
      dq_block(b, h, i0, bm, w);
    }
  }
}

Call make_call(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& cu_q,
               const Tensor& cu_k, const Tensor& out, const Tensor& lse, int64_t max_len_q, int64_t max_len_k,
               double scale, bool causal, bool windowed, int64_t left, int64_t right, int64_t num_global,
               double dropout_p, int64_t seed) {
  const bool packed = cu_q.present;
  check(q.ndim == (packed ? 3 : 4), "query: expected (B, H, L, D) or packed (total, H, D)");
  check(k.ndim == q.ndim && v.ndim == q.ndim, "key/value: rank differs from query");
  check(q.dtype == k.dtype && q.dtype == v.dtype && q.dtype == out.dtype, "key/value: dtype differs from query");
  check_float_dtype(q, "query");
  Call c;
  Problem& pb = c.pb;
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
    for (int64_t b = 0; b < pb.batch; ++b) {
      check(pb.len_q(b) >= 0 && pb.len_q(b) <= max_len_q && pb.q_start(b) + pb.len_q(b) <= q.size(0),
            "cu_seqlens_q: offsets must be non-decreasing, within max_seqlen_q and the query length");
      check(pb.len_k(b) >= 0 && pb.len_k(b) <= max_len_k && pb.k_start(b) + pb.len_k(b) <= k.size(0),
            "cu_seqlens_k: offsets must be non-decreasing, within max_seqlen_k and the key length");
    }
  } else {
    pb.batch = q.size(0);
    check(k.size(0) == pb.batch && v.size(0) == pb.batch, "key: batch differs from query");
    check(v.size(2) == k.size(2), "value: length differs from key");
  }
  pb.max_len_q = max_len_q;
  pb.max_len_k = max_len_k;
  pb.scale = static_cast<float>(scale);
  pb.vis.causal = causal;
  pb.vis.windowed = windowed;
  pb.vis.left = left;
  pb.vis.right = right;
  pb.vis.num_global = num_global;
  pb.dropout_p = static_cast<float>(dropout_p);
  pb.seed = static_cast<uint64_t>(seed);
  c.q = q.data;
  c.k = k.data;
  c.v = v.data;
  c.o = out.data;
  c.lq = attn::layout_of(q);
  c.lk = attn::layout_of(k);
  c.lv = attn::layout_of(v);
  c.lo = attn::layout_of(out);
  c.lrow = attn::row_layout_of(lse, packed);
  c.lse = lse.ptr<float>();
  if (mask.present) {
    check(!packed && mask.ndim == 4, "attn_mask: expected a (B, H, L, S) view");
    check(mask.dtype == DType::b8 || mask.dtype == DType::f32, "attn_mask: expected bool or float32");
    c.mask = mask.data;
    c.mask_bool = mask.dtype == DType::b8;
    c.lmask = attn::layout_of(mask);
  }
  c.init_blocks();
  return c;
}

}  // namespace

void attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& cu_q,
                       const Tensor& cu_k, const Tensor& out, const Tensor& lse, int64_t max_len_q, int64_t max_len_k,
                       double scale, bool causal, bool windowed, int64_t left, int64_t right, int64_t num_global,
                       double dropout_p, int64_t seed, int num_threads) {
  Call c = make_call(q, k, v, mask, cu_q, cu_k, out, lse, max_len_q, max_len_k, scale, causal, windowed, left, right,
                     num_global, dropout_p, seed);
  dispatch_float(q.dtype, "query", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    forward<scalar_t>(c, out.ptr<scalar_t>(), num_threads);
  });
}

void attention_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& cu_q,
                       const Tensor& cu_k, const Tensor& out, const Tensor& grad_out, const Tensor& lse,
                       const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dmask, int64_t max_len_q,
                       int64_t max_len_k, double scale, bool causal, bool windowed, int64_t left, int64_t right,
                       int64_t num_global, double dropout_p, int64_t seed, int num_threads) {
  Call c = make_call(q, k, v, mask, cu_q, cu_k, out, lse, max_len_q, max_len_k, scale, causal, windowed, left, right,
                     num_global, dropout_p, seed);
  c.go = grad_out.data;
  c.lgo = attn::layout_of(grad_out);
  if (dmask.present) {
    check(dmask.dtype == DType::f32 && mask.present, "attn_mask: gradient buffer must be float32");
    c.dmask = dmask.ptr<float>();
    c.ldmask = attn::layout_of(dmask);
  }
  dispatch_float(q.dtype, "query", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    backward<scalar_t>(c, dq.ptr<scalar_t>(), attn::layout_of(dq), dk.ptr<scalar_t>(), attn::layout_of(dk),
                       dv.ptr<scalar_t>(), attn::layout_of(dv), num_threads);
  });
}

// Writes the dropout keep-mask (B, H, L, S) (uint8/bool, contiguous) that the kernels draw for `seed`.
void attention_dropout_mask_cpu(const Tensor& keep, double dropout_p, int64_t seed, int num_threads) {
  check(keep.ndim == 4 && keep.dtype == DType::b8, "keep: expected a (B, H, L, S) bool tensor");
  uint8_t* out = keep.ptr<uint8_t>();
  const int64_t BH = keep.size(0) * keep.size(1), L = keep.size(2), S = keep.size(3);
  const float p = static_cast<float>(dropout_p);
#pragma omp parallel for collapse(2) num_threads(num_threads)
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < S; ++j)
        out[(bh * L + i) * S + j] = attn::dropout_keep(static_cast<uint64_t>(seed), bh, i, j, p) ? 1 : 0;
}

}  // namespace mmkern
