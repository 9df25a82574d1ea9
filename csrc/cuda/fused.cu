// Fused element-wise ops on CUDA: bias + GELU and residual add + LayerNorm, forward and backward. The math is the
// CPU kernels' (mmkern/fused.h); only the spreading of work differs. bias + GELU: (32 columns x 8 rows) thread
// blocks striding over rows, the bias gradient reduced in shared memory and added with one atomic per column and
// block. add + LayerNorm: one 128-thread block per row, block reductions for the statistics; the parameter
// gradients are fp32 atomics per row and column.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "mmkern/cuda_gemm.cuh"
#include "mmkern/fused.h"

namespace mmkern {
namespace {

constexpr int kCols = 32, kRows = 8, kLnThreads = 128;

template <typename T, GeluKind kKind>
__global__ void bias_gelu_fwd_kernel(const T* x, const T* bias, T* out, int64_t rows, int64_t n, int64_t sx0,
                                     int64_t sx1, int64_t sb, int64_t so0) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  if (j >= n) return;
  const float b = bias ? cuda::load(bias, j * sb) : 0.f;
  for (int64_t i = blockIdx.y * static_cast<int64_t>(kRows) + threadIdx.y; i < rows;
       i += static_cast<int64_t>(gridDim.y) * kRows)
    cuda::store(out, i * so0 + j, gelu_value<kKind>(cuda::load(x, i * sx0 + j * sx1) + b));
}

template <typename T, GeluKind kKind>
__global__ void bias_gelu_bwd_kernel(const T* go, const T* x, const T* bias, T* gx, float* gb, int64_t rows, int64_t n,
                                     int64_t sg0, int64_t sg1, int64_t sx0, int64_t sx1, int64_t sb, int64_t sgx0) {
  __shared__ float partial[kRows][kCols];
  const int64_t j = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  float acc = 0.f;
  if (j < n) {
    const float b = bias ? cuda::load(bias, j * sb) : 0.f;
    for (int64_t i = blockIdx.y * static_cast<int64_t>(kRows) + threadIdx.y; i < rows;
         i += static_cast<int64_t>(gridDim.y) * kRows) {
      const float d = cuda::load(go, i * sg0 + j * sg1) * gelu_derivative<kKind>(cuda::load(x, i * sx0 + j * sx1) + b);
      cuda::store(gx, i * sgx0 + j, d);
      acc += d;
    }
  }
  if (!gb) return;
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    for (int r = 1; r < kRows; ++r) acc += partial[r][threadIdx.x];
    atomicAdd(gb + j, acc);
  }
}

// Sum over the block of one value per thread (kLnThreads threads); every thread gets the result.
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kLnThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T>
__global__ void add_ln_fwd_kernel(const T* x, const T* r, const T* w, const T* b, T* s, T* out, float* mean,
                                  float* rstd, int64_t d, float eps, int64_t sx0, int64_t sx1, int64_t sr0, int64_t sr1,
                                  int64_t sw, int64_t sb, int64_t ss0, int64_t so0) {
  __shared__ float shared[kLnThreads / 32];
  const int64_t i = blockIdx.x;
  // The normalised input: x, or the sum x + r rounded to T as it is stored.
  auto input = [&](int64_t j) { return s ? cuda::load(s, i * ss0 + j) : cuda::load(x, i * sx0 + j * sx1); };
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kLnThreads) {
    if (s) {
      cuda::store(s, i * ss0 + j, cuda::load(x, i * sx0 + j * sx1) + cuda::load(r, i * sr0 + j * sr1));
    }
    sum += input(j);
  }
  const float mu = block_sum(sum, shared) / static_cast<float>(d);
  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kLnThreads) sq += (input(j) - mu) * (input(j) - mu);
  const float rs = rsqrtf(block_sum(sq, shared) / static_cast<float>(d) + eps);
  for (int64_t j = threadIdx.x; j < d; j += kLnThreads) {
    float y = (input(j) - mu) * rs;
    if (w) y *= cuda::load(w, j * sw);
    if (b) y += cuda::load(b, j * sb);
    cuda::store(out, i * so0 + j, y);
  }
  if (threadIdx.x == 0) {
    mean[i] = mu;
    rstd[i] = rs;
  }
}

template <typename T>
__global__ void add_ln_bwd_kernel(const T* go, const T* gs, const T* s, const T* w, const float* mean,
                                  const float* rstd, T* gx, float* gw, float* gb, int64_t d, int64_t sg0, int64_t sg1,
                                  int64_t sgs0, int64_t sgs1, int64_t ss0, int64_t ss1, int64_t sw, int64_t sgx0) {
  __shared__ float shared[kLnThreads / 32];
  const int64_t i = blockIdx.x;
  const float mu = mean[i], rs = rstd[i];
  auto xhat = [&](int64_t j) { return (cuda::load(s, i * ss0 + j * ss1) - mu) * rs; };
  auto g = [&](int64_t j) { return cuda::load(go, i * sg0 + j * sg1) * (w ? cuda::load(w, j * sw) : 1.f); };
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kLnThreads) {
    sum_g += g(j);
    sum_gx += g(j) * xhat(j);
  }
  const float mg = block_sum(sum_g, shared) / static_cast<float>(d);
  const float mgx = block_sum(sum_gx, shared) / static_cast<float>(d);
  for (int64_t j = threadIdx.x; j < d; j += kLnThreads) {
    const float xh = xhat(j);
    if (gx) {
      float v = rs * (g(j) - mg - xh * mgx);
      if (gs) v += cuda::load(gs, i * sgs0 + j * sgs1);
      cuda::store(gx, i * sgx0 + j, v);
    }
    if (gw) {
      const float o = cuda::load(go, i * sg0 + j * sg1);
      atomicAdd(gw + j, o * xh);
      atomicAdd(gb + j, o);
    }
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((rows + kRows - 1) / kRows, 1024)));
}

template <class F>
int with_gelu_kind(int kind, F&& f) {
  check(kind == 0 || kind == 1, "approximate: expected 'none' or 'tanh'");
  if (kind == 0) return f(std::integral_constant<GeluKind, GeluKind::erf>{});
  return f(std::integral_constant<GeluKind, GeluKind::tanh>{});
}

}  // namespace

int bias_gelu_fwd_cuda(const BiasGeluFwdParams& p, uintptr_t stream_handle) {
  const Tensor &x = p.x, &bias = p.bias, &out = p.out;
  check_dims(x, 2, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  check(!bias.present || (bias.ndim == 1 && bias.size(0) == n), "bias: expected (N,) with N the last dim of x");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return with_gelu_kind(p.kind, [&](auto k) -> int {
    constexpr GeluKind kKind = decltype(k)::value;
    return dispatch_float(x.dtype, "bias_gelu", [&](auto tag) -> int {
      using T = typename decltype(tag)::type;
      const dim3 grid(static_cast<unsigned>((n + kCols - 1) / kCols), row_blocks(rows)), block(kCols, kRows);
      bias_gelu_fwd_kernel<T, kKind><<<grid, block, 0, stream>>>(
          x.ptr<T>(), bias.present ? bias.ptr<T>() : nullptr, out.ptr<T>(), rows, n, x.stride(0), x.stride(1),
          bias.present ? bias.stride(0) : 0, out.stride(0));
      return cudaGetLastError();
    });
  });
}

int bias_gelu_bwd_cuda(const BiasGeluBwdParams& p, uintptr_t stream_handle) {
  const Tensor &grad_out = p.grad_out, &x = p.x, &bias = p.bias, &grad_x = p.grad_x, &grad_bias = p.grad_bias;
  check_dims(x, 2, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  check(!grad_bias.present || (grad_bias.dtype == DType::f32 && grad_bias.stride(0) == 1),
        "grad_bias: expected contiguous fp32 (N,)");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (grad_bias.present) {
    cudaError_t err = cudaMemsetAsync(grad_bias.data, 0, n * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  return with_gelu_kind(p.kind, [&](auto k) -> int {
    constexpr GeluKind kKind = decltype(k)::value;
    return dispatch_float(x.dtype, "bias_gelu", [&](auto tag) -> int {
      using T = typename decltype(tag)::type;
      const dim3 grid(static_cast<unsigned>((n + kCols - 1) / kCols), row_blocks(rows)), block(kCols, kRows);
      bias_gelu_bwd_kernel<T, kKind><<<grid, block, 0, stream>>>(
          grad_out.ptr<T>(), x.ptr<T>(), bias.present ? bias.ptr<T>() : nullptr, grad_x.ptr<T>(),
          grad_bias.present ? grad_bias.ptr<float>() : nullptr, rows, n, grad_out.stride(0), grad_out.stride(1),
          x.stride(0), x.stride(1), bias.present ? bias.stride(0) : 0, grad_x.stride(0));
      return cudaGetLastError();
    });
  });
}

int add_layer_norm_fwd_cuda(const AddLayerNormFwdParams& p, uintptr_t stream_handle) {
  const Tensor &x = p.x, &residual = p.residual, &weight = p.weight, &bias = p.bias, &sum_out = p.sum_out;
  const Tensor &out = p.out, &mean = p.mean, &rstd = p.rstd;
  check_dims(x, 2, "x");
  check(residual.present == sum_out.present, "sum_out: given exactly when residual is");
  const int64_t rows = x.size(0), d = x.size(1);
  if (rows == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(x.dtype, "add_layer_norm", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    add_ln_fwd_kernel<T><<<static_cast<unsigned>(rows), kLnThreads, 0, stream>>>(
        x.ptr<T>(), residual.present ? residual.ptr<T>() : nullptr, weight.present ? weight.ptr<T>() : nullptr,
        bias.present ? bias.ptr<T>() : nullptr, sum_out.present ? sum_out.ptr<T>() : nullptr, out.ptr<T>(),
        mean.ptr<float>(), rstd.ptr<float>(), d, static_cast<float>(p.eps), x.stride(0), x.stride(1),
        residual.present ? residual.stride(0) : 0, residual.present ? residual.stride(1) : 0,
        weight.present ? weight.stride(0) : 0, bias.present ? bias.stride(0) : 0,
        sum_out.present ? sum_out.stride(0) : 0, out.stride(0));
    return cudaGetLastError();
  });
}

int add_layer_norm_bwd_cuda(const AddLayerNormBwdParams& p, uintptr_t stream_handle) {
  const Tensor &grad_out = p.grad_out, &grad_sum = p.grad_sum, &s = p.s, &weight = p.weight, &mean = p.mean;
  const Tensor &rstd = p.rstd, &grad_x = p.grad_x, &grad_weight = p.grad_weight, &grad_bias = p.grad_bias;
  check_dims(s, 2, "s");
  const int64_t rows = s.size(0), d = s.size(1);
  check(grad_weight.present == grad_bias.present, "grad_weight, grad_bias: computed together");
  check(!grad_weight.present || (grad_weight.stride(0) == 1 && grad_bias.stride(0) == 1),
        "grad_weight, grad_bias: expected contiguous fp32 (D,)");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (grad_weight.present) {
    cudaError_t err = cudaMemsetAsync(grad_weight.data, 0, d * sizeof(float), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(grad_bias.data, 0, d * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  if (rows == 0) return 0;
  return dispatch_float(s.dtype, "add_layer_norm", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    add_ln_bwd_kernel<T><<<static_cast<unsigned>(rows), kLnThreads, 0, stream>>>(
        grad_out.ptr<T>(), grad_sum.present ? grad_sum.ptr<T>() : nullptr, s.ptr<T>(),
        weight.present ? weight.ptr<T>() : nullptr, mean.ptr<float>(), rstd.ptr<float>(),
        grad_x.present ? grad_x.ptr<T>() : nullptr, grad_weight.present ? grad_weight.ptr<float>() : nullptr,
        grad_bias.present ? grad_bias.ptr<float>() : nullptr, d, grad_out.stride(0), grad_out.stride(1),
        grad_sum.present ? grad_sum.stride(0) : 0, grad_sum.present ? grad_sum.stride(1) : 0, s.stride(0),
        s.stride(1), weight.present ? weight.stride(0) : 0, grad_x.stride(0));
    return cudaGetLastError();
  });
}

}  // namespace mmkern
