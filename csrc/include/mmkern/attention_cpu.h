// Tile math of the CPU attention kernels (host only): a vectorised exp, row reductions, transposes, small
// GEMMs whose operands are read in place, the staging of K/V/Q rows as fp32, the visibility of a key range
// and a software prefetcher.
//
// Attention tiles are small and ragged (a ViT head is 197 x 197 x 64, a demo head 17 x 17 x 16), so the
// products here never pack or pad their operands: A is read row by row (or as its transpose), B row by row
// with any row stride, and the last column vector of a tile is a masked load/store, so N = 17 costs two
// vectors, not a 32-wide padded panel. Written on the vector type of the ISA level (simd_cpu.h); the micro-tiles'
// height follows the level's register count, the transposes have an AVX-512 and an AVX2 shuffle network.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mmkern/attention.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/simd_cpu.h"

MMKERN_CPU_BEGIN
namespace attn_cpu {

using simd::exp2v;
using simd::hmax;
using simd::hsum;
using simd::kLanes;
using simd::kLineFloats;
using simd::kLog2e;
using simd::lanes_below;
using simd::load;
using simd::load_n;
using simd::load_tail;
using simd::splat;
using simd::store;
using simd::store_n;
using simd::store_tail;
using simd::vf;
using simd::vi;

// row[j] = keep[j] ? row[j] : -inf for j < n (bool mask bytes).
inline void apply_bool_mask(float* row, const uint8_t* keep, int64_t n) {
  typedef uint8_t vu8 __attribute__((vector_size(kLanes)));
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    vu8 k;
    std::memcpy(&k, keep + j, sizeof(k));
    const vi kept = __builtin_convertvector(k, vi);
    store(row + j, kept != 0 ? load(row + j) : splat(-INFINITY));
  }
  for (; j < n; ++j) row[j] = keep[j] ? row[j] : -INFINITY;
}

inline float row_max(const float* row, int64_t n) {
  vf m = splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf x = load_n(row + j, static_cast<int>(n - j), -INFINITY);
    m = x > m ? x : m;
  }
  return hmax(m);
}

// row[j] = exp((row[j] - shift) - bias) for j < n; returns the sum. The difference first: as one fused
// multiply-add x log2(e) - shift log2(e), the rounding of shift log2(e) (~1e3 at |shift| ~ 1e10) lands in the
// exponent.
inline float exp_row(float* row, int64_t n, float shift, float bias = 0.f) {
  const float c = -bias * kLog2e;
  vf s = vf{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - j));
    vf p = exp2v((load_n(row + j, w, -INFINITY) - shift) * kLog2e + c);
    if (w < kLanes) p = lanes_below(w) ? p : vf{};  // in registers: reloading a masked store stalls
    store_n(row + j, p, w);
    s += p;
  }
  return hsum(s);
}

// One online-softmax step on a score row of n: row = exp(row - m_new) in place with m_new = max(m, row),
// l = l alpha + sum(row), m = m_new; returns alpha = exp(m_old - m_new), the factor for what was accumulated
// with the old max (first: m, l start empty and alpha is 1). A row that has seen only -inf shifts by 0.
// Rows up to 2 kLanes stay in registers between the max and the exp.
inline float softmax_step(float* row, int64_t n, float& m, float& l, bool first) {
  const float m_old = first ? -INFINITY : m;
  float sum, m_new;
  if (n <= 2 * kLanes) {
    const int w0 = static_cast<int>(std::min<int64_t>(n, kLanes)), w1 = static_cast<int>(n) - w0;
    const vf x0 = load_n(row, w0, -INFINITY), x1 = w1 > 0 ? load_n(row + kLanes, w1, -INFINITY) : splat(-INFINITY);
    m_new = std::max(m_old, hmax(x0 > x1 ? x0 : x1));
    const float shift = m_new == -INFINITY ? 0.f : m_new;
    const vf p0 = exp2v((x0 - shift) * kLog2e);  // lanes past n hold -inf scores: exp gives 0
    store_n(row, p0, w0);
    vf acc = p0;
    if (w1 > 0) {
      const vf p1 = exp2v((x1 - shift) * kLog2e);
      store_n(row + kLanes, p1, w1);
      acc += p1;
    }
    sum = hsum(acc);
  } else {
    m_new = std::max(m_old, row_max(row, n));
    sum = exp_row(row, n, m_new == -INFINITY ? 0.f : m_new);
  }
  const float alpha = first ? 1.f : std::exp(m_old - (m_new == -INFINITY ? 0.f : m_new));
  l = first ? sum : l * alpha + sum;
  m = m_new;
  return alpha;
}

// End of the online softmax for n rows: the row statistics (m, log l) of attn::row_stat_max / row_stat_log_sum
// (m = +inf, log l = 0 for a row that saw no key) in m and log_l, and l = 1 / l (0 for such a row).
inline void softmax_finish(float* m, float* l, int64_t n, float* log_l) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - i));
    const vf lv = load_n(l + i, w, 1.f), mv = load_n(m + i, w);
    const vi empty = lv == 0.f;
    store_n(m + i, empty ? splat(INFINITY) : mv, w);
    store_n(log_l + i, empty ? vf{} : simd::logv(empty ? splat(1.f) : lv), w);
    store_n(l + i, empty ? vf{} : 1.f / lv, w);
  }
}

// dst[j] = src[j] * f for j < n.
inline void scale_row(float* dst, const float* src, int64_t n, float f) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - j));
    store_n(dst + j, load_n(src + j, w) * f, w);
  }
}

// sum_j a[j] b[j] for j < n.
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = vf{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - j));
    acc += load_n(a + j, w) * load_n(b + j, w);
  }
  return hsum(acc);
}

// Software prefetch into L2 of the rows that the next task will read, a few lines per step of the current
// one: a ViT head's Q, K, V, O and dO (50 KiB each) come from memory at ~10 GB/s per core, and left to the
// copies that first touch them they cost ~15% of the kernel's time. At most kBudget bytes: a long sequence's
// next head (MiBs) would only evict the current one from L2.
class Prefetcher {
 public:
  // rows of row_bytes, stride_bytes apart, from p.
  void add(const void* p, int64_t rows, int64_t row_bytes, int64_t stride_bytes) {
    if (stride_bytes == row_bytes) {  // contiguous rows: one long row
      row_bytes *= rows;
      rows = 1;
    }
    if (rows == 1)
      row_bytes = std::min(row_bytes, kBudget - bytes_);
    else
      rows = std::min(rows, (kBudget - bytes_) / std::max<int64_t>(row_bytes, 1));
    if (rows <= 0 || row_bytes <= 0 || n_ == kMaxRanges) return;
    bytes_ += rows * row_bytes;
    ranges_[n_++] = {static_cast<const char*>(p), rows, row_bytes, stride_bytes};
    lines_ += rows * (row_bytes / 64 + 2);
  }
  // Spreads the lines over about `steps` calls of step(), made per micro-tile of the tile products and per score
  // row: the more calls, the fewer lines each. (A burst of ~20 prefetches to memory stalls the product it lands
  // in: 40 KB spread over one K = 64 score product of 9 us makes it 17% slower, 20 KB 3%.)
  void plan(int64_t steps) { per_step_ = lines_ / std::max<int64_t>(steps, 1) + 1; }
  void step() {
    for (int64_t lines = per_step_; lines > 0 && cur_ < n_; --lines) {
      const Range& r = ranges_[cur_];
      const char* row = r.p + row_ * r.stride;
      const char* line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63}) + off_;
      __builtin_prefetch(line, 0, 2);  // locality 2: prefetcht1, into L2
      off_ += 64;
      if (line + 64 >= row + r.bytes) {
        off_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++cur_;
        }
      }
    }
  }

 private:
  struct Range {
    const char* p;
    int64_t rows, bytes, stride;
  };
  static constexpr int kMaxRanges = 16;
  static constexpr int64_t kBudget = 512 << 10;
  Range ranges_[kMaxRanges];
  int n_ = 0, cur_ = 0;
  int64_t bytes_ = 0, lines_ = 0, per_step_ = 0, row_ = 0, off_ = 0;
};

// Most rows of a micro-tile: its 2 MR accumulators, two B vectors and the A broadcast fit the vector registers
// (24 + 3 of 32 zmm; 12 + 3 of 16 ymm or xmm).
constexpr int kMaxMR = simd::kVecRegs == 32 ? 12 : 6;

// Micro-tiles of an M x N product: one Prefetcher step each (so is each score row; see Prefetcher::plan).
inline int64_t micro_tiles(int64_t M, int64_t N) {
  return (M + kMaxMR - 1) / kMaxMR * ((N + 2 * kLanes - 1) / (2 * kLanes));
}

// Micro-kernel: C[0:MR, 0:n] (+)= A[0:MR, 0:K] B[0:K, 0:n] with n <= kLanes NV (n = kLanes NV unless kTail). a(i, k) =
// A[i * lda + k], or A[k * lda + i] when kTrans (A given as its transpose: P^T, dS^T from the row-major
// tiles). B row k is B + k * ldb. With kTail the lanes >= n of the last vector are not stored, and not loaded
// from B unless kPadB (B rows readable to a whole vector: the kernels' own padded buffers), so B and C may be
// exactly n wide. The accumulators are two named arrays with constant indices so that they stay in registers:
// every loop over them is unrolled (one rolled loop and GCC keeps them on the stack, zeroed by rep stos and
// spilled before the stores, ~70 cycles a micro-tile: 8% of a K = 64 product).
template <int MR, int NV, bool kTrans, bool kTail, bool kPadB>
inline void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int n,
                  bool accumulate) {
  static_assert(NV == 1 || NV == 2, "one or two vectors per row");
  vf c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vf{};
  const int last = n - kLanes * (NV - 1);  // lanes of the last vector
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    const float* bl = bk + kLanes * (NV - 1);
    const vf b_last = kTail && !kPadB ? load_tail(bl, last) : load(bl);
    const vf b0 = NV == 1 ? b_last : load(bk);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float x = kTrans ? A[k * lda + i] : A[i * lda + k];
      c0[i] += x * b0;
      if (NV == 2) c1[i] += x * b_last;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = C + i * ldc;
    if (NV == 2) store(row, accumulate ? load(row) + c0[i] : c0[i]);
    float* rl = row + kLanes * (NV - 1);
    const vf cl = NV == 1 ? c0[i] : c1[i];
    if (kTail)
      store_tail(rl, accumulate ? load_tail(rl, last) + cl : cl, last);
    else
      store(rl, accumulate ? load(rl) + cl : cl);
  }
}

template <int MR, bool kTrans>
inline void micro_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate, bool pad_b, Prefetcher* pf) {
  for (int64_t j0 = 0; j0 < N; j0 += 2 * kLanes) {
    if (pf) pf->step();
    const int n = static_cast<int>(std::min<int64_t>(2 * kLanes, N - j0));
    const float* b = B + j0;
    float* c = C + j0;
    if (n == 2 * kLanes)
      micro<MR, 2, kTrans, false, false>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else if (n == kLanes)
      micro<MR, 1, kTrans, false, false>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else if (n > kLanes && pad_b)
      micro<MR, 2, kTrans, true, true>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else if (n > kLanes)
      micro<MR, 2, kTrans, true, false>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else if (pad_b)
      micro<MR, 1, kTrans, true, true>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else
      micro<MR, 1, kTrans, true, false>(K, A, lda, b, ldb, c, ldc, n, accumulate);
  }
}

// micro_rows<mr> for a run-time mr in 1..R.
template <int R, bool kTrans>
inline void rows_dispatch(int mr, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                          float* C, int64_t ldc, bool accumulate, bool pad_b, Prefetcher* pf) {
  if (mr == R) return micro_rows<R, kTrans>(N, K, A, lda, B, ldb, C, ldc, accumulate, pad_b, pf);
  if constexpr (R > 1) rows_dispatch<R - 1, kTrans>(mr, N, K, A, lda, B, ldb, C, ldc, accumulate, pad_b, pf);
}

// C (M x N, row stride ldc) (+)= A B: A (M x K, row stride lda; kTrans: A^T given, K x M) and B (K x N, row
// stride ldb; pad_b: rows readable to a whole vector) read in place. Rows go in equal groups of at most kMaxMR
// (25 rows as 9 + 8 + 8, not 12 + 12 + 1: a one-row tile is latency-bound and costs half an 8-row one).
template <bool kTrans = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate, bool pad_b = false, Prefetcher* pf = nullptr) {
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const int64_t tiles = (M + kMaxMR - 1) / kMaxMR, base = M / tiles, extra = M % tiles;
  int64_t i0 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int mr = static_cast<int>(base + (t < extra ? 1 : 0));
    const float* a = kTrans ? A + i0 : A + i0 * lda;
    float* c = C + i0 * ldc;
    rows_dispatch<kMaxMR, kTrans>(mr, N, K, a, lda, B, ldb, c, ldc, accumulate, pad_b, pf);
    i0 += mr;
  }
}

// dst[c * ld + r] = f src[r * st + c] for r < rows <= kLanes, c < cols <= kLanes: one block through registers
// (AVX-512: four rounds of shuffles; AVX2: three), lanes outside the block neither read nor written.
inline void transpose_block(const float* src, int64_t st, int rows, int cols, float* dst, int64_t ld, float f) {
#if defined(__AVX512F__)
  // (The mask_ forms with a full mask: GCC 12 warns that the plain forms' undefined source is uninitialised.)
  if (rows * cols < 64) {  // a row or two (17 keys = 16 + 1): element copies beat the shuffle network
    for (int c = 0; c < cols; ++c)
      for (int r = 0; r < rows; ++r) dst[c * ld + r] = f * src[r * st + c];
    return;
  }
  __m512 r[kLanes], t[kLanes];
  const __mmask16 cmask = static_cast<__mmask16>((1u << cols) - 1u);
  const __m512 fv = _mm512_set1_ps(f);
  for (int i = 0; i < kLanes; ++i)
    r[i] = i < rows ? _mm512_mul_ps(fv, _mm512_maskz_loadu_ps(cmask, src + i * st)) : _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_mask_unpacklo_ps(r[2 * i], 0xffff, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_mask_unpackhi_ps(r[2 * i], 0xffff, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_mask_shuffle_f32x4(r[i], 0xffff, r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_mask_shuffle_f32x4(r[i], 0xffff, r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_mask_shuffle_f32x4(r[8 + i], 0xffff, r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_mask_shuffle_f32x4(r[8 + i], 0xffff, r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_mask_shuffle_f32x4(t[i], 0xffff, t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_mask_shuffle_f32x4(t[i], 0xffff, t[i], t[8 + i], 0xDD);
  }
  const __mmask16 rmask = static_cast<__mmask16>((1u << rows) - 1u);  // r[c] is now column c of the block
  for (int c = 0; c < cols; ++c) _mm512_mask_storeu_ps(dst + c * ld, rmask, r[c]);
#elif defined(__AVX2__)
  if (rows * cols < 32) {  // as above
    for (int c = 0; c < cols; ++c)
      for (int r = 0; r < rows; ++r) dst[c * ld + r] = f * src[r * st + c];
    return;
  }
  __m256 r[kLanes], t[kLanes];
  const __m256i cmask = (__m256i)lanes_below(cols);
  const __m256 fv = _mm256_set1_ps(f);
  for (int i = 0; i < kLanes; ++i)
    r[i] = i < rows ? _mm256_mul_ps(fv, _mm256_maskload_ps(src + i * st, cmask)) : _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x20);
    t[4 + i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x31);
  }
  for (int c = 0; c < cols; ++c) store_n(dst + c * ld, (vf)t[c], rows);  // t[c] is now column c of the block
#else
  for (int c = 0; c < cols; ++c)
    for (int r = 0; r < rows; ++r) dst[c * ld + r] = f * src[r * st + c];
#endif
}

// dst (cols x rows, row stride ld) = f src^T for src (rows x cols, row stride st, unit column stride).
inline void transpose(const float* src, int64_t st, int64_t rows, int64_t cols, float* dst, int64_t ld, float f) {
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes)
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes)
      transpose_block(src + r0 * st + c0, st, static_cast<int>(std::min<int64_t>(kLanes, rows - r0)),
                      static_cast<int>(std::min<int64_t>(kLanes, cols - c0)), dst + c0 * ld + r0, ld, f);
}

// Row stride (floats) of the kernels' row-major buffers: whole vectors, and an odd number of cache lines, so
// that the column panels the tile products stream (2 kLanes floats of every row) spread over all L1 sets. A
// stride of 128 or 4096 floats maps every row of a panel to a few sets and thrashed L1 (PV at D = 128 ran at
// 60% of the rate it reaches with this padding).
inline int64_t padded_ld(int64_t n) { return round_up(std::max<int64_t>(n, 1), kLineFloats) | kLineFloats; }

// Keys [lo, hi) holding every key that a query in [i0, i1) may see (causal, window; masks aside).
inline void key_range(const attn::Visibility& v, int64_t i0, int64_t i1, int64_t S, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = v.causal ? std::min(S, i1) : S;
  if (v.windowed && i0 >= v.num_global) {  // no query of the block is global
    hi = std::min(hi, std::max(i1 + v.right, v.num_global));
    if (v.num_global == 0) lo = std::max<int64_t>(0, i0 - v.left);
  }
  hi = std::max(hi, lo);
}

// Sets the scores of keys k0 .. k0 + n - 1 that query qi cannot see (causal, window) to -inf.
inline void mask_structure(const attn::Visibility& v, int64_t qi, int64_t k0, int64_t n, float* row) {
  if (v.windowed && v.num_global > 0) {  // window plus global tokens: no single visible interval
    for (int64_t j = 0; j < n; ++j)
      if (!attn::visible(v, qi, k0 + j)) row[j] = -INFINITY;
    return;
  }
  int64_t lo = 0, hi = k0 + n;  // visible keys [lo, hi)
  if (v.causal) hi = std::min(hi, qi + 1);
  if (v.windowed) {
    lo = qi - v.left;
    hi = std::min(hi, qi + v.right + 1);
  }
  lo = std::clamp<int64_t>(lo - k0, 0, n);
  hi = std::clamp<int64_t>(hi - k0, lo, n);
  std::fill(row, row + lo, -INFINITY);
  std::fill(row + hi, row + n, -INFINITY);
}

// dst (cols x rows, row stride ld) = f times the transpose of rows x cols of src (strides st, sd), in fp32.
template <typename T>
void transpose_to(const T* src, int64_t st, int64_t sd, int64_t rows, int64_t cols, float* dst, int64_t ld, float f) {
  if constexpr (std::is_same_v<T, float>) {
    if (sd == 1) return transpose(src, st, rows, cols, dst, ld, f);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < cols; ++d) dst[d * ld + r] = f * to_float(src[r * st + d * sd]);
}

// dst (rows x cols, row stride ld) = rows x cols of src (strides st, sd), in fp32.
template <typename T>
void copy_rows(const T* src, int64_t st, int64_t sd, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      if (sd == 1) {
        scale_row(dst + r * ld, src + r * st, cols, 1.f);
        continue;
      }
    }
    for (int64_t d = 0; d < cols; ++d) dst[r * ld + d] = to_float(src[r * st + d * sd]);
  }
}

// Whether a column panel of a tile product (2 kLanes floats of each of `rows` rows, `st` floats apart) stays
// in L1: rows map to 64 / gcd(stride in lines, 64) of its 64 sets (8 ways assumed).
inline bool panel_fits_l1(int64_t rows, int64_t st) {
  if (st % kLineFloats) return true;  // rows not line-aligned: they spread over the sets
  int64_t lines = st / kLineFloats, sets = 64;
  while (sets > 1 && lines % 2 == 0) {
    lines /= 2;
    sets /= 2;
  }
  const int64_t lines_per_row = std::max(1, 2 * kLanes / kLineFloats);
  return lines_per_row * rows <= 8 * sets;
}

// rows x cols of src as fp32 rows with stride ld: read in place when they are fp32 rows whose column panels
// stay in L1 (panel_fits_l1); else copied to dst with padded_ld rows.
template <typename T>
const float* rows_fp32(const T* src, int64_t st, int64_t sd, int64_t rows, int64_t cols, float* dst, int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (sd == 1 && panel_fits_l1(rows, st)) {
      ld = st;
      return src;
    }
  }
  ld = padded_ld(cols);
  copy_rows(src, st, sd, rows, cols, dst, ld);
  return dst;
}

// dst rows (strides lay.st / lay.sd from (b, h, t0)) = src (rows x cols, row-major fp32) * factor[row].
template <typename T>
void write_rows(T* dst, const attn::Layout& lay, int64_t b, int64_t h, int64_t t0, int64_t rows, int64_t cols,
                const float* src, const float* row_factor, float factor) {
  T* base = dst + lay.offset(b, h, t0, 0);
  for (int64_t i = 0; i < rows; ++i) {
    const float f = row_factor ? row_factor[i] * factor : factor;
    T* out = base + i * lay.st;
    const float* in = src + i * cols;
    if constexpr (std::is_same_v<T, float>) {
      if (lay.sd == 1) {
        scale_row(out, in, cols, f);
        continue;
      }
    }
    if (lay.sd == 1) {
      for (int64_t d = 0; d < cols; ++d) out[d] = from_float<T>(in[d] * f);
    } else {
      for (int64_t d = 0; d < cols; ++d) out[d * lay.sd] = from_float<T>(in[d] * f);
    }
  }
}

// Adds rows [t0, t0 + rows) of head (b, h) of a tensor to a prefetch (rows of unit column stride only).
template <typename T>
void prefetch_rows(Prefetcher& pf, const void* base, const attn::Layout& lay, int64_t b, int64_t h, int64_t t0,
                   int64_t rows, int64_t cols) {
  if (lay.sd == 1)
    pf.add(static_cast<const T*>(base) + lay.offset(b, h, t0, 0), rows, cols * sizeof(T), lay.st * sizeof(T));
}

// A float buffer that keeps its memory between calls (held thread_local by the kernels): fresh pages on
// every call cost as much as the tile products at ViT sizes (page faults of zero-filled memory).
struct Workspace {
  std::vector<float> data;
  float* get(int64_t n) {
    if (static_cast<int64_t>(data.size()) < n) data.resize(n);
    return data.data();
  }
};

}  // namespace attn_cpu
MMKERN_CPU_END
