// Fused attention on CUDA: the CPU kernel's algorithm with the work spread over thread blocks.
//
// Forward: one block per (query block, batch*head); key blocks stream through shared memory with an online
// softmax; only out and the row statistics (m, log l) (attn::row_stat_max) are written. Backward, without
// atomics (deterministic): a delta kernel (rowsum dO o O), a dK/dV kernel per key block looping over the query
// blocks of its head group, and a dQ kernel per query block (it also writes dS as the float mask's gradient).
// Key blocks that no query of the block sees (causal, window) are skipped. Visibility, the softmax guards and
// the problem/layout description come from mmkern/attention.h, shared with the CPU kernel that the tests run.
//
// Tile products run on tensor cores (wmma 16x16x16, fp32 accumulation) for fp16/bf16 and as plain fp32
// loops for fp32 inputs. Dropout is not implemented here: the Python op raises a ValueError for it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <type_traits>

#include "mmkern/attention.h"
#include "mmkern/common.h"

namespace mmkern {
namespace {

using attn::Layout;
using attn::Problem;
using namespace nvcuda;

constexpr int kThreads = 128;

template <typename T>
struct WmmaType {
  using type = float;
};
template <>
struct WmmaType<Half> {
  using type = __half;
};
template <>
struct WmmaType<BFloat16> {
  using type = __nv_bfloat16;
};

// The forward's operands (attn::Operands: q, k, v, o, mask, lse and their layouts) and the backward's.
struct Params : attn::Operands {
  const void* go;
  void *out, *dq, *dk, *dv;
  float *delta, *dmask;
  Layout lgo, ldmask, ldq, ldk, ldv;
  bool chunked;  // q, k, v (and dO in a backward) copy in 16-byte chunks (cp.async), see chunkable
  int dp, dvp;   // head dims rounded up to 16
};

__host__ __device__ inline int round16(int64_t x) { return static_cast<int>((x + 15) / 16 * 16); }
__host__ __device__ inline size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// C (M x N fp32, row stride ldc) (+)= A (M x K) B (K x N), all in shared memory, M, N, K multiples of 16.
// ACol: A(i, k) = A[k * lda + i], else A[i * lda + k]; BCol: B(k, j) = B[j * ldb + k], else B[k * ldb + j].
template <typename T, bool ACol, bool BCol>
__device__ void gemm_smem(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C, int ldc,
                          bool accumulate) {
  if constexpr (std::is_same<T, float>::value) {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int i = idx / N, j = idx % N;
      float s = accumulate ? C[i * ldc + j] : 0.f;
      for (int k = 0; k < K; ++k) s += A[ACol ? k * lda + i : i * lda + k] * B[BCol ? j * ldb + k : k * ldb + j];
      C[i * ldc + j] = s;
    }
  } else {
    using W = typename WmmaType<T>::type;
    using LA = typename std::conditional<ACol, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<BCol, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32, tiles_n = N / 16;
    for (int t = warp; t < (M / 16) * tiles_n; t += warps) {
      const int ti = t / tiles_n * 16, tj = t % tiles_n * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate)
        wmma::load_matrix_sync(c, C + ti * ldc + tj, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(c, 0.f);
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, LB> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const W*>(ACol ? A + k * lda + ti : A + ti * lda + k), lda);
        wmma::load_matrix_sync(b, reinterpret_cast<const W*>(BCol ? B + tj * ldb + k : B + k * ldb + tj), ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + ti * ldc + tj, c, ldc, wmma::mem_row_major);
    }
  }
  __syncthreads();
}

// cp.async (sm_80+): a 16-byte global -> shared copy that bypasses the registers and L1, zero-filling the 16 bytes
// when !valid (src-size 0: nothing is read). Earlier architectures copy through registers.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
#else
  *static_cast<uint4*>(dst) = valid ? *static_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups of this thread's copies are in flight.
template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Starts copying rows [t0, t0 + rows) x [0, cols) of (b, h) into a (R x ld) tile, zero padding the rest. Chunked
// (the launcher checked alignment, see chunkable): 16-byte cp.async copies, complete after async_wait and a
// barrier; else element by element, complete after a barrier.
template <typename T>
__device__ void copy_tile(T* dst, int R, int ld, const T* src, const Layout& lay, int64_t b, int64_t h, int64_t t0,
                          int64_t rows, int64_t cols, bool chunked) {
  if (chunked) {
    constexpr int C = 16 / sizeof(T);
    const int chunks = ld / C;
    for (int idx = threadIdx.x; idx < R * chunks; idx += blockDim.x) {
      const int r = idx / chunks, c = idx % chunks * C;
      const bool valid = r < rows && c < cols;
      copy16_async(dst + r * ld + c, valid ? src + lay.offset(b, h, t0 + r, c) : src, valid);
    }
    return;
  }
  for (int idx = threadIdx.x; idx < R * ld; idx += blockDim.x) {
    const int r = idx / ld, c = idx % ld;
    dst[idx] = (r < rows && c < cols) ? src[lay.offset(b, h, t0 + r, c)] : from_float<T>(0.f);
  }
}

// copy_tile, complete for this thread (a barrier still has to follow).
template <typename T>
__device__ void load_tile(T* dst, int R, int ld, const T* src, const Layout& lay, int64_t b, int64_t h, int64_t t0,
                          int64_t rows, int64_t cols, bool chunked) {
  copy_tile(dst, R, ld, src, lay, b, h, t0, rows, cols, chunked);
  async_commit();
  async_wait<0>();
}

// Streams the blocks at t = 0, step, 2·step, ... below end for which visible(t) holds through two shared-memory
// buffers: copy(buf, t) starts the copies (copy_tile) of block t into buffer buf, body(buf, t) computes on them. The
// next visible block's copy runs while body works on this one; body must end with a barrier (it does when its
// last step is a gemm_smem), since the following copy overwrites the buffer it read. Copies started before the
// call (not yet committed) complete with the first block's. Nothing is in flight on return, after a barrier.
template <typename Visible, typename Copy, typename Body>
__device__ void stream_blocks(int64_t end, int64_t step, Visible visible, Copy copy, Body body) {
  auto next = [&](int64_t t) {
    while (t < end && !visible(t)) t += step;
    return t;
  };
  int64_t t = next(0);
  if (t < end) copy(0, t);
  async_commit();
  for (int buf = 0; t < end; buf ^= 1) {
    const int64_t t_next = next(t + step);
    if (t_next < end) copy(buf ^ 1, t_next);
    async_commit();
    async_wait<1>();  // all but the copy just started: this block's tiles are in
    __syncthreads();
    body(buf, t);
    t = t_next;
  }
  async_wait<0>();
  __syncthreads();
}

// Buffer buf of a double buffer, selected: indexing the pair with a run-time buf would put it in local memory.
template <typename P>
__device__ __forceinline__ P* buffer(P* const (&pair)[2], int buf) {
  return buf ? pair[1] : pair[0];
}

// Grid: x = blocks along the sequence, (y, z) = batch·head split at 65,535 (the limit of axes y and z), so that
// batch·heads up to 2^32 launch and the blocks of one head still run next to each other.
constexpr int64_t kGridY = 65535;

dim3 grid_of(int64_t blocks, int64_t batch_heads) {
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch_heads < kGridY ? batch_heads : kGridY),
              static_cast<unsigned>((batch_heads + kGridY - 1) / kGridY));
}

__device__ inline int64_t grid_batch_head() { return static_cast<int64_t>(blockIdx.z) * kGridY + blockIdx.y; }

// Score s (already scaled) of query i, key j after the float / bool mask and visibility; -inf if hidden.
__device__ inline float masked_score(const Params& p, float s, int64_t b, int64_t h, int64_t i, int64_t j,
                                     int64_t L, int64_t S) {
  if (i >= L || j >= S || !attn::visible(p.pb.vis, i, j)) return -INFINITY;
  if (p.mask) {
    const int64_t off = p.lmask.offset(b, h, i, j);
    if (p.mask_bool) return static_cast<const uint8_t*>(p.mask)[off] ? s : -INFINITY;
    return s + static_cast<const float*>(p.mask)[off];
  }
  return s;
}

// K/V tiles are double buffered (stream_blocks): the copy of the next visible key block (cp.async) runs while this
// one is computed on. The softmax gives each warp whole rows, lanes along the keys: consecutive shared-memory words (no
// bank conflicts; one thread per row walked a 64-float row stride, all 32 lanes in one bank) and coalesced mask
// reads.
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(Params p) {
  const Problem& pb = p.pb;
  const int64_t bh = grid_batch_head();
  if (bh >= pb.batch * pb.heads_q) return;
  const int64_t b = bh / pb.heads_q, h = bh % pb.heads_q, hk = h / (pb.heads_q / pb.heads_k);
  const int64_t L = pb.len_q(b), S = pb.len_k(b), i0 = static_cast<int64_t>(blockIdx.x) * BM;
  if (i0 >= L) return;
  const int Dp = p.dp, DVp = p.dvp;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* cur = smem;
  auto take = [&](size_t bytes) { unsigned char* r = cur; cur += align128(bytes); return r; };
  T* qs = reinterpret_cast<T*>(take(sizeof(T) * BM * Dp));
  T* ks[2] = {reinterpret_cast<T*>(take(sizeof(T) * BN * Dp)), reinterpret_cast<T*>(take(sizeof(T) * BN * Dp))};
  T* vs[2] = {reinterpret_cast<T*>(take(sizeof(T) * BN * DVp)), reinterpret_cast<T*>(take(sizeof(T) * BN * DVp))};
  T* ps = reinterpret_cast<T*>(take(sizeof(T) * BM * BN));
  float* ss = reinterpret_cast<float*>(take(sizeof(float) * BM * BN));
  float* os = reinterpret_cast<float*>(take(sizeof(float) * BM * DVp));
  float* m = reinterpret_cast<float*>(take(sizeof(float) * BM));
  float* l = reinterpret_cast<float*>(take(sizeof(float) * BM));

  const T *K = static_cast<const T*>(p.k), *V = static_cast<const T*>(p.v);
  auto copy_kv = [&](int buf, int64_t j0) {
    copy_tile(buffer(ks, buf), BN, Dp, K, p.lk, b, hk, pb.k_start(b) + j0, S - j0, pb.dim, p.chunked);
    copy_tile(buffer(vs, buf), BN, DVp, V, p.lv, b, hk, pb.k_start(b) + j0, S - j0, pb.dim_v, p.chunked);
  };
  copy_tile(qs, BM, Dp, static_cast<const T*>(p.q), p.lq, b, h, pb.q_start(b) + i0, L - i0, pb.dim, p.chunked);
  for (int idx = threadIdx.x; idx < BM * DVp; idx += blockDim.x) os[idx] = 0.f;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto visible = [&](int64_t j0) { return attn::block_any_visible(pb.vis, i0, i0 + BM, j0, j0 + BN); };
  // Q completes with the first K/V tile; a query block that sees no key still waits for it before it exits.
  stream_blocks(S, BN, visible, copy_kv, [&](int buf, int64_t j0) {
    gemm_smem<T, false, true>(BM, BN, Dp, qs, Dp, buffer(ks, buf), Dp, ss, BN, false);
    for (int r = warp; r < BM; r += kThreads / 32) {
      float* row = ss + r * BN;
      float mx = -INFINITY;
      for (int j = lane; j < BN; j += 32) {
        row[j] = masked_score(p, row[j] * pb.scale, b, h, i0 + r, j0 + j, L, S);
        mx = fmaxf(mx, row[j]);
      }
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[r], mx), shift = attn::softmax_shift(m_new), alpha = __expf(m[r] - shift);
      float sum = 0.f;
      for (int j = lane; j < BN; j += 32) {
        const float e = __expf(row[j] - shift);
        ps[r * BN + j] = from_float<T>(e);
        sum += e;
      }
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      for (int d = lane; d < DVp; d += 32) os[r * DVp + d] *= alpha;
      __syncwarp();  // every lane has read m[r]
      if (lane == 0) {
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
      }
    }
    __syncthreads();
    gemm_smem<T, false, false>(BM, DVp, BN, ps, BN, buffer(vs, buf), DVp, os, DVp, true);
  });
  T* out = static_cast<T*>(p.out);
  const int64_t t0 = pb.q_start(b) + i0;
  for (int idx = threadIdx.x; idx < BM * pb.dim_v; idx += blockDim.x) {
    const int r = idx / static_cast<int>(pb.dim_v), d = idx - r * static_cast<int>(pb.dim_v);  // 32-bit: D <= 256
    if (i0 + r < L) out[p.lo.offset(b, h, t0 + r, d)] = from_float<T>(os[r * DVp + d] * attn::row_inv_sum(l[r]));
  }
  for (int r = threadIdx.x; r < BM; r += blockDim.x)
    if (i0 + r < L) {
      float* stat = p.lse + p.lrow.offset(b, h, t0 + r, 0);
      stat[0] = attn::row_stat_max(m[r], l[r]);
      stat[1] = attn::row_stat_log_sum(l[r]);
    }
}

template <typename T>
__global__ void attention_delta_kernel(Params p) {
  const Problem& pb = p.pb;
  const int64_t bh = grid_batch_head();
  if (bh >= pb.batch * pb.heads_q) return;
  const int64_t b = bh / pb.heads_q, h = bh % pb.heads_q;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pb.len_q(b)) return;
  const int64_t t = pb.q_start(b) + i;
  float s = 0.f;
  for (int64_t d = 0; d < pb.dim_v; ++d)
    s += to_float(static_cast<const T*>(p.go)[p.lgo.offset(b, h, t, d)]) *
         to_float(static_cast<const T*>(p.o)[p.lo.offset(b, h, t, d)]);
  p.delta[p.lrow.offset(b, h, t, 0)] = s;
}

// Shared memory of the backward kernels: Q, dO, K, V tiles (K and V twice in the dQ kernel, which double buffers
// them), S and dP tiles (fp32), P and dS tiles (T), the fp32 accumulators (dK and dV, or dQ), the row statistics.
// carve lays it out from base and returns its size in bytes (base nullptr: the size only), so the launchers and
// the kernels cannot disagree about it.
template <typename T>
struct BwdSmem {
  T *qs, *dos, *ks[2], *vs[2], *pt, *dst;
  float *ss, *dps, *acc, *lse, *log_l, *delta;

  template <bool kDq, typename Base>
  __host__ __device__ size_t carve(Base base, int BM, int BN, int Dp, int DVp) {
    size_t used = 0;
    auto take = [&](size_t bytes) {
      unsigned char* r = nullptr;  // a compile-time choice: a run-time null test here made ptxas spill (dK/dV)
      if constexpr (!std::is_same<Base, std::nullptr_t>::value) r = base + used;
      used += align128(bytes);
      return r;
    };
    qs = reinterpret_cast<T*>(take(sizeof(T) * BM * Dp));
    dos = reinterpret_cast<T*>(take(sizeof(T) * BM * DVp));
    for (int buf = 0; buf < (kDq ? 2 : 1); ++buf) {
      ks[buf] = reinterpret_cast<T*>(take(sizeof(T) * BN * Dp));
      vs[buf] = reinterpret_cast<T*>(take(sizeof(T) * BN * DVp));
    }
    ss = reinterpret_cast<float*>(take(sizeof(float) * BM * BN));
    dps = reinterpret_cast<float*>(take(sizeof(float) * BM * BN));
    pt = reinterpret_cast<T*>(take(sizeof(T) * BM * BN));
    dst = reinterpret_cast<T*>(take(sizeof(T) * BM * BN));
    acc = reinterpret_cast<float*>(take(sizeof(float) * (kDq ? BM * Dp : BN * (Dp + DVp))));
    lse = reinterpret_cast<float*>(take(sizeof(float) * BM));
    log_l = reinterpret_cast<float*>(take(sizeof(float) * BM));
    delta = reinterpret_cast<float*>(take(sizeof(float) * BM));
    return used;
  }
};

// Recomputes one (query block, key block) tile: pt = P (T), dst = dS (T); writes dS into dmask if asked.
template <typename T, int BM, int BN>
__device__ void bwd_tile(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t L, int64_t S,
                         const T* qs, const T* dos, const T* ks, const T* vs, float* ss, float* dps, T* pt, T* dst,
                         const float* lse, const float* log_l, const float* delta, bool write_dmask) {
  gemm_smem<T, false, true>(BM, BN, p.dp, qs, p.dp, ks, p.dp, ss, BN, false);
  gemm_smem<T, false, true>(BM, BN, p.dvp, dos, p.dvp, vs, p.dvp, dps, BN, false);
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    const int r = idx / BN, c = idx % BN;
    const float s = masked_score(p, ss[idx] * p.pb.scale, b, h, i0 + r, j0 + c, L, S);
    const float pr = s == -INFINITY ? 0.f : attn::row_prob(s, lse[r], log_l[r]);
    const float ds = pr * (dps[idx] - delta[r]);
    pt[idx] = from_float<T>(pr);
    dst[idx] = from_float<T>(ds);
    if (write_dmask && i0 + r < L && j0 + c < S) p.dmask[p.ldmask.offset(b, h, i0 + r, j0 + c)] = ds;
  }
  __syncthreads();
}

template <typename T, int BM>
__device__ void load_query_rows(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t L, T* qs, T* dos,
                                float* lse, float* log_l, float* delta) {
  const int64_t t0 = p.pb.q_start(b) + i0;
  load_tile(qs, BM, p.dp, static_cast<const T*>(p.q), p.lq, b, h, t0, L - i0, p.pb.dim, p.chunked);
  load_tile(dos, BM, p.dvp, static_cast<const T*>(p.go), p.lgo, b, h, t0, L - i0, p.pb.dim_v, p.chunked);
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const bool in = i0 + r < L;
    const float* stat = p.lse + p.lrow.offset(b, h, t0 + r, 0);
    lse[r] = in ? stat[0] : INFINITY;
    log_l[r] = in ? stat[1] : 0.f;
    delta[r] = in ? p.delta[p.lrow.offset(b, h, t0 + r, 0)] : 0.f;
  }
}

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(Params p) {
  const Problem& pb = p.pb;
  const int64_t bhk = grid_batch_head();
  if (bhk >= pb.batch * pb.heads_k) return;
  const int64_t group = pb.heads_q / pb.heads_k, b = bhk / pb.heads_k, hk = bhk % pb.heads_k;
  const int64_t L = pb.len_q(b), S = pb.len_k(b), j0 = static_cast<int64_t>(blockIdx.x) * BN;
  if (j0 >= S) return;
  extern __shared__ __align__(128) unsigned char smem[];
  BwdSmem<T> sm;
  sm.template carve<false>(smem, BM, BN, p.dp, p.dvp);
  T *qs = sm.qs, *dos = sm.dos, *ks = sm.ks[0], *vs = sm.vs[0];
  float* dk = sm.acc;
  float* dv = sm.acc + BN * p.dp;
  load_tile(ks, BN, p.dp, static_cast<const T*>(p.k), p.lk, b, hk, pb.k_start(b) + j0, S - j0, pb.dim, p.chunked);
  load_tile(vs, BN, p.dvp, static_cast<const T*>(p.v), p.lv, b, hk, pb.k_start(b) + j0, S - j0, pb.dim_v, p.chunked);
  for (int idx = threadIdx.x; idx < BN * (p.dp + p.dvp); idx += blockDim.x) sm.acc[idx] = 0.f;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < L; i0 += BM) {
      if (!attn::block_any_visible(pb.vis, i0, i0 + BM, j0, j0 + BN)) continue;
      __syncthreads();
      load_query_rows<T, BM>(p, b, h, i0, L, qs, dos, sm.lse, sm.log_l, sm.delta);
      __syncthreads();
      bwd_tile<T, BM, BN>(p, b, h, i0, j0, L, S, qs, dos, ks, vs, sm.ss, sm.dps, sm.pt, sm.dst, sm.lse, sm.log_l,
                          sm.delta, false);
      gemm_smem<T, true, false>(BN, p.dvp, BM, sm.pt, BN, dos, p.dvp, dv, p.dvp, true);   // dV += P^T dO
      gemm_smem<T, true, false>(BN, p.dp, BM, sm.dst, BN, qs, p.dp, dk, p.dp, true);      // dK += dS^T Q
    }
  }
  __syncthreads();
  const int64_t t0 = pb.k_start(b) + j0;
  for (int idx = threadIdx.x; idx < BN * pb.dim; idx += blockDim.x) {
    const int r = idx / static_cast<int>(pb.dim), d = idx - r * static_cast<int>(pb.dim);  // 32-bit: D <= 256
    if (j0 + r < S) static_cast<T*>(p.dk)[p.ldk.offset(b, hk, t0 + r, d)] = from_float<T>(dk[r * p.dp + d] * pb.scale);
  }
  for (int idx = threadIdx.x; idx < BN * pb.dim_v; idx += blockDim.x) {
    const int r = idx / static_cast<int>(pb.dim_v), d = idx - r * static_cast<int>(pb.dim_v);  // 32-bit: D <= 256
    if (j0 + r < S) static_cast<T*>(p.dv)[p.ldv.offset(b, hk, t0 + r, d)] = from_float<T>(dv[r * p.dvp + d]);
  }
}

// K/V tiles double buffered as in the forward (stream_blocks).
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(Params p) {
  const Problem& pb = p.pb;
  const int64_t bh = grid_batch_head();
  if (bh >= pb.batch * pb.heads_q) return;
  const int64_t b = bh / pb.heads_q, h = bh % pb.heads_q, hk = h / (pb.heads_q / pb.heads_k);
  const int64_t L = pb.len_q(b), S = pb.len_k(b), i0 = static_cast<int64_t>(blockIdx.x) * BM;
  if (i0 >= L) return;
  extern __shared__ __align__(128) unsigned char smem[];
  BwdSmem<T> sm;
  sm.template carve<true>(smem, BM, BN, p.dp, p.dvp);
  float* dq = sm.acc;
  load_query_rows<T, BM>(p, b, h, i0, L, sm.qs, sm.dos, sm.lse, sm.log_l, sm.delta);
  for (int idx = threadIdx.x; idx < BM * p.dp; idx += blockDim.x) dq[idx] = 0.f;
  const T *K = static_cast<const T*>(p.k), *V = static_cast<const T*>(p.v);
  auto visible = [&](int64_t j0) { return attn::block_any_visible(pb.vis, i0, i0 + BM, j0, j0 + BN); };
  auto copy_kv = [&](int buf, int64_t j0) {
    copy_tile(buffer(sm.ks, buf), BN, p.dp, K, p.lk, b, hk, pb.k_start(b) + j0, S - j0, pb.dim, p.chunked);
    copy_tile(buffer(sm.vs, buf), BN, p.dvp, V, p.lv, b, hk, pb.k_start(b) + j0, S - j0, pb.dim_v, p.chunked);
  };
  stream_blocks(S, BN, visible, copy_kv, [&](int buf, int64_t j0) {
    T *ks = buffer(sm.ks, buf), *vs = buffer(sm.vs, buf);
    bwd_tile<T, BM, BN>(p, b, h, i0, j0, L, S, sm.qs, sm.dos, ks, vs, sm.ss, sm.dps, sm.pt, sm.dst, sm.lse, sm.log_l,
                        sm.delta, p.dmask != nullptr);
    gemm_smem<T, false, false>(BM, p.dp, BN, sm.dst, BN, ks, p.dp, dq, p.dp, true);  // dQ += dS K
  });
  const int64_t t0 = pb.q_start(b) + i0;
  for (int idx = threadIdx.x; idx < BM * pb.dim; idx += blockDim.x) {
    const int r = idx / static_cast<int>(pb.dim), d = idx - r * static_cast<int>(pb.dim);  // 32-bit: D <= 256
    if (i0 + r < L) static_cast<T*>(p.dq)[p.ldq.offset(b, h, t0 + r, d)] = from_float<T>(dq[r * p.dp + d] * pb.scale);
  }
}

size_t fwd_smem(size_t elem, int BM, int BN, int Dp, int DVp) {
  return align128(elem * BM * Dp) + 2 * align128(elem * BN * Dp) + 2 * align128(elem * BN * DVp) +
         align128(elem * BM * BN) + align128(4 * BM * BN) + align128(4 * BM * DVp) + 2 * align128(4 * BM);
}

// True if t's (b, h, t) rows start on 16-byte boundaries with adjacent elements and a row length that is a whole
// number of 16-byte chunks: then tiles of it copy in 16-byte chunks.
bool chunkable(const Tensor& t, size_t elem) {
  if (!t.present) return true;
  const int64_t c = 16 / static_cast<int64_t>(elem);
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0 || t.stride(-1) != 1 || t.size(-1) % c != 0) return false;
  for (int d = 0; d < t.ndim - 1; ++d)
    if (t.stride(d) % c != 0) return false;
  return true;
}

int max_smem() {
  int device = 0, bytes = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return bytes;
}

cudaError_t launch(void (*kernel)(Params), dim3 grid, size_t smem, const Params& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The parameters of a forward (bwd null) or of a backward (bwd the same parameters, with the gradients).
Params make_params(const AttentionFwdParams& fwd, const AttentionBwdParams* bwd) {
  check(fwd.dropout_p == 0, "dropout_p: the CUDA kernels have no dropout");
  Params p{};
  // cu_seqlens are device pointers here: read only inside kernels
  static_cast<attn::Operands&>(p) = attn::make_operands(fwd);
  p.out = fwd.out.data;
  p.dp = round16(p.pb.dim);
  p.dvp = round16(p.pb.dim_v);
  if (bwd) {
    check(bwd->delta.present, "delta: the CUDA backward's workspace is missing");
    p.go = bwd->grad_out.data;
    p.lgo = attn::layout_of(bwd->grad_out);
    p.dq = bwd->dq.data;
    p.dk = bwd->dk.data;
    p.dv = bwd->dv.data;
    p.ldq = attn::layout_of(bwd->dq);
    p.ldk = attn::layout_of(bwd->dk);
    p.ldv = attn::layout_of(bwd->dv);
    p.delta = bwd->delta.ptr<float>();
    if (bwd->dmask.present) {
      p.dmask = bwd->dmask.ptr<float>();
      p.ldmask = attn::layout_of(bwd->dmask);
    }
  }
  const size_t elem = fwd.q.dtype == DType::f32 ? 4 : 2;
  p.chunked = chunkable(fwd.q, elem) && chunkable(fwd.k, elem) && chunkable(fwd.v, elem) &&
              (!bwd || chunkable(bwd->grad_out, elem));
  return p;
}

// Each launcher picks the largest tile size (64, 32, 16) whose shared memory fits the device.
template <typename T>
cudaError_t run_fwd(const Params& p, cudaStream_t stream) {
  const int64_t limit = max_smem();
  const dim3 grid64 = grid_of((p.pb.max_len_q + 63) / 64, p.pb.batch * p.pb.heads_q);
  const size_t s64 = fwd_smem(sizeof(T), 64, 64, p.dp, p.dvp), s32 = fwd_smem(sizeof(T), 32, 32, p.dp, p.dvp);
  if (static_cast<int64_t>(s64) <= limit)
    return launch(attention_fwd_kernel<T, 64, 64>, grid64, s64, p, stream);
  const dim3 grid32 = grid_of((p.pb.max_len_q + 31) / 32, p.pb.batch * p.pb.heads_q);
  if (static_cast<int64_t>(s32) <= limit)
    return launch(attention_fwd_kernel<T, 32, 32>, grid32, s32, p, stream);
  const dim3 grid16 = grid_of((p.pb.max_len_q + 15) / 16, p.pb.batch * p.pb.heads_q);
  return launch(attention_fwd_kernel<T, 16, 16>, grid16, fwd_smem(sizeof(T), 16, 16, p.dp, p.dvp), p,
                                 stream);
}

template <typename T, bool kDq, int B>
cudaError_t run_bwd_kernel(const Params& p, size_t smem, cudaStream_t stream) {
  if constexpr (kDq)
    return launch(attention_bwd_dq_kernel<T, B, B>, grid_of((p.pb.max_len_q + B - 1) / B, p.pb.batch * p.pb.heads_q),
                  smem, p, stream);
  return launch(attention_bwd_dkdv_kernel<T, B, B>, grid_of((p.pb.max_len_k + B - 1) / B, p.pb.batch * p.pb.heads_k),
                smem, p, stream);
}

// Each backward kernel (kDq: the dQ kernel, else dK/dV) runs the largest tile size (64, 32, 16) whose shared memory
// fits the device.
template <typename T, bool kDq>
cudaError_t run_bwd_tiles(const Params& p, int64_t limit, cudaStream_t stream) {
  auto bytes = [&](int B) { return BwdSmem<T>{}.template carve<kDq>(nullptr, B, B, p.dp, p.dvp); };
  if (static_cast<int64_t>(bytes(64)) <= limit) return run_bwd_kernel<T, kDq, 64>(p, bytes(64), stream);
  if (static_cast<int64_t>(bytes(32)) <= limit) return run_bwd_kernel<T, kDq, 32>(p, bytes(32), stream);
  return run_bwd_kernel<T, kDq, 16>(p, bytes(16), stream);
}

template <typename T>
cudaError_t run_bwd(const Params& p, cudaStream_t stream) {
  const dim3 grid_delta = grid_of((p.pb.max_len_q + kThreads - 1) / kThreads, p.pb.batch * p.pb.heads_q);
  attention_delta_kernel<T><<<grid_delta, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t limit = max_smem();
  err = run_bwd_tiles<T, false>(p, limit, stream);
  return err != cudaSuccess ? err : run_bwd_tiles<T, true>(p, limit, stream);
}

}  // namespace

int attention_fwd_cuda(const AttentionFwdParams& fwd, uintptr_t stream) {
  const Params p = make_params(fwd, nullptr);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_float(fwd.q.dtype, "query", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return static_cast<int>(run_fwd<scalar_t>(p, s));
  });
}

int attention_bwd_cuda(const AttentionBwdParams& bwd, uintptr_t stream) {
  const Params p = make_params(bwd, &bwd);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_float(bwd.q.dtype, "query", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return static_cast<int>(run_bwd<scalar_t>(p, s));
  });
}

}  // namespace mmkern
