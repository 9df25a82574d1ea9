// Memory-flat contrastive losses on CUDA (SIMT; the Triton kernels are the tensor-core path).
//
// Same decomposition as the Triton kernels: a "row" kernel owns 64 rows of A and streams all rows of B,
// computing 64x64 tiles of d = A.B^T in registers. Forward reduces each tile into the rows' online-max
// statistics (CLIP's column statistics are the same kernel with A and B swapped); backward recomputes the tile,
// turns it into G = dL/dz with the shared grad_logit and adds G.B into the fp32 gradient rows it owns. No
// atomics, no cross-block merges: each output row has exactly one writer. The per-element math (merge,
// softplus, grad_logit) is the host/device code of mmkern/contrastive.h that the CPU tests exercise.
#include <cuda_runtime.h>

#include "mmkern/contrastive.h"
#include "mmkern/cuda_gemm.cuh"

namespace mmkern {
namespace {

using namespace contrastive;

constexpr int kTile = 64;     // rows of A and of B per tile
constexpr int kDepth = 16;    // feature depth per shared-memory stage
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 outputs each

template <typename T>
__device__ float load_or_zero(const T* p, int64_t row, int64_t rows, int64_t ld, int64_t k, int64_t D) {
  return row < rows && k < D ? to_float(p[row * ld + k]) : 0.f;
}

// sS[64][65] = A[i0:i0+64] . B[j0:j0+64]^T (zero outside the matrices). Ends with __syncthreads().
template <typename T>
__device__ void tile_dot(const T* A, const T* B, int64_t M, int64_t N, int64_t D, int64_t lda, int64_t ldb,
                         int64_t i0, int64_t j0, float (*sA)[kTile], float (*sB)[kTile], float (*sS)[kTile + 1]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < D; k0 += kDepth) {
    for (int idx = threadIdx.x; idx < kTile * kDepth; idx += kThreads) {
      const int r = idx / kDepth, k = idx % kDepth;
      sA[k][r] = load_or_zero(A, i0 + r, M, lda, k0 + k, D);
      sB[k][r] = load_or_zero(B, j0 + r, N, ldb, k0 + k, D);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k)
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += sA[k][ty * 4 + a] * sB[k][tx * 4 + b];
    __syncthreads();
  }
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) sS[ty * 4 + a][tx * 4 + b] = acc[a][b];
  __syncthreads();
}

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// out: `planes` planes of M floats (value, d/ds, d/db); softmax (kRows) or sigmoid (kSigmoid) rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) contrastive_fwd_kernel(const T* A, const T* B, int64_t M, int64_t N,
                                                                   int64_t D, int64_t lda, int64_t ldb,
                                                                   const float* sb, int mode, bool diag, float* out,
                                                                   int planes) {
  __shared__ float sA[kDepth][kTile], sB[kDepth][kTile], sS[kTile][kTile + 1];
  __shared__ SoftmaxState state[kTile];
  __shared__ float sums[3][kTile];
  const float s = sb[0], bias = sb[1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < kTile) {
    state[threadIdx.x] = softmax_init();
    sums[0][threadIdx.x] = sums[1][threadIdx.x] = sums[2][threadIdx.x] = 0.f;
  }
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    tile_dot(A, B, M, N, D, lda, ldb, i0, j0, sA, sB, sS);
    for (int r = warp * 8; r < warp * 8 + 8; ++r) {  // each warp owns 8 rows; lanes take 2 columns each
      float z[2], d[2];
      bool ok[2], pos[2];
      for (int c = 0; c < 2; ++c) {
        const int64_t j = j0 + lane + 32 * c;
        ok[c] = j < N;
        d[c] = sS[r][lane + 32 * c];
        z[c] = s * d[c] + bias;
        pos[c] = diag && j == i0 + r;
      }
      if (mode == kSigmoid) {
        float sp = 0.f, sd = 0.f, sg = 0.f;
        for (int c = 0; c < 2; ++c)
          if (ok[c]) {
            const float g = sigmoid_grad(z[c], pos[c]);
            sp += softplus(pos[c] ? -z[c] : z[c]);
            sd += g * d[c];
            sg += g;
          }
        sp = warp_sum(sp), sd = warp_sum(sd), sg = warp_sum(sg);
        if (lane == 0) sums[0][r] += sp, sums[1][r] += sd, sums[2][r] += sg;
        continue;
      }
      for (int c = 0; c < 2; ++c) ok[c] = ok[c] && !pos[c];  // softmax positives stay out (contrastive.h)
      const float mt = warp_max(fmaxf(ok[0] ? z[0] : -INFINITY, ok[1] ? z[1] : -INFINITY));
      float l = 0.f, e = 0.f;
      for (int c = 0; c < 2; ++c)
        if (ok[c]) {
          const float p = expf(z[c] - mt);
          l += p;
          e += p * d[c];
        }
      l = warp_sum(l), e = warp_sum(e);
      if (lane == 0) softmax_merge(state[r], mt, l, e);
    }
    __syncthreads();
  }
  if (threadIdx.x < kTile && i0 + threadIdx.x < M) {
    const int r = threadIdx.x;
    const int64_t i = i0 + r;
    const bool sig = mode == kSigmoid;
    out[i] = sig ? sums[0][r] : softmax_lse(state[r]);
    out[M + i] = sig ? sums[1][r] : softmax_mean_d(state[r]);
    if (planes == 3) out[2 * M + i] = sig ? sums[2][r] : 1.f;
  }
}

// dA[i0:i0+64] (fp32, row stride D) += G . B with G_ij = grad_logit(z_ij). `swap`: the loss's rows are
// B's rows (the dY launch), so B's (lse, weight) fill grad_logit's row slots.
template <typename T>
__global__ void __launch_bounds__(kThreads) contrastive_bwd_kernel(const T* A, const T* B, int64_t M, int64_t N,
                                                                   int64_t D, int64_t lda, int64_t ldb,
                                                                   const float* sb, int mode, bool diag, bool swap,
                                                                   const float* lse_a, const float* g_a,
                                                                   const float* lse_b, const float* g_b, float* dA) {
  __shared__ float sA[kDepth][kTile], sB[kDepth][kTile], sS[kTile][kTile + 1];
  __shared__ float sBd[kTile][kTile];
  const float s = sb[0], bias = sb[1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    tile_dot(A, B, M, N, D, lda, ldb, i0, j0, sA, sB, sS);
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int r = idx / kTile, c = idx % kTile;
      const int64_t i = i0 + r, j = j0 + c;
      float g = 0.f;
      if (i < M && j < N) {
        const float z = s * sS[r][c] + bias;
        const float la = lse_a ? lse_a[i] : 0.f, ga = g_a ? g_a[i] : 0.f;
        const float lb = lse_b ? lse_b[j] : 0.f, gb = g_b ? g_b[j] : 0.f;
        const bool pos = diag && i == j;
        g = swap ? grad_logit(mode, pos, z, lb, gb, la, ga) : grad_logit(mode, pos, z, la, ga, lb, gb);
      }
      sS[r][c] = g;
    }
    __syncthreads();
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
        const int n = idx / kTile, k = idx % kTile;
        sBd[n][k] = load_or_zero(B, j0 + n, N, ldb, d0 + k, D);
      }
      __syncthreads();
      float acc[4][4] = {};
      for (int n = 0; n < kTile; ++n)
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] += sS[ty * 4 + a][n] * sBd[n][tx * 4 + b];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) {
          const int64_t i = i0 + ty * 4 + a, k = d0 + tx * 4 + b;
          if (i < M && k < D) dA[i * D + k] += acc[a][b];
        }
      __syncthreads();
    }
  }
}

int blocks_for(int64_t rows) { return static_cast<int>((rows + kTile - 1) / kTile); }

}  // namespace

int contrastive_fwd_cuda(const ContrastiveFwdParams& p, uintptr_t stream_handle) {
  const Tensor &x = p.x, &y = p.y, &row_stats = p.row_stats, &col_stats = p.col_stats;
  const int mode = p.mode;
  const bool diagonal = p.diagonal;
  check(x.ndim == 2 && y.ndim == 2 && x.size(1) == y.size(1) && x.stride(1) == 1 && y.stride(1) == 1,
        "x: expected (B, D) and (K, D) row-major features");
  check(mode == kRows || mode == kRowsCols || mode == kSigmoid, "mode: unknown contrastive mode");
  check(mode != kRowsCols || col_stats.present, "col_stats: required for the CLIP loss");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t B = x.size(0), K = y.size(0), D = x.size(1);
  check_scale_bias(p.scale_bias);
  const float* sb = p.scale_bias.ptr<float>();
  dispatch_float(x.dtype, "contrastive", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t *xp = x.ptr<scalar_t>(), *yp = y.ptr<scalar_t>();
    const int row_mode = mode == kSigmoid ? kSigmoid : kRows;
    if (B > 0)
      contrastive_fwd_kernel<<<blocks_for(B), kThreads, 0, stream>>>(xp, yp, B, K, D, x.stride(0), y.stride(0), sb,
                                                                     row_mode, diagonal, row_stats.ptr<float>(), 3);
    if (mode == kRowsCols && K > 0)
      contrastive_fwd_kernel<<<blocks_for(K), kThreads, 0, stream>>>(yp, xp, K, B, D, y.stride(0), x.stride(0), sb,
                                                                     kRows, diagonal, col_stats.ptr<float>(), 2);
  });
  return static_cast<int>(cudaGetLastError());
}

int contrastive_bwd_cuda(const ContrastiveBwdParams& p, uintptr_t stream_handle) {
  const Tensor &x = p.x, &y = p.y, &row_lse = p.row_lse, &col_lse = p.col_lse, &gr = p.gr, &gc = p.gc;
  const Tensor &dx = p.dx, &dy = p.dy;
  const int mode = p.mode;
  const bool diagonal = p.diagonal;
  check(x.ndim == 2 && y.ndim == 2 && x.size(1) == y.size(1) && x.stride(1) == 1 && y.stride(1) == 1,
        "x: expected (B, D) and (K, D) row-major features");
  check(mode == kRows || mode == kRowsCols || mode == kSigmoid, "mode: unknown contrastive mode");
  check(mode != kRowsCols || (col_lse.present && gc.present), "gc: required for the CLIP loss");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t B = x.size(0), K = y.size(0), D = x.size(1);
  check_scale_bias(p.scale_bias);
  const float* sb = p.scale_bias.ptr<float>();
  const float* rl = mode == kSigmoid ? nullptr : row_lse.ptr<float>();
  const float* cl = mode == kRowsCols ? col_lse.ptr<float>() : nullptr;
  const float* gcp = mode == kRowsCols ? gc.ptr<float>() : nullptr;
  dispatch_float(x.dtype, "contrastive", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t *xp = x.ptr<scalar_t>(), *yp = y.ptr<scalar_t>();
    if (B > 0)
      contrastive_bwd_kernel<<<blocks_for(B), kThreads, 0, stream>>>(xp, yp, B, K, D, x.stride(0), y.stride(0), sb,
                                                                     mode, diagonal, false, rl, gr.ptr<float>(), cl,
                                                                     gcp, dx.ptr<float>());
    if (K > 0)
      contrastive_bwd_kernel<<<blocks_for(K), kThreads, 0, stream>>>(yp, xp, K, B, D, y.stride(0), x.stride(0), sb,
                                                                     mode, diagonal, true, cl, gcp, rl,
                                                                     gr.ptr<float>(), dy.ptr<float>());
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace mmkern
