// Patch index arithmetic shared by the CPU and CUDA patch-embedding kernels.
//
// Token row r of the GEMM (r in [0, B*N)) is patch (gy, gx) = divmod(r % N, W/P) of image r / N; patch
// element k (k in [0, C*P*P)) is (c, py, px) in the order of a Conv2d weight (E, C, P, P) flattened.
#pragma once

#include <vector>

#include "mmkern/common.h"

namespace mmkern {

struct PatchGeometry {
  int64_t batch, channels, height, width, patch, embed_dim;
  int64_t grid_w, num_patches, patch_dim, num_prefix;
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
  return g;
}

// Offset of pixel (0, 0) of token row `row` in a (B, C, H, W) tensor with the given strides.
MMK_HD int64_t patch_origin_offset(const PatchGeometry& g, int64_t row, const int64_t* strides) {
  const int64_t b = row / g.num_patches, n = row % g.num_patches;
  const int64_t gy = n / g.grid_w, gx = n % g.grid_w;
  return b * strides[0] + gy * g.patch * strides[2] + gx * g.patch * strides[3];
}

// Offset of patch element k relative to the patch origin, for channel/row/column strides.
MMK_HD int64_t patch_element_offset(const PatchGeometry& g, int64_t k, int64_t stride_c, int64_t stride_y,
                                    int64_t stride_x) {
  const int64_t pp = g.patch * g.patch;
  const int64_t c = k / pp, r = k % pp;
  return c * stride_c + (r / g.patch) * stride_y + (r % g.patch) * stride_x;
}

inline std::vector<int64_t> patch_element_offsets(const PatchGeometry& g, int64_t stride_c, int64_t stride_y,
                                                  int64_t stride_x) {
  std::vector<int64_t> offsets(g.patch_dim);
  for (int64_t k = 0; k < g.patch_dim; ++k) offsets[k] = patch_element_offset(g, k, stride_c, stride_y, stride_x);
  return offsets;
}

}  // namespace mmkern
