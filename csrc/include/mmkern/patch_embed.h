// Patch index arithmetic shared by the CPU and CUDA patch-embedding kernels.
//
// Token row r of the GEMM (r in [0, B*N)) is patch (gy, gx) = divmod(r % N, W/P) of image r / N; patch
// element k (k in [0, C*P*P)) is (c, py, px) in the order of a Conv2d weight (E, C, P, P) flattened.
#pragma once

#include <algorithm>
#include <vector>

#include "mmkern/common.h"

namespace mmkern {

// n / d and n % d for 0 <= n < 2^31 and 1 <= d < 2^31 by a 32-bit multiply-high, an add and a shift
// (Granlund & Montgomery 1994, with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1): the GPU has no
// integer divider, and a 64-bit `/` or `%` there is a call to a ~70-instruction routine, once per gathered
// element. n < 2^31 keeps n + mulhi(m, n) within 32 bits.
struct FastDivmod {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(int64_t divisor) : d(static_cast<uint32_t>(divisor)) {
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  MMK_HD int64_t div(int64_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(u, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * mul) >> 32);
#endif
    return (hi + u) >> shift;
  }
  MMK_HD int64_t mod(int64_t n) const { return n - div(n) * d; }
};

// ---- Entry points (the convention: see the top of csrc/bindings.cpp) ----

// out (B, T + N, E) = [prefix_tokens; patches of images x weight^T + bias] + pos_embed, for images (B, C, H, W), a
// Conv2d weight (E, C, P, P), bias (E,), pos_embed (T + N, E), prefix_tokens (T, E) (class / register tokens);
// bias, pos_embed and prefix_tokens may be absent.
struct PatchEmbedFwdParams {
  Tensor images, weight, bias, pos_embed, prefix_tokens, out;
  template <class F>
  void fields(F&& f) {
    f("images", images), f("weight", weight), f("bias", bias), f("pos_embed", pos_embed);
    f("prefix_tokens", prefix_tokens), f("out", out);
  }
};

// grad_images (like images) and grad_weight (fp32 (E, C*P*P), contiguous) from grad_out's patch rows (those
// after the num_prefix prefix tokens); either may be absent (not computed).
struct PatchEmbedBwdParams {
  Tensor grad_out, images, weight, grad_images, grad_weight;
  int64_t num_prefix = 0;
  template <class F>
  void fields(F&& f) {
    f("grad_out", grad_out), f("images", images), f("weight", weight), f("grad_images", grad_images);
    f("grad_weight", grad_weight), f("num_prefix", num_prefix);
  }
};

// Packed patch embedding (mmkern.ops.patch_embed_packed). The patches of every image arrive as one (M, K) matrix;
// GEMM row r goes to output row out_rows[r] (int64 (M,)) of the packed (R, E) tokens `out`, and its position
// embedding is gathered from the model's base grid pos_grid (G, E) through the taps s in [tap_ptr[r],
// tap_ptr[r + 1]) (CSR, int64 (M + 1,)): sum_s tap_weight[s] * pos_grid[tap_index[s]] (int32, fp32), the base
// grid resampled to the image's own patch grid (a separable interpolation is such a weighted sum; a downsampled
// image's antialiased rows have hundreds of taps, an upsampled one's 16, so the rows do not share one tap count).
// Without pos_grid the tap tensors are absent; bias (E,) may be. Prefix rows of `out` are left to the caller.
struct PatchEmbedPackedFwdParams {
  Tensor patches, weight, bias, pos_grid, tap_ptr, tap_index, tap_weight, out_rows, out;
  template <class F>
  void fields(F&& f) {
    f("patches", patches), f("weight", weight), f("bias", bias), f("pos_grid", pos_grid), f("tap_ptr", tap_ptr);
    f("tap_index", tap_index), f("tap_weight", tap_weight), f("out_rows", out_rows), f("out", out);
  }
};

// CUDA (csrc/cuda/patch_embed.cu): a cudaError_t, 0 on success.
int patch_embed_fwd_cuda(const PatchEmbedFwdParams& p, uintptr_t stream);
int patch_embed_bwd_cuda(const PatchEmbedBwdParams& p, uintptr_t stream);
int patch_embed_packed_fwd_cuda(const PatchEmbedPackedFwdParams& p, uintptr_t stream);

// The GEMM of either patch embedding, rows x patch_dim patches times the (embed_dim, patch_dim) weight^T, and
// where its rows come from: images (patch_geometry; rows = batch * num_patches) or a packed patch matrix
// (packed_geometry; the image fields are 0 there, the packed ones 0 here).
struct PatchGeometry {
  int64_t rows = 0, patch_dim = 0, embed_dim = 0;
  int64_t batch = 0, channels = 0, height = 0, width = 0, patch = 0, grid_w = 0, num_patches = 0, num_prefix = 0;
  int64_t grid_rows = 0, out_rows = 0, taps = 0;  // packed: base grid rows, output rows, taps
  // Token rows and patch elements are below 2^31 (patch_geometry checks), so their divisions are FastDivmods:
  // n / num_patches, grid_w, patch², patch.
  FastDivmod by_patches, by_grid_w, by_patch_area, by_patch;
};

inline PatchGeometry patch_geometry(const Tensor& images, const Tensor& weight, int64_t num_prefix) {
  check_dims(images, 4, "images");
  check_dims(weight, 4, "weight");
  PatchGeometry g;
  g.batch = images.size(0);
  g.channels = images.size(1);
  g.height = images.size(2);
  g.width = images.size(3);
  g.embed_dim = weight.size(0);
  g.patch = weight.size(2);
  check(weight.size(1) == g.channels, "weight: channel count differs from images");
  check(g.patch > 0 && weight.size(3) == g.patch, "weight: expected a square (E, C, P, P) kernel");
  check(g.height % g.patch == 0 && g.width % g.patch == 0, "images: H and W must be multiples of the patch size");
  g.grid_w = g.width / g.patch;
  g.num_patches = (g.height / g.patch) * g.grid_w;
  g.rows = g.batch * g.num_patches;
  g.patch_dim = g.channels * g.patch * g.patch;
  g.num_prefix = num_prefix;
  constexpr int64_t kMax32 = (int64_t{1} << 31) - 1;
  check(g.batch * g.num_patches <= kMax32, "images: more than 2^31 - 1 patches in one call (split the batch)");
  check(g.patch * g.patch <= kMax32 && g.patch_dim <= kMax32, "weight: more than 2^31 - 1 elements per patch");
  g.by_patches = FastDivmod(std::max<int64_t>(g.num_patches, 1));
  g.by_grid_w = FastDivmod(std::max<int64_t>(g.grid_w, 1));
  g.by_patch_area = FastDivmod(g.patch * g.patch);
  g.by_patch = FastDivmod(g.patch);
  return g;
}

// Offset of pixel (0, 0) of token row `row` in a (B, C, H, W) tensor with the given strides.
MMK_HD int64_t patch_origin_offset(const PatchGeometry& g, int64_t row, const int64_t* strides) {
  const int64_t b = g.by_patches.div(row), n = row - b * g.num_patches;
  const int64_t gy = g.by_grid_w.div(n), gx = n - gy * g.grid_w;
  return b * strides[0] + gy * g.patch * strides[2] + gx * g.patch * strides[3];
}

// Offset of patch element k relative to the patch origin, for channel/row/column strides.
MMK_HD int64_t patch_element_offset(const PatchGeometry& g, int64_t k, int64_t stride_c, int64_t stride_y,
                                    int64_t stride_x) {
  const int64_t c = g.by_patch_area.div(k), r = k - c * g.patch * g.patch;
  const int64_t y = g.by_patch.div(r), x = r - y * g.patch;
  return c * stride_c + y * stride_y + x * stride_x;
}

inline std::vector<int64_t> patch_element_offsets(const PatchGeometry& g, int64_t stride_c, int64_t stride_y,
                                                  int64_t stride_x) {
  std::vector<int64_t> offsets(g.patch_dim);
  for (int64_t k = 0; k < g.patch_dim; ++k) offsets[k] = patch_element_offset(g, k, stride_c, stride_y, stride_x);
  return offsets;
}

inline PatchGeometry packed_geometry(const PatchEmbedPackedFwdParams& p) {
  const Tensor &patches = p.patches, &weight = p.weight, &pos_grid = p.pos_grid, &out_rows = p.out_rows, &out = p.out;
  const Tensor &tap_ptr = p.tap_ptr, &tap_index = p.tap_index, &tap_weight = p.tap_weight;
  check_dims(patches, 2, "patches");
  check_dims(weight, 2, "weight");
  check_dims(out_rows, 1, "out_rows");
  check_dims(out, 2, "out");
  PatchGeometry g;
  g.rows = patches.size(0);
  g.patch_dim = patches.size(1);
  g.embed_dim = weight.size(0);
  g.out_rows = out.size(0);
  check(weight.size(1) == g.patch_dim, "weight: expected (E, K) with the patches' K");
  check(out.size(1) == g.embed_dim && out_rows.size(0) == g.rows, "out: shape differs from (R, E) / out_rows (M,)");
  check(out_rows.dtype == DType::i64, "out_rows: expected int64");
  check_contiguous(out_rows, "out_rows");
  if (pos_grid.present) {
    check_dims(pos_grid, 2, "pos_grid");
    check_dims(tap_ptr, 1, "tap_ptr");
    check_dims(tap_index, 1, "tap_index");
    check_dims(tap_weight, 1, "tap_weight");
    check(pos_grid.size(1) == g.embed_dim, "pos_grid: expected (G, E)");
    check(tap_ptr.dtype == DType::i64 && tap_index.dtype == DType::i32 && tap_weight.dtype == DType::f32,
          "tap_ptr / tap_index / tap_weight: expected int64 / int32 / float32");
    check(tap_ptr.size(0) == g.rows + 1 && tap_weight.size(0) == tap_index.size(0),
          "tap_ptr / tap_weight: expected (M + 1,) offsets and one weight per index");
    check_contiguous(tap_ptr, "tap_ptr");
    check_contiguous(tap_index, "tap_index");
    check_contiguous(tap_weight, "tap_weight");
    g.grid_rows = pos_grid.size(0);
    g.taps = tap_index.size(0);
  }
  return g;
}

}  // namespace mmkern

#if defined(MMKERN_CPU_NS)  // CPU (csrc/cpu/patch_embed.cpp, once per ISA level)
MMKERN_CPU_BEGIN
void patch_embed_fwd_cpu(const PatchEmbedFwdParams& p, int num_threads);
void patch_embed_bwd_cpu(const PatchEmbedBwdParams& p, int num_threads);
void patch_embed_packed_fwd_cpu(const PatchEmbedPackedFwdParams& p, int num_threads);
MMKERN_CPU_END
#endif
