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

// Token rows and patch elements are below 2^31 (patch_geometry checks), so their divisions are FastDivmods.
struct PatchGeometry {
  int64_t batch, channels, height, width, patch, embed_dim;
  int64_t grid_w, num_patches, patch_dim, num_prefix;
  FastDivmod by_patches, by_grid_w, by_patch_area, by_patch;  // n / num_patches, grid_w, patch², patch
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

// Packed patch embedding (mmkern.ops.patch_embed_packed). The patches of every image arrive as one (M, K) matrix;
// GEMM row r goes to output row out_rows[r] of the packed (R, E) tokens, and its position embedding is gathered
// from the model's base grid (G, E) through the taps s in [tap_ptr[r], tap_ptr[r + 1]) (CSR):
// sum_s tap_weight[s] * pos_grid[tap_index[s]], the base grid resampled to the image's own patch grid (a separable
// interpolation is such a weighted sum; a downsampled image's antialiased rows have hundreds of taps, an
// upsampled one's 16, so the rows do not share one tap count).
struct PackedGeometry {
  int64_t rows, patch_dim, embed_dim, grid_rows, out_rows, taps;
};

inline PackedGeometry packed_geometry(const Tensor& patches, const Tensor& weight, const Tensor& pos_grid,
                                      const Tensor& tap_ptr, const Tensor& tap_index, const Tensor& tap_weight,
                                      const Tensor& out_rows, const Tensor& out) {
  check_dims(patches, 2, "patches");
  check_dims(weight, 2, "weight");
  check_dims(out_rows, 1, "out_rows");
  check_dims(out, 2, "out");
  PackedGeometry g;
  g.rows = patches.size(0);
  g.patch_dim = patches.size(1);
  g.embed_dim = weight.size(0);
  g.out_rows = out.size(0);
  check(weight.size(1) == g.patch_dim, "weight: expected (E, K) with the patches' K");
  check(out.size(1) == g.embed_dim && out_rows.size(0) == g.rows, "out: shape differs from (R, E) / out_rows (M,)");
  check(out_rows.dtype == DType::i64, "out_rows: expected int64");
  check_contiguous(out_rows, "out_rows");
  g.grid_rows = 0;
  g.taps = 0;
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
