// Fused patch embedding on CUDA: the patch gather happens inside the GEMM tile loads and bias, position
// embedding and prefix tokens in its epilogue, so no im2col buffer exists. Index math is shared with the
// CPU kernel through mmkern/patch_embed.h.
#include "mmkern/cuda_gemm.cuh"
#include "mmkern/patch_embed.h"

namespace mmkern {
namespace {

struct Strides4 {
  int64_t s[4];
};
Strides4 strides_of(const Tensor& t) { return {{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}}; }

template <typename T>
struct PatchLoad {  // a(row, k): pixel k of token row `row`
  const T* img;
  PatchGeometry g;
  Strides4 st;
  __device__ float operator()(int64_t row, int64_t k) const {
    return cuda::load(img, patch_origin_offset(g, row, st.s) + patch_element_offset(g, k, st.s[1], st.s[2], st.s[3]));
  }
};

template <typename T>
struct WeightLoad {  // b(k, e) = weight[e, k]
  const T* w;
  PatchGeometry g;
  Strides4 st;
  __device__ float operator()(int64_t k, int64_t e) const {
    return cuda::load(w, e * st.s[0] + patch_element_offset(g, k, st.s[1], st.s[2], st.s[3]));
  }
};

template <typename T>
struct FwdEpilogue {
  T* out;
  const T* bias;
  const T* pos;
  int64_t bias_stride, pos_s0, pos_s1, o_b, o_t, o_e;
  PatchGeometry g;
  __device__ void operator()(int64_t row, int64_t e, float acc) const {
    const int64_t b = g.by_patches.div(row), token = g.num_prefix + row - b * g.num_patches;
    if (bias) acc += cuda::load(bias, e * bias_stride);
    if (pos) acc += cuda::load(pos, token * pos_s0 + e * pos_s1);
    cuda::store(out, b * o_b + token * o_t + e * o_e, acc);
  }
};

// Prefix tokens (+ their position embedding) into every image: blocks stride over the (image, prefix token) rows,
// threads over the embedding, so the only divisions are one per row.
template <typename T>
__global__ void prefix_kernel(T* out, const T* prefix, const T* pos, int64_t pr_s0, int64_t pr_s1, int64_t pos_s0,
                              int64_t pos_s1, int64_t o_b, int64_t o_t, int64_t o_e, int64_t batch, int64_t num_prefix,
                              int64_t embed_dim) {
  for (int64_t row = blockIdx.x; row < batch * num_prefix; row += gridDim.x) {
    const int64_t b = row / num_prefix, t = row - b * num_prefix;
    for (int64_t e = threadIdx.x; e < embed_dim; e += blockDim.x) {
      float v = cuda::load(prefix, t * pr_s0 + e * pr_s1);
      if (pos) v += cuda::load(pos, t * pos_s0 + e * pos_s1);
      cuda::store(out, b * o_b + t * o_t + e * o_e, v);
    }
  }
}

template <typename T>
struct GradOutLoad {  // a(row, e) = grad_out[b, T + n, e]
  const T* go;
  PatchGeometry g;
  int64_t s_b, s_t, s_e;
  __device__ float operator()(int64_t row, int64_t e) const {
    const int64_t b = g.by_patches.div(row);
    return cuda::load(go, b * s_b + (g.num_prefix + row - b * g.num_patches) * s_t + e * s_e);
  }
};

template <typename T>
struct GradOutTLoad {  // a(e, row) = grad_out[b, T + n, e]
  GradOutLoad<T> inner;
  __device__ float operator()(int64_t e, int64_t row) const { return inner(row, e); }
};

template <typename T>
struct WeightRowLoad {  // b(e, k) = weight[e, k]
  WeightLoad<T> inner;
  __device__ float operator()(int64_t e, int64_t k) const { return inner(k, e); }
};

template <typename T>
struct ImageScatter {  // grad_images[pixel k of row] = value (each pixel written once)
  T* gi;
  PatchGeometry g;
  Strides4 st;
  __device__ void operator()(int64_t row, int64_t k, float v) const {
    cuda::store(gi, patch_origin_offset(g, row, st.s) + patch_element_offset(g, k, st.s[1], st.s[2], st.s[3]), v);
  }
};

struct F32Store {  // fp32 (E, K) contiguous
  float* p;
  int64_t ld;
  __device__ void operator()(int64_t i, int64_t j, float v) const { p[i * ld + j] = v; }
};

}  // namespace

int patch_embed_fwd_cuda(const PatchEmbedFwdParams& p, uintptr_t stream_handle) {
  const Tensor &images = p.images, &weight = p.weight, &bias = p.bias, &pos_embed = p.pos_embed;
  const Tensor &prefix_tokens = p.prefix_tokens, &out = p.out;
  const PatchGeometry g = patch_geometry(images, weight, prefix_tokens.present ? prefix_tokens.size(0) : 0);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(images.dtype, "patch_embed", [&](auto tag) -> int {
    using scalar_t = typename decltype(tag)::type;
    using T = scalar_t;
    const T* pos = pos_embed.present ? pos_embed.ptr<T>() : nullptr;
    const int64_t pos_s0 = pos ? pos_embed.stride(0) : 0, pos_s1 = pos ? pos_embed.stride(1) : 0;
    FwdEpilogue<T> epi{out.ptr<T>(), bias.present ? bias.ptr<T>() : nullptr, pos, bias.present ? bias.stride(0) : 0,
                       pos_s0, pos_s1, out.stride(0), out.stride(1), out.stride(2), g};
    cudaError_t err = cuda::tiled_gemm(g.rows, g.embed_dim, g.patch_dim,
                                       PatchLoad<T>{images.ptr<T>(), g, strides_of(images)},
                                       WeightLoad<T>{weight.ptr<T>(), g, strides_of(weight)}, epi, stream);
    if (err != cudaSuccess || g.num_prefix == 0 || g.batch == 0) return err;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(g.batch * g.num_prefix, 4096));
    prefix_kernel<<<blocks, 256, 0, stream>>>(out.ptr<T>(), prefix_tokens.ptr<T>(), pos, prefix_tokens.stride(0),
                                              prefix_tokens.stride(1), pos_s0, pos_s1, out.stride(0), out.stride(1),
                                              out.stride(2), g.batch, g.num_prefix, g.embed_dim);
    return cudaGetLastError();
  });
}

int patch_embed_bwd_cuda(const PatchEmbedBwdParams& p, uintptr_t stream_handle) {
  const Tensor &grad_out = p.grad_out, &images = p.images, &weight = p.weight, &grad_images = p.grad_images;
  const Tensor& grad_weight = p.grad_weight;
  const PatchGeometry g = patch_geometry(images, weight, p.num_prefix);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t rows = g.rows;
  return dispatch_float(images.dtype, "patch_embed", [&](auto tag) -> int {
    using scalar_t = typename decltype(tag)::type;
    using T = scalar_t;
    GradOutLoad<T> go{grad_out.ptr<T>(), g, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2)};
    WeightLoad<T> wl{weight.ptr<T>(), g, strides_of(weight)};
    if (grad_weight.present) {
      cudaError_t err = cuda::tiled_gemm(g.embed_dim, g.patch_dim, rows, GradOutTLoad<T>{go},
                                         PatchLoad<T>{images.ptr<T>(), g, strides_of(images)},
                                         F32Store{grad_weight.ptr<float>(), g.patch_dim}, stream);
      if (err != cudaSuccess) return err;
    }
    if (grad_images.present) {
      return cuda::tiled_gemm(rows, g.patch_dim, g.embed_dim, go, WeightRowLoad<T>{wl},
                              ImageScatter<T>{grad_images.ptr<T>(), g, strides_of(grad_images)}, stream);
    }
    return cudaSuccess;
  });
}

namespace {

template <typename T>
struct MatrixLoad {  // a(i, k) = m[i, k] of a strided 2-d tensor
  const T* m;
  int64_t s0, s1;
  __device__ float operator()(int64_t i, int64_t k) const { return cuda::load(m, i * s0 + k * s1); }
};

template <typename T>
struct MatrixTLoad {  // b(k, e) = m[e, k]
  MatrixLoad<T> inner;
  __device__ float operator()(int64_t k, int64_t e) const { return inner(e, k); }
};

template <typename T>
struct PackedEpilogue {  // see PatchEmbedPackedFwdParams in mmkern/patch_embed.h
  T* out;
  const T* bias;
  const T* grid;
  const int64_t* tap_ptr;
  const int32_t* tap_index;
  const float* tap_weight;
  const int64_t* out_rows;
  int64_t bias_stride, grid_s0, grid_s1, o_r, o_e;
  __device__ void operator()(int64_t row, int64_t e, float acc) const {
    if (bias) acc += cuda::load(bias, e * bias_stride);
    if (grid)
      for (int64_t s = tap_ptr[row]; s < tap_ptr[row + 1]; ++s)
        acc += tap_weight[s] * cuda::load(grid, tap_index[s] * grid_s0 + e * grid_s1);
    cuda::store(out, out_rows[row] * o_r + e * o_e, acc);
  }
};

}  // namespace

int patch_embed_packed_fwd_cuda(const PatchEmbedPackedFwdParams& p, uintptr_t stream_handle) {
  const Tensor &patches = p.patches, &weight = p.weight, &bias = p.bias, &pos_grid = p.pos_grid, &out = p.out;
  const Tensor &tap_ptr = p.tap_ptr, &tap_index = p.tap_index, &tap_weight = p.tap_weight, &out_rows = p.out_rows;
  const PatchGeometry g = packed_geometry(p);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(patches.dtype, "patch_embed_packed", [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    const bool pos = pos_grid.present;
    PackedEpilogue<T> epi{out.ptr<T>(),
                          bias.present ? bias.ptr<T>() : nullptr,
                          pos ? pos_grid.ptr<T>() : nullptr,
                          pos ? tap_ptr.ptr<int64_t>() : nullptr,
                          pos ? tap_index.ptr<int32_t>() : nullptr,
                          pos ? tap_weight.ptr<float>() : nullptr,
                          out_rows.ptr<int64_t>(),
                          bias.present ? bias.stride(0) : 0,
                          pos ? pos_grid.stride(0) : 0,
                          pos ? pos_grid.stride(1) : 0,
                          out.stride(0),
                          out.stride(1)};
    return cuda::tiled_gemm(g.rows, g.embed_dim, g.patch_dim,
                            MatrixLoad<T>{patches.ptr<T>(), patches.stride(0), patches.stride(1)},
                            MatrixTLoad<T>{{weight.ptr<T>(), weight.stride(0), weight.stride(1)}}, epi, stream);
  });
}

}  // namespace mmkern
