// Fused attention on the CPU: blocked online softmax (forward) and tile recomputation (backward).
//
// Forward, per query block (<= c.bm queries) of a (batch, head): S = Q (scale K)^T over blocks of <= c.bn keys,
// the running max m and sum l per row, acc = sum P V rescaled when m grows; out = acc / l, and the row
// statistics (m, log l) (attn::row_stat_max). Backward recomputes P = exp((S - m) - log l) per tile:
// dV += (P o Z)^T dO,  dS = P o (Z o dO V^T - delta) with delta = rowsum(dO o O) and Z the dropout scale,
// dK += scale dS^T Q,  dQ += scale dS K (the scale folded into dS unless the mask's gradient is wanted).
//
// Each thread copies K^T (times scale) and V^T per key block, and K and V rows when they must be converted or
// their stride would thrash L1, of the (batch, kv head) it works on, once, and keeps them while its next
// tasks use the same head. Q, dO, P and dS are read in place by the tile products of attention_cpu.h, with
// ragged edges masked instead of padded. Only the key range that some query of the block can see (causal,
// window) is visited. Parallelism: the forward runs over batch x heads x query chunks. The backward runs over
// batch x kv-heads with private dK/dV when that gives every thread several tasks; otherwise it runs in two
// passes, over key blocks (dK, dV) and over query blocks (dQ), recomputing the tile products once more but
// keeping all threads busy (ATen parallelises its backward over batch x heads only). Each output element is
// written by one task in a fixed order, so the backward is deterministic.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mmkern/attention.h"
#include "mmkern/attention_cpu.h"
#include "mmkern/common.h"
#include "mmkern/cpu_kernels.h"

MMKERN_CPU_BEGIN

namespace {

using attn::Layout;
using attn::Problem;
using attn_cpu::key_range;
using attn_cpu::kLanes;
using attn_cpu::kLog2e;
using attn_cpu::mask_structure;
using attn_cpu::padded_ld;
using attn_cpu::prefetch_rows;
using attn_cpu::rows_fp32;
using attn_cpu::transpose_to;
using attn_cpu::vf;
using attn_cpu::write_rows;

constexpr int64_t kBM = 128;  // most queries per block: the S tile (kBM x kBN fp32, 128 KiB) stays in L2
constexpr int64_t kBN = 256;  // most keys per block: at ViT sizes (197) one block, so no online rescaling

// Equal blocks of at most `most` (a multiple of `align`) covering n: 197 keys are one block of 197 rather
// than 128 + 69, 197 queries four blocks of 56 / 29 rather than three of 64 and one of 5.
inline int64_t block_size(int64_t n, int64_t most, int64_t align) {
  const int64_t blocks = std::max<int64_t>(1, (n + most - 1) / most);
  return std::min(most, round_up((n + blocks - 1) / blocks, align));
}

// Everything a kernel needs about one call, built whole by make_call: the forward's operands and, for the
// backward, dO and the mask gradient; the block sizes.
struct Call : attn::Operands {
  const void* go = nullptr;  // backward: dO, laid out by lgo
  Layout lgo, ldmask;
  float* dmask = nullptr;  // (B, Hq, L, S) fp32, or null
  // Backward: dS is formed times the score scale, so that dK = dS^T Q and dQ = dS K need no scaling and can be
  // accumulated in the gradient tensors themselves; not when the mask gradient wants dS itself.
  bool ds_scaled = false;
  int64_t bm = 0, bn = 0, ld_tile = 0;  // most queries per block, key block size, row stride of score tiles

  int64_t lrow_offset(int64_t b, int64_t h, int64_t i) const { return lrow.offset(b, h, pb.q_start(b) + i, 0); }
};

// Score row post-processing: the float mask is added, the bool mask and the structure set -inf.
inline void mask_row(const Call& c, int64_t b, int64_t h, int64_t qi, int64_t k0, int64_t n, bool all_visible,
                     float* row) {
  if (c.mask) {
    const int64_t sd = c.lmask.sd;
    const int64_t base = c.lmask.offset(b, h, qi, k0);
    if (!c.mask_bool) {
      const float* m = static_cast<const float*>(c.mask) + base;
      if (sd == 1) {
        for (int64_t j = 0; j < n; j += kLanes) {
          const int w = static_cast<int>(std::min<int64_t>(kLanes, n - j));
          attn_cpu::store_n(row + j, attn_cpu::load_n(row + j, w) + attn_cpu::load_n(m + j, w), w);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] += m[j * sd];
      }
    } else {
      const uint8_t* m = static_cast<const uint8_t*>(c.mask) + base;
      if (sd == 1) {
        attn_cpu::apply_bool_mask(row, m, n);
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = m[j * sd] ? row[j] : -INFINITY;
      }
    }
  }
  if (!all_visible) mask_structure(c.pb.vis, qi, k0, n, row);
}

// A thread's scratch: thread_local buffers that keep their memory between calls (the worker threads of
// the OpenMP pool persist).
inline float* scratch(int slot, int64_t n) {
  thread_local attn_cpu::Workspace ws[8];
  return ws[slot].get(n);
}

// K and V of one (batch, kv head) as the tile products read them, in fp32: K and V (S x D, S x Dv) by
// rows_fp32, and K^T and V^T per key block of the grid of c.bn keys (D x c.bn, Dv x c.bn:
// one (S)-long row per dim put the rows of a column panel 16 KiB apart at S = 4096, a page and a TLB entry
// each, and the products ran at 60% of their rate).
struct HeadKV {
  int64_t b = -1, hk = -1;
  const float *kt = nullptr, *vt = nullptr, *kn = nullptr, *vn = nullptr;
  int64_t ldt = 0, ldkn = 0, ldvn = 0, kt_block = 0, vt_block = 0;
  bool kn_padded = false, vn_padded = false;
  const float* kt_at(int64_t j0, int64_t bn) const { return kt + j0 / bn * kt_block; }  // j0 on the grid
  const float* vt_at(int64_t j0, int64_t bn) const { return vt + j0 / bn * vt_block; }
};

struct KVWant {
  bool kt = false, vt = false, kn = false, vn = false;
};

template <typename T>
void load_head(const Call& c, int64_t b, int64_t hk, KVWant want, HeadKV& kv) {
  if (kv.b == b && kv.hk == hk) return;
  const Problem& pb = c.pb;
  const int64_t S = pb.len_k(b), s0 = pb.k_start(b), D = pb.dim, Dv = pb.dim_v;
  const T* K = static_cast<const T*>(c.k) + c.lk.offset(b, hk, s0, 0);
  const T* V = static_cast<const T*>(c.v) + c.lv.offset(b, hk, s0, 0);
  const int64_t blocks = (S + c.bn - 1) / c.bn;
  kv.ldt = c.ld_tile;
  kv.kt_block = D * kv.ldt;
  kv.vt_block = Dv * kv.ldt;
  if (want.kt) {
    float* kt = scratch(4, blocks * kv.kt_block);
    for (int64_t kb = 0; kb < blocks; ++kb)
      transpose_to(K + kb * c.bn * c.lk.st, c.lk.st, c.lk.sd, std::min(c.bn, S - kb * c.bn), D, kt + kb * kv.kt_block,
                   kv.ldt, pb.scale);
    kv.kt = kt;
  }
  if (want.vt) {
    float* vt = scratch(5, blocks * kv.vt_block);
    for (int64_t kb = 0; kb < blocks; ++kb)
      transpose_to(V + kb * c.bn * c.lv.st, c.lv.st, c.lv.sd, std::min(c.bn, S - kb * c.bn), Dv,
                   vt + kb * kv.vt_block, kv.ldt, 1.f);
    kv.vt = vt;
  }
  float* kn = scratch(6, S * padded_ld(D));
  float* vn = scratch(7, S * padded_ld(Dv));
  if (want.kn) kv.kn = rows_fp32(K, c.lk.st, c.lk.sd, S, D, kn, kv.ldkn);
  if (want.vn) kv.vn = rows_fp32(V, c.lv.st, c.lv.sd, S, Dv, vn, kv.ldvn);
  kv.kn_padded = kv.kn == kn;  // a copy has whole-vector rows; user memory may end mid-vector
  kv.vn_padded = kv.vn == vn;
  kv.b = b;
  kv.hk = hk;
}

// Rows [i0, i0 + bm) of the query of (b, h) as fp32 rows (rows_fp32 into buf), their row stride in ld, and
// whether whole vectors may be read past each row. The score scale lives in the K^T copy, so Q is used as is.
template <typename T>
const float* query_rows(const Call& c, int64_t b, int64_t h, int64_t i0, int64_t bm, float* buf, int64_t& ld,
                        bool& padded) {
  const T* Q = static_cast<const T*>(c.q) + c.lq.offset(b, h, c.pb.q_start(b) + i0, 0);
  const float* rows = rows_fp32(Q, c.lq.st, c.lq.sd, bm, c.pb.dim, buf, ld);
  padded = rows == buf;
  return rows;
}

// Tasks handed out per grab of the dynamic schedule: several when they are many and small (512 demo heads of
// ~1 us each would otherwise pay a contended atomic per head), about 10 us of work per grab when they are
// larger (12 ViT heads of ~0.2 ms per grab left one thread idle for ~1 ms at the end), one when few must balance.
inline int grab(int64_t tasks, int num_threads, double flops_per_task) {
  const int64_t by_count = tasks / (16 * static_cast<int64_t>(num_threads));
  const int64_t by_work = static_cast<int64_t>(1.5e6 / std::max(flops_per_task, 1.0));
  return static_cast<int>(std::max<int64_t>(1, std::min(by_count, by_work)));
}

// The tasks [0, n) of a parallel region handed out dynamically in chunks of `grab`, each thread claiming its next
// chunk when it starts the last task of the current one, so that it always knows the task it will run after the
// current one and can prefetch that task's rows. (With `omp for schedule(dynamic)` the next index usually
// belongs to another thread: the prefetch then fetched rows that thread was reading or writing, and the
// kernels lost their prefetch gain on two threads.)
class TaskStream {
 public:
  TaskStream(std::atomic<int64_t>& counter, int64_t n, int64_t grab) : counter_(counter), n_(n), grab_(grab) {
    cur_ = claim();
    end_ = std::min(cur_ + grab_, n_);
    ahead_ = end_ - cur_ == 1 ? claim() : n_;
  }
  bool done() const { return cur_ >= n_; }
  int64_t task() const { return cur_; }
  // The task this thread runs after task(), or n when none.
  int64_t following() const { return cur_ + 1 < end_ ? cur_ + 1 : ahead_; }
  void advance() {
    if (++cur_ < end_) {
      if (cur_ + 1 == end_) ahead_ = claim();
      return;
    }
    cur_ = ahead_;
    end_ = std::min(cur_ + grab_, n_);
    ahead_ = end_ - cur_ == 1 ? claim() : n_;
  }

 private:
  int64_t claim() {
    const int64_t start = counter_.fetch_add(grab_, std::memory_order_relaxed);
    return std::min(start, n_);
  }
  std::atomic<int64_t>& counter_;
  int64_t n_, grab_, cur_ = 0, end_ = 0, ahead_ = 0;
};

// Tasks of `units` independent pieces of work (heads) split into chunks of rows so that every thread gets
// several tasks to balance (causal rows cost more the later they are): rows per chunk, a multiple of bm.
inline int64_t chunk_rows(int64_t units, int64_t rows, int64_t bm, int num_threads) {
  const int64_t want = 8 * static_cast<int64_t>(num_threads);
  if (units >= want || rows <= bm) return std::max<int64_t>(rows, 1);
  const int64_t chunks = std::min((want + units - 1) / units, (rows + bm - 1) / bm);
  return round_up((rows + chunks - 1) / chunks, bm);
}

template <typename T>
void forward(const Call& c, T* out, int num_threads) {
  const Problem& pb = c.pb;
  const int64_t D = pb.dim, Dv = pb.dim_v, group = pb.heads_q / pb.heads_k, ld = c.ld_tile;
  const float keep_scale = pb.dropout_p > 0.f ? 1.f / (1.f - pb.dropout_p) : 1.f;
  const int64_t rows = chunk_rows(pb.batch * pb.heads_q, pb.max_len_q, c.bm, num_threads);
  const int64_t chunks = std::max<int64_t>(1, (pb.max_len_q + rows - 1) / rows);
  const int64_t tasks = pb.batch * pb.heads_q * chunks;  // ordered (b, kv head, head of the group, chunk)
  const int per_grab = grab(tasks, num_threads, 2.0 * rows * pb.max_len_k * (D + Dv));
  std::atomic<int64_t> counter{0};
#pragma omp parallel num_threads(num_threads)
  {
    HeadKV kv;
    KVWant want;
    want.kt = want.vn = true;
    float* qbuf = scratch(0, c.bm * padded_ld(D));
    float* st = scratch(1, c.bm * ld);
    float* acc = scratch(2, c.bm * Dv);
    float* stats = scratch(3, 3 * c.bm);
    float *m = stats, *l = stats + c.bm, *log_l = stats + 2 * c.bm;
    for (TaskStream ts(counter, tasks, per_grab); !ts.done(); ts.advance()) {
      const int64_t task = ts.task(), next = ts.following();
      const int64_t chunk = task % chunks, bh = task / chunks, b = bh / pb.heads_q, h = bh % pb.heads_q;
      const int64_t hk = h / group, L = pb.len_q(b), S = pb.len_k(b), bh_drop = b * pb.heads_q + h;
      const int64_t r0 = chunk * rows, r1 = std::min(L, r0 + rows);
      if (r0 >= r1) continue;
      attn_cpu::Prefetcher pf;
      if (next < tasks) {  // this thread's next task: its query rows, and K and V when it moves to another head
        const int64_t nbh = next / chunks, nb = nbh / pb.heads_q, nh = nbh % pb.heads_q;
        const int64_t n0 = next % chunks * rows, n1 = std::min(pb.len_q(nb), n0 + rows);
        prefetch_rows<T>(pf, c.q, c.lq, nb, nh, pb.q_start(nb) + n0, n1 - n0, D);
        if (nb != b || nh / group != hk) {
          prefetch_rows<T>(pf, c.k, c.lk, nb, nh / group, pb.k_start(nb), pb.len_k(nb), D);
          prefetch_rows<T>(pf, c.v, c.lv, nb, nh / group, pb.k_start(nb), pb.len_k(nb), Dv);
        }
        prefetch_rows<T>(pf, out, c.lo, nb, nh, pb.q_start(nb) + n0, n1 - n0, Dv);  // its first stores then hit L2
      }
      const int64_t bm_blk = block_size(r1 - r0, c.bm, 8), nqb = (r1 - r0 + bm_blk - 1) / bm_blk;
      const int64_t nkb = (S + c.bn - 1) / c.bn;
      pf.plan(nqb * (attn_cpu::micro_tiles(bm_blk, S) + nkb * (attn_cpu::micro_tiles(bm_blk, Dv) + bm_blk)));
      load_head<T>(c, b, hk, want, kv);
      for (int64_t i0 = r0; i0 < r1; i0 += bm_blk) {
        const int64_t bm = std::min(bm_blk, r1 - i0);
        int64_t ldq;
        bool q_padded;
        const float* qs = query_rows<T>(c, b, h, i0, bm, qbuf, ldq, q_padded);
        int64_t lo, hi;
        key_range(pb.vis, i0, i0 + bm, S, lo, hi);
        bool first = true;
        for (int64_t j0 = lo / c.bn * c.bn; j0 < hi; j0 += c.bn) {
          const int64_t bn = std::min(c.bn, hi - j0);
          if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
          const bool all_visible = attn::block_all_visible(pb.vis, i0, i0 + bm, j0, j0 + bn);
          attn_cpu::gemm(bm, bn, D, qs, ldq, kv.kt_at(j0, c.bn), kv.ldt, st, ld, false, true, &pf);
          for (int64_t i = 0; i < bm; ++i) {
            pf.step();
            float* row = st + i * ld;
            if (c.mask || !all_visible) mask_row(c, b, h, i0 + i, j0, bn, all_visible, row);
            const float alpha = attn_cpu::softmax_step(row, bn, m[i], l[i], first);
            if (alpha != 1.f) attn_cpu::scale_row(acc + i * Dv, acc + i * Dv, Dv, alpha);
            if (pb.dropout_p > 0.f)
              for (int64_t j = 0; j < bn; ++j)
                row[j] *= attn::dropout_keep(pb.seed, bh_drop, i0 + i, j0 + j, pb.dropout_p) ? keep_scale : 0.f;
          }
          attn_cpu::gemm(bm, Dv, bn, st, ld, kv.vn + j0 * kv.ldvn, kv.ldvn, acc, Dv, !first, kv.vn_padded, &pf);
          first = false;
        }
        if (first) {  // no visible key: output 0, statistics (+inf, 0)
          std::fill(acc, acc + bm * Dv, 0.f);
          std::fill(l, l + bm, 0.f);
          std::fill(m, m + bm, -INFINITY);
        }
        attn_cpu::softmax_finish(m, l, bm, log_l);
        for (int64_t i = 0; i < bm; ++i) {
          float* stat = c.lse + c.lrow_offset(b, h, i0 + i);
          stat[0] = m[i];
          stat[1] = log_l[i];
        }
        write_rows(out, c.lo, b, h, pb.q_start(b) + i0, bm, Dv, acc, l, 1.f);
      }
    }
  }
}

// Per-thread buffers of the backward pass and the work on one (query block, key block) tile. q and go are
// the query block's Q and dO rows (in place, or copies in qbuf / gobuf), with their row strides.
struct BwdScratch {
  float *qbuf, *gobuf, *st, *dpt, *dq_acc, *lse, *log_l, *delta;  // lse, log_l: the rows' (m, log l)
  const float *q = nullptr, *go = nullptr;
  int64_t ldq = 0, ldgo = 0;
  bool q_padded = false, go_padded = false;
  bool delta_in_tile = false;  // the block's keys are one tile: delta = rowsum(P o dP) there, O is not read
  attn_cpu::Prefetcher* pf = nullptr;  // the next task's rows, a step per micro-tile
  explicit BwdScratch(const Call& c) {
    const int64_t D = c.pb.dim, Dv = c.pb.dim_v;
    qbuf = scratch(0, kBM * padded_ld(D));
    gobuf = scratch(1, kBM * padded_ld(Dv));
    st = scratch(2, 2 * kBM * c.ld_tile);
    dpt = st + kBM * c.ld_tile;
    dq_acc = scratch(3, kBM * D + 3 * kBM);
    lse = dq_acc + kBM * D;
    log_l = lse + kBM;
    delta = log_l + kBM;
  }
};

// Whether the keys that queries [i0, i1) of sequence b may see lie in one key block (one tile per query row).
inline bool one_key_block(const Call& c, int64_t b, int64_t i0, int64_t i1) {
  int64_t lo, hi;
  key_range(c.pb.vis, i0, i1, c.pb.len_k(b), lo, hi);
  return hi <= lo / c.bn * c.bn + c.bn;
}

// Loads query block (b, h, i0): Q and dO rows, the row statistics (m, log l), and delta = rowsum(dO o O) unless
// the tile computes it as rowsum(P o dP) (O = P V; with dropout the tile would need the keep-mask twice, so O is read).
template <typename T>
void load_query_block(const Call& c, int64_t b, int64_t h, int64_t i0, int64_t bm, BwdScratch& w) {
  const Problem& pb = c.pb;
  const int64_t Dv = pb.dim_v, t0 = pb.q_start(b) + i0;
  w.q = query_rows<T>(c, b, h, i0, bm, w.qbuf, w.ldq, w.q_padded);
  w.delta_in_tile = pb.dropout_p == 0.f && one_key_block(c, b, i0, i0 + bm);
  const T* gbase = static_cast<const T*>(c.go) + c.lgo.offset(b, h, t0, 0);
  const T* obase = static_cast<const T*>(c.o) + c.lo.offset(b, h, t0, 0);
  w.go = rows_fp32(gbase, c.lgo.st, c.lgo.sd, bm, Dv, w.gobuf, w.ldgo);
  w.go_padded = w.go == w.gobuf;
  for (int64_t i = 0; i < bm; ++i) {
    const float* stat = c.lse + c.lrow_offset(b, h, i0 + i);
    w.lse[i] = stat[0];
    w.log_l[i] = stat[1];
    if (w.delta_in_tile) continue;
    const float* g = w.go + i * w.ldgo;
    const T* oi = obase + i * c.lo.st;
    float delta = 0.f;
    if constexpr (std::is_same_v<T, float>) {
      if (c.lo.sd == 1) delta = attn_cpu::dot(g, oi, Dv);
    }
    if (!std::is_same_v<T, float> || c.lo.sd != 1)
      for (int64_t d = 0; d < Dv; ++d) delta += g[d] * to_float(oi[d * c.lo.sd]);
    w.delta[i] = delta;
  }
}

// fp32 rows that a tile product writes: the gradient tensor itself, or an accumulator that is copied out later.
// `on` says whether they are wanted: p cannot, as a head dim of 0 gives torch's empty dQ / dK a null data pointer
// (the first (batch, head) of a one-pass backward then skipped dK, dV and gave dV = 0).
struct Rows {
  float* p = nullptr;
  int64_t ld = 0;
  bool on = false;
};

// One tile: dK, dV of the block's keys into dk / dv (bn rows; set, or added to when kv_add) if dk.on, dQ of its
// queries into dq (bm rows; set when first, else added to) if dq.on, and dS into
// dmask along with dQ.
void backward_tile(const Call& c, const HeadKV& kv, int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0,
                   int64_t bn, Rows dk, Rows dv, bool kv_add, Rows dq, bool first, BwdScratch& w) {
  const Problem& pb = c.pb;
  const int64_t D = pb.dim, Dv = pb.dim_v, bh = b * pb.heads_q + h, ld = c.ld_tile;
  const bool all_visible = attn::block_all_visible(pb.vis, i0, i0 + bm, j0, j0 + bn);
  const float keep_scale = pb.dropout_p > 0.f ? 1.f / (1.f - pb.dropout_p) : 1.f;
  const float ds_scale = c.ds_scaled ? pb.scale : 1.f;
  float* st = w.st;
  float* dpt = w.dpt;
  attn_cpu::gemm(bm, bn, D, w.q, w.ldq, kv.kt_at(j0, c.bn), kv.ldt, st, ld, false, true, w.pf);
  attn_cpu::gemm(bm, bn, Dv, w.go, w.ldgo, kv.vt_at(j0, c.bn), kv.ldt, dpt, ld, false, true, w.pf);
  for (int64_t i = 0; i < bm; ++i) {
    if (w.pf) w.pf->step();
    float* srow = st + i * ld;
    float* drow = dpt + i * ld;
    if (c.mask || !all_visible) mask_row(c, b, h, i0 + i, j0, bn, all_visible, srow);
    const float m = w.lse[i];
    if (pb.dropout_p > 0.f) {
      const float delta = w.delta[i];
      attn_cpu::exp_row(srow, bn, m, w.log_l[i]);
      for (int64_t j = 0; j < bn; ++j) {
        const float p = srow[j];
        const float z = attn::dropout_keep(pb.seed, bh, i0 + i, j0 + j, pb.dropout_p) ? keep_scale : 0.f;
        srow[j] = p * z;                      // dropped probabilities, for dV
        drow[j] = ds_scale * p * (drow[j] * z - delta);  // dS
      }
    } else {
      // (s - m) first (see exp2v); lanes past bn load -inf, so their p is 0 and p * dP is not inf * 0 = NaN
      // when m < -88 (a fully masked row of a -1e4 additive mask).
      const float shift = -w.log_l[i] * kLog2e;
      vf pdp = vf{};
      for (int64_t j = 0; j < bn; j += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, bn - j));
        const vf p = attn_cpu::exp2v((attn_cpu::load_n(srow + j, n, -INFINITY) - m) * kLog2e + shift);
        attn_cpu::store_n(srow + j, p, n);
        pdp += p * attn_cpu::load_n(drow + j, n);  // lanes past bn: dP loads 0
      }
      const float delta = w.delta_in_tile ? attn_cpu::hsum(pdp) : w.delta[i];
      for (int64_t j = 0; j < bn; j += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, bn - j));
        const vf p = attn_cpu::load_n(srow + j, n) * ds_scale;
        attn_cpu::store_n(drow + j, p * (attn_cpu::load_n(drow + j, n) - delta), n);
      }
    }
    if (c.dmask && dq.on) {
      float* dm = c.dmask + c.ldmask.offset(b, h, i0 + i, j0);
      for (int64_t j = 0; j < bn; ++j) dm[j * c.ldmask.sd] = drow[j];
    }
  }
  if (dk.on) {
    attn_cpu::gemm<true>(bn, Dv, bm, st, ld, w.go, w.ldgo, dv.p, dv.ld, kv_add, w.go_padded, w.pf);
    attn_cpu::gemm<true>(bn, D, bm, dpt, ld, w.q, w.ldq, dk.p, dk.ld, kv_add, w.q_padded, w.pf);
  }
  if (dq.on) attn_cpu::gemm(bm, D, bn, dpt, ld, kv.kn + j0 * kv.ldkn, kv.ldkn, dq.p, dq.ld, !first, kv.kn_padded, w.pf);
}

// Zeroes rows x cols of r.
inline void zero_rows(Rows r, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) std::fill(r.p + i * r.ld, r.p + i * r.ld + cols, 0.f);
}

// The gradients dQ, dK, dV that a backward writes, and how.
template <typename T>
struct Grads {
  T *dq, *dk, *dv;
  Layout ldq, ldk, ldv;
  float out_scale;  // what dQ and dK still need when they are written
  // fp32 gradients with unit-stride rows are accumulated in place (no accumulator to clear and copy out: 3% of
  // the ViT backward); the others in fp32 rows that write_rows converts.
  bool direct;

  Grads(const Call& c, const AttentionBwdParams& p)
      : dq(p.dq.ptr<T>()),
        dk(p.dk.ptr<T>()),
        dv(p.dv.ptr<T>()),
        ldq(attn::layout_of(p.dq)),
        ldk(attn::layout_of(p.dk)),
        ldv(attn::layout_of(p.dv)),
        out_scale(c.ds_scaled ? 1.f : c.pb.scale),
        direct(std::is_same_v<T, float> && c.ds_scaled && ldq.sd == 1 && ldk.sd == 1 && ldv.sd == 1) {}

  // Rows t0... of (b, h) of a gradient, as fp32 rows (only when direct).
  static Rows rows_of(T* base, const Layout& lay, int64_t b, int64_t h, int64_t t0) {
    return Rows{reinterpret_cast<float*>(base + lay.offset(b, h, t0, 0)), lay.st, true};
  }
};

// dQ of query block (b, h, i0) over its visible keys; with dk_rows / dv_rows (the head's S keys) also their
// part of dK, dV. A tile covers a prefix of its key block (causal: up to the block's last query), and
// rows_set[block] counts the rows that earlier tiles have set: rows past it are cleared before a tile adds.
template <typename T>
void backward_query_block(const Call& c, const Grads<T>& g, const HeadKV& kv, int64_t b, int64_t h, int64_t i0,
                          int64_t bm, Rows dk_rows, Rows dv_rows, int64_t* rows_set, BwdScratch& w) {
  const Problem& pb = c.pb;
  const int64_t D = pb.dim, Dv = pb.dim_v;
  load_query_block<T>(c, b, h, i0, bm, w);
  const Rows dq_rows = g.direct ? g.rows_of(g.dq, g.ldq, b, h, pb.q_start(b) + i0) : Rows{w.dq_acc, D, true};
  int64_t lo, hi;
  key_range(pb.vis, i0, i0 + bm, pb.len_k(b), lo, hi);
  bool first = true;
  for (int64_t j0 = lo / c.bn * c.bn; j0 < hi; j0 += c.bn) {
    const int64_t bn = std::min(c.bn, hi - j0);
    if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
    Rows dkb, dvb;
    bool kv_add = false;
    if (dk_rows.on) {
      dkb = {dk_rows.p + j0 * dk_rows.ld, dk_rows.ld, true};
      dvb = {dv_rows.p + j0 * dv_rows.ld, dv_rows.ld, true};
      int64_t& done = rows_set[j0 / c.bn];
      kv_add = done > 0;
      if (kv_add && done < bn) {
        zero_rows({dkb.p + done * dkb.ld, dkb.ld}, bn - done, D);
        zero_rows({dvb.p + done * dvb.ld, dvb.ld}, bn - done, Dv);
      }
      done = std::max(done, bn);
    }
    backward_tile(c, kv, b, h, i0, bm, j0, bn, dkb, dvb, kv_add, dq_rows, first, w);
    first = false;
  }
  if (first) zero_rows(dq_rows, bm, D);
  if (!g.direct) write_rows(g.dq, g.ldq, b, h, pb.q_start(b) + i0, bm, D, w.dq_acc, nullptr, g.out_scale);
}

// One pass, task = (batch, kv head): every query block of the head group against its visible key blocks, dK and
// dV of the head in private rows. For calls with several such tasks per thread.
template <typename T>
void backward_one_pass(const Call& c, const Grads<T>& g, int num_threads) {
  const Problem& pb = c.pb;
  const int64_t D = pb.dim, Dv = pb.dim_v, group = pb.heads_q / pb.heads_k, kv_tasks = pb.batch * pb.heads_k;
  const double task_flops = 2.0 * group * pb.max_len_q * pb.max_len_k * (3 * D + 2 * Dv);  // five products
  const int per_grab = grab(kv_tasks, num_threads, task_flops);
  KVWant want;
  want.kt = want.vt = want.kn = true;
  std::atomic<int64_t> counter{0};
#pragma omp parallel num_threads(num_threads)
  {
    BwdScratch w(c);
    HeadKV kv;
    thread_local attn_cpu::Workspace acc_ws;
    float* dkv = g.direct ? nullptr : acc_ws.get(pb.max_len_k * (D + Dv));
    std::vector<int64_t> rows_set((pb.max_len_k + c.bn - 1) / c.bn);
    for (TaskStream ts(counter, kv_tasks, per_grab); !ts.done(); ts.advance()) {
      const int64_t task = ts.task(), next = ts.following();
      const int64_t b = task / pb.heads_k, hk = task % pb.heads_k, L = pb.len_q(b), S = pb.len_k(b);
      attn_cpu::Prefetcher pf;
      if (next < kv_tasks) {  // this thread's next head group: its K, V, Q, O and dO
        const int64_t nb = next / pb.heads_k, nhk = next % pb.heads_k;
        const int64_t nL = pb.len_q(nb), nS = pb.len_k(nb), q0 = pb.q_start(nb);
        prefetch_rows<T>(pf, c.k, c.lk, nb, nhk, pb.k_start(nb), nS, D);
        prefetch_rows<T>(pf, c.v, c.lv, nb, nhk, pb.k_start(nb), nS, Dv);
        for (int64_t h = nhk * group; h < (nhk + 1) * group; ++h) {
          prefetch_rows<T>(pf, c.q, c.lq, nb, h, q0, nL, D);
          if (pb.dropout_p > 0.f || !one_key_block(c, nb, 0, nL)) prefetch_rows<T>(pf, c.o, c.lo, nb, h, q0, nL, Dv);
          prefetch_rows<T>(pf, c.go, c.lgo, nb, h, q0, nL, Dv);
          prefetch_rows<T>(pf, g.dq, g.ldq, nb, h, q0, nL, D);  // outputs too: their first stores then hit L2
        }
        prefetch_rows<T>(pf, g.dk, g.ldk, nb, nhk, pb.k_start(nb), nS, D);
        prefetch_rows<T>(pf, g.dv, g.ldv, nb, nhk, pb.k_start(nb), nS, Dv);
      }
      const int64_t bm_blk = block_size(std::max<int64_t>(L, 1), c.bm, 8), nkb = (S + c.bn - 1) / c.bn;
      pf.plan(group * ((L + bm_blk - 1) / bm_blk) *
              (attn_cpu::micro_tiles(bm_blk, 2 * S + D) + attn_cpu::micro_tiles(S, D + Dv) + nkb * bm_blk));
      w.pf = &pf;
      load_head<T>(c, b, hk, want, kv);
      const Rows dk_rows = g.direct ? g.rows_of(g.dk, g.ldk, b, hk, pb.k_start(b)) : Rows{dkv, D, true};
      const Rows dv_rows = g.direct ? g.rows_of(g.dv, g.ldv, b, hk, pb.k_start(b)) : Rows{dkv + S * D, Dv, true};
      std::fill(rows_set.begin(), rows_set.end(), 0);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t i0 = 0; i0 < L; i0 += bm_blk)
          backward_query_block(c, g, kv, b, h, i0, std::min(bm_blk, L - i0), dk_rows, dv_rows, rows_set.data(), w);
      for (int64_t j0 = 0; j0 < S; j0 += c.bn) {  // keys no query may see
        const int64_t done = rows_set[j0 / c.bn], rows = std::min(c.bn, S - j0) - done;
        zero_rows({dk_rows.p + (j0 + done) * dk_rows.ld, dk_rows.ld}, rows, D);
        zero_rows({dv_rows.p + (j0 + done) * dv_rows.ld, dv_rows.ld}, rows, Dv);
      }
      if (!g.direct) {
        write_rows(g.dk, g.ldk, b, hk, pb.k_start(b), S, D, dk_rows.p, nullptr, g.out_scale);
        write_rows(g.dv, g.ldv, b, hk, pb.k_start(b), S, Dv, dv_rows.p, nullptr, 1.f);
      }
    }
  }
}

// Two passes, for calls with few (batch, kv head) tasks: over key blocks (dK, dV), then over query blocks (dQ),
// recomputing the tile products once more but keeping all threads busy.
template <typename T>
void backward_two_pass(const Call& c, const Grads<T>& g, int num_threads) {
  const Problem& pb = c.pb;
  const int64_t D = pb.dim, Dv = pb.dim_v, group = pb.heads_q / pb.heads_k, kv_tasks = pb.batch * pb.heads_k;
  // Pass 1, task = (batch, kv head, key block): dK and dV of the block.
  const int64_t nkb = (pb.max_len_k + c.bn - 1) / c.bn;
#pragma omp parallel num_threads(num_threads)
  {
    BwdScratch w(c);
    HeadKV kv;
    KVWant want;
    want.kt = want.vt = true;
    thread_local attn_cpu::Workspace acc_ws;
    float* dka = acc_ws.get(c.bn * (D + Dv));
    float* dva = dka + c.bn * D;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < kv_tasks * nkb; ++task) {
      const int64_t kb = task % nkb, b = task / nkb / pb.heads_k, hk = task / nkb % pb.heads_k;
      const int64_t L = pb.len_q(b), S = pb.len_k(b), j0 = kb * c.bn;
      if (j0 >= S) continue;
      const int64_t bn = std::min(c.bn, S - j0);
      load_head<T>(c, b, hk, want, kv);
      std::fill(dka, dka + c.bn * (D + Dv), 0.f);
      const int64_t bm_blk = block_size(std::max<int64_t>(L, 1), c.bm, 8);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < L; i0 += bm_blk) {
          const int64_t bm = std::min(bm_blk, L - i0);
          if (!attn::block_any_visible(pb.vis, i0, i0 + bm, j0, j0 + bn)) continue;
          load_query_block<T>(c, b, h, i0, bm, w);
          backward_tile(c, kv, b, h, i0, bm, j0, bn, {dka, D, true}, {dva, Dv, true}, true, {}, false, w);
        }
      }
      write_rows(g.dk, g.ldk, b, hk, pb.k_start(b) + j0, bn, D, dka, nullptr, g.out_scale);
      write_rows(g.dv, g.ldv, b, hk, pb.k_start(b) + j0, bn, Dv, dva, nullptr, 1.f);
    }
  }
  // Pass 2, task = (batch, query head, query block): dQ (and dS into the mask gradient).
  const int64_t bm_max = block_size(std::max<int64_t>(pb.max_len_q, 1), c.bm, 8);
  const int64_t nqb = (pb.max_len_q + bm_max - 1) / bm_max;
#pragma omp parallel num_threads(num_threads)
  {
    BwdScratch w(c);
    HeadKV kv;
    KVWant want;
    want.kt = want.vt = want.kn = true;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < pb.batch * pb.heads_q * nqb; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, b = bh / pb.heads_q, h = bh % pb.heads_q;
      const int64_t L = pb.len_q(b), i0 = qb * bm_max;
      if (i0 >= L) continue;
      load_head<T>(c, b, h / group, want, kv);
      backward_query_block(c, g, kv, b, h, i0, std::min(bm_max, L - i0), {}, {}, nullptr, w);
    }
  }
}

// Key blocks are a grid of bn keys (windows start on it too); a window visits ~2 w / bn + 1 blocks per query
// block, so it gets smaller blocks. Taller query blocks reuse each K/V block more (+7% at L = 4096), but causal
// and windowed blocks of moderate length lose more to the square they compute around the diagonal (CLIP text,
// L = 77: -15%). The forward of long full attention gains another 2.5% at twice the height (L = 4096, D = 128);
// its backward, with two score tiles and five products per tile, loses 5% there, and causal gains nothing. A
// forward whose keys are one block keeps its score tile in L1 at half the height (56 x 197 at ViT-B/16: 45 KiB;
// forward -2 to -4%), with nothing to reuse across key blocks.
void set_blocks(Call& c, bool forward) {
  const Problem& pb = c.pb;
  c.bn = block_size(std::max<int64_t>(pb.max_len_k, 1), pb.vis.windowed ? kBN / 2 : kBN, kLanes);
  c.ld_tile = padded_ld(c.bn);
  const bool masked_structure = pb.vis.causal || pb.vis.windowed;
  c.bm = (masked_structure && pb.max_len_q < 1024) || (forward && pb.max_len_k <= c.bn) ? kBM / 2 : kBM;
  if (forward && !masked_structure && pb.max_len_q >= 1024 && pb.max_len_k >= 1024) c.bm = 2 * kBM;
}

// The call of a forward (bwd null) or of a backward (bwd the same parameters, with the gradients).
Call make_call(const AttentionFwdParams& p, const AttentionBwdParams* bwd) {
  check_float_dtype(p.q, "query");
  Call c;
  static_cast<attn::Operands&>(c) = attn::make_operands(p);
  const Problem& pb = c.pb;
  for (int64_t b = 0; p.cu_q.present && b < pb.batch; ++b) {
    check(pb.len_q(b) >= 0 && pb.len_q(b) <= p.max_len_q && pb.q_start(b) + pb.len_q(b) <= p.q.size(0),
          "cu_seqlens_q: offsets must be non-decreasing, within max_seqlen_q and the query length");
    check(pb.len_k(b) >= 0 && pb.len_k(b) <= p.max_len_k && pb.k_start(b) + pb.len_k(b) <= p.k.size(0),
          "cu_seqlens_k: offsets must be non-decreasing, within max_seqlen_k and the key length");
  }
  if (bwd) {
    c.go = bwd->grad_out.data;
    c.lgo = attn::layout_of(bwd->grad_out);
    c.ds_scaled = !bwd->dmask.present;
    if (bwd->dmask.present) {
      check(bwd->dmask.dtype == DType::f32 && p.mask.present, "attn_mask: gradient buffer must be float32");
      c.dmask = bwd->dmask.ptr<float>();
      c.ldmask = attn::layout_of(bwd->dmask);
    }
  }
  set_blocks(c, bwd == nullptr);
  return c;
}

}  // namespace

void attention_fwd_cpu(const AttentionFwdParams& p, int num_threads) {
  const Call c = make_call(p, nullptr);
  dispatch_float(p.q.dtype, "query", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    forward<scalar_t>(c, p.out.ptr<scalar_t>(), num_threads);
  });
}

void attention_bwd_cpu(const AttentionBwdParams& p, int num_threads) {
  const Call c = make_call(p, &p);
  dispatch_float(p.q.dtype, "query", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const Grads<scalar_t> g(c, p);
    if (c.pb.batch * c.pb.heads_k >= 4 * static_cast<int64_t>(num_threads))
      backward_one_pass(c, g, num_threads);
    else
      backward_two_pass(c, g, num_threads);
  });
}

// Writes the dropout keep-mask (B, H, L, S) (uint8/bool, contiguous) that the kernels draw for `seed`.
void attention_dropout_mask_cpu(const AttentionDropoutMaskParams& p, int num_threads) {
  const Tensor& keep = p.keep;
  check(keep.ndim == 4 && keep.dtype == DType::b8, "keep: expected a (B, H, L, S) bool tensor");
  uint8_t* out = keep.ptr<uint8_t>();
  const int64_t BH = keep.size(0) * keep.size(1), L = keep.size(2), S = keep.size(3);
  const uint64_t seed = static_cast<uint64_t>(p.seed);
  const float dropout_p = static_cast<float>(p.dropout_p);
#pragma omp parallel for collapse(2) num_threads(num_threads)
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < S; ++j) out[(bh * L + i) * S + j] = attn::dropout_keep(seed, bh, i, j, dropout_p) ? 1 : 0;
}

MMKERN_CPU_END
