// Fused patch embedding on the CPU: patch gather + GEMM + bias + position add + prefix write.
//
// The patch matrix A (tokens x C*P*P) is never built: the GEMM packs each 8-row panel straight from the
// image through two offset tables (one per token, one per patch element), so any image strides,
// channels_last included, cost the same. The weight is packed once per call and shared by all threads.
// bf16 runs on AVX-512 BF16 dot products where the CPU has them (see Engine), everything else on the
// fp32 kernel; both accumulate in fp32.
#include <omp.h>

#include <cstdlib>
#include <type_traits>
#include <vector>

#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/cpu_gemm.h"
#include "mmkern/patch_embed.h"

MMKERN_CPU_BEGIN

namespace {

// Rows of tokens a thread computes at a time: the fp32 tile (kRowsPerTask x E) stays in L2.
constexpr int64_t kRowsPerTask = 64;

// The packed GEMM a storage type runs on: fp32 panels (any dtype, converted while packing), or, for bf16
// on CPUs with AVX-512 BF16, raw bf16 panels multiplied by vdpbf16ps at twice the fp32 rate. Products of
// two bf16 values are exact in fp32, so both paths give the same fp32-accumulated result.
template <typename T, bool kBf16Dot>
struct Engine {
  using scalar_t = T;
  using packed_t = float;
  static float load(T v) { return to_float(v); }
  static int64_t packed_b_size(int64_t K, int64_t N) { return cpu::packed_b_floats(K, N); }
  static constexpr int64_t kPanelA = cpu::kPanelAFloats;
  static int64_t workspace(int64_t K, int64_t N) { return cpu::gemm_workspace_floats(K, N); }
  template <class FB>
  static void pack_b_all(const FB& b, int64_t K, int64_t N, float* dst) {
    cpu::pack_b_all(b, K, N, dst);
  }
  template <class FA>
  static void gemm_packed_b(int64_t M, int64_t N, int64_t K, const FA& a, const float* Bp, float* C, int64_t ldc,
                            bool accumulate, float* ws) {
    cpu::gemm_packed_b(M, N, K, a, Bp, C, ldc, accumulate, ws);
  }
};

#ifdef MMKERN_CPU_BF16_DOT
template <>
struct Engine<BFloat16, true> {
  using scalar_t = BFloat16;
  using packed_t = uint16_t;
  static uint16_t load(BFloat16 v) { return v.bits; }
  static int64_t packed_b_size(int64_t K, int64_t N) { return cpu::packed_b_bf16_elems(K, N); }
  static constexpr int64_t kPanelA = cpu::kPanelABf16;
  static int64_t workspace(int64_t K, int64_t N) { return cpu::gemm_bf16_workspace_elems(K, N); }
  template <class FB>
  static void pack_b_all(const FB& b, int64_t K, int64_t N, uint16_t* dst) {
    cpu::pack_b_all_bf16(b, K, N, dst);
  }
  template <class FA>
  static void gemm_packed_b(int64_t M, int64_t N, int64_t K, const FA& a, const uint16_t* Bp, float* C, int64_t ldc,
                            bool accumulate, uint16_t* ws) {
    cpu::gemm_packed_b_bf16(M, N, K, a, Bp, C, ldc, accumulate, ws);
  }
};
#endif

template <typename E>
struct EngineTag {
  using type = E;
};

// Calls f(EngineTag<Engine<scalar_t, ...>>) for the storage type of `dtype` with the faster packed GEMM for it
// on this CPU; MMKERN_CPU_BF16_DOT=0|1 overrides the measured choice (the tests run both paths).
template <class F>
void dispatch_engine(DType dtype, const char* name, F&& f) {
  dispatch_float(dtype, name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
#ifdef MMKERN_CPU_BF16_DOT
    if constexpr (std::is_same_v<scalar_t, BFloat16>) {
      const char* env = std::getenv("MMKERN_CPU_BF16_DOT");
      if (env && *env ? env[0] != '0' : cpu::bf16_dot_is_faster()) return f(EngineTag<Engine<BFloat16, true>>{});
    }
#endif
    f(EngineTag<Engine<scalar_t, false>>{});
  });
}

}  // namespace

void patch_embed_fwd_cpu(const PatchEmbedFwdParams& p, int num_threads) {
  const Tensor &images = p.images, &weight = p.weight, &bias = p.bias, &pos_embed = p.pos_embed;
  const Tensor &prefix_tokens = p.prefix_tokens, &out = p.out;
  const PatchGeometry g = patch_geometry(images, weight, prefix_tokens.present ? prefix_tokens.size(0) : 0);
  const int64_t rows = g.rows;
  std::vector<int64_t> image_k_offsets = patch_element_offsets(g, images.stride(1), images.stride(2), images.stride(3));
  std::vector<int64_t> weight_k_offsets = patch_element_offsets(g, weight.stride(1), weight.stride(2), weight.stride(3));

  dispatch_engine(images.dtype, "patch_embed", [&](auto engine) {
    using Eng = typename decltype(engine)::type;
    using scalar_t = typename Eng::scalar_t;
    using packed_t = typename Eng::packed_t;
    const scalar_t* img = images.ptr<scalar_t>();
    const scalar_t* w = weight.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    const int64_t w_stride_e = weight.stride(0);
    const int64_t o_stride_b = out.stride(0), o_stride_t = out.stride(1), o_stride_e = out.stride(2);

    std::vector<packed_t> packed_weight(Eng::packed_b_size(g.patch_dim, g.embed_dim));
    auto w_elem = [&](int64_t k, int64_t e) { return Eng::load(w[e * w_stride_e + weight_k_offsets[k]]); };
    Eng::pack_b_all(w_elem, g.patch_dim, g.embed_dim, packed_weight.data());

    // Epilogue terms per token, in fp32: bias for patch tokens, the prefix token itself for prefix rows,
    // the position embedding for every token.
    std::vector<float> extra((g.num_prefix + g.num_patches) * g.embed_dim, 0.f);
    for (int64_t t = 0; t < g.num_prefix + g.num_patches; ++t) {
      float* row = extra.data() + t * g.embed_dim;
      for (int64_t e = 0; e < g.embed_dim; ++e) {
        float v = 0.f;
        if (t >= g.num_prefix) {
          if (bias.present) v += to_float(bias.ptr<scalar_t>()[e * bias.stride(0)]);
        } else {
          v += to_float(prefix_tokens.ptr<scalar_t>()[t * prefix_tokens.stride(0) + e * prefix_tokens.stride(1)]);
        }
        if (pos_embed.present)
          v += to_float(pos_embed.ptr<scalar_t>()[t * pos_embed.stride(0) + e * pos_embed.stride(1)]);
        row[e] = v;
      }
    }

    const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<float> tile(kRowsPerTask * g.embed_dim);
      std::vector<packed_t> panel(Eng::kPanelA);
      std::vector<int64_t> row_offsets(kRowsPerTask);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t r0 = task * kRowsPerTask;
        const int64_t m = std::min(kRowsPerTask, rows - r0);
        for (int64_t i = 0; i < m; ++i) row_offsets[i] = patch_origin_offset(g, r0 + i, images.strides);
        auto a_elem = [&](int64_t i, int64_t k) { return Eng::load(img[row_offsets[i] + image_k_offsets[k]]); };
        Eng::gemm_packed_b(m, g.embed_dim, g.patch_dim, a_elem, packed_weight.data(), tile.data(), g.embed_dim, false,
                           panel.data());
        for (int64_t i = 0; i < m; ++i) {
          const int64_t b = (r0 + i) / g.num_patches;
          const int64_t token = g.num_prefix + (r0 + i) % g.num_patches;
          scalar_t* dst = o + b * o_stride_b + token * o_stride_t;
          const float* src = tile.data() + i * g.embed_dim;
          const float* add = extra.data() + token * g.embed_dim;
          if (o_stride_e == 1) {  // the usual case, vectorised
            for (int64_t e = 0; e < g.embed_dim; ++e) dst[e] = from_float<scalar_t>(src[e] + add[e]);
          } else {
            for (int64_t e = 0; e < g.embed_dim; ++e) dst[e * o_stride_e] = from_float<scalar_t>(src[e] + add[e]);
          }
        }
      }
      // Prefix tokens (class / register tokens) carry no patch product.
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < g.batch; ++b)
        for (int64_t t = 0; t < g.num_prefix; ++t)
          for (int64_t e = 0; e < g.embed_dim; ++e)
            o[b * o_stride_b + t * o_stride_t + e * o_stride_e] = from_float<scalar_t>(extra[t * g.embed_dim + e]);
    }
  });
}

// grad_patch rows G = grad_out[:, T:, :] viewed as (B*N, E).
//   grad_weight[e, k] = sum_rows G[row, e] * patch[row, k]   (fp32, into grad_weight)
//   grad_images[patch k of row] = sum_e G[row, e] * weight[e, k]   (each pixel written exactly once)
void patch_embed_bwd_cpu(const PatchEmbedBwdParams& p, int num_threads) {
  const Tensor &grad_out = p.grad_out, &images = p.images, &weight = p.weight, &grad_images = p.grad_images;
  const Tensor& grad_weight = p.grad_weight;
  const PatchGeometry g = patch_geometry(images, weight, p.num_prefix);
  const int64_t rows = g.rows;
  std::vector<int64_t> image_k_offsets = patch_element_offsets(g, images.stride(1), images.stride(2), images.stride(3));
  std::vector<int64_t> weight_k_offsets = patch_element_offsets(g, weight.stride(1), weight.stride(2), weight.stride(3));

  dispatch_engine(images.dtype, "patch_embed", [&](auto engine) {
    using Eng = typename decltype(engine)::type;
    using scalar_t = typename Eng::scalar_t;
    using packed_t = typename Eng::packed_t;
    const scalar_t* img = images.ptr<scalar_t>();
    const scalar_t* w = weight.ptr<scalar_t>();
    const scalar_t* go = grad_out.ptr<scalar_t>();
    const int64_t go_b = grad_out.stride(0), go_t = grad_out.stride(1), go_e = grad_out.stride(2);
    auto grad_row_offset = [&](int64_t row) {
      return (row / g.num_patches) * go_b + (g.num_prefix + row % g.num_patches) * go_t;
    };

    if (grad_weight.present) {
      // The reduction over token rows is split between threads, each summing whole kKC-row blocks into a
      // private fp32 (E, K) partial (thread 0 straight into grad_weight): every patch and every grad_out
      // element is packed exactly once, whatever the thread count. The partials are added at the end.
      float* gw = grad_weight.ptr<float>();  // fp32 (E, K) contiguous, written here
      const int64_t EK = g.embed_dim * g.patch_dim;
      const int64_t blocks = (rows + cpu::kKC - 1) / cpu::kKC;
      const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks)));
      std::vector<float> partials(static_cast<size_t>(parts - 1) * EK);
#pragma omp parallel num_threads(parts)
      {
        // The runtime may grant fewer threads than asked for: stride by the team actually running.
        const int part = omp_get_thread_num(), team = omp_get_num_threads();
        float* acc = part == 0 ? gw : partials.data() + (part - 1) * EK;
        std::fill(acc, acc + EK, 0.f);
        std::vector<packed_t> packed_patches(Eng::packed_b_size(cpu::kKC, g.patch_dim));
        std::vector<packed_t> panel(Eng::kPanelA);
        std::vector<int64_t> row_offsets(cpu::kKC), go_offsets(cpu::kKC);
        for (int64_t blk = part; blk < blocks; blk += team) {
          const int64_t r0 = blk * cpu::kKC, kc = std::min(cpu::kKC, rows - r0);
          for (int64_t r = 0; r < kc; ++r) {
            row_offsets[r] = patch_origin_offset(g, r0 + r, images.strides);
            go_offsets[r] = grad_row_offset(r0 + r);
          }
          auto b_elem = [&](int64_t r, int64_t k) { return Eng::load(img[row_offsets[r] + image_k_offsets[k]]); };
          Eng::pack_b_all(b_elem, kc, g.patch_dim, packed_patches.data());
          auto a_elem = [&](int64_t e, int64_t r) { return Eng::load(go[go_offsets[r] + e * go_e]); };
          Eng::gemm_packed_b(g.embed_dim, g.patch_dim, kc, a_elem, packed_patches.data(), acc, g.patch_dim, true,
                             panel.data());
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < EK; ++i)
          for (int p = 1; p < team; ++p) gw[i] += partials[(p - 1) * EK + i];
      }
    }

    if (grad_images.present) {
      scalar_t* gi = grad_images.ptr<scalar_t>();
      std::vector<int64_t> gi_k_offsets =
          patch_element_offsets(g, grad_images.stride(1), grad_images.stride(2), grad_images.stride(3));
      std::vector<packed_t> packed_weight(Eng::packed_b_size(g.embed_dim, g.patch_dim));
      auto w_elem = [&](int64_t e, int64_t k) { return Eng::load(w[e * weight.stride(0) + weight_k_offsets[k]]); };
      Eng::pack_b_all(w_elem, g.embed_dim, g.patch_dim, packed_weight.data());
      const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(num_threads)
      {
        std::vector<float> tile(kRowsPerTask * g.patch_dim);
        std::vector<packed_t> panel(Eng::kPanelA);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
          const int64_t r0 = task * kRowsPerTask;
          const int64_t m = std::min(kRowsPerTask, rows - r0);
          auto a_elem = [&](int64_t i, int64_t e) { return Eng::load(go[grad_row_offset(r0 + i) + e * go_e]); };
          Eng::gemm_packed_b(m, g.patch_dim, g.embed_dim, a_elem, packed_weight.data(), tile.data(), g.patch_dim,
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

// Packed patch embedding: the (M, K) patches of every image times weight (E, K)^T, plus bias and the position
// embedding gathered from the base grid (see PatchEmbedPackedFwdParams), each row written to its out_rows slot.
// Prefix rows of `out` are left to the caller. The grid is converted to fp32 once, so the gather is a contiguous axpy per tap.
void patch_embed_packed_fwd_cpu(const PatchEmbedPackedFwdParams& p, int num_threads) {
  const Tensor &patches = p.patches, &weight = p.weight, &bias = p.bias, &pos_grid = p.pos_grid, &out = p.out;
  const PatchGeometry g = packed_geometry(p);
  const int64_t E = g.embed_dim;
  const int64_t* rows_to = p.out_rows.ptr<int64_t>();
  const int64_t* tap_at = pos_grid.present ? p.tap_ptr.ptr<int64_t>() : nullptr;
  const int32_t* tap_row = pos_grid.present ? p.tap_index.ptr<int32_t>() : nullptr;
  const float* tap_w = pos_grid.present ? p.tap_weight.ptr<float>() : nullptr;
  // Bad tables would write or read out of bounds: checked here, once, rather than trusted.
  for (int64_t r = 0; r < g.rows; ++r) check(rows_to[r] >= 0 && rows_to[r] < g.out_rows, "out_rows: out of range");
  if (tap_at) {
    check(tap_at[0] == 0 && tap_at[g.rows] == g.taps, "tap_ptr: must run from 0 to the number of taps");
    for (int64_t r = 0; r < g.rows; ++r) check(tap_at[r] <= tap_at[r + 1], "tap_ptr: must not decrease");
    for (int64_t i = 0; i < g.taps; ++i) check(tap_row[i] >= 0 && tap_row[i] < g.grid_rows, "tap_index: out of range");
  }

  dispatch_engine(patches.dtype, "patch_embed_packed", [&](auto engine) {
    using Eng = typename decltype(engine)::type;
    using scalar_t = typename Eng::scalar_t;
    using packed_t = typename Eng::packed_t;
    const scalar_t* a = patches.ptr<scalar_t>();
    const scalar_t* w = weight.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    const int64_t a_r = patches.stride(0), a_k = patches.stride(1), w_e = weight.stride(0), w_k = weight.stride(1);
    const int64_t o_r = out.stride(0), o_e = out.stride(1);

    std::vector<packed_t> packed_weight(Eng::packed_b_size(g.patch_dim, E));
    auto w_elem = [&](int64_t k, int64_t e) { return Eng::load(w[e * w_e + k * w_k]); };
    Eng::pack_b_all(w_elem, g.patch_dim, E, packed_weight.data());
    std::vector<float> bias_f(E, 0.f), grid_f(g.grid_rows * E);
    if (bias.present)
      for (int64_t e = 0; e < E; ++e) bias_f[e] = to_float(bias.ptr<scalar_t>()[e * bias.stride(0)]);
    for (int64_t t = 0; t < g.grid_rows; ++t)
      for (int64_t e = 0; e < E; ++e)
        grid_f[t * E + e] = to_float(pos_grid.ptr<scalar_t>()[t * pos_grid.stride(0) + e * pos_grid.stride(1)]);

    const int64_t tasks = (g.rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<float> tile(kRowsPerTask * E);
      std::vector<packed_t> panel(Eng::kPanelA);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t r0 = task * kRowsPerTask;
        const int64_t m = std::min(kRowsPerTask, g.rows - r0);
        auto a_elem = [&](int64_t i, int64_t k) { return Eng::load(a[(r0 + i) * a_r + k * a_k]); };
        Eng::gemm_packed_b(m, E, g.patch_dim, a_elem, packed_weight.data(), tile.data(), E, false, panel.data());
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = r0 + i;
          float* acc = tile.data() + i * E;
          for (int64_t e = 0; e < E; ++e) acc[e] += bias_f[e];
          for (int64_t s = tap_at ? tap_at[r] : 0; s < (tap_at ? tap_at[r + 1] : 0); ++s) {
            const float* src = grid_f.data() + static_cast<int64_t>(tap_row[s]) * E;
            for (int64_t e = 0; e < E; ++e) acc[e] += tap_w[s] * src[e];
          }
          scalar_t* dst = o + rows_to[r] * o_r;
          for (int64_t e = 0; e < E; ++e) dst[e * o_e] = from_float<scalar_t>(acc[e]);
        }
      }
    }
  });
}

MMKERN_CPU_END
