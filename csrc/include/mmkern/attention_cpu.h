// Tile math of the CPU attention kernels (host only): a vectorised exp, row reductions, transposes, small
// GEMMs whose operands are read in place, the staging of K/V/Q rows as fp32, the visibility of a key range
// and a software prefetcher.
//
// Attention tiles are small and ragged (a ViT head is 197 x 197 x 64, a demo head 17 x 17 x 16), so the
// products here never pack or pad their operands: A is read row by row (or as its transpose), B row by row
// with any row stride, and the last column vector of a tile is a masked load/store, so N = 17 costs two
// vectors, not a 32-wide padded panel. Written on GCC vector types (16 fp32 lanes); AVX-512 intrinsics
// only for masked loads/stores and the exponent scaling, with a portable fallback for other targets.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mmkern/attention.h"
#include "mmkern/simd_cpu.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mmkern::attn_cpu {

using simd::hmax;
using simd::hsum;
using simd::splat;
using simd::vf16;
using simd::vi16;
constexpr int kLanes = 16;

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

// Lanes [0, n) of p (n in 1..16); the other lanes are `fill` and their memory is never touched.
inline vf16 load_tail(const float* p, int n, float fill = 0.f) {
#if defined(__AVX512F__)
  return (vf16)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1u), p);
#else
  float buf[kLanes];
  for (int j = 0; j < kLanes; ++j) buf[j] = j < n ? p[j] : fill;
  return load16(buf);
#endif
}
inline void store_tail(float* p, vf16 v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), (__m512)v);
#else
  float buf[kLanes];
  store16(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
#endif
}
// Lanes j < n set.
inline vi16 lanes_below(int n) {
  const vi16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota < n;
}
inline vf16 load_n(const float* p, int n, float fill = 0.f) { return n >= kLanes ? load16(p) : load_tail(p, n, fill); }
inline void store_n(float* p, vf16 v, int n) {
  if (n >= kLanes)
    store16(p, v);
  else
    store_tail(p, v, n);
}

// 2^t = 2^f 2^n with n = floor(t) and f = t - n in [0, 1), 2^f by a degree-5 polynomial (relative error < 2e-7
// evaluated in fp32, far inside the fp32 tolerance of 2e-5; a degree more costs ~8% of the exp). AVX-512 forms f
// in one vreduceps and scales by 2^floor(t) in vscalefps, which floors its exponent operand itself: 3 vector
// operations fewer than clamping, rounding and subtracting (the softmax's exp -17%). t < -126 gives exactly 0
// (also t = -inf, so masked scores vanish) without ever forming a subnormal: an underflowing scale costs a
// microcode assist of ~100 cycles per vector, which made masked rows 3x slower. t >= 128 gives inf, NaN stays
// NaN. Softmax callers pass t = (x - shift) log2(e), the difference first: as one fused multiply-add
// x log2(e) - shift log2(e) the rounding of shift log2(e) (~1e3 at |shift| ~ 1e10) lands in the exponent.
inline vf16 exp2v(vf16 t) {
#if defined(__AVX512F__)
  const vf16 f = (vf16)_mm512_reduce_ps((__m512)t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // reduce(+-inf) = 0
#else
  const vf16 tc = t < -127.f ? splat(-127.f) : (t > 128.f ? splat(128.f) : t);  // NaN compares false: kept
  vf16 n = (tc + 12582912.f) - 12582912.f;  // nearest, via 1.5 * 2^23
  n = n > tc ? n - 1.f : n;
  const vf16 f = tc - n;
#endif
  vf16 p = splat(1.8671303987503052e-3f);
  p = p * f + 9.017029777169228e-3f;
  p = p * f + 5.579991266131401e-2f;
  p = p * f + 0.24016444385051727f;
  p = p * f + 0.6931512951850891f;
  p = p * f + 1.f;
#if defined(__AVX512F__)
  // p * 2^floor(t), and 0 where t < -126 (a NaN t compares unordered: kept).
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)t, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  return (vf16)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)t);
#else
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  vf16 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return t < -126.f ? vf16{} : p * scale;
#endif
}

constexpr float kLog2e = 1.4426950408889634f;

// row[j] = keep[j] ? row[j] : -inf for j < n (bool mask bytes).
inline void apply_bool_mask(float* row, const uint8_t* keep, int64_t n) {
  typedef uint8_t vu8 __attribute__((vector_size(16)));
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    vu8 k;
    std::memcpy(&k, keep + j, sizeof(k));
    const vi16 kept = __builtin_convertvector(k, vi16);
    store16(row + j, kept != 0 ? load16(row + j) : splat(-INFINITY));
  }
  for (; j < n; ++j) row[j] = keep[j] ? row[j] : -INFINITY;
}

inline float row_max(const float* row, int64_t n) {
  vf16 m = splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf16 x = load_n(row + j, static_cast<int>(n - j), -INFINITY);
    m = x > m ? x : m;
  }
  return hmax(m);
}

// row[j] = exp((row[j] - shift) - bias) for j < n; returns the sum.
inline float exp_row(float* row, int64_t n, float shift, float bias = 0.f) {
  const float c = -bias * kLog2e;
  vf16 s = vf16{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - j));
    vf16 p = exp2v((load_n(row + j, w, -INFINITY) - shift) * kLog2e + c);
    if (w < kLanes) p = lanes_below(w) ? p : vf16{};  // in registers: reloading a masked store stalls
    store_n(row + j, p, w);
    s += p;
  }
  return hsum(s);
}

// One online-softmax step on a score row of n: row = exp(row - m_new) in place with m_new = max(m, row),
// l = l alpha + sum(row), m = m_new; returns alpha = exp(m_old - m_new), the factor for what was accumulated
// with the old max (first: m, l start empty and alpha is 1). A row that has seen only -inf shifts by 0.
// Rows up to 32 stay in registers between the max and the exp.
inline float softmax_step(float* row, int64_t n, float& m, float& l, bool first) {
  const float m_old = first ? -INFINITY : m;
  float sum, m_new;
  if (n <= 2 * kLanes) {
    const int w0 = static_cast<int>(std::min<int64_t>(n, kLanes)), w1 = static_cast<int>(n) - w0;
    const vf16 x0 = load_n(row, w0, -INFINITY), x1 = w1 > 0 ? load_n(row + kLanes, w1, -INFINITY) : splat(-INFINITY);
    m_new = std::max(m_old, hmax(x0 > x1 ? x0 : x1));
    const float shift = m_new == -INFINITY ? 0.f : m_new;
    const vf16 p0 = exp2v((x0 - shift) * kLog2e);  // lanes past n hold -inf scores: exp gives 0
    store_n(row, p0, w0);
    vf16 acc = p0;
    if (w1 > 0) {
      const vf16 p1 = exp2v((x1 - shift) * kLog2e);
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

// Natural log of x > 0 (normal): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| < 0.172, as an odd series to s^9 (error < 1e-9).
inline vf16 logv(vf16 x) {
  vi16 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  vi16 e = (bits >> 23) - 127;
  const vi16 mbits = (bits & 0x7fffff) | 0x3f800000;
  vf16 m;
  std::memcpy(&m, &mbits, sizeof(m));
  const vi16 big = m > 1.41421356f;  // lanes -1 where true
  m = big ? m * 0.5f : m;
  e -= big;
  const vf16 s = (m - 1.f) / (m + 1.f), s2 = s * s;
  vf16 p = splat(1.f / 9.f);
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return __builtin_convertvector(e, vf16) * 0.6931471805599453f + 2.f * s * p;
}

// End of the online softmax for n rows: the row statistics (m, log l) of attn::row_stat_max / row_stat_log_sum
// (m = +inf, log l = 0 for a row that saw no key) in m and log_l, and l = 1 / l (0 for such a row).
inline void softmax_finish(float* m, float* l, int64_t n, float* log_l) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - i));
    const vf16 lv = load_n(l + i, w, 1.f), mv = load_n(m + i, w);
    const vi16 empty = lv == 0.f;
    store_n(m + i, empty ? splat(INFINITY) : mv, w);
    store_n(log_l + i, empty ? vf16{} : logv(empty ? splat(1.f) : lv), w);
    store_n(l + i, empty ? vf16{} : 1.f / lv, w);
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
  vf16 acc = vf16{};
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

constexpr int kMaxMR = 12;  // most rows of a micro-tile (see gemm)

// Micro-tiles of an M x N product: one Prefetcher step each (so is each score row; see Prefetcher::plan).
inline int64_t micro_tiles(int64_t M, int64_t N) {
  return (M + kMaxMR - 1) / kMaxMR * ((N + 2 * kLanes - 1) / (2 * kLanes));
}

// Micro-kernel: C[0:MR, 0:n] (+)= A[0:MR, 0:K] B[0:K, 0:n] with n <= 16 NV (n = 16 NV unless kTail). a(i, k) =
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
  vf16 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vf16{};
  const int last = n - kLanes * (NV - 1);  // lanes of the last vector
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    const float* bl = bk + kLanes * (NV - 1);
    const vf16 b_last = kTail && !kPadB ? load_tail(bl, last) : load16(bl);
    const vf16 b0 = NV == 1 ? b_last : load16(bk);
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
    if (NV == 2) store16(row, accumulate ? load16(row) + c0[i] : c0[i]);
    float* rl = row + kLanes * (NV - 1);
    const vf16 cl = NV == 1 ? c0[i] : c1[i];
    if (kTail)
      store_tail(rl, accumulate ? load_tail(rl, last) + cl : cl, last);
    else
      store16(rl, accumulate ? load16(rl) + cl : cl);
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

// C (M x N, row stride ldc) (+)= A B: A (M x K, row stride lda; kTrans: A^T given, K x M) and B (K x N, row
// stride ldb; pad_b: rows readable to a multiple of 16 floats) read in place. Rows go in equal groups of at
// most kMaxMR (25 rows as 9 + 8 + 8, not 12 + 12 + 1: a one-row tile is latency-bound and costs half an 8-row one).
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
    switch (mr) {
#define MMKERN_ATTN_TILE(R) \
  case R:                  \
    micro_rows<R, kTrans>(N, K, a, lda, B, ldb, c, ldc, accumulate, pad_b, pf); \
    break;
      MMKERN_ATTN_TILE(1)
      MMKERN_ATTN_TILE(2)
      MMKERN_ATTN_TILE(3)
      MMKERN_ATTN_TILE(4)
      MMKERN_ATTN_TILE(5)
      MMKERN_ATTN_TILE(6)
      MMKERN_ATTN_TILE(7)
      MMKERN_ATTN_TILE(8)
      MMKERN_ATTN_TILE(9)
      MMKERN_ATTN_TILE(10)
      MMKERN_ATTN_TILE(11)
      MMKERN_ATTN_TILE(12)
#undef MMKERN_ATTN_TILE
    }
    i0 += mr;
  }
}

// dst[c * ld + r] = f src[r * st + c] for r < rows <= 16, c < cols <= 16: one block through registers
// (AVX-512: four rounds of shuffles), lanes outside the block neither read nor written.
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
// that the column panels the tile products stream (32 floats of every row) spread over all L1 sets. A
// stride of 128 or 4096 floats maps every row of a panel to a few sets and thrashed L1 (PV at D = 128 ran at
// 60% of the rate it reaches with this padding).
inline int64_t padded_ld(int64_t n) { return round_up(std::max<int64_t>(n, 1), kLanes) | kLanes; }

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

// Whether a column panel of a tile product (two cache lines of each of `rows` rows, `st` floats apart) stays
// in L1: rows map to 64 / gcd(stride in lines, 64) of its 64 sets (8 ways assumed).
inline bool panel_fits_l1(int64_t rows, int64_t st) {
  if (st % kLanes) return true;  // rows not line-aligned: they spread over the sets
  int64_t lines = st / kLanes, sets = 64;
  while (sets > 1 && lines % 2 == 0) {
    lines /= 2;
    sets /= 2;
  }
  return 2 * rows <= 8 * sets;
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

}  // namespace mmkern::attn_cpu
