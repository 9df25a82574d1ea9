// RMSNorm with an optional residual add on CUDA, forward and backward. The math is the CPU kernels'
// (mmkern/rms_norm.h); only the spreading of work differs: one warp per row (warp shuffles for the row sums, no
// shared memory), each lane moving 16 bytes at a time where every row tensor allows it (unit column stride, row
// strides, D and base addresses multiples of the vector), else one element. The backward gives each warp a fixed
// row of fp32 partial weight gradients, which only that warp's lanes write (one column each), and a second kernel
// sums the partials over warps: no atomics, and the same result on every run.
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>

#include "mmkern/cuda_gemm.cuh"
#include "mmkern/rms_norm.h"

namespace mmkern {
namespace {

constexpr int kWarps = 4;  // rows (warps) per block

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Elements [j, j + kVec) of a row into fp32 (kVec > 1 only with unit stride and aligned addresses).
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* row, int64_t j, int64_t stride, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_float(row[j * stride]);
  } else {
    const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + j);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_float(p.v[k]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* row, int64_t j, const float (&in)[kVec]) {
  Pack<T, kVec> p;
#pragma unroll
  for (int k = 0; k < kVec; ++k) p.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, kVec>*>(row + j) = p;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const Tensor& t, int64_t i) {
  return t.present ? t.ptr<T>() + i * t.strides[0] : nullptr;
}

template <typename T, int kVec>
__global__ void rms_norm_fwd_kernel(const RmsNormFwdParams p) {
  const int64_t rows = p.x.sizes[0], d = p.x.sizes[1];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (i >= rows) return;
  const T* x = row_ptr<T>(p.x, i);
  const T* r = row_ptr<T>(p.residual, i);
  T* s = const_cast<T*>(row_ptr<T>(p.sum_out, i));
  T* out = const_cast<T*>(row_ptr<T>(p.out, i));
  const T* w = p.weight.present ? p.weight.ptr<T>() : nullptr;
  const int64_t sx = p.x.strides[1], sr = p.residual.present ? p.residual.strides[1] : 0;
  const int64_t sw = w ? p.weight.strides[0] : 0;
  float sum_sq = 0.f;
  for (int64_t j = threadIdx.x * kVec; j < d; j += 32 * kVec) {
    float v[kVec];
    load_vec<T, kVec>(x, j, sx, v);
    if (r) {
      float rv[kVec];
      load_vec<T, kVec>(r, j, sr, rv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = to_float(from_float<T>(v[k] + rv[k]));  // s as stored
      store_vec<T, kVec>(s, j, v);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum_sq += v[k] * v[k];
  }
  const float rs = rms_rstd(warp_sum(sum_sq), d, static_cast<float>(p.eps));
  // Second pass over the row (in L1 / L2 by now), reading s back as stored.
  for (int64_t j = threadIdx.x * kVec; j < d; j += 32 * kVec) {
    float v[kVec], wv[kVec];
    if (r)
      load_vec<T, kVec>(s, j, 1, v);
    else
      load_vec<T, kVec>(x, j, sx, v);
    if (w) {
      load_vec<T, kVec>(w, j, sw, wv);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) wv[k] = 1.f;
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = v[k] * rs * wv[k];
    store_vec<T, kVec>(out, j, v);
  }
  if (threadIdx.x == 0 && p.rstd.present) p.rstd.ptr<float>()[i * p.rstd.strides[0]] = rs;
}

// Warp gw (of `warps`) takes rows gw, gw + warps, ...; its weight-gradient partials are row gw of `partial`
// (warps, D), each column written by one lane only.
template <typename T, int kVec>
__global__ void rms_norm_bwd_kernel(const RmsNormBwdParams p, int64_t warps) {
  const int64_t rows = p.s.sizes[0], d = p.s.sizes[1];
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (gw >= warps) return;
  const T* w = p.weight.present ? p.weight.ptr<T>() : nullptr;
  const int64_t sw = w ? p.weight.strides[0] : 0;
  float* part = p.grad_weight.present ? p.partial.ptr<float>() + gw * d : nullptr;
  if (part)
    for (int64_t j = threadIdx.x; j < d; j += 32) part[j] = 0.f;
  __syncwarp();
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t i = gw; i < rows; i += warps) {
    const T* go = row_ptr<T>(p.grad_out, i);
    const T* gs = row_ptr<T>(p.grad_sum, i);
    const T* s = row_ptr<T>(p.s, i);
    T* gx = const_cast<T*>(row_ptr<T>(p.grad_x, i));
    const int64_t sg = p.grad_out.strides[1], sgs = gs ? p.grad_sum.strides[1] : 0, ss = p.s.strides[1];
    const float rs = p.rstd.ptr<float>()[i * p.rstd.strides[0]];
    float sum_gx = 0.f;
    for (int64_t j = threadIdx.x * kVec; j < d; j += 32 * kVec) {
      float o[kVec], sv[kVec], wv[kVec];
      load_vec<T, kVec>(go, j, sg, o);
      load_vec<T, kVec>(s, j, ss, sv);
      if (w) load_vec<T, kVec>(w, j, sw, wv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float xh = sv[k] * rs;
        sum_gx += o[k] * (w ? wv[k] : 1.f) * xh;
        if (part) part[j + k] += o[k] * xh;
      }
    }
    const float mgx = warp_sum(sum_gx) * inv_d;
    for (int64_t j = threadIdx.x * kVec; j < d; j += 32 * kVec) {
      float o[kVec], sv[kVec], wv[kVec], base[kVec];
      load_vec<T, kVec>(go, j, sg, o);
      load_vec<T, kVec>(s, j, ss, sv);
      if (w) load_vec<T, kVec>(w, j, sw, wv);
      if (gs) load_vec<T, kVec>(gs, j, sgs, base);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float g = o[k] * (w ? wv[k] : 1.f);
        o[k] = (g - sv[k] * rs * mgx) * rs + (gs ? base[k] : 0.f);
      }
      store_vec<T, kVec>(gx, j, o);
    }
  }
}

// grad_weight[j] = Σ_w partial[w, j], one thread per column.
__global__ void sum_partials_kernel(const float* partial, int64_t warps, int64_t d, float* out, int64_t so) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  float acc = 0.f;
  for (int64_t w = 0; w < warps; ++w) acc += partial[w * d + j];
  out[j * so] = acc;
}

// 16 bytes per lane where every present row tensor allows it, else 1 element.
template <typename T>
int vector_width(int64_t d, std::initializer_list<const Tensor*> tensors) {
  constexpr int kVec = 16 / sizeof(T);
  if (d % kVec) return 1;
  for (const Tensor* t : tensors) {
    if (!t->present) continue;
    const bool row = t->ndim == 2;
    if (t->stride(row ? 1 : 0) != 1 || (row && t->stride(0) % kVec)) return 1;
    if (reinterpret_cast<uintptr_t>(t->data) % 16) return 1;
  }
  return kVec;
}

}  // namespace

int rms_norm_fwd_cuda(const RmsNormFwdParams& p, uintptr_t stream_handle) {
  check_rms_norm(p);
  const int64_t rows = p.x.size(0), d = p.x.size(1);
  if (rows == 0 || d == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(32, kWarps);
  return dispatch_float(p.x.dtype, "rms_norm", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    if (vector_width<T>(d, {&p.x, &p.residual, &p.weight, &p.sum_out, &p.out}) > 1)
      rms_norm_fwd_kernel<T, 16 / sizeof(T)><<<grid, block, 0, stream>>>(p);
    else
      rms_norm_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

int rms_norm_bwd_cuda(const RmsNormBwdParams& p, uintptr_t stream_handle) {
  check_rms_norm(p);
  const int64_t rows = p.s.size(0), d = p.s.size(1);
  check(!p.grad_weight.present ||
            (p.partial.present && p.partial.dtype == DType::f32 && p.partial.ndim == 2 && p.partial.size(0) >= 1 &&
             p.partial.size(1) == d && p.partial.stride(1) == 1 && p.partial.stride(0) == d),
        "partial: expected contiguous fp32 (warps, D) with grad_weight");
  if (d == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // One row per warp without a weight gradient; else as many warps as partial rows, striding over the rows.
  const int64_t warps = p.grad_weight.present ? p.partial.size(0) : std::max<int64_t>(rows, 1);
  const dim3 grid(static_cast<unsigned>((warps + kWarps - 1) / kWarps)), block(32, kWarps);
  return dispatch_float(p.s.dtype, "rms_norm", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    if (vector_width<T>(d, {&p.grad_out, &p.grad_sum, &p.s, &p.weight, &p.grad_x}) > 1)
      rms_norm_bwd_kernel<T, 16 / sizeof(T)><<<grid, block, 0, stream>>>(p, warps);
    else
      rms_norm_bwd_kernel<T, 1><<<grid, block, 0, stream>>>(p, warps);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !p.grad_weight.present) return static_cast<int>(err);
    sum_partials_kernel<<<static_cast<unsigned>((d + 255) / 256), 256, 0, stream>>>(
        p.partial.ptr<float>(), warps, d, p.grad_weight.ptr<float>(), p.grad_weight.stride(0));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace mmkern
