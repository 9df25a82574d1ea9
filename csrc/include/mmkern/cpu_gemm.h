// A small packed fp32 GEMM for the CPU kernels (host only).
//
// The op kernels fuse their own data movement into the packing step: an operand is described by an
// element function f(row, col) -> float (a patch gather, a dtype conversion, a transposed view), packed
// into a cache-sized panel, and multiplied by a register-blocked micro-kernel. So an op never
// materialises an im2col buffer or a converted copy of its inputs, and still runs near the machine's
// sgemm rate. Everything here is single-threaded: the op kernels split their work over OpenMP threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "mmkern/common.h"

namespace mmkern::cpu {

// Micro tile: kMR rows x kNR columns of C held in registers (16 accumulators of 16 lanes with AVX-512,
// leaving registers for the two B vectors and the A broadcast).
constexpr int kMR = 8;
constexpr int kNR = 32;
// Depth of one packed panel: kKC x kNR floats of B (32 KiB) stay in L1 across a row panel of A.
constexpr int64_t kKC = 256;

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[0:mr, 0:nr] (row stride ldc) = (accumulate ? C : 0) + sum_k Ap[k][0:mr] * Bp[k][0:nr],
// with Ap packed k-major in kMR-wide rows and Bp k-major in kNR-wide rows, both zero padded.
inline void micro_kernel(int64_t K, const float* __restrict__ Ap, const float* __restrict__ Bp, float* C,
                         int64_t ldc, int mr, int nr, bool accumulate) {
  v16 c[kMR][2];
  for (int i = 0; i < kMR; ++i) c[i][0] = c[i][1] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const v16 b0 = *reinterpret_cast<const v16*>(Bp + k * kNR);
    const v16 b1 = *reinterpret_cast<const v16*>(Bp + k * kNR + 16);
    const float* a = Ap + k * kMR;
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      c[i][0] += a[i] * b0;
      c[i][1] += a[i] * b1;
    }
  }
  if (mr == kMR && nr == kNR) {
    for (int i = 0; i < kMR; ++i) {
      v16* row = reinterpret_cast<v16*>(C + i * ldc);
      if (accumulate) {
        row[0] += c[i][0];
        row[1] += c[i][1];
      } else {
        row[0] = c[i][0];
        row[1] = c[i][1];
      }
    }
    return;
  }
  for (int i = 0; i < mr; ++i) {
    float* row = C + i * ldc;
    for (int j = 0; j < nr; ++j) {
      const float v = c[i][j >> 4][j & 15];
      row[j] = accumulate ? row[j] + v : v;
    }
  }
}

// Packs A[i0:i0+mr, k0:k0+kc] (element function a(i, k)) into a k-major panel of kMR-wide rows.
template <class FA>
inline void pack_a(const FA& a, int64_t i0, int mr, int64_t k0, int64_t kc, float* __restrict__ dst) {
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

}  // namespace mmkern::cpu
