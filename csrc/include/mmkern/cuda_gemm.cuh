// A generic tiled fp32-accumulating GEMM for CUDA kernels whose operands are gathered, not stored:
// C[i, j] = sum_k a(i, k) * b(k, j), handed to epi(i, j, value). The loaders and the epilogue are
// functors, so an op fuses its own gather (patches, transposes, dtype conversion) and its epilogue
// (bias, position add, scatter) into one pass. SIMT code: correct on every arch, not tensor-core fast.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "mmkern/common.h"

namespace mmkern::cuda {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

template <class LoadA, class LoadB, class Epilogue>
__global__ void __launch_bounds__(kThreads) tiled_gemm_kernel(int64_t M, int64_t N, int64_t K, LoadA a, LoadB b,
                                                              Epilogue epi) {
  __shared__ float As[kTileK][kTileM + 4];
  __shared__ float Bs[kTileK][kTileN + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileM, col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    for (int idx = threadIdx.x; idx < kTileM * kTileK; idx += kThreads) {
      const int i = idx / kTileK, k = idx % kTileK;
      As[k][i] = (row0 + i < M && k0 + k < K) ? a(row0 + i, k0 + k) : 0.f;
    }
    for (int idx = threadIdx.x; idx < kTileN * kTileK; idx += kThreads) {
      const int k = idx / kTileN, j = idx % kTileN;
      Bs[k][j] = (col0 + j < N && k0 + k < K) ? b(k0 + k, col0 + j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = As[k][ty * 4 + r];
#pragma unroll
      for (int c = 0; c < 4; ++c) bv[c] = Bs[k][tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += av[r] * bv[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = row0 + ty * 4 + r, j = col0 + tx * 4 + c;
      if (i < M && j < N) epi(i, j, acc[r][c]);
    }
}

template <class LoadA, class LoadB, class Epilogue>
cudaError_t tiled_gemm(int64_t M, int64_t N, int64_t K, LoadA a, LoadB b, Epilogue epi, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((N + kTileN - 1) / kTileN), static_cast<unsigned>((M + kTileM - 1) / kTileM));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  tiled_gemm_kernel<<<grid, kThreads, 0, stream>>>(M, N, K, a, b, epi);
  return cudaGetLastError();
}

// Device-side load/store of a float storage type.
template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) { return to_float(p[i]); }
template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, float v) { p[i] = from_float<T>(v); }

}  // namespace mmkern::cuda
