// Fused element-wise ops on CUDA: bias + GELU and residual add + LayerNorm, forward and backward. The math is the
// CPU kernels' (mmkern/fused.h); only the spreading of work differs. bias + GELU: (32 column groups x 8 rows)
// thread blocks striding over rows, the bias gradient reduced in shared memory and added with one atomic per column
// and block. add + LayerNorm: 128-thread blocks, one row at a time, block reductions for the statistics; the
// parameter gradients are summed per block (in shared memory, or in the block's own workspace row when 2·D floats
// do not fit) into a workspace of (blocks, 2, D) partials, then column-summed by a second kernel: no atomics.
//
// Every kernel has a vector form (V = 16 / sizeof(T): one 16-byte load or store per V adjacent columns) that the
// launchers pick when all the tensors' pointers are 16-byte aligned, their columns adjacent, their row strides and
// the row length multiples of V; else the scalar form (V = 1, any strides).
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "mmkern/cuda_gemm.cuh"
#include "mmkern/fused.h"

namespace mmkern {
namespace {

constexpr int kCols = 32, kRows = 8, kLnThreads = 128;
// LayerNorm partials stay in shared memory up to D = 5120 (40 KB: within the 48 KB a launch gets without opting in).
constexpr int64_t kSmemPartialFloats = 40 * 1024 / 4;

// p[off + j·col_stride], V adjacent elements from j on, as floats: one 16-byte load when V > 1 (then col_stride is 1
// and p + off + j is 16-byte aligned).
template <int V, typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t off, int64_t j, int64_t col_stride, float (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = to_float(p[off + j * col_stride]);
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    union {
      uint4 raw;
      T e[V];
    } u;
    u.raw = *reinterpret_cast<const uint4*>(p + off + j);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = to_float(u.e[k]);
  }
}

// p[off + j .. off + j + V) = v (unit column stride), one 16-byte store when V > 1.
template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t off, const float (&v)[V]) {
  if constexpr (V == 1) {
    p[off] = from_float<T>(v[0]);
  } else {
    union {
      uint4 raw;
      T e[V];
    } u;
#pragma unroll
    for (int k = 0; k < V; ++k) u.e[k] = from_float<T>(v[k]);
    *reinterpret_cast<uint4*>(p + off) = u.raw;
  }
}

template <typename T, int V, GeluKind kKind>
__global__ void bias_gelu_fwd_kernel(const T* x, const T* bias, T* out, int64_t rows, int64_t n, int64_t sx0,
                                     int64_t sx1, int64_t sb, int64_t so0) {
  const int64_t j = (blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x) * V;
  if (j >= n) return;
  float b[V] = {};
  if (bias) load_vec<V>(bias, 0, j, sb, b);
  for (int64_t i = blockIdx.y * static_cast<int64_t>(kRows) + threadIdx.y; i < rows;
       i += static_cast<int64_t>(gridDim.y) * kRows) {
    float v[V];
    load_vec<V>(x, i * sx0, j, sx1, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = gelu_value<kKind>(v[k] + b[k]);
    store_vec<V>(out, i * so0 + j, v);
  }
}

template <typename T, int V, GeluKind kKind>
__global__ void bias_gelu_bwd_kernel(const T* go, const T* x, const T* bias, T* gx, float* gb, int64_t rows, int64_t n,
                                     int64_t sg0, int64_t sg1, int64_t sx0, int64_t sx1, int64_t sb, int64_t sgx0) {
  __shared__ float partial[V][kRows][kCols];
  const int64_t j = (blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x) * V;
  float acc[V] = {};
  if (j < n) {
    float b[V] = {};
    if (bias) load_vec<V>(bias, 0, j, sb, b);
    for (int64_t i = blockIdx.y * static_cast<int64_t>(kRows) + threadIdx.y; i < rows;
         i += static_cast<int64_t>(gridDim.y) * kRows) {
      float g[V], v[V];
      load_vec<V>(go, i * sg0, j, sg1, g);
      load_vec<V>(x, i * sx0, j, sx1, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = g[k] * gelu_derivative<kKind>(v[k] + b[k]);
        acc[k] += v[k];
      }
      store_vec<V>(gx, i * sgx0 + j, v);
    }
  }
  if (!gb) return;
#pragma unroll
  for (int k = 0; k < V; ++k) partial[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      for (int r = 1; r < kRows; ++r) acc[k] += partial[k][r][threadIdx.x];
      atomicAdd(gb + j + k, acc[k]);
    }
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

// One block per row. Thread t owns columns t·V + [0, V) + m·kLnThreads·V.
template <typename T, int V>
__global__ void add_ln_fwd_kernel(const T* x, const T* r, const T* w, const T* b, T* s, T* out, float* mean,
                                  float* rstd, int64_t d, float eps, int64_t sx0, int64_t sx1, int64_t sr0, int64_t sr1,
                                  int64_t sw, int64_t sb, int64_t ss0, int64_t so0) {
  __shared__ float shared[kLnThreads / 32];
  const int64_t i = blockIdx.x;
  // The normalised input: x, or the sum x + r rounded to T as it is stored.
  auto input = [&](int64_t j, float (&v)[V]) {
    if (s)
      load_vec<V>(s, i * ss0, j, 1, v);
    else
      load_vec<V>(x, i * sx0, j, sx1, v);
  };
  float sum = 0.f;
  for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V) {
    float v[V];
    load_vec<V>(x, i * sx0, j, sx1, v);
    if (s) {
      float rv[V];
      load_vec<V>(r, i * sr0, j, sr1, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = to_float(from_float<T>(v[k] + rv[k]));
      store_vec<V>(s, i * ss0 + j, v);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) sum += v[k];
  }
  float mu = block_sum(sum, shared) / static_cast<float>(d);
  // The first pass's mean corrected here, as the CPU kernel does (fused.cpp, row_sq_dev): mu += Σ(s - mu)/d and
  // Σ(s - mu')² = Σ(s - mu)² - (Σ(s - mu))²/d; its rounding would otherwise reach x̂ times rstd (|mean| >> std).
  float sq = 0.f, dev = 0.f;
  for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V) {
    float v[V];
    input(j, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float c = v[k] - mu;
      sq += c * c;
      dev += c;
    }
  }
  const float sum_dev = block_sum(dev, shared), sum_sq = block_sum(sq, shared);
  mu += sum_dev / static_cast<float>(d);
  const float rs = rsqrtf(fmaxf(sum_sq - sum_dev * sum_dev / static_cast<float>(d), 0.f) / static_cast<float>(d) + eps);
  for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V) {
    float v[V], wv[V], bv[V];
    input(j, v);
    if (w) load_vec<V>(w, 0, j, sw, wv);
    if (b) load_vec<V>(b, 0, j, sb, bv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = (v[k] - mu) * rs;
      if (w) v[k] *= wv[k];
      if (b) v[k] += bv[k];
    }
    store_vec<V>(out, i * so0 + j, v);
  }
  if (threadIdx.x == 0 && mean) {  // absent for inference
    mean[i] = mu;
    rstd[i] = rs;
  }
}

// Blocks stride over the rows. With `partial` (blocks, 2, d): the block's sums of grad_out·x̂ and grad_out over its
// rows, accumulated by the thread that owns each column (so without synchronisation) in shared memory when
// smem_partial, else in the block's own partial row.
template <typename T, int V>
__global__ void add_ln_bwd_kernel(const T* go, const T* gs, const T* s, const T* w, const float* mean,
                                  const float* rstd, T* gx, float* partial, bool smem_partial, int64_t rows, int64_t d,
                                  int64_t sg0, int64_t sg1, int64_t sgs0, int64_t sgs1, int64_t ss0, int64_t ss1,
                                  int64_t sw, int64_t sgx0) {
  __shared__ float shared[kLnThreads / 32];
  extern __shared__ float smem_acc[];
  float* acc = partial ? (smem_partial ? smem_acc : partial + blockIdx.x * 2 * d) : nullptr;
  if (acc)
    for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V)
#pragma unroll
      for (int k = 0; k < V; ++k) acc[j + k] = acc[d + j + k] = 0.f;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const float mu = mean[i], rs = rstd[i];
    // o = grad_out, g = grad_out·w, xh = x̂ at columns j + [0, V)
    auto row = [&](int64_t j, float (&o)[V], float (&g)[V], float (&xh)[V]) {
      float wv[V];
      load_vec<V>(go, i * sg0, j, sg1, o);
      load_vec<V>(s, i * ss0, j, ss1, xh);
      if (w) load_vec<V>(w, 0, j, sw, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        g[k] = w ? o[k] * wv[k] : o[k];
        xh[k] = (xh[k] - mu) * rs;
      }
    };
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V) {
      float o[V], g[V], xh[V];
      row(j, o, g, xh);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sum_g += g[k];
        sum_gx += g[k] * xh[k];
      }
    }
    const float mg = block_sum(sum_g, shared) / static_cast<float>(d);
    const float mgx = block_sum(sum_gx, shared) / static_cast<float>(d);
    for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V) {
      float o[V], g[V], xh[V], v[V], gsv[V];
      row(j, o, g, xh);
      if (gx) {
        if (gs) load_vec<V>(gs, i * sgs0, j, sgs1, gsv);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = rs * (g[k] - mg - xh[k] * mgx) + (gs ? gsv[k] : 0.f);
        store_vec<V>(gx, i * sgx0 + j, v);
      }
      if (acc)
#pragma unroll
        for (int k = 0; k < V; ++k) {
          acc[j + k] += o[k] * xh[k];
          acc[d + j + k] += o[k];
        }
    }
  }
  if (acc && smem_partial)
    for (int64_t j = threadIdx.x * V; j < d; j += kLnThreads * V)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        partial[blockIdx.x * 2 * d + j + k] = acc[j + k];
        partial[blockIdx.x * 2 * d + d + j + k] = acc[d + j + k];
      }
}

// grad_weight[j] / grad_bias[j] = the sums over blocks of partial (blocks, 2, d): (32 columns x 8 block-rows) threads,
// reduced in shared memory; every column written once.
__global__ void ln_param_grad_kernel(const float* partial, int64_t blocks, int64_t d, float* gw, float* gb) {
  __shared__ float sums[kRows][kCols];
  const int64_t j = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;  // in [0, 2d)
  float acc = 0.f;
  if (j < 2 * d)
    for (int64_t r = threadIdx.y; r < blocks; r += kRows) acc += partial[r * 2 * d + j];
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || j >= 2 * d) return;
  for (int r = 1; r < kRows; ++r) acc += sums[r][threadIdx.x];
  if (j < d)
    gw[j] = acc;
  else
    gb[j - d] = acc;
}

// True if the V-wide kernels may run: n (the row length) and each present tensor's row stride multiples of V, its
// data 16-byte aligned and its columns adjacent.
template <typename T>
bool vectorizable(int64_t n, std::initializer_list<const Tensor*> tensors) {
  constexpr int64_t V = 16 / sizeof(T);
  if (n % V != 0) return false;
  for (const Tensor* t : tensors) {
    if (!t->present) continue;
    if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0 || t->stride(-1) != 1) return false;
    if (t->ndim == 2 && t->stride(0) % V != 0) return false;
  }
  return true;
}

// Calls f(std::integral_constant<int, V>{}) with V = 16 / sizeof(T) if vectorizable, else V = 1.
template <typename T, class F>
int with_vector(bool vector, F&& f) {
  if (vector) return f(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  return f(std::integral_constant<int, 1>{});
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
      return with_vector<T>(vectorizable<T>(n, {&x, &bias, &out}), [&](auto vec) -> int {
        constexpr int V = decltype(vec)::value;
        const int64_t groups = (n + V - 1) / V;
        const dim3 grid(static_cast<unsigned>((groups + kCols - 1) / kCols), row_blocks(rows)), block(kCols, kRows);
        bias_gelu_fwd_kernel<T, V, kKind><<<grid, block, 0, stream>>>(
            x.ptr<T>(), bias.present ? bias.ptr<T>() : nullptr, out.ptr<T>(), rows, n, x.stride(0), x.stride(1),
            bias.present ? bias.stride(0) : 0, out.stride(0));
        return cudaGetLastError();
      });
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
      return with_vector<T>(vectorizable<T>(n, {&grad_out, &x, &bias, &grad_x}), [&](auto vec) -> int {
        constexpr int V = decltype(vec)::value;
        const int64_t groups = (n + V - 1) / V;
        const dim3 grid(static_cast<unsigned>((groups + kCols - 1) / kCols), row_blocks(rows)), block(kCols, kRows);
        bias_gelu_bwd_kernel<T, V, kKind><<<grid, block, 0, stream>>>(
            grad_out.ptr<T>(), x.ptr<T>(), bias.present ? bias.ptr<T>() : nullptr, grad_x.ptr<T>(),
            grad_bias.present ? grad_bias.ptr<float>() : nullptr, rows, n, grad_out.stride(0), grad_out.stride(1),
            x.stride(0), x.stride(1), bias.present ? bias.stride(0) : 0, grad_x.stride(0));
        return cudaGetLastError();
      });
    });
  });
}

int add_layer_norm_fwd_cuda(const AddLayerNormFwdParams& p, uintptr_t stream_handle) {
  const Tensor &x = p.x, &residual = p.residual, &weight = p.weight, &bias = p.bias, &sum_out = p.sum_out;
  const Tensor &out = p.out, &mean = p.mean, &rstd = p.rstd;
  check_dims(x, 2, "x");
  check(residual.present == sum_out.present, "sum_out: given exactly when residual is");
  check(mean.present == rstd.present, "mean, rstd: both given or both absent");
  const int64_t rows = x.size(0), d = x.size(1);
  if (rows == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(x.dtype, "add_layer_norm", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    const bool vector = vectorizable<T>(d, {&x, &residual, &weight, &bias, &sum_out, &out});
    return with_vector<T>(vector, [&](auto vec) -> int {
      constexpr int V = decltype(vec)::value;
      add_ln_fwd_kernel<T, V><<<static_cast<unsigned>(rows), kLnThreads, 0, stream>>>(
          x.ptr<T>(), residual.present ? residual.ptr<T>() : nullptr, weight.present ? weight.ptr<T>() : nullptr,
          bias.present ? bias.ptr<T>() : nullptr, sum_out.present ? sum_out.ptr<T>() : nullptr, out.ptr<T>(),
          mean.present ? mean.ptr<float>() : nullptr, rstd.present ? rstd.ptr<float>() : nullptr, d,
          static_cast<float>(p.eps), x.stride(0), x.stride(1),
          residual.present ? residual.stride(0) : 0, residual.present ? residual.stride(1) : 0,
          weight.present ? weight.stride(0) : 0, bias.present ? bias.stride(0) : 0,
          sum_out.present ? sum_out.stride(0) : 0, out.stride(0));
      return cudaGetLastError();
    });
  });
}

int add_layer_norm_bwd_cuda(const AddLayerNormBwdParams& p, uintptr_t stream_handle) {
  const Tensor &grad_out = p.grad_out, &grad_sum = p.grad_sum, &s = p.s, &weight = p.weight, &mean = p.mean;
  const Tensor &rstd = p.rstd, &grad_x = p.grad_x, &grad_weight = p.grad_weight, &grad_bias = p.grad_bias;
  const Tensor& partial = p.partial;
  check_dims(s, 2, "s");
  const int64_t rows = s.size(0), d = s.size(1);
  check(grad_weight.present == grad_bias.present, "grad_weight, grad_bias: computed together");
  check(!grad_weight.present || (grad_weight.stride(0) == 1 && grad_bias.stride(0) == 1),
        "grad_weight, grad_bias: expected contiguous fp32 (D,)");
  check(partial.present == grad_weight.present, "partial: given exactly when grad_weight is");
  if (partial.present) {
    check(partial.dtype == DType::f32 && partial.ndim == 3 && partial.size(0) >= 1 && partial.size(1) == 2 &&
              partial.size(2) == d,
          "partial: expected fp32 (blocks, 2, D)");
    check_contiguous(partial, "partial");
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (rows == 0 || d == 0) {
    if (!grad_weight.present) return 0;
    cudaError_t err = cudaMemsetAsync(grad_weight.data, 0, d * sizeof(float), stream);
    return err == cudaSuccess ? cudaMemsetAsync(grad_bias.data, 0, d * sizeof(float), stream) : err;
  }
  const int64_t blocks = partial.present ? partial.size(0) : std::min<int64_t>(rows, int64_t{1} << 30);
  const bool smem_partial = partial.present && 2 * d <= kSmemPartialFloats;
  return dispatch_float(s.dtype, "add_layer_norm", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    const bool vector = vectorizable<T>(d, {&grad_out, &grad_sum, &s, &weight, &grad_x});
    cudaError_t err = static_cast<cudaError_t>(with_vector<T>(vector, [&](auto vec) -> int {
      constexpr int V = decltype(vec)::value;
      add_ln_bwd_kernel<T, V><<<static_cast<unsigned>(blocks), kLnThreads, smem_partial ? 2 * d * sizeof(float) : 0,
                                stream>>>(
          grad_out.ptr<T>(), grad_sum.present ? grad_sum.ptr<T>() : nullptr, s.ptr<T>(),
          weight.present ? weight.ptr<T>() : nullptr, mean.ptr<float>(), rstd.ptr<float>(),
          grad_x.present ? grad_x.ptr<T>() : nullptr, partial.present ? partial.ptr<float>() : nullptr, smem_partial,
          rows, d, grad_out.stride(0), grad_out.stride(1), grad_sum.present ? grad_sum.stride(0) : 0,
          grad_sum.present ? grad_sum.stride(1) : 0, s.stride(0), s.stride(1), weight.present ? weight.stride(0) : 0,
          grad_x.stride(0));
      return cudaGetLastError();
    }));
    if (err != cudaSuccess || !partial.present) return static_cast<int>(err);
    const dim3 grid(static_cast<unsigned>((2 * d + kCols - 1) / kCols)), block(kCols, kRows);
    ln_param_grad_kernel<<<grid, block, 0, stream>>>(partial.ptr<float>(), blocks, d, grad_weight.ptr<float>(),
                                                      grad_bias.ptr<float>());
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace mmkern
