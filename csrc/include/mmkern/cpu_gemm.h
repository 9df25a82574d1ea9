// A small packed fp32 GEMM for the CPU kernels (host only).
//
// The op kernels fuse their own data movement into the packing step: an operand is described by an
// element function f(row, col) -> float (a patch gather, a dtype conversion, a transposed view), packed
// into a cache-sized panel, and multiplied by a register-blocked micro-kernel. So an op never
// materialises an im2col buffer or a converted copy of its inputs, and still runs near the machine's
// sgemm rate. Everything here is single-threaded: the op kernels split their work over OpenMP threads.
// With AVX-512 BF16 a bf16 variant (packed raw bf16, vdpbf16ps) is compiled too; bf16_dot_is_faster()
// says whether to use it, as on some CPUs converting bf16 to fp32 for the fp32 kernel is faster.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/simd_cpu.h"

MMKERN_CPU_BEGIN
namespace cpu {

using simd::vf;

// Micro tile: kMR rows x kNR columns (two vectors) of C held in registers, leaving registers for the two B vectors
// and the A broadcast: 8 x 32 with AVX-512 (16 of 32 zmm), 6 x 16 with AVX2 (12 of 16 ymm; BLIS's Haswell kernel),
// 6 x 8 on SSE2, 8 x 8 on NEON.
constexpr int kNR = 2 * simd::kLanes;
constexpr int kMR = simd::kVecRegs == 32 ? 8 : 6;
// Depth of one packed panel: kKC x kNR floats of B (32 KiB with AVX-512, 15 KiB with AVX2) stay in L1 across a row
// panel of A. A multiple of kMR and kNR, so that the contrastive kernels' tiles (kKC rows or columns) are whole
// panels.
constexpr int64_t kKC = kMR == 8 ? 256 : 240;
static_assert(kKC % kMR == 0 && kKC % kNR == 0, "a kKC block must hold whole micro-panels");

// C[0:mr, 0:nr] (row stride ldc) = (accumulate ? C : 0) + sum_k Ap[k][0:mr] * Bp[k][0:nr],
// with Ap packed k-major in kMR-wide rows and Bp k-major in kNR-wide rows, both zero padded. Every loop over the
// accumulators is unrolled and the edge path reads them from a stored tile, so that they stay in registers (see
// attn_cpu::micro).
inline void micro_kernel(int64_t K, const float* __restrict__ Ap, const float* __restrict__ Bp, float* C,
                         int64_t ldc, int mr, int nr, bool accumulate) {
  constexpr int kL = simd::kLanes;
  vf c[kMR][2];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) c[i][0] = c[i][1] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = simd::load(Bp + k * kNR);
    const vf b1 = simd::load(Bp + k * kNR + kL);
    const float* a = Ap + k * kMR;
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      c[i][0] += a[i] * b0;
      c[i][1] += a[i] * b1;
    }
  }
  if (mr == kMR && nr == kNR) {
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      float* row = C + i * ldc;
      simd::store(row, accumulate ? simd::load(row) + c[i][0] : c[i][0]);
      simd::store(row + kL, accumulate ? simd::load(row + kL) + c[i][1] : c[i][1]);
    }
    return;
  }
  alignas(64) float tile[kMR][kNR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    simd::store(tile[i], c[i][0]);
    simd::store(tile[i] + kL, c[i][1]);
  }
  for (int i = 0; i < mr; ++i) {
    float* row = C + i * ldc;
    for (int j = 0; j < nr; ++j) row[j] = accumulate ? row[j] + tile[i][j] : tile[i][j];
  }
}

// Packs A[i0:i0+mr, k0:k0+kc] (element function a(i, k)) into a k-major panel of kMR-wide rows.
template <class FA>
inline void pack_a(const FA& a, int64_t i0, int mr, int64_t k0, int64_t kc, float* __restrict__ dst) {
  if (mr == kMR) {  // k outer: the panel is written in order, and A's rows are read in step
    for (int64_t k = 0; k < kc; ++k)
#pragma GCC unroll 8
      for (int i = 0; i < kMR; ++i) dst[k * kMR + i] = a(i0 + i, k0 + k);
    return;
  }
  for (int i = 0; i < kMR; ++i) {
    if (i < mr) {
      for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = a(i0 + i, k0 + k);
    } else {
      for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = 0.f;
    }
  }
}

// Packs B[k0:k0+kc, j0:j0+nr] (element function b(k, j)) into a k-major panel of kNR-wide rows.
template <class FB>
inline void pack_b(const FB& b, int64_t k0, int64_t kc, int64_t j0, int nr, float* __restrict__ dst) {
  for (int64_t k = 0; k < kc; ++k) {
    float* row = dst + k * kNR;
    int j = 0;
    for (; j < nr; ++j) row[j] = b(k0 + k, j0 + j);
    for (; j < kNR; ++j) row[j] = 0.f;
  }
}

// Layout of a fully packed B (K x N): k-blocks of kKC rows, each holding round_up(N, kNR) / kNR panels of
// kc x kNR floats. Packing B once and sharing it between threads pays off when B is a weight.
inline int64_t packed_b_floats(int64_t K, int64_t N) { return K * round_up(N, kNR); }

template <class FB>
void pack_b_all(const FB& b, int64_t K, int64_t N, float* dst) {
  const int64_t n_padded = round_up(N, kNR);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    for (int64_t j0 = 0; j0 < N; j0 += kNR)
      pack_b(b, k0, kc, j0, static_cast<int>(std::min<int64_t>(kNR, N - j0)), dst + k0 * n_padded + j0 * kc);
  }
}

// Floats of workspace for gemm_packed_b (one packed A panel).
constexpr int64_t kPanelAFloats = kKC * kMR;

// C (M x N, fp32, row stride ldc) = (accumulate ? C : 0) + A (M x K) * B, with B packed by pack_b_all.
// `ws` holds kPanelAFloats floats. Single-threaded.
template <class FA>
void gemm_packed_b(int64_t M, int64_t N, int64_t K, const FA& a, const float* Bp, float* C, int64_t ldc,
                   bool accumulate, float* ws) {
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const int64_t n_padded = round_up(N, kNR);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const float* Bk = Bp + k0 * n_padded;
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
      pack_a(a, i0, mr, k0, kc, ws);
      for (int64_t j0 = 0; j0 < N; j0 += kNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kNR, N - j0));
        micro_kernel(kc, ws, Bk + j0 * kc, C + i0 * ldc + j0, ldc, mr, nr, accumulate || k0 > 0);
      }
    }
  }
}

// Floats of workspace that `gemm` needs for a product with K rows and N columns of B.
inline int64_t gemm_workspace_floats(int64_t K, int64_t N) { return packed_b_floats(std::min(K, kKC), N) + kPanelAFloats; }

// C (M x N, fp32, row stride ldc) = (accumulate ? C : 0) + A (M x K) * B (K x N), packing B one k-block
// at a time. `ws` holds gemm_workspace_floats(K, N) floats. Single-threaded.
template <class FA, class FB>
void gemm(int64_t M, int64_t N, int64_t K, const FA& a, const FB& b, float* C, int64_t ldc, bool accumulate,
          float* ws) {
  if (K == 0) {
    gemm_packed_b(M, N, K, a, ws, C, ldc, accumulate, ws);
    return;
  }
  float* Bp = ws;
  float* Ap = ws + packed_b_floats(std::min(K, kKC), N);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    auto b_block = [&](int64_t k, int64_t j) { return b(k0 + k, j); };
    auto a_block = [&](int64_t i, int64_t k) { return a(i, k0 + k); };
    pack_b_all(b_block, kc, N, Bp);
    gemm_packed_b(M, N, kc, a_block, Bp, C, ldc, accumulate || k0 > 0, Ap);
  }
}

// Element function over a strided 2-D array of any float storage type.
template <typename T>
struct Strided {
  const T* p;
  int64_t row_stride, col_stride;
  float operator()(int64_t r, int64_t c) const { return to_float(p[r * row_stride + c * col_stride]); }
};

// ---------------------------------------------------------------------------------------------------------
// bf16 x bf16 -> fp32 with AVX-512 BF16 (vdpbf16ps): twice the multiply rate of the fp32 kernel and half
// the packed bytes. Operands are packed as raw bf16 bits in k-pairs: vdpbf16ps multiplies lane l's pair
// (a[k], a[k+1]) by (b[k][l], b[k+1][l]) and adds both products to the fp32 accumulator, so an A pair is
// broadcast as one 32-bit word and a B row pair holds the two k rows interleaved per column. K is padded
// to even with zeros. Element functions return bf16 bits (uint16_t).
#if defined(__AVX512BF16__)
#define MMKERN_CPU_BF16_DOT 1
static_assert(kMR == 8 && kNR == 32, "the bf16 kernel is laid out for AVX-512's 8 x 32 tile");

// Packed B panel: (kc/2) pair rows of kNR columns x 2 bf16 (two zmm registers per pair row).
constexpr int64_t kPairRow = 2 * kNR;

inline void micro_kernel_bf16(int64_t kpairs, const uint16_t* __restrict__ Ap, const uint16_t* __restrict__ Bp,
                              float* C, int64_t ldc, int mr, int nr, bool accumulate) {
  __m512 c[kMR][2];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kpairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + p * kPairRow);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + p * kPairRow + kNR);
    const uint16_t* a = Ap + p * 2 * kMR;
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      uint32_t pair;
      std::memcpy(&pair, a + 2 * i, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      c[i][0] = _mm512_dpbf16_ps(c[i][0], av, b0);
      c[i][1] = _mm512_dpbf16_ps(c[i][1], av, b1);
    }
  }
  if (mr == kMR && nr == kNR) {
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      float* row = C + i * ldc;
      __m512 lo = c[i][0], hi = c[i][1];
      if (accumulate) {
        lo = _mm512_add_ps(lo, _mm512_loadu_ps(row));
        hi = _mm512_add_ps(hi, _mm512_loadu_ps(row + 16));
      }
      _mm512_storeu_ps(row, lo);
      _mm512_storeu_ps(row + 16, hi);
    }
    return;
  }
  alignas(64) float tile[kMR][kNR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    _mm512_store_ps(tile[i], c[i][0]);
    _mm512_store_ps(tile[i] + 16, c[i][1]);
  }
  for (int i = 0; i < mr; ++i) {
    float* row = C + i * ldc;
    for (int j = 0; j < nr; ++j) row[j] = accumulate ? row[j] + tile[i][j] : tile[i][j];
  }
}

// Packs A[i0:i0+mr, k0:k0+kc] into (kc+1)/2 pair rows of kMR 32-bit words (row i: a[i][k] low, a[i][k+1] high).
template <class FA>
inline void pack_a_bf16(const FA& a, int64_t i0, int mr, int64_t k0, int64_t kc, uint16_t* __restrict__ dst) {
  const int64_t kc2 = round_up(kc, 2);
  if (mr == kMR && kc == kc2) {  // k outer: the panel is written in order
    for (int64_t k = 0; k < kc; k += 2)
#pragma GCC unroll 8
      for (int i = 0; i < kMR; ++i) {
        dst[k * kMR + 2 * i] = a(i0 + i, k0 + k);
        dst[k * kMR + 2 * i + 1] = a(i0 + i, k0 + k + 1);
      }
    return;
  }
  for (int i = 0; i < kMR; ++i) {
    uint16_t* d = dst + 2 * i;
    if (i < mr) {
      int64_t k = 0;
      for (; k < kc; ++k) d[(k >> 1) * 2 * kMR + (k & 1)] = a(i0 + i, k0 + k);
      for (; k < kc2; ++k) d[(k >> 1) * 2 * kMR + (k & 1)] = 0;
    } else {
      for (int64_t k = 0; k < kc2; ++k) d[(k >> 1) * 2 * kMR + (k & 1)] = 0;
    }
  }
}

// Packs B[k0:k0+kc, j0:j0+nr] into (kc+1)/2 pair rows of kPairRow bf16 (columns 0-15, then 16-31).
template <class FB>
inline void pack_b_bf16(const FB& b, int64_t k0, int64_t kc, int64_t j0, int nr, uint16_t* __restrict__ dst) {
  const int64_t kc2 = round_up(kc, 2);
  for (int64_t k = 0; k < kc2; ++k) {
    uint16_t* row = dst + (k >> 1) * kPairRow + (k & 1);
    for (int j = 0; j < kNR; ++j) {
      const int64_t slot = (j >> 4) * kNR + (j & 15) * 2;  // zmm j/16, lane j%16, pair half k&1
      row[slot] = (k < kc && j < nr) ? b(k0 + k, j0 + j) : uint16_t{0};
    }
  }
}

// Fully packed bf16 B (K x N): k-blocks of kKC rows, as pack_b_all, in pair rows. Counts are uint16_t.
inline int64_t packed_b_bf16_elems(int64_t K, int64_t N) { return round_up(K, 2) * round_up(N, kNR); }

template <class FB>
void pack_b_all_bf16(const FB& b, int64_t K, int64_t N, uint16_t* dst) {
  const int64_t n_padded = round_up(N, kNR);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    for (int64_t j0 = 0; j0 < N; j0 += kNR)
      pack_b_bf16(b, k0, kc, j0, static_cast<int>(std::min<int64_t>(kNR, N - j0)),
                  dst + k0 * n_padded + j0 * round_up(kc, 2));
  }
}

// uint16_t workspace for gemm_packed_b_bf16 (one packed A panel).
constexpr int64_t kPanelABf16 = kKC * kMR;

// C (M x N, fp32) = (accumulate ? C : 0) + A (M x K, bf16 bits) * B (packed by pack_b_all_bf16). Single-threaded.
template <class FA>
void gemm_packed_b_bf16(int64_t M, int64_t N, int64_t K, const FA& a, const uint16_t* Bp, float* C, int64_t ldc,
                        bool accumulate, uint16_t* ws) {
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const int64_t n_padded = round_up(N, kNR);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0), kc2 = round_up(kc, 2);
    const uint16_t* Bk = Bp + k0 * n_padded;
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
      pack_a_bf16(a, i0, mr, k0, kc, ws);
      for (int64_t j0 = 0; j0 < N; j0 += kNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kNR, N - j0));
        micro_kernel_bf16(kc2 / 2, ws, Bk + j0 * kc2, C + i0 * ldc + j0, ldc, mr, nr, accumulate || k0 > 0);
      }
    }
  }
}

inline int64_t gemm_bf16_workspace_elems(int64_t K, int64_t N) {
  return packed_b_bf16_elems(std::min(K, kKC), N) + kPanelABf16;
}

// As gemm, for bf16 operands: B is packed one k-block at a time. `ws` holds gemm_bf16_workspace_elems(K, N).
template <class FA, class FB>
void gemm_bf16(int64_t M, int64_t N, int64_t K, const FA& a, const FB& b, float* C, int64_t ldc, bool accumulate,
               uint16_t* ws) {
  if (K == 0) {
    gemm_packed_b_bf16(M, N, K, a, ws, C, ldc, accumulate, ws);
    return;
  }
  uint16_t* Bp = ws;
  uint16_t* Ap = ws + packed_b_bf16_elems(std::min(K, kKC), N);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    auto b_block = [&](int64_t k, int64_t j) { return b(k0 + k, j); };
    auto a_block = [&](int64_t i, int64_t k) { return a(i, k0 + k); };
    pack_b_all_bf16(b_block, kc, N, Bp);
    gemm_packed_b_bf16(M, N, kc, a_block, Bp, C, ldc, accumulate || k0 > 0, Ap);
  }
}

// Whether vdpbf16ps beats converting bf16 to fp32 and using the fp32 kernel on this CPU, measured once
// on L1-resident panels. It is not a given: on some Xeons (measured: family 6 model 207 under a VM) one
// vdpbf16ps (64 flops) issues about every 5 cycles while two fp32 FMAs (64 flops) issue every cycle.
inline bool bf16_dot_is_faster() {
  static const bool faster = [] {
    std::vector<float> af(kKC * kMR, 0.5f), bf(kKC * kNR, 0.25f), c(kMR * kNR);
    std::vector<uint16_t> ah(kKC * kMR, 0x3f00), bh(kKC * kNR, 0x3e80);
    auto seconds = [](auto&& fn) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int rep = 0; rep < 64; ++rep) fn();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    double t_f32 = 1e30, t_bf16 = 1e30;
    for (int round = 0; round < 5; ++round) {  // alternate and keep the best: other processes share the cores
      t_f32 = std::min(t_f32, seconds([&] { micro_kernel(kKC, af.data(), bf.data(), c.data(), kNR, kMR, kNR, true); }));
      t_bf16 = std::min(t_bf16, seconds([&] {
        micro_kernel_bf16(kKC / 2, ah.data(), bh.data(), c.data(), kNR, kMR, kNR, true);
      }));
    }
    return t_bf16 < t_f32;
  }();
  return faster;
}
#endif  // __AVX512BF16__

}  // namespace cpu
MMKERN_CPU_END
