// Row-wise CPU kernels' plumbing (the fused element-wise ops, RMSNorm): rows of a 2-D strided view as contiguous
// fp32, the split of rows over threads, per-thread parameter-gradient partials, and the chunking of a row into the
// level's vectors (simd_cpu.h). Only for files built per ISA level (see cpu_kernels.h).
#pragma once

#include <algorithm>
#include <cstdint>
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

// Row `i` of a 2-D view into fp32 dst[0:n].
template <typename T>
inline void load_row(const Tensor& t, int64_t i, int64_t n, float* __restrict dst) {
  const T* src = t.ptr<T>() + i * t.stride(0);
  const int64_t s = t.stride(1);
  if (s == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j * s]);
  }
}

template <typename T>
inline void store_row(const Tensor& t, int64_t i, int64_t n, const float* __restrict src) {
  T* dst = t.ptr<T>() + i * t.stride(0);
  const int64_t s = t.stride(1);
  if (s == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = from_float<T>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j * s] = from_float<T>(src[j]);
  }
}

template <typename T>
inline bool direct(const Tensor& t) {
  return std::is_same_v<T, float> && t.stride(1) == 1;
}

// Row `i` of t as contiguous fp32: the tensor's memory when it is fp32 with unit stride, else `buf` filled from it.
template <typename T>
inline const float* input_row(const Tensor& t, int64_t i, int64_t n, float* buf) {
  if (direct<T>(t)) return t.ptr<float>() + i * t.stride(0);
  load_row<T>(t, i, n, buf);
  return buf;
}

// Where row `i` of t is computed: the tensor's memory when it is fp32 with unit stride, else `buf`, which
// finish_row then writes to t.
template <typename T>
inline float* output_row(const Tensor& t, int64_t i, float* buf) {
  return direct<T>(t) ? t.ptr<float>() + i * t.stride(0) : buf;
}

template <typename T>
inline void finish_row(const Tensor& t, int64_t i, int64_t n, const float* row) {
  if (!direct<T>(t)) store_row<T>(t, i, n, row);
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

inline simd::vf load(const float* p, int w) { return simd::load_n(p, w); }  // lanes past w read 0
inline void store(float* p, simd::vf v, int w) { simd::store_n(p, v, w); }

// Calls f(j, w) for the chunks of [0, n): full vectors (w = kLanes, a constant once inlined, so plain loads and
// stores), then the tail.
template <class F>
inline void for_chunks(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + simd::kLanes <= n; j += simd::kLanes) f(j, simd::kLanes);
  if (j < n) f(j, static_cast<int>(n - j));
}

// s = x + r (r null: s is x and is not written); returns Σ s, or Σ s² with kSquares (LayerNorm's mean, RMSNorm's
// mean square).
template <bool kSquares>
inline float add_row_reduce(const float* x, const float* r, float* s, int64_t d) {
  simd::vf acc = simd::vf{};
  for_chunks(d, [&](int64_t j, int w) {
    simd::vf v = load(x + j, w);
    if (r) {
      v = v + load(r + j, w);
      store(s + j, v, w);
    }
    acc = kSquares ? v * v + acc : acc + v;
  });
  return simd::hsum(acc);
}

}  // namespace rows
MMKERN_CPU_END
