// Row-wise CPU kernels' plumbing (the fused element-wise ops, RMSNorm): the level's vectors (simd_cpu.h) loaded from
// and stored to a row of any storage type, the chunking of a row into them and its sums, rows of a 2-D strided view
// as contiguous rows, the split of rows over threads and the per-thread parameter-gradient partials. Only for files
// built per ISA level (see cpu_kernels.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/simd_cpu.h"

MMKERN_CPU_BEGIN
namespace rows {

// Below this many elements a single thread is faster than waking the team.
constexpr int64_t kMinElemsPerThread = 1 << 14;

inline int threads_for(int64_t elems, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, elems / kMinElemsPerThread)));
}

// body() on a team of `threads`, or on this thread alone without a parallel region when threads is 1: libgomp's team
// start and closing barrier cost ~0.5 us even for a team of one (a futex wake every time), a tenth of a small call.
// body may hold an `omp for` (orphaned outside a region: this thread runs every iteration) and read
// omp_get_thread_num / omp_get_num_threads (0 and 1 outside a region).
template <class F>
void parallel(int threads, F&& body) {
  if (threads <= 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(threads)
  body();
}

using simd::kLanes;
using simd::vf;
using simd::vi;

// kLanes values of storage type T at p as fp32 vectors, and back; w < kLanes: the first w lanes (the others read 0,
// and their memory is not touched). Element by element, through to_float / from_float, the conversions took more
// time than the ops' own math (bf16 add_layer_norm 2x, bias_gelu 1.9x slower than fp32); GCC's code for the vector
// extensions' conversions split and permuted where one instruction does. fp32 -> bf16 rounds to nearest even:
// AVX-512 BF16's vcvtneps2bf16 (which flushes subnormals to zero, as these kernels' exp does anyway), elsewhere in
// integer arithmetic as from_float. fp16 through F16C.
template <typename T>
inline vf load_as(const T* p, int w) {
  if constexpr (std::is_same_v<T, float>) {
    return simd::load_n(p, w);
  } else {
    if (w < kLanes) {
      float t[kLanes] = {};
      for (int k = 0; k < w; ++k) t[k] = to_float(p[k]);
      return simd::load(t);
    }
#if defined(__AVX512F__)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, BFloat16>) return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    return (vf)_mm512_cvtph_ps(h);
#elif defined(__AVX2__)
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, BFloat16>) return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    return (vf)_mm256_cvtph_ps(h);
#else
    float t[kLanes];
    for (int k = 0; k < kLanes; ++k) t[k] = to_float(p[k]);
    return simd::load(t);
#endif
  }
}

template <typename T>
inline void store_as(T* p, vf v, int w) {
  if constexpr (std::is_same_v<T, float>) {
    simd::store_n(p, v, w);
  } else {
#if defined(__AVX512F__) || defined(__AVX2__)
    if (w == kLanes) {
#if defined(__AVX512F__)
      __m256i h;
      if constexpr (std::is_same_v<T, Half>) {
        h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
#if defined(__AVX512BF16__)
        h = (__m256i)_mm512_cvtneps_pbh((__m512)v);
#else
        const __m512i u = (__m512i)v, odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        const __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
        h = _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
#endif
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
      __m128i h;
      if constexpr (std::is_same_v<T, Half>) {
        h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        const __m256i u = (__m256i)v, odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
        const __m256i nan = (__m256i)_mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q);
        r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
        h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // values < 2^16: exact
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#endif
      return;
    }
#endif
    for (int k = 0; k < w; ++k) p[k] = from_float<T>(v[k]);
  }
}

// Calls f(j, w) for the chunks of [0, n): full vectors (w = kLanes, a constant once inlined, so plain loads and
// stores), then the tail.
template <class F>
inline void for_chunks(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) f(j, kLanes);
  if (j < n) f(j, static_cast<int>(n - j));
}

// Two vector sums taken together (a row's Σ a and Σ b in one pass).
struct Sum2 {
  vf a, b;
};
inline Sum2 operator+(Sum2 x, Sum2 y) { return {x.a + y.a, x.b + y.b}; }

// Σ f(j, w) over the chunks of [0, n) (f's lanes past w must be 0), a vector or a Sum2, in four accumulators taken
// in turn. One accumulator updated inside a for_chunks lambda made GCC keep it in memory, a store and a reload on
// the critical path of every vector (add_layer_norm without a residual: 1.8x slower than F.layer_norm); and one
// accumulator in a register still waits ~3 cycles per add where the loads allow one vector a cycle.
template <class A = vf, class F>
inline A sum_chunks(int64_t n, F&& f) {
  A a0{}, a1{}, a2{}, a3{};
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    a0 = a0 + f(j, kLanes);
    a1 = a1 + f(j + kLanes, kLanes);
    a2 = a2 + f(j + 2 * kLanes, kLanes);
    a3 = a3 + f(j + 3 * kLanes, kLanes);
  }
  for (; j + kLanes <= n; j += kLanes) a0 = a0 + f(j, kLanes);
  if (j < n) a1 = a1 + f(j, static_cast<int>(n - j));
  return (a0 + a1) + (a2 + a3);
}

// Stores v to p as T and returns the value stored, as fp32.
template <typename T>
inline vf store_rounded(T* p, vf v, int w) {
  store_as<T>(p, v, w);
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return load_as<T>(p, w);
  }
}

// The row kernels run on contiguous rows of the storage type, converting a vector at a time. Row `i` of a 2-D view
// as such a row: the tensor's memory when its last stride is 1, else `buf` (n elements) gathered from it;
// output_row: where row `i` is computed (the memory, or buf that finish_row then scatters).
template <typename T>
inline const T* input_row(const Tensor& t, int64_t i, int64_t n, T* buf) {
  const T* src = t.ptr<T>() + i * t.stride(0);
  if (t.stride(1) == 1) return src;
  for (int64_t j = 0; j < n; ++j) buf[j] = src[j * t.stride(1)];
  return buf;
}

template <typename T>
inline T* output_row(const Tensor& t, int64_t i, T* buf) {
  return t.stride(1) == 1 ? t.ptr<T>() + i * t.stride(0) : buf;
}

template <typename T>
inline void finish_row(const Tensor& t, int64_t i, int64_t n, const T* row) {
  if (t.stride(1) == 1) return;
  T* dst = t.ptr<T>() + i * t.stride(0);
  for (int64_t j = 0; j < n; ++j) dst[j * t.stride(1)] = row[j];
}

// A thread's gather buffer for rows of t: n elements when t is present with a last stride other than 1, else none.
template <typename T>
std::vector<T> row_buffer(const Tensor& t, int64_t n) {
  return std::vector<T>(t.present && t.stride(1) != 1 ? n : 0);
}

// A (n,) vector parameter as fp32, or n copies of `fill` when it is absent.
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

// Sums per-thread fp32 partials (parts, n) into dst (n,), fp32 with stride (deterministic for a thread count).
inline void reduce_partials(const std::vector<float>& partials, int parts, int64_t n, const Tensor& dst) {
  float* out = dst.ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    float acc = 0.f;
    for (int p = 0; p < parts; ++p) acc += partials[p * n + j];
    out[j * dst.stride(0)] = acc;
  }
}

// s = x + r rounded to T (r null: s is x and is not written); returns Σ s, or Σ s² with kSquares, of s as stored
// (LayerNorm's mean, RMSNorm's mean square: they normalise s as the unfused add would have stored it).
template <bool kSquares, typename T>
inline float add_row_reduce(const T* x, const T* r, T* s, int64_t d) {
  const vf total = r ? sum_chunks(d, [&](int64_t j, int w) {
    const vf v = store_rounded(s + j, load_as(x + j, w) + load_as(r + j, w), w);
    return kSquares ? v * v : v;
  }) : sum_chunks(d, [&](int64_t j, int w) {
    const vf v = load_as(x + j, w);
    return kSquares ? v * v : v;
  });
  return simd::hsum(total);
}

}  // namespace rows
MMKERN_CPU_END
