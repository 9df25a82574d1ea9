// The vector unit of the ISA level that a CPU kernel file is compiled for (csrc/cpu/*.cpp are built once per level,
// see cpu_kernels.h): fp32 / int32 vectors of kLanes lanes on GCC vector extensions, loads and stores of a row's
// ragged end, horizontal reductions, exp2 and log, and the register budget that sizes the micro-kernels.
//
//   level              lanes   vector registers
//   avx512(_bf16)      16      32 zmm
//   avx2               8       16 ymm
//   default            4       16 xmm (SSE2, x86-64), 32 (NEON, aarch64)
//
// The vector types are the machine's own width: a 16-lane type on AVX2 would be split into pairs of ymm operations
// whose accumulators do not fit the 16 registers (the kernels ran at 0.03-0.15x of PyTorch so).
#pragma once

#include <cstdint>
#include <cstring>

#include "mmkern/cpu_kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

MMKERN_CPU_BEGIN
namespace simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kVecRegs = 32;
#elif defined(__AVX2__)
constexpr int kLanes = 8, kVecRegs = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kVecRegs = 32;
#else
constexpr int kLanes = 4, kVecRegs = 16;
#endif
// Floats per cache line (the unit of padding and prefetching, whatever the vector width).
constexpr int kLineFloats = 16;

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// Lanes j < n set (-1), the others 0.
inline vi lanes_below(int n) {
  vi iota;
  for (int j = 0; j < kLanes; ++j) iota[j] = j;  // folded to a constant
  return iota < n;
}

// Lanes [0, n) of p (n in 1..kLanes); the other lanes are `fill` and their memory is never touched.
inline vf load_tail(const float* p, int n, float fill = 0.f) {
#if defined(__AVX512F__)
  return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1u), p);
#elif defined(__AVX2__)
  const vi keep = lanes_below(n);
  return keep ? (vf)_mm256_maskload_ps(p, (__m256i)keep) : splat(fill);
#else
  vf v = splat(fill);
  for (int j = 0; j < n; ++j) v[j] = p[j];
  return v;
#endif
}

// Stores lanes [0, n) of v to p (n in 1..kLanes); memory past n is not touched.
inline void store_tail(float* p, vf v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), (__m512)v);
#else  // (AVX2's vmaskmovps store is microcoded on AMD CPUs: slower than these few scalar stores)
  for (int j = 0; j < n; ++j) p[j] = v[j];
#endif
}

inline vf load_n(const float* p, int n, float fill = 0.f) { return n >= kLanes ? load(p) : load_tail(p, n, fill); }
inline void store_n(float* p, vf v, int n) {
  if (n >= kLanes)
    store(p, v);
  else
    store_tail(p, v, n);
}

// Lane-wise min, the second operand where either is NaN: a < b ? a : b, which GCC compiles to a compare and a
// blend, two operations where vminps is one.
inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
  return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX2__)
  return (vf)_mm256_min_ps((__m256)a, (__m256)b);
#else
  return a < b ? a : b;
#endif
}

// Horizontal max / sum as a halving tree (lane-by-lane loops took ~7% of a small contrastive forward).
template <bool kMax, class V>
inline float reduce(V x) {
  auto op = [](auto u, auto v) { return kMax ? (u > v ? u : v) : u + v; };
  if constexpr (sizeof(V) == 8) {
    return op(x[0], x[1]);
  } else {
    typedef float Half __attribute__((vector_size(sizeof(V) / 2)));
    Half lo, hi;
    std::memcpy(&lo, &x, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(Half), sizeof(Half));
    return reduce<kMax>(op(lo, hi));
  }
}
inline float hmax(vf x) { return reduce<true>(x); }
inline float hsum(vf x) { return reduce<false>(x); }

// 2^t = 2^f 2^n with n = floor(t) and f = t - n in [0, 1), 2^f by a degree-5 polynomial (relative error < 2e-7
// evaluated in fp32, far inside the fp32 tolerance of 2e-5; a degree more costs ~8% of the exp). AVX-512 forms f
// in one vreduceps and scales by 2^floor(t) in vscalefps, which floors its exponent operand itself: 3 vector
// operations fewer than clamping, rounding and subtracting (the softmax's exp -17%). t < -126 gives exactly 0
// (also t = -inf, so masked scores vanish) without ever forming a subnormal: an underflowing scale costs a
// microcode assist of ~100 cycles per vector, which made masked rows 3x slower. t >= 128 gives inf, NaN stays
// NaN. Softmax callers pass t = (x - shift) log2(e), the difference first (see attn_cpu::exp_row).
inline vf exp2v(vf t) {
#if defined(__AVX512F__)
  const vf f = (vf)_mm512_reduce_ps((__m512)t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // reduce(+-inf) = 0
#else
  const vf tc = t < -127.f ? splat(-127.f) : (t > 128.f ? splat(128.f) : t);  // NaN compares false: kept
#if defined(__AVX2__)
  const vf n = (vf)_mm256_floor_ps((__m256)tc);
#else
  vf n = (tc + 12582912.f) - 12582912.f;  // nearest, via 1.5 * 2^23
  n = n > tc ? n - 1.f : n;
#endif
  const vf f = tc - n;
#endif
  vf p = splat(1.8671303987503052e-3f);
  p = p * f + 9.017029777169228e-3f;
  p = p * f + 5.579991266131401e-2f;
  p = p * f + 0.24016444385051727f;
  p = p * f + 0.6931512951850891f;
  p = p * f + 1.f;
#if defined(__AVX512F__)
  // p * 2^floor(t), and 0 where t < -126 (a NaN t compares unordered: kept).
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)t, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)t);
#else
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return t < -126.f ? vf{} : p * scale;
#endif
}

constexpr float kLog2e = 1.4426950408889634f;

// Natural log of x > 0 (normal): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| < 0.172, as an odd series to s^9 (error < 1e-9).
inline vf logv(vf x) {
  vi bits;
  std::memcpy(&bits, &x, sizeof(bits));
  vi e = (bits >> 23) - 127;
  const vi mbits = (bits & 0x7fffff) | 0x3f800000;
  vf m;
  std::memcpy(&m, &mbits, sizeof(m));
  const vi big = m > 1.41421356f;  // lanes -1 where true
  m = big ? m * 0.5f : m;
  e -= big;
  const vf s = (m - 1.f) / (m + 1.f), s2 = s * s;
  vf p = splat(1.f / 9.f);
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return __builtin_convertvector(e, vf) * 0.6931471805599453f + 2.f * s * p;
}

}  // namespace simd
MMKERN_CPU_END
