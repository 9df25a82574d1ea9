// Fused patch embedding on the CPU: patch gather + GEMM + bias + position add + prefix write.
//
// The patch matrix A (tokens x C*P*P) is never built: the GEMM packs each 8-row panel straight from the
// image through two offset tables (one per token, one per patch element), so any image strides,
// channels_last included, cost the same. The weight is packed once per call and shared by all threads.
#include <omp.h>

#include <vector>

#include "mmkern/common.h"
#include "mmkern/cpu_gemm.h"
#include "mmkern/patch_embed.h"

namespace mmkern {

namespace {

// Rows of tokens a thread computes at a time: the fp32 tile (kRowsPerTask x E) stays in L2.
constexpr int64_t kRowsPerTask = 64;

}  // namespace

void patch_embed_fwd_cpu(const Tensor& images, const Tensor& weight, const Tensor& bias, const Tensor& pos_embed,
                         const Tensor& prefix_tokens, const Tensor& out, int num_threads) {
  const PatchGeometry g = patch_geometry(images, weight, prefix_tokens.present ? prefix_tokens.size(0) : 0);
  const int64_t rows = g.batch * g.num_patches;
  std::vector<int64_t> image_k_offsets = patch_element_offsets(g, images.stride(1), images.stride(2), images.stride(3));
  std::vector<int64_t> weight_k_offsets = patch_element_offsets(g, weight.stride(1), weight.stride(2), weight.stride(3));

  dispatch_float(images.dtype, "patch_embed", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* img = images.ptr<scalar_t>();
    const scalar_t* w = weight.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    const int64_t w_stride_e = weight.stride(0);
    const int64_t o_stride_b = out.stride(0), o_stride_t = out.stride(1), o_stride_e = out.stride(2);

    std::vector<float> packed_weight(cpu::packed_b_floats(g.patch_dim, g.embed_dim));
    auto w_elem = [&](int64_t k, int64_t e) { return to_float(w[e * w_stride_e + weight_k_offsets[k]]); };
    cpu::pack_b_all(w_elem, g.patch_dim, g.embed_dim, packed_weight.data());

    // Epilogue terms per token: bias for patch tokens, the position embedding for every token.
    auto extra = [&](int64_t token, int64_t e) {
      float v = 0.f;
      if (token >= g.num_prefix) {
        if (bias.present) v += to_float(bias.ptr<scalar_t>()[e * bias.stride(0)]);
      } else {
        v += to_float(prefix_tokens.ptr<scalar_t>()[token * prefix_tokens.stride(0) + e * prefix_tokens.stride(1)]);
      }
      if (pos_embed.present)
        v += to_float(pos_embed.ptr<scalar_t>()[token * pos_embed.stride(0) + e * pos_embed.stride(1)]);
      return v;
    };

    const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<float> tile(kRowsPerTask * g.embed_dim);
      std::vector<float> panel(cpu::kPanelAFloats);
      std::vector<int64_t> row_offsets(kRowsPerTask);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t r0 = task * kRowsPerTask;
        const int64_t m = std::min(kRowsPerTask, rows - r0);
        for (int64_t i = 0; i < m; ++i) row_offsets[i] = patch_origin_offset(g, r0 + i, images.strides);
        auto a_elem = [&](int64_t i, int64_t k) { return to_float(img[row_offsets[i] + image_k_offsets[k]]); };
        cpu::gemm_packed_b(m, g.embed_dim, g.patch_dim, a_elem, packed_weight.data(), tile.data(), g.embed_dim,
                           false, panel.data());
        for (int64_t i = 0; i < m; ++i) {
          const int64_t b = (r0 + i) / g.num_patches;
          const int64_t token = g.num_prefix + (r0 + i) % g.num_patches;
          scalar_t* dst = o + b * o_stride_b + token * o_stride_t;
          const float* src = tile.data() + i * g.embed_dim;
          for (int64_t e = 0; e < g.embed_dim; ++e) dst[e * o_stride_e] = from_float<scalar_t>(src[e] + extra(token, e));
        }
      }
      // Prefix tokens (class / register tokens) carry no patch product.
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < g.batch; ++b)
        for (int64_t t = 0; t < g.num_prefix; ++t)
          for (int64_t e = 0; e < g.embed_dim; ++e)
            o[b * o_stride_b + t * o_stride_t + e * o_stride_e] = from_float<scalar_t>(extra(t, e));
    }
  });
}

// grad_patch_rows = grad_out[:, T:, :] viewed as (B*N, E).
//   grad_weight[e, k] = sum_rows grad_patch[row, e] * patch[row, k]   (accumulated in fp32 into grad_weight_f32)
//   grad_images[patch k of row]  = sum_e grad_patch[row, e] * weight[e, k]   (each pixel written exactly once)
void patch_embed_bwd_cpu(const Tensor& grad_out, const Tensor& images, const Tensor& weight, const Tensor& grad_images,
                         const Tensor& grad_weight, int64_t num_prefix, int num_threads) {
  const PatchGeometry g = patch_geometry(images, weight, num_prefix);
  const int64_t rows = g.batch * g.num_patches;
  std::vector<int64_t> image_k_offsets = patch_element_offsets(g, images.stride(1), images.stride(2), images.stride(3));
  std::vector<int64_t> weight_k_offsets = patch_element_offsets(g, weight.stride(1), weight.stride(2), weight.stride(3));

  dispatch_float(images.dtype, "patch_embed", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* img = images.ptr<scalar_t>();
    const scalar_t* w = weight.ptr<scalar_t>();
    const scalar_t* go = grad_out.ptr<scalar_t>();
    const int64_t go_b = grad_out.stride(0), go_t = grad_out.stride(1), go_e = grad_out.stride(2);
    auto grad_row_offset = [&](int64_t row) {
      return (row / g.num_patches) * go_b + (g.num_prefix + row % g.num_patches) * go_t;
    };

    if (grad_weight.present) {
      // Columns k of grad_weight are split between threads; each thread reduces over all rows.
      float* gw = grad_weight.ptr<float>();  // fp32 (E, K) contiguous, written here
      std::vector<int64_t> row_offsets(rows), go_offsets(rows);
      for (int64_t r = 0; r < rows; ++r) {
        row_offsets[r] = patch_origin_offset(g, r, images.strides);
        go_offsets[r] = grad_row_offset(r);
      }
      const int64_t col_chunk = cpu::round_up((g.patch_dim + num_threads - 1) / num_threads, cpu::kNR);
#pragma omp parallel num_threads(num_threads)
      {
        std::vector<float> ws(cpu::gemm_workspace_floats(rows, col_chunk));
#pragma omp for schedule(static)
        for (int64_t k0 = 0; k0 < g.patch_dim; k0 += col_chunk) {
          const int64_t kn = std::min(col_chunk, g.patch_dim - k0);
          auto a_elem = [&](int64_t e, int64_t r) { return to_float(go[go_offsets[r] + e * go_e]); };
          auto b_elem = [&](int64_t r, int64_t k) { return to_float(img[row_offsets[r] + image_k_offsets[k0 + k]]); };
          cpu::gemm(g.embed_dim, kn, rows, a_elem, b_elem, gw + k0, g.patch_dim, false, ws.data());
        }
      }
    }

    if (grad_images.present) {
      scalar_t* gi = grad_images.ptr<scalar_t>();
      std::vector<int64_t> gi_k_offsets =
          patch_element_offsets(g, grad_images.stride(1), grad_images.stride(2), grad_images.stride(3));
      std::vector<float> packed_weight(cpu::packed_b_floats(g.embed_dim, g.patch_dim));
      auto w_elem = [&](int64_t e, int64_t k) { return to_float(w[e * weight.stride(0) + weight_k_offsets[k]]); };
      cpu::pack_b_all(w_elem, g.embed_dim, g.patch_dim, packed_weight.data());
      const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(num_threads)
      {
        std::vector<float> tile(kRowsPerTask * g.patch_dim);
        std::vector<float> panel(cpu::kPanelAFloats);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
          const int64_t r0 = task * kRowsPerTask;
          const int64_t m = std::min(kRowsPerTask, rows - r0);
          auto a_elem = [&](int64_t i, int64_t e) { return to_float(go[grad_row_offset(r0 + i) + e * go_e]); };
          cpu::gemm_packed_b(m, g.patch_dim, g.embed_dim, a_elem, packed_weight.data(), tile.data(), g.patch_dim,
                             false, panel.data());
          for (int64_t i = 0; i < m; ++i) {
            scalar_t* dst = gi + patch_origin_offset(g, r0 + i, grad_images.strides);
            const float* src = tile.data() + i * g.patch_dim;
            for (int64_t k = 0; k < g.patch_dim; ++k) dst[gi_k_offsets[k]] = from_float<scalar_t>(src[k]);
          }
        }
      }
    }
  });
}

}  // namespace mmkern
