// 16-lane fp32 / int32 vectors on GCC vector extensions and the horizontal reductions that the CPU kernels of
// attention and the contrastive losses share (host only).
#pragma once

#include <cstdint>
#include "mmkern/cpu_kernels.h"

MMKERN_CPU_BEGIN
namespace simd {

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline vf16 splat(float x) { return vf16{} + x; }

// Horizontal max / sum of 16 lanes as a halving tree (lane-by-lane loops took ~7% of a small contrastive forward).
template <bool kMax>
inline float reduce16(vf16 x) {
  typedef float vf8 __attribute__((vector_size(32)));
  typedef float vf4 __attribute__((vector_size(16)));
  auto op = [](auto u, auto v) { return kMax ? (u > v ? u : v) : u + v; };
  const vf8 a = op(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  const vf4 c = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  const vf4 d = op(c, __builtin_shufflevector(c, c, 2, 3, 0, 1));
  return op(d[0], d[1]);
}
inline float hmax(vf16 x) { return reduce16<true>(x); }
inline float hsum(vf16 x) { return reduce16<false>(x); }

}  // namespace simd
MMKERN_CPU_END
