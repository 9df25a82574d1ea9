// Tile machinery of the CPU contrastive kernels (host only, see csrc/cpu/contrastive.cpp): vector exp / log1p
// (reductions in simd_cpu.h), uninitialised and per-thread persistent buffers, packing of the operands, the tile
// products X Y^T and the gradient GEMMs into a blocked layout, and the Latin-square schedule of tiles over threads.
#pragma once

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "mmkern/contrastive.h"
#include "mmkern/cpu_gemm.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/simd_cpu.h"

MMKERN_CPU_BEGIN
namespace contrastive_cpu {

using cpu::kKC;
using cpu::kMR;
using cpu::kNR;
using namespace contrastive;
using simd::hmax;
using simd::hsum;
using simd::kLanes;
using simd::load;
using simd::splat;
using simd::store;
using simd::vf;
using simd::vi;

// Tile of logits a thread holds (256 KiB of fp32 with AVX-512). kKC square, so a tile's rows (columns) never
// straddle a k-block of a packed operand, and the backward GEMMs can read a tile's slice in place; whole
// micro-panels (kMR rows, kNR columns) and whole vectors.
constexpr int64_t kBM = kKC;
constexpr int64_t kBN = kKC;
static_assert(kBM % kMR == 0 && kBN % kNR == 0 && kBN % kLanes == 0, "tiles must hold whole panels");
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // a NaN in `a` is dropped; exp() re-propagates it

// exp(x), ~2 ulp: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial times 2^n. Exact 0 below
// the normal range, inf above it, NaN stays NaN (every comparison with NaN is false).
inline vf vexp(vf x) {
  const vf xc = x < -87.f ? splat(-87.f) : x;  // clamps -inf, keeps NaN (the comparison is false)
  const vf xr = xc > 88.f ? splat(88.f) : xc;
  const vf n = (xr * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest integer
  const vf r = (xr - n * 0.693145752f) - n * 1.42860677e-6f;
  vf p = splat(1.f / 720) * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vf out = p * scale;
  out = x < -87.3f ? splat(0.f) : out;
  out = x > 88.72f ? splat(INFINITY) : out;
  return out;
}

// log(1 + u) for u in [0, 1] (NaN stays NaN): 2 atanh(t) with t = u / (2 + u) <= 1/3, series to t^13.
inline vf vlog1p(vf u) {
  const vf t = u / (2.f + u), t2 = t * t;
  vf p = splat(1.f / 13);
  for (float k : {11.f, 9.f, 7.f, 5.f, 3.f, 1.f}) p = p * t2 + 1.f / k;
  return 2.f * t * p;
}

// Uninitialised fp32 storage (every user writes what it reads). A packed operand (tens of MiB at large B, read panel
// by panel all over) goes on transparent huge pages where the system grants them on request: fewer TLB misses
// (measured: 1-2% of the whole loss, near the noise here). Small buffers stay on ordinary pages: a fresh 2 MiB page
// per call costs more than the loss itself at B ~ 100s.
class Buffer {
 public:
  explicit Buffer(int64_t floats) {
    constexpr size_t kHuge = size_t{2} << 20, kLine = 64;
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float);
    const size_t align = bytes >= 4 * kHuge ? kHuge : kLine;
    const size_t rounded = (bytes + align - 1) / align * align;
    p_ = static_cast<float*>(std::aligned_alloc(align, rounded));
    if (!p_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (align == kHuge) madvise(p_, rounded, MADV_HUGEPAGE);  // a hint: without it, simply 4 KiB pages
#endif
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() const { return p_; }

 private:
  float* p_;
};

// A thread's tile scratch (packed row tiles, logits, gradient tiles: ~1 MiB at D = 64, ~2.5 MiB at D = 768), kept
// from call to call and grown when a call needs more. Allocating it per call cost a third of the whole loss at
// B = 128 (zero-filling, and page faults wherever malloc hands such blocks back to the system on free).
// take(n) hands out consecutive 64-byte aligned slices of one call's share. Slot 1 is a second buffer of the same
// kind, for the logit tiles the fused small-batch path shares between threads (taken by the calling thread).
class Scratch {
 public:
  explicit Scratch(int64_t floats, int slot = 0) {
    thread_local std::unique_ptr<Buffer> bufs[2];
    thread_local int64_t capacity[2] = {0, 0};
    if (floats > capacity[slot]) {
      bufs[slot].reset();
      bufs[slot] = std::make_unique<Buffer>(floats);
      capacity[slot] = floats;
    }
    next_ = bufs[slot] ? bufs[slot]->data() : nullptr;
  }
  float* take(int64_t floats) {
    float* p = next_;
    next_ += round_up(floats, 16);
    return p;
  }
  // Room that take() calls for these sizes use.
  template <class... N>
  static int64_t floats(N... n) {
    return (round_up(n, 16) + ...);
  }

 private:
  float* next_;
};

struct Shape {
  int64_t B, K, D, K_pad, D_pad;
};

// Packs every panel of an operand in layout B (column panels of kNR, element b(k, j), K x N) inside an
// enclosing parallel region.
template <class F>
inline void pack_b_parallel(const F& b, int64_t K, int64_t N, float* dst) {
  const int64_t N_pad = round_up(N, kNR), kblocks = (K + kKC - 1) / kKC, panels = N_pad / kNR;
#pragma omp for schedule(static) collapse(2)
  for (int64_t kb = 0; kb < kblocks; ++kb)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t k0 = kb * kKC, kc = std::min(kKC, K - k0), j0 = p * kNR;
      cpu::pack_b(b, k0, kc, j0, static_cast<int>(std::min<int64_t>(kNR, N - j0)), dst + k0 * N_pad + j0 * kc);
    }
}

// Packs rows X[i0:i0+im] as Xt (A layout, k-blocks of kKC, kBM rows each) and, if Xrt is given, as Xrt
// (B layout with the rows as k: one k-block of im rows).
template <class F>
inline void pack_rows(const F& xe, int64_t D, int64_t i0, int64_t im, float* Xt, float* Xrt) {
  auto rows = [&](int64_t i, int64_t k) { return xe(i0 + i, k); };
  for (int64_t k0 = 0; k0 < D; k0 += kKC)
    for (int64_t ip = 0; ip < im; ip += kMR)
      cpu::pack_a(rows, ip, static_cast<int>(std::min<int64_t>(kMR, im - ip)), k0, std::min(kKC, D - k0),
                  Xt + k0 * kBM + ip * std::min(kKC, D - k0));
  if (Xrt)
    for (int64_t dp = 0; dp < D; dp += kNR)
      cpu::pack_b(rows, 0, im, dp, static_cast<int>(std::min<int64_t>(kNR, D - dp)), Xrt + dp * im);
}

// Spreads prefetches of the next B panel (`floats` floats at `next`) over the `calls` micro-kernel calls that
// sweep the current one (this is call number `call`): a panel that comes from L3 is then in L1 when its own
// sweep starts, which the hardware prefetchers do not achieve (measured: +8% on such GEMMs).
inline void prefetch_share(const float* next, int64_t floats, int64_t call, int64_t calls) {
  const int64_t lines = (floats + 15) / 16, per = (lines + calls - 1) / calls;
  for (int64_t l = call * per; l < std::min(lines, (call + 1) * per); ++l) __builtin_prefetch(next + l * 16);
}

// Prefetches (with write intent) the kMR x kNR block of C at C (row stride ldc) that a micro-kernel call will
// add to after its k loop, so the loads overlap the loop.
inline void prefetch_c(float* C, int64_t ldc) {
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; j += simd::kLineFloats) __builtin_prefetch(C + i * ldc + j, 1);
}

// S[0:im, 0:jn] (row stride kBN) = X[i0:i0+im] . Y[j0:j0+jn]^T from the packed Xt and Yb. Columns jn..
// round_up(jn, kLanes) are set to 0 so that vector epilogues read defined values.
inline void tile_dot(const Shape& sh, const float* Xt, const float* Yb, int64_t im, int64_t j0, int64_t jn, float* S) {
  const int64_t calls = (im + kMR - 1) / kMR;
  for (int64_t k0 = 0; k0 < sh.D; k0 += kKC) {
    const int64_t kc = std::min(kKC, sh.D - k0);
    for (int64_t jp = 0; jp < jn; jp += kNR) {
      const float* Bp = Yb + k0 * sh.K_pad + (j0 + jp) * kc;
      const int64_t k1 = k0 + kc;  // the panel after the last one of this k-block: the next k-block's first
      const float* next = jp + kNR < jn ? Bp + kNR * kc
                          : k1 < sh.D   ? Yb + k1 * sh.K_pad + j0 * std::min(kKC, sh.D - k1)
                                        : nullptr;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, jn - jp));
      for (int64_t ip = 0; ip < im; ip += kMR) {
        if (next) prefetch_share(next, kc * kNR, ip / kMR, calls);
        const float* Ap = Xt + k0 * kBM + ip * kc;
        prefetch_c(S + ip * kBN + jp, kBN);
        cpu::micro_kernel(kc, Ap, Bp, S + ip * kBN + jp, kBN, static_cast<int>(std::min<int64_t>(kMR, im - ip)),
                          nr, k0 > 0);
      }
    }
  }
  const int64_t jn_vec = round_up(jn, kLanes);
  for (int64_t i = 0; i < im; ++i)
    for (int64_t j = jn; j < jn_vec; ++j) S[i * kBN + j] = 0.f;
}

// The gradients accumulate in a blocked layout while the tiles run: each group of kMR rows (the kMR x D floats
// where those rows live) stores its kNR-column panels one after another, so a micro-kernel's C block is one
// contiguous run (1 KiB) instead of kMR pieces 2 KiB apart, which the hardware prefetchers do not follow
// (measured: the gradient GEMMs ran ~15% slower on row-major C). unblock_group() restores row-major order in place.
// Row r0 (a multiple of kMR), column d0 (a multiple of kNR) of a blocked n_rows x D array; its row stride is
// the panel's width.
inline float* blocked_at(float* C, int64_t n_rows, int64_t D, int64_t r0, int64_t d0) {
  return C + r0 * D + std::min<int64_t>(kMR, n_rows - r0) * d0;
}

// Restores row-major order in place for the group of rows r0.. (a multiple of kMR) of a blocked n_rows x D array.
inline void unblock_group(float* C, int64_t n_rows, int64_t D, int64_t r0, float* tmp) {
  const int64_t m = std::min<int64_t>(kMR, n_rows - r0);
  float* group = C + r0 * D;
  std::copy(group, group + m * D, tmp);
  for (int64_t d0 = 0; d0 < D; d0 += kNR) {
    const int64_t nr = std::min<int64_t>(kNR, D - d0);
    for (int64_t r = 0; r < m; ++r) std::copy(tmp + m * d0 + r * nr, tmp + m * d0 + (r + 1) * nr, group + r * D + d0);
  }
}

// C (blocked, c_rows x D; rows c0.. of the tile) += A (packed tile, m x kt) . Bk (packed operand rows k0..k0+kt)
// where the packed operand is P (B-layout of an n_rows x D matrix) and k0 its first row.
inline void tile_grad(const Shape& sh, const float* A, int64_t m, int64_t kt, const float* P, int64_t n_rows, int64_t k0,
               float* C, int64_t c_rows, int64_t c0) {
  const int64_t kb = k0 / kKC * kKC, kcb = std::min(kKC, n_rows - kb);
  for (int64_t dp = 0; dp < sh.D; dp += kNR) {
    const float* Bp = P + kb * sh.D_pad + dp * kcb + (k0 - kb) * kNR;
    const int nr = static_cast<int>(std::min<int64_t>(kNR, sh.D - dp));
    for (int64_t ip = 0; ip < m; ip += kMR) {
      if (dp + kNR < sh.D) prefetch_share(Bp + kNR * kcb, kt * kNR, ip / kMR, (m + kMR - 1) / kMR);
      float* Cb = blocked_at(C, c_rows, sh.D, c0 + ip, dp);
      prefetch_c(Cb, nr);
      cpu::micro_kernel(kt, A + ip * kt, Bp, Cb, nr,
                        static_cast<int>(std::min<int64_t>(kMR, m - ip)), nr, true);
    }
  }
}

// Runs body(i0, im, j0, jn) over every tile (see the file comment). Call inside a parallel region.
template <class F>
inline void for_each_tile(int64_t rows, int64_t cols, const F& body) {
  const int64_t rt = (rows + kBM - 1) / kBM, ct = (cols + kBN - 1) / kBN;
  const int64_t P = std::min<int64_t>(rt, 4 * omp_get_num_threads());
  for (int64_t r = 0; r < P; ++r) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c = (p + r) % P;
      for (int64_t it = rt * p / P; it < rt * (p + 1) / P; ++it)
        for (int64_t jt = ct * c / P; jt < ct * (c + 1) / P; ++jt)
          body(it * kBM, std::min(kBM, rows - it * kBM), jt * kBN, std::min(kBN, cols - jt * kBN));
    }  // implicit barrier: the next round reuses these rows and columns
  }
}

}  // namespace contrastive_cpu
MMKERN_CPU_END
