// Memory-flat contrastive losses on the CPU: tiles of d = X Y^T are computed with the packed GEMM
// of cpu_gemm.h and reduced on the spot into O(B) row / column statistics (see contrastive.h); backward
// recomputes each tile once, turns it into dL/dz in place and multiplies it into both feature gradients.
//
// Y is packed once per call, shared by all threads, in the layouts its GEMMs want:
//   Yb  Y^T as the B operand of X Y^T (32-column panels)    Yr  Y as the B operand of G Y (rows are k)
// X is packed per row tile, by the thread that owns it (once per round, so about T times per call):
//   Xt  X[i0:i0+256] as the A operand of X Y^T (8-row panels)   Xrt  the same rows as the B operand of G^T X
// so the packed copies cost 2 (backward) or 1 (forward) B x D fp32 buffers, not 4.
// Threads never share an output row or column: rows and columns are cut into P (up to 4 per thread) chunks
// each, and round r runs the P tasks (row chunk p, column chunk (p + r) mod P) (a Latin square), handed out
// dynamically so that a thread slowed by other load does not hold the rest back, with a barrier between
// rounds. So dX, dY and the column statistics need no atomics and no per-thread copies.
// Speed (fwd + bwd = 8 B^2 D flops, GEMM-bound): CLIP tiles whose logits lie close together take one exp per
// logit for rows and columns (rows_cols_shared_shift, and its backward twin); dX and dY accumulate in a
// blocked layout with contiguous micro-tiles (blocked_at); the next B panel and the C block are prefetched
// while the micro-kernel works (prefetch_share, prefetch_c). Each was measured on this CPU (see there).
// Small batches (B K <= kFusedMaxLogits) that need gradients take contrastive_fused_cpu: statistics, then the
// gradients from the same logit tiles kept in memory, in one call. The tile machinery is in contrastive_cpu.h.
#include <algorithm>
#include <vector>

#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/contrastive.h"
#include "mmkern/contrastive_cpu.h"
#include "mmkern/cpu_gemm.h"

MMKERN_CPU_BEGIN

namespace {

using namespace contrastive;
using namespace contrastive_cpu;
using cpu::kMR;

// Largest B K for contrastive_fused_cpu (must match mmkern/ops/contrastive.py FUSED_MAX_LOGITS): its logit tiles,
// at most ~4 MiB with the padding of partial tiles, stay in memory between the statistics and the gradients.
constexpr int64_t kFusedMaxLogits = int64_t{1} << 18;

// One tile's exp terms can share a single shift M (the tile's max z) for rows and columns alike when every
// row's and every column's max lies within kSharedRange of M: a row's sum is then at least exp(-kSharedRange),
// and the terms that exp(z - M) flushes to 0 weigh less than exp(kSharedRange - 87) relative to their row's or
// column's largest term, far below fp32 resolution. Otherwise (a wide spread of logits, e.g. s = 100 with
// rows of very different best matches, or non-finite values) the caller runs separate row and column passes.
constexpr float kSharedRange = 40.f;

// Forward statistics of one CLIP tile with one exp per logit: rows and columns merge the same exp(z - M).
// z_at(i, c): kLanes logits of row i from column c kLanes (-inf past jn). cmax / cl / ce: kBN floats of scratch.
// Returns false, touching nothing, when the tile's spread needs separate shifts.
template <class Z>
bool rows_cols_shared_shift(const float* S, int64_t im, int64_t jn, const Z& z_at, SoftmaxState* rows,
                            SoftmaxState* cols, float* cmax, float* cl, float* ce) {
  const int64_t chunks = (jn + kLanes - 1) / kLanes;
  for (int64_t c = 0; c < chunks; ++c) store(cmax + c * kLanes, splat(-INFINITY));
  float M = -INFINITY, lo = INFINITY;
  for (int64_t i = 0; i < im; ++i) {
    vf vm = splat(-INFINITY);
    for (int64_t c = 0; c < chunks; ++c) {
      const vf z = z_at(i, c);
      vm = vmax(z, vm);
      store(cmax + c * kLanes, vmax(z, load(cmax + c * kLanes)));
    }
    const float m = hmax(vm);
    M = m > M ? m : M;
    lo = m < lo ? m : lo;
  }
  for (int64_t j = 0; j < jn; ++j) lo = cmax[j] < lo ? cmax[j] : lo;
  if (!(M - lo <= kSharedRange)) return false;  // also false for NaN and infinities
  for (int64_t c = 0; c < chunks; ++c) {
    store(cl + c * kLanes, vf{});
    store(ce + c * kLanes, vf{});
  }
  for (int64_t i = 0; i < im; ++i) {
    vf vl = {}, ve = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const vf d = load(S + i * kBN + c * kLanes), p = vexp(z_at(i, c) - M);
      vl += p;
      ve += p * d;
      store(cl + c * kLanes, load(cl + c * kLanes) + p);
      store(ce + c * kLanes, load(ce + c * kLanes) + p * d);
    }
    softmax_merge(rows[i], M, hsum(vl), hsum(ve));
  }
  for (int64_t j = 0; j < jn; ++j) softmax_merge(cols[j], M, cl[j], ce[j]);
  return true;
}

Shape check_shapes(const Tensor& x, const Tensor& y) {
  check_dims(x, 2, "x");
  check_dims(y, 2, "y");
  check(x.size(1) == y.size(1), "y: feature width differs from x");
  check(x.dtype == y.dtype, "y: dtype differs from x");
  check_float_dtype(x, "x");
  Shape sh{x.size(0), y.size(0), x.size(1), 0, 0};
  sh.K_pad = round_up(sh.K, kNR);
  sh.D_pad = round_up(sh.D, kNR);
  return sh;
}

// Threads beyond the number of row tiles would only wait at the round barriers.
int team_size(const Shape& sh, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, (sh.B + kBM - 1) / kBM)));
}

// Mask added to z: 0 for valid columns of a tile, -inf for the padding to whole vectors.
void column_mask(int64_t jn, float* neg) {
  for (int64_t j = 0; j < kBN; ++j) neg[j] = j < jn ? 0.f : -INFINITY;
}

struct Problem {
  Shape sh;
  int mode;
  bool diagonal;
  float s, b;
};

// Running statistics of a forward pass: softmax states (rows, and columns for CLIP) or the sigmoid sums.
struct Stats {
  std::vector<SoftmaxState> rows, cols;
  std::vector<float> sig;  // sums of softplus, sigmoid*d, sigmoid (3 planes of B)
  explicit Stats(const Problem& p)
      : rows(p.sh.B, softmax_init()),
        cols(p.mode == kRowsCols ? p.sh.K : 0, softmax_init()),
        sig(p.mode == kSigmoid ? 3 * p.sh.B : 0, 0.f) {}

  // Writes the (3, B) row and (2, K) column statistics.
  void finish(const Problem& p, float* rs, float* cs) const {
    const int64_t B = p.sh.B, K = p.sh.K;
    for (int64_t i = 0; i < B; ++i) {
      if (p.mode == kSigmoid) {
        for (int q = 0; q < 3; ++q) rs[q * B + i] = sig[q * B + i];
      } else {
        rs[i] = softmax_lse(rows[i]);
        rs[B + i] = softmax_mean_d(rows[i]);
        rs[2 * B + i] = 1.f;
      }
    }
    for (int64_t j = 0; p.mode == kRowsCols && j < K; ++j) {
      cs[j] = softmax_lse(cols[j]);
      cs[K + j] = softmax_mean_d(cols[j]);
    }
  }
};

constexpr int64_t kForwardWork = 5 * kBN;  // floats of forward_tile's scratch

// Merges the tile S (d, rows i0.., columns j0..) into the running statistics. `work`: kForwardWork floats.
void forward_tile(const Problem& p, const float* S, int64_t i0, int64_t im, int64_t j0, int64_t jn, float* work,
                  Stats& st) {
  const int mode = p.mode;
  const float s = p.s, b = p.b;
  float *neg = work, *cm = work + kBN, *ca = work + 2 * kBN, *cl = work + 3 * kBN, *ce = work + 4 * kBN;
  column_mask(jn, neg);
  const int64_t chunks = (jn + kLanes - 1) / kLanes;
  // Softmax positives (diagonal) stay out of the statistics: z = -inf at lane i0 + i - j0 - c kLanes of row i.
  const bool hide_diagonal = p.diagonal && mode != kSigmoid && i0 < j0 + jn && j0 < i0 + im;
  auto z_at = [&](int64_t i, int64_t c) {
    vf z = load(&S[i * kBN + c * kLanes]) * s + b + load(&neg[c * kLanes]);
    const int64_t lane = i0 + i - j0 - c * kLanes;
    if (hide_diagonal && lane >= 0 && lane < kLanes) z[lane] = -INFINITY;
    return z;
  };
  if (mode == kRowsCols && rows_cols_shared_shift(S, im, jn, z_at, &st.rows[i0], &st.cols[j0], cm, cl, ce)) return;
  for (int64_t i = 0; i < im; ++i) {
    const float* d = &S[i * kBN];
    if (mode == kSigmoid) {
      // The row's positive (if in this tile) leaves the vector sums (z = -inf adds 0) and is added
      // exactly: softplus(-z), no cancellation.
      const int64_t jd = p.diagonal ? i0 + i - j0 : -1;
      const bool has_pos = jd >= 0 && jd < jn;
      if (has_pos) neg[jd] = -INFINITY;
      vf vp = {}, vd = {}, vg = {};
      for (int64_t c = 0; c < chunks; ++c) {
        const vf z = z_at(i, c);
        const vf g = 1.f / (1.f + vexp(-z));
        vp += (z > 0.f ? z : splat(0.f)) + vlog1p(vexp(z < 0.f ? z : -z));
        vd += g * load(d + c * kLanes);
        vg += g;
      }
      float sp = hsum(vp), sd = hsum(vd), sg = hsum(vg);
      if (has_pos) {
        neg[jd] = 0.f;
        const float z = s * d[jd] + b, g = sigmoid_grad(z, true);
        sp += softplus(-z);
        sd += g * d[jd];
        sg += g;
      }
      st.sig[i0 + i] += sp;
      st.sig[p.sh.B + i0 + i] += sd;
      st.sig[2 * p.sh.B + i0 + i] += sg;
      continue;
    }
    vf vm = splat(-INFINITY);
    for (int64_t c = 0; c < chunks; ++c) vm = vmax(z_at(i, c), vm);
    SoftmaxState& row = st.rows[i0 + i];
    const float mt = hmax(vm), m = row.m > mt ? row.m : mt, shift = m == -INFINITY ? 0.f : m;  // no -inf - -inf
    const float a = row.m == -INFINITY ? 0.f : expf(row.m - m);
    vf vl = {}, ve = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const vf e = vexp(z_at(i, c) - shift);
      vl += e;
      ve += e * load(d + c * kLanes);
    }
    row.l = row.l * a + hsum(vl);
    row.e = row.e * a + hsum(ve);
    row.m = m;
  }
  if (mode != kRowsCols) return;
  // Columns: tile max, then one pass of exp against the merged max, a vector of columns at a time.
  for (int64_t c = 0; c < chunks; ++c) {
    vf vm = splat(-INFINITY);
    for (int64_t i = 0; i < im; ++i) vm = vmax(z_at(i, c), vm);
    store(cm + c * kLanes, vm);
  }
  for (int64_t j = 0; j < chunks * kLanes; ++j) {
    const SoftmaxState col = j < jn ? st.cols[j0 + j] : softmax_init();
    const float m = col.m > cm[j] ? col.m : cm[j];
    ca[j] = col.m == -INFINITY ? 0.f : expf(col.m - m);
    cm[j] = j < jn && m != -INFINITY ? m : 0.f;  // the shift; a column that saw only -inf stays empty below
  }
  for (int64_t c = 0; c < chunks; ++c) {
    vf vl = {}, ve = {};
    const vf m = load(&cm[c * kLanes]);
    for (int64_t i = 0; i < im; ++i) {
      const vf e = vexp(z_at(i, c) - m);
      vl += e;
      ve += e * load(&S[i * kBN + c * kLanes]);
    }
    store(cl + c * kLanes, vl);
    store(ce + c * kLanes, ve);
  }
  for (int64_t j = 0; j < jn; ++j) {
    SoftmaxState& col = st.cols[j0 + j];
    col.l = col.l * ca[j] + cl[j];
    col.e = col.e * ca[j] + ce[j];
    col.m = col.l == 0.f ? -INFINITY : cm[j];
  }
}

// What backward_tile turns d into G with: row / column lse (plane 0 of the statistics) and weights.
struct GradWeights {
  const float *rl, *cl, *gr, *gc;  // cl, gc: null unless CLIP
};

constexpr int64_t kBackwardWork = 2 * kBM * kBN + 4 * kBN;  // floats of backward_tile's scratch

// Turns the tile S (d, rows i0.., columns j0..) into G = dL/dz in place and adds G Y[j0:] to dX[i0:] and
// G^T X[i0:] to dY[j0:] (blocked layout). Xrt: rows i0.. packed by pack_rows. `work`: kBackwardWork floats.
void backward_tile(const Problem& p, float* S, int64_t i0, int64_t im, int64_t j0, int64_t jn, float* work,
                   const GradWeights& w, const float* Yr, const float* Xrt, float* dxp, float* dyp) {
  const int mode = p.mode;
  const float s = p.s, b = p.b;
  float *GA = work, *GT = work + kBM * kBN, *neg = GT + kBM * kBN, *tl = neg + kBN, *tg = tl + kBN, *tw = tg + kBN;
  column_mask(jn, neg);
  // A row or column without terms (lse -inf: its only pair is a left-out positive) gets lse +inf, G = 0.
  auto lse_of = [](float lse) { return lse == -INFINITY ? INFINITY : lse; };
  for (int64_t j = 0; j < kBN; ++j) {  // column lse and weight, 0 in the padding
    tl[j] = w.cl && j < jn ? lse_of(w.cl[j0 + j]) : 0.f;
    tg[j] = w.gc && j < jn ? w.gc[j0 + j] : 0.f;
  }
  const int64_t chunks = (jn + kLanes - 1) / kLanes;
  // SigLIP positives (i == j) use -sigmoid(-z) in place of sigmoid(z) - 1, which would cancel.
  // Softmax positives (diagonal) are not part of G: the caller adds their term.
  std::vector<std::pair<int64_t, float>> positives;
  if (p.diagonal)
    for (int64_t i = std::max(i0, j0); i < std::min(i0 + im, j0 + jn); ++i)
      positives.emplace_back(i, mode == kSigmoid ? w.gr[i] * sigmoid_grad(s * S[(i - i0) * kBN + i - j0] + b, true)
                                                 : 0.f);
  // CLIP with one exp per logit when the tile's lse values lie within kSharedRange of their largest, M:
  // G = exp(z - M) (g_i exp(M - r_i) + gc_j exp(M - c_j)), and z <= every lse, so exp(z - M) <= 1.
  float M = -INFINITY, lo = INFINITY;
  if (mode == kRowsCols) {
    for (int64_t i = 0; i < im; ++i) M = std::max(M, w.rl[i0 + i]), lo = std::min(lo, w.rl[i0 + i]);
    for (int64_t j = 0; j < jn; ++j) M = std::max(M, tl[j]), lo = std::min(lo, tl[j]);
  }
  const bool shared = mode == kRowsCols && M - lo <= kSharedRange;  // false for NaN and infinities
  if (shared)
    for (int64_t j = 0; j < kBN; ++j) tw[j] = j < jn ? tg[j] * expf(M - tl[j]) : 0.f;
  // G goes to S (row-major, read by pack_a as the A operand of G Y) and, as the A operand of G^T X, to GT:
  // panels of kMR columns, k = row. Columns past jn get G = 0 (z = -inf), which is GT's zero padding.
  auto gt_at = [&](int64_t i, int64_t j) { return &GT[j / kMR * kMR * im + i * kMR + j % kMR]; };
  for (int64_t i = 0; i < im; ++i) {
    const float r = lse_of(w.rl[i0 + i]), g = w.gr[i0 + i], u = shared ? g * expf(M - r) : 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      float* d = &S[i * kBN + c * kLanes];
      const vf z = load(d) * s + b + load(&neg[c * kLanes]);
      vf G;
      if (mode == kSigmoid) {
        G = g / (1.f + vexp(-z));
      } else if (shared) {
        G = vexp(z - M) * (u + load(&tw[c * kLanes]));
      } else {
        G = g * vexp(z - r);
        if (mode == kRowsCols) G += load(&tg[c * kLanes]) * vexp(z - load(&tl[c * kLanes]));
      }
      store(d, G);
      for (int l = 0; l < kLanes;) {  // the vector's columns in runs that lie in one GT panel
        const int64_t j = c * kLanes + l, run = std::min<int64_t>(kLanes - l, kMR - j % kMR);
        std::memcpy(gt_at(i, j), reinterpret_cast<const float*>(&G) + l, run * sizeof(float));
        l += static_cast<int>(run);
      }
    }
  }
  for (const auto& [i, g] : positives) S[(i - i0) * kBN + i - j0] = *gt_at(i - i0, i - j0) = g;
  for (int64_t ip = 0; ip < im; ip += kMR)
    cpu::pack_a(cpu::Strided<float>{S, kBN, 1}, ip, static_cast<int>(std::min<int64_t>(kMR, im - ip)), 0, jn,
                GA + ip * jn);
  tile_grad(p.sh, GA, im, jn, Yr, p.sh.K, j0, dxp, p.sh.B, i0);
  tile_grad(p.sh, GT, jn, im, Xrt, im, 0, dyp, p.sh.K, j0);
}

Problem make_problem(const ContrastiveParams& p) {
  const Shape sh = check_shapes(p.x, p.y);
  check(p.mode == kRows || p.mode == kRowsCols || p.mode == kSigmoid, "mode: unknown contrastive mode");
  check_scale_bias(p.scale_bias);
  return Problem{sh, p.mode, p.diagonal, p.scale_bias.ptr<float>()[0], p.scale_bias.ptr<float>()[1]};
}

void check_stats(const Problem& p, const Tensor& row_stats, const Tensor& col_stats) {
  check(row_stats.present && row_stats.numel() == kRowPlanes * p.sh.B, "row_stats: expected (3, B) fp32");
  check(p.mode != kRowsCols || (col_stats.present && col_stats.numel() == kColPlanes * p.sh.K),
        "col_stats: expected (2, K) fp32");
}

// dX = G Y and dY = G^T X (fp32, overwritten). With `fused` the statistics are computed first, into fused->stats,
// from logit tiles that stay in memory for the gradients (no second product X Y^T); w then points into them.
struct Fused {
  Stats stats;
  float *rs, *cs;
  float *wr, *wc;  // the row / column weights of G: 1, or sigmoid(lse_neg - z_ii) when positives are left out
};

void gradients(const Problem& p, const Tensor& x, const Tensor& y, GradWeights w, float* dxp, float* dyp,
               int num_threads, Fused* fused) {
  const Shape& sh = p.sh;
  Buffer Yb(sh.D * sh.K_pad), Yr(sh.K * sh.D_pad);
  const int64_t rt = (sh.B + kBM - 1) / kBM, ct = (sh.K + kBN - 1) / kBN, slab = std::min(sh.B, kBM) * kBN;
  Scratch tiles(fused ? rt * ct * slab : 0, 1);
  float* slabs = tiles.take(fused ? rt * ct * slab : 0);
  dispatch_float(x.dtype, "contrastive", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const cpu::Strided<scalar_t> xe{x.ptr<scalar_t>(), x.stride(0), x.stride(1)};
    const cpu::Strided<scalar_t> ye{y.ptr<scalar_t>(), y.stride(0), y.stride(1)};
#pragma omp parallel num_threads(team_size(sh, num_threads))
    {
      pack_b_parallel([&](int64_t k, int64_t j) { return ye(j, k); }, sh.D, sh.K, Yb.data());
      pack_b_parallel(ye, sh.K, sh.D, Yr.data());
#pragma omp for schedule(static) nowait
      for (int64_t r = 0; r < sh.B; ++r) std::fill(dxp + r * sh.D, dxp + (r + 1) * sh.D, 0.f);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < sh.K; ++r) std::fill(dyp + r * sh.D, dyp + (r + 1) * sh.D, 0.f);
      Scratch scratch(Scratch::floats(kBM * sh.D, kBM * sh.D_pad, kMR * sh.D, kBM * kBN, kBackwardWork));
      float *Xt = scratch.take(kBM * sh.D), *Xrt = scratch.take(kBM * sh.D_pad), *tmp = scratch.take(kMR * sh.D),
            *S = scratch.take(kBM * kBN), *work = scratch.take(kBackwardWork);
      auto tile_of = [&](int64_t i0, int64_t j0) { return fused ? slabs + (i0 / kBM * ct + j0 / kBN) * slab : S; };
      int64_t packed_i0 = -1;
      if (fused) {
        for_each_tile(sh.B, sh.K, [&](int64_t i0, int64_t im, int64_t j0, int64_t jn) {
          if (i0 != packed_i0) pack_rows(xe, sh.D, i0, im, Xt, Xrt);
          packed_i0 = i0;
          tile_dot(sh, Xt, Yb.data(), im, j0, jn, tile_of(i0, j0));
          forward_tile(p, tile_of(i0, j0), i0, im, j0, jn, work, fused->stats);
        });
#pragma omp single
        {
          fused->stats.finish(p, fused->rs, fused->cs);  // implicit barrier: every thread sees the statistics
          // Positives left out of softmax statistics (diagonal): row i's negatives weigh exp(lse_neg - lse) =
          // sigmoid(lse_neg - z_ii) in the loss's G, with z_ii from the logit tiles kept here.
          for (int64_t i = 0; p.diagonal && p.mode != kSigmoid && i < std::min(sh.B, sh.K); ++i) {
            const float z = p.s * tile_of(i / kBM * kBM, i / kBN * kBN)[i % kBM * kBN + i % kBN] + p.b;
            fused->wr[i] = sigmoid(fused->rs[i] - z);
            if (fused->wc) fused->wc[i] = sigmoid(fused->cs[i] - z);
          }
        }
      }
      for_each_tile(sh.B, sh.K, [&](int64_t i0, int64_t im, int64_t j0, int64_t jn) {
        if (i0 != packed_i0) pack_rows(xe, sh.D, i0, im, Xt, Xrt);
        packed_i0 = i0;
        if (!fused) tile_dot(sh, Xt, Yb.data(), im, j0, jn, S);
        backward_tile(p, tile_of(i0, j0), i0, im, j0, jn, work, w, Yr.data(), Xrt, dxp, dyp);
      });
#pragma omp for schedule(static) nowait
      for (int64_t r0 = 0; r0 < sh.B; r0 += kMR) unblock_group(dxp, sh.B, sh.D, r0, tmp);
#pragma omp for schedule(static)
      for (int64_t r0 = 0; r0 < sh.K; r0 += kMR) unblock_group(dyp, sh.K, sh.D, r0, tmp);
    }
  });
}

void check_grads(const Problem& p, const Tensor& dx, const Tensor& dy) {
  check(dx.present && dx.numel() == p.sh.B * p.sh.D && dy.present && dy.numel() == p.sh.K * p.sh.D,
        "dx: expected contiguous fp32 gradients");
}

}  // namespace

void contrastive_fwd_cpu(const ContrastiveFwdParams& params, int num_threads) {
  const Tensor &x = params.x, &y = params.y, &row_stats = params.row_stats, &col_stats = params.col_stats;
  const Problem p = make_problem(params);
  check_stats(p, row_stats, col_stats);
  const Shape& sh = p.sh;
  Buffer Yb(sh.D * sh.K_pad);
  Stats st(p);
  dispatch_float(x.dtype, "contrastive", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const cpu::Strided<scalar_t> xe{x.ptr<scalar_t>(), x.stride(0), x.stride(1)};
    const cpu::Strided<scalar_t> ye{y.ptr<scalar_t>(), y.stride(0), y.stride(1)};
#pragma omp parallel num_threads(team_size(sh, num_threads))
    {
      pack_b_parallel([&](int64_t k, int64_t j) { return ye(j, k); }, sh.D, sh.K, Yb.data());
      Scratch scratch(Scratch::floats(kBM * sh.D, kBM * kBN, kForwardWork));
      float *Xt = scratch.take(kBM * sh.D), *S = scratch.take(kBM * kBN), *work = scratch.take(kForwardWork);
      int64_t packed_i0 = -1;
      for_each_tile(sh.B, sh.K, [&](int64_t i0, int64_t im, int64_t j0, int64_t jn) {
        if (i0 != packed_i0) pack_rows(xe, sh.D, i0, im, Xt, nullptr);
        packed_i0 = i0;
        tile_dot(sh, Xt, Yb.data(), im, j0, jn, S);
        forward_tile(p, S, i0, im, j0, jn, work, st);
      });
    }
  });
  st.finish(p, row_stats.ptr<float>(), p.mode == kRowsCols ? col_stats.ptr<float>() : nullptr);
}

// dX (B x D fp32) = G Y and dY (K x D fp32) = G^T X (both overwritten) with G_ij = dL/dz_ij from grad_logit (the logit
// scale is applied by the caller). row_lse / col_lse: plane 0 of the forward statistics; gr (B), gc (K).
void contrastive_bwd_cpu(const ContrastiveBwdParams& params, int num_threads) {
  const Tensor &row_lse = params.row_lse, &col_lse = params.col_lse, &gr = params.gr, &gc = params.gc;
  const Tensor &dx = params.dx, &dy = params.dy;
  const Problem p = make_problem(params);
  const int64_t B = p.sh.B, K = p.sh.K;
  check(row_lse.present && gr.present && row_lse.numel() >= B && gr.numel() == B, "gr: expected (B,) fp32");
  check(p.mode != kRowsCols || (col_lse.present && gc.present && col_lse.numel() >= K && gc.numel() == K),
        "gc: expected (K,) fp32");
  check_grads(p, dx, dy);
  const bool cols = p.mode == kRowsCols;
  const GradWeights w{row_lse.ptr<float>(), cols ? col_lse.ptr<float>() : nullptr, gr.ptr<float>(),
                      cols ? gc.ptr<float>() : nullptr};
  gradients(p, params.x, params.y, w, dx.ptr<float>(), dy.ptr<float>(), num_threads, nullptr);
}

// Forward statistics and the unit-weight gradients (gr = gc = 1; sigmoid(lse_neg - z_ii) where `diagonal` leaves
// softmax positives out, see Fused) in one call, for batches whose logits
// (B K <= kFusedMaxLogits) can stay in memory between the two: one product X Y^T instead of two.
void contrastive_fused_cpu(const ContrastiveFusedParams& params, int num_threads) {
  const Tensor &row_stats = params.row_stats, &col_stats = params.col_stats, &dx = params.dx, &dy = params.dy;
  const Problem p = make_problem(params);
  check_stats(p, row_stats, col_stats);
  check_grads(p, dx, dy);
  check(p.sh.B * p.sh.K <= kFusedMaxLogits, "x: too many logits for the fused path");
  const bool cols = p.mode == kRowsCols;
  std::vector<float> weights(p.sh.B + p.sh.K, 1.f);
  Fused fused{Stats(p), row_stats.ptr<float>(), cols ? col_stats.ptr<float>() : nullptr, weights.data(),
              cols ? weights.data() + p.sh.B : nullptr};
  const GradWeights w{fused.rs, fused.cs, fused.wr, fused.wc};
  gradients(p, params.x, params.y, w, dx.ptr<float>(), dy.ptr<float>(), num_threads, &fused);
}

MMKERN_CPU_END
