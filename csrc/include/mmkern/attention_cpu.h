// Tile math of the CPU attention kernels (host only): a vectorised exp, row reductions, a transpose and
// small GEMMs whose operands are read in place.
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
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mmkern::attn_cpu {

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vf16 splat(float x) { return vf16{} + x; }
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
inline vf16 load_n(const float* p, int n, float fill = 0.f) { return n >= kLanes ? load16(p) : load_tail(p, n, fill); }
inline void store_n(float* p, vf16 v, int n) {
  if (n >= kLanes)
    store16(p, v);
  else
    store_tail(p, v, n);
}

// 2^t: t = n + f with n = round(t), 2^f by a degree-6 polynomial on [-1/2, 1/2] (minimax, relative error
// ~1e-7 when evaluated in fp32), then scaled by 2^n. t < -125 gives exactly 0 (also t = -inf, so masked
// scores vanish) without ever forming a subnormal: an underflowing scale costs a microcode assist of ~100
// cycles per vector, which made masked rows 3x slower. NaN stays NaN. Softmax callers pass
// t = (x - shift) log2(e) as one fused multiply-add.
inline vf16 exp2v(vf16 t) {
  const vf16 tc = t < -125.f ? splat(-125.f) : (t > 128.f ? splat(128.f) : t);  // NaN compares false: kept
#if defined(__AVX512F__)
  const vf16 n = (vf16)_mm512_roundscale_ps((__m512)tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf16 n = (tc + 12582912.f) - 12582912.f;  // round to nearest via 1.5 * 2^23
#endif
  const vf16 f = tc - n;
  vf16 p = splat(1.5337577497120947e-4f);
  p = p * f + 1.3399859890341759e-3f;
  p = p * f + 9.618519805371761e-3f;
  p = p * f + 5.550329014658928e-2f;
  p = p * f + 0.24022646248340607f;
  p = p * f + 0.6931471824645996f;
  p = p * f + 1.f;
#if defined(__AVX512F__)
  const vf16 r = (vf16)_mm512_scalef_ps((__m512)p, (__m512)n);  // p * 2^n: normal, or inf for n = 128
#else
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  vf16 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const vf16 r = p * scale;
#endif
  return t < -125.f ? vf16{} : r;
}

constexpr float kLog2e = 1.4426950408889634f;

// Horizontal max / sum of 16 lanes.
inline float hmax(vf16 x) {
  float m = x[0];
  for (int j = 1; j < kLanes; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
inline float hsum(vf16 x) {
  typedef float vf8 __attribute__((vector_size(32)));
  typedef float vf4 __attribute__((vector_size(16)));
  const vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}

inline float row_max(const float* row, int64_t n) {
  vf16 m = splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf16 x = load_n(row + j, static_cast<int>(n - j), -INFINITY);
    m = x > m ? x : m;
  }
  return hmax(m);
}

// row[j] = exp(row[j] - shift) for j < n; returns the sum.
inline float exp_row(float* row, int64_t n, float shift) {
  const float c = -shift * kLog2e;
  vf16 s = vf16{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const int w = static_cast<int>(std::min<int64_t>(kLanes, n - j));
    const vf16 p = exp2v(load_n(row + j, w) * kLog2e + c);
    store_n(row + j, p, w);
    s += w == kLanes ? p : load_tail(row + j, w);
  }
  return hsum(s);
}

// Micro-kernel: C[0:MR, 0:n] (+)= A[0:MR, 0:K] B[0:K, 0:n] with n <= 16 NV (n = 16 NV unless kTail). a(i, k) =
// A[i * lda + k], or A[k * lda + i] when kTrans (A given as its transpose: P^T, dS^T from the row-major
// tiles). B row k is B + k * ldb; with kTail the lanes >= n of the last vector are masked, so B and C may be
// exactly n wide. The accumulators are two named arrays with constant indices so that they stay in registers.
template <int MR, int NV, bool kTrans, bool kTail>
inline void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int n,
                  bool accumulate) {
  static_assert(NV == 1 || NV == 2, "one or two vectors per row");
  vf16 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vf16{};
  const int last = n - kLanes * (NV - 1);  // lanes of the last vector
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    vf16 b0, b1 = vf16{};
    if (NV == 1) {
      b0 = kTail ? load_tail(bk, last) : load16(bk);
    } else {
      b0 = load16(bk);
      b1 = kTail ? load_tail(bk + kLanes, last) : load16(bk + kLanes);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float x = kTrans ? A[k * lda + i] : A[i * lda + k];
      c0[i] += x * b0;
      if (NV == 2) c1[i] += x * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* row = C + i * ldc;
    if (NV == 1) {
      if (kTail)
        store_tail(row, accumulate ? load_tail(row, last) + c0[i] : c0[i], last);
      else
        store16(row, accumulate ? load16(row) + c0[i] : c0[i]);
    } else {
      store16(row, accumulate ? load16(row) + c0[i] : c0[i]);
      if (kTail)
        store_tail(row + kLanes, accumulate ? load_tail(row + kLanes, last) + c1[i] : c1[i], last);
      else
        store16(row + kLanes, accumulate ? load16(row + kLanes) + c1[i] : c1[i]);
    }
  }
}

template <int MR, bool kTrans>
inline void micro_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < N; j0 += 2 * kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(2 * kLanes, N - j0));
    const float* b = B + j0;
    float* c = C + j0;
    if (n == 2 * kLanes)
      micro<MR, 2, kTrans, false>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else if (n > kLanes)
      micro<MR, 2, kTrans, true>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else if (n == kLanes)
      micro<MR, 1, kTrans, false>(K, A, lda, b, ldb, c, ldc, n, accumulate);
    else
      micro<MR, 1, kTrans, true>(K, A, lda, b, ldb, c, ldc, n, accumulate);
  }
}

// C (M x N, row stride ldc) (+)= A B: A (M x K, row stride lda; kTrans: A^T given, K x M) and B (K x N, row
// stride ldb) read in place. Rows go 8 at a time, the remainder 4 / 2 / 1 at a time (no wasted rows).
template <bool kTrans = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  int64_t i0 = 0;
  auto a_at = [&](int64_t i) { return kTrans ? A + i : A + i * lda; };
  for (; i0 + 8 <= M; i0 += 8) micro_rows<8, kTrans>(N, K, a_at(i0), lda, B, ldb, C + i0 * ldc, ldc, accumulate);
  if (M - i0 >= 4) {
    micro_rows<4, kTrans>(N, K, a_at(i0), lda, B, ldb, C + i0 * ldc, ldc, accumulate);
    i0 += 4;
  }
  if (M - i0 >= 2) {
    micro_rows<2, kTrans>(N, K, a_at(i0), lda, B, ldb, C + i0 * ldc, ldc, accumulate);
    i0 += 2;
  }
  if (M - i0 == 1) micro_rows<1, kTrans>(N, K, a_at(i0), lda, B, ldb, C + i0 * ldc, ldc, accumulate);
}

// dst (cols x rows, row stride ld) = src^T for src (rows x cols, row stride st, unit column stride):
// 16 x 16 blocks through registers, so that neither side is accessed with a large stride element by element.
inline void transpose(const float* src, int64_t st, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  int64_t r0 = 0;
  for (; r0 + kLanes <= rows; r0 += kLanes) {
    int64_t c0 = 0;
    for (; c0 + kLanes <= cols; c0 += kLanes) {
      vf16 x[kLanes];
      for (int r = 0; r < kLanes; ++r) x[r] = load16(src + (r0 + r) * st + c0);
      for (int c = 0; c < kLanes; ++c) {
        vf16 y;
        for (int r = 0; r < kLanes; ++r) y[r] = x[r][c];
        store16(dst + (c0 + c) * ld + r0, y);
      }
    }
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + kLanes; ++r) dst[c * ld + r] = src[r * st + c];
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = r0; r < rows; ++r) dst[c * ld + r] = src[r * st + c];
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
