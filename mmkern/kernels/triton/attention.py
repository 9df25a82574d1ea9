"""Triton flash attention, forward and backward (see mmkern.ops.attention for the semantics).

Forward: one program per (query block, batch·head); key blocks stream past with an online softmax
(running max m, sum l), out = acc / l and the row statistics (m, log l) are stored (the log-sum-exp as a
pair: m + log l in fp32 would drop log l once |m| >= 2^24).

Backward, without atomics (so it is deterministic): delta = rowsum(dO ∘ O) is computed first; one kernel
owns a key block and accumulates dK, dV over the query blocks of its head group; another owns a query block
and accumulates dQ (and writes dS as the float mask's gradient). Both recompute P = exp((S - m) - log l).

Compiler-facing choices (checked by `python -m benchmarks.triton_compile`):
- Blocks that no pair of a tile can see (causal, window) are left out through the loop bounds, never by an
  `if` inside the loop: a data-dependent branch in the loop body stops Triton's pipeliner, and the loads
  lose cp.async double buffering. Causal attention splits off the diagonal blocks, so the blocks below it
  skip the position mask.
- Offsets are 64-bit: batch and head indices, token rows and mask rows become int64 before they meet a
  stride, since b · stride or row · stride passes 2^31 for tensors past 2^31 elements (or strided views
  into such storage) and int32 wraps silently.
- The grid is 1-D (programs = blocks × batch·heads): grid axes 1 and 2 stop at 65,535.

The visibility rules and the Philox dropout draw mirror csrc/include/mmkern/attention.h exactly, so this
kernel drops the same elements as the CPU kernel for the same seed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _grid_of(tiles, warps=(4, 8), stages=(2, 3)):
    return [(bm, bn, w, st) for bm, bn in tiles for w in warps for st in stages]


# (BM, BN, warps, stages) the autotuner of each kernel tries for fp16 / bf16 and TF32: the configs that spill no
# register on sm_90 and sm_80 at head dim 64 in the compile report (`python -m benchmarks.triton_compile`).
# The forward leaves out 64 x 64 on 4 warps (first-config report, triton 3.7.1, sm_80: 24 B with a bool mask at D = 64,
# 72 B varlen and 288 B causal + float mask + dropout at D = 128), where 64 x 64 on 8 warps spills nothing on sm_80
# or sm_90 for any feature at D = 64 and 128. dK/dV keeps four (BN, D) tiles live across its query loop, and ptxas
# spills it in 14 of the 16 configs of the (BM, BN) grid below on one of the two targets (triton 3.9).
CONFIGS = {
    "fwd": [c for c in _grid_of([(64, 64), (128, 64), (64, 32), (128, 32)], warps=(8, 4)) if c[:3] != (64, 64, 4)],
    "dkdv": [(32, 64, 8, 2), (32, 64, 8, 3)],
    "dq": [c for c in _grid_of([(64, 64), (32, 64), (64, 32), (32, 32)]) if c[:3] != (64, 64, 4)],
}
# Head dim 64 before sm_90 (mma.sync; sm_90's wgmma needs the 64-row tiles above): dK/dV 32 x 64 spilled 344-416 B
# with causal + float mask + dropout on sm_80 (triton 3.7.1) and 32-64 B with a bool mask (3.6), dQ 64 x 64 64 B with a
# bool mask (3.6). These two spill nothing there for any feature, fp16 or bf16, with 3.6 and 3.7.1.
CONFIGS_SM80 = {**CONFIGS, "dkdv": [(32, 32, 8, 2)], "dq": [(64, 32, 8, 2)]}
# Head dim 128: the forward's 128-row tiles on 4 warps spill in the full report (plain 104-120 B on sm_90, 48-304 B on
# sm_80; window up to 6.5 KB on sm_80), where the same tiles on 8 warps spill nothing.
CONFIGS_128 = {**CONFIGS, "fwd": [c for c in CONFIGS["fwd"] if not (c[0] == 128 and c[2] == 4)]}
# Head dim 128 before sm_90: dQ 64 x 64 spilled 24 B with a float mask on sm_80 with triton 3.4 (the floor); 64 x 32 on
# 8 warps spills nothing there without dropout with 3.4, and nothing for any feature with 3.6 and 3.7.1.
CONFIGS_128_SM80 = {**CONFIGS_128, "dq": [(64, 32, 8, 2)]}
# Head dims above 128 (BD = 256): the (BM, D) accumulators alone hold 64-128 fp32 registers per thread, and the
# D <= 128 configs spilled 8-680 B per thread on sm_90 and up to 3.3 KB on sm_80. The compile report at D = 256
# (fp16 / bf16, every feature, sm_90 and sm_80) keeps these: no spill without dropout, at most 248 B with it. Left
# out: dQ 64 x 32 and 32 x 32 at 8 warps (8-16 B with causal, window, bool mask or varlen on sm_90), forward
# 32 x 32 (24 B varlen), dK/dV 32 x 32 and 16 x 32 (336-376 B with dropout).
CONFIGS_WIDE = {
    "fwd": [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3)],
    "dkdv": [(16, 64, 8, 2)],
    "dq": [(32, 32, 4, 2)],
}
# fp32 with IEEE products (no TF32) needs 3x the registers per element of a dot: only small tiles run. fp32 dK/dV at
# D = 256 fits none of them in sm_80's 163 KB (16 x 64 needs 172-176 KB, triton 3.6 and 3.7.1): 16 x 32 on one stage
# needs 100 KB there and spills 104-136 B (on two stages 4.4-6 KB; 32 x 32 on one stage 10-11 KB).
IEEE_CONFIGS = {
    "fwd": _grid_of([(64, 32), (32, 32)]),
    "dkdv": [*_grid_of([(64, 32), (32, 32)]), (16, 32, 4, 1)],
    "dq": _grid_of([(64, 32), (32, 32)]),
}


def _key(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages


def _configs(kind: str) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1)]
    tuples = list(dict.fromkeys(CONFIGS[kind] + CONFIGS_SM80[kind] + CONFIGS_WIDE[kind] + IEEE_CONFIGS[kind]))
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tuples]


def shared_bytes_estimate(bm: int, bn: int, stages: int, bd: int, bdv: int, elem: int, bwd: bool) -> int:
    """Shared memory a config needs, an upper bound of the compile report's figures: each pipeline stage holds
    the streamed tiles (K and V forward; Q and dO backward, for the larger of the two tile sides), plus the tiles
    that the dots re-layout once. One stage still passes the loaded tiles through shared memory (fp32 dK/dV at
    D = 256, 16 x 32: 100 KB on one stage, 100-102 KB on two), so it counts as two."""
    streamed = max(bm, bn) if bwd else bn
    return (max(stages, 2) * streamed + (bm if not bwd else min(bm, bn))) * (bd + bdv) * elem


def fitting_configs(configs: list[triton.Config], elem: int, meta: dict, shared_limit: int, kind: str, arch: int):
    """The configs of kernel `kind` ("fwd", "dkdv", "dq") a launch may run on sm_<arch>: its CONFIGS (CONFIGS_SM80
    for head dim 64 before sm_90, CONFIGS_128 / CONFIGS_128_SM80 for head dim 128, CONFIGS_WIDE above, IEEE_CONFIGS for
    fp32 without TF32) that fit shared_limit bytes of shared memory (a D = 256 config that does not fit is otherwise
    compiled only to be rejected); the one needing the least shared memory if none fits."""
    if meta["PREC"] == "ieee":
        allowed = IEEE_CONFIGS[kind]
    else:
        bd = max(meta["BD"], meta["BDV"])
        if bd > 128:
            allowed = CONFIGS_WIDE[kind]
        elif bd > 64:
            allowed = (CONFIGS_128 if arch >= 90 else CONFIGS_128_SM80)[kind]
        else:
            allowed = (CONFIGS if arch >= 90 else CONFIGS_SM80)[kind]

    def shared(c):
        return shared_bytes_estimate(*_key(c)[:2], c.num_stages, meta["BD"], meta["BDV"], elem, kind != "fwd")

    keep = [c for c in configs if _key(c) in allowed and shared(c) <= shared_limit]
    return keep or [min(configs, key=shared)]


def _prune(kind: str):
    def prune(configs, named_args, **meta):
        if _INTERPRET:
            return configs
        q = named_args["Q"]
        limit = triton.runtime.driver.active.utils.get_device_properties(q.device.index)["max_shared_mem"]
        major, minor = torch.cuda.get_device_capability(q.device)
        return fitting_configs(configs, q.element_size(), meta, limit, kind, 10 * major + minor)

    return prune


# Lengths enter the key as power-of-two buckets: with exact lengths every new sequence length (varlen
# batches, generation) re-benchmarks every config of all three kernels.
_KEY = ["D", "DV", "CAUSAL", "WINDOWED", "MASK_KIND", "VARLEN", "DROPOUT", "PREC", "L_BUCKET", "S_BUCKET"]


@triton.jit
def _dropout_keep(seed_lo, seed_hi, bh, offs_m, offs_n, p):
    """Philox-4x32-10, first word, counter (key j, query i, batch·head, 0): as attn::dropout_keep."""
    zero = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.uint32)
    c0 = zero + offs_n[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero
    k0 = zero + seed_lo.to(tl.uint32)
    k1 = zero + seed_hi.to(tl.uint32)
    m0 = zero + 0xD2511F53
    m1 = zero + 0xCD9E8D57
    w0 = zero + 0x9E3779B9
    w1 = zero + 0xBB67AE85
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


@triton.jit
def _visible(a0, a1, n, before, after, num_global, BLK: tl.constexpr, CAUSAL: tl.constexpr, KEYS: tl.constexpr,
             WINDOWED: tl.constexpr):  # fmt: skip
    """Which BLK-blocks of the other side (n positions) hold a visible pair with the block [a0, a1) of this
    side, as loop bounds (attn::block_any_visible, turned into ranges). KEYS: the other side is the keys
    (this block holds queries: causal keeps j <= i); else the queries (causal keeps i >= j). before / after:
    how far the window reaches towards lower / higher positions of the other side.

    Returns (lo, mid, hi, cut, skip): the block loop runs over [lo, hi) in BLK steps. With a window it is one
    loop over the global positions below the band, then the band: a block start t >= cut stands for t + skip
    (`_block_start`); one loop, not two, since a second pipelined loop pushed the dQ kernel (64 x 64, 8 warps,
    2 stages) on sm_80 to 255 registers and a spill. Causal without a window: the blocks that need the
    position mask are [mid, hi) for KEYS, [lo, mid) otherwise, and the rest see every pair."""
    lo = 0
    hi = n
    if CAUSAL:
        if KEYS:
            hi = tl.minimum(hi, a1)
        else:
            lo = a0 // BLK * BLK
    cut = hi
    skip = 0
    if WINDOWED:
        # A block holding a global position sees / is seen by everything. Selects, not a run-time `if`: triton 3.4's
        # TritonGPUCoalesce pass crashes (an LLVM assertion) on that branch.
        banded = a0 >= num_global
        band = tl.maximum(lo, tl.maximum(a0 - before, 0) // BLK * BLK)
        g_hi = tl.where(banded, tl.minimum(tl.minimum(tl.cdiv(num_global, BLK) * BLK, band), hi), lo)
        cut = lo + tl.cdiv(tl.maximum(g_hi - lo, 0), BLK) * BLK  # = g_hi where the band is not empty
        band_lo = tl.where(banded, band, lo)
        band_hi = tl.where(banded, tl.minimum(hi, a1 + after), hi)
        skip = band_lo - cut
        hi = cut + tl.cdiv(tl.maximum(band_hi - band_lo, 0), BLK) * BLK
    mid = hi
    if CAUSAL and not WINDOWED:
        if KEYS:
            mid = tl.minimum(tl.maximum((a0 + 1) // BLK * BLK, lo), hi)
        else:
            mid = tl.minimum(lo + tl.cdiv(a1 - 1 - lo, BLK) * BLK, hi)
    return lo, mid, hi, cut, skip


@triton.jit
def _block_start(t, cut, skip, WINDOWED: tl.constexpr):
    """The block of the loop step at t (see _visible): with a window, past the global blocks, the band's."""
    if WINDOWED:
        return tl.where(t < cut, t, t + skip)
    return t


@triton.jit
def _scores(
    q,
    k,
    offs_m,
    offs_n,
    Lb,
    Sb,
    scale,
    mptrs,
    left,
    right,
    num_global,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PREC: tl.constexpr,
):
    """Scaled scores of a (BM, BN) tile with every mask applied (-inf where invisible)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    i = offs_m[:, None]
    j = offs_n[None, :]
    ok = (i < Lb) & (j < Sb)
    if CAUSAL:
        ok = ok & (j <= i)
    if WINDOWED:
        ok = ok & (((j >= i - left) & (j <= i + right)) | (i < num_global) | (j < num_global))
    if MASK_KIND == 1:
        ok = ok & (tl.load(mptrs, mask=ok, other=0) != 0)
    if MASK_KIND == 2:
        s = s + tl.load(mptrs, mask=ok, other=0.0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _seq(Cu, b, n, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(Cu + b)
        return start, tl.load(Cu + b + 1) - start
    return 0, n


@triton.jit
def _tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc):
    """Pointers to rows t0 + offs_t, columns offs_c of a (token, dim) view, and the in-bounds mask."""
    rows = (t0 + offs_t).to(tl.int64)
    return base + rows[:, None] * st + offs_c[None, :] * sc, (offs_t < n_t)[:, None] & (offs_c < n_c)[None, :]


@triton.jit
def _load_tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc):
    """Tile of rows t0 + offs_t, zero past n_t rows and n_c columns."""
    ptrs, ok = _tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _store_tile(base, x, t0, offs_t, n_t, st, offs_c, n_c, sc):
    ptrs, ok = _tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok)


@triton.jit
def _mask_ptrs(Mb, offs_m, sml, offs_n, sms):
    return Mb + offs_m.to(tl.int64)[:, None] * sml + offs_n.to(tl.int64)[None, :] * sms


@triton.jit
def _program(n, BLK: tl.constexpr, heads, REVERSE: tl.constexpr):
    """(block start, batch, head) of this program of the flat grid: cdiv(n, BLK) blocks of each batch·head,
    batch and head as int64. REVERSE runs the blocks of a head last to first (causal: the longest first)."""
    blocks = tl.cdiv(n, BLK)
    pid = tl.program_id(0)
    bh = pid // blocks
    blk = pid % blocks
    if REVERSE:
        blk = blocks - 1 - blk
    return blk * BLK, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)


@triton.jit
def _fwd_blocks(
    acc, m_i, l_i, q, Kb, Vb, Mb, k0, lo, hi, cut, skip, offs_m, Lb, Sb, skt, skd, svt, svd, sml, sms, offs_d, D,
    offs_dv, DV, scale, left, right, num_global, dropout_p, keep_scale, seed_lo, seed_hi, bh,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """The online-softmax update over the key blocks of [lo, hi) (blocks as _visible says)."""
    for t in range(lo, hi, BN):
        j0 = _block_start(t, cut, skip, WINDOWED)
        offs_n = j0 + tl.arange(0, BN)
        k = _load_tile(Kb, k0, offs_n, Sb, skt, offs_d, D, skd)
        mptrs = _mask_ptrs(Mb, offs_m, sml, offs_n, sms)
        s = _scores(
            q, k, offs_m, offs_n, Lb, Sb, scale, mptrs, left, right, num_global, CAUSAL, WINDOWED, MASK_KIND, PREC
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # attn::softmax_shift
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        if DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, bh, offs_m, offs_n, dropout_p)
            p = tl.where(keep, p * keep_scale, 0.0)
        v = _load_tile(Vb, k0, offs_n, Sb, svt, offs_dv, DV, svd)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_i, l_i


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Mask, CuQ, CuK, Out, Lse,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smh, sml, sms, slb, slh, slt,
    H, group, L, S, D, DV, scale, left, right, num_global, dropout_p, keep_scale, seed_lo, seed_hi, L_BUCKET, S_BUCKET,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    i0, b, h = _program(L, BM, H, CAUSAL)
    hk = h // group
    q0, Lb = _seq(CuQ, b, L, VARLEN)
    k0, Sb = _seq(CuK, b, S, VARLEN)
    if i0 >= Lb:
        return
    bh = b * H + h
    offs_m = i0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = _load_tile(Q + b * sqb + h * sqh, q0, offs_m, Lb, sqt, offs_d, D, sqd)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    Mb = Mask + b * smb + h * smh
    lo, mid, hi, cut, skip = _visible(i0, i0 + BM, Sb, left, right, num_global, BN, CAUSAL, True, WINDOWED)
    # fmt: off
    # Causal without a window: the blocks below the diagonal [lo, mid) need no position mask.
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, Kb, Vb, Mb, k0, lo, mid, cut, skip, offs_m, Lb, Sb, skt, skd, svt,
                                svd, sml, sms, offs_d, D, offs_dv, DV, scale, left, right, num_global, dropout_p,
                                keep_scale, seed_lo, seed_hi, bh, CAUSAL and WINDOWED, WINDOWED, MASK_KIND, DROPOUT,
                                PREC, BN)
    if CAUSAL and not WINDOWED:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, Kb, Vb, Mb, k0, mid, hi, cut, skip, offs_m, Lb, Sb, skt, skd,
                                    svt, svd, sml, sms, offs_d, D, offs_dv, DV, scale, left, right, num_global,
                                    dropout_p, keep_scale, seed_lo, seed_hi, bh, True, False, MASK_KIND, DROPOUT,
                                    PREC, BN)
    # fmt: on
    empty = l_i == 0.0  # rows that see no key give 0 and store (m, log l) = (+inf, 0): attn::row_stat_max
    safe_l = tl.where(empty, 1.0, l_i)
    inv = tl.where(empty, 0.0, 1.0 / safe_l)
    out = acc * inv[:, None]
    _store_tile(Out + b * sob + h * soh, out, q0, offs_m, Lb, sot, offs_dv, DV, sod)
    stat = Lse + b * slb + h * slh + (q0 + offs_m).to(tl.int64) * slt
    tl.store(stat, tl.where(empty, float("inf"), m_i), mask=offs_m < Lb)
    tl.store(stat + 1, tl.where(empty, 0.0, tl.log(safe_l)), mask=offs_m < Lb)


@triton.jit
def _bwd_probs(
    s,
    m,
    log_l,
    delta,
    do,
    v,
    offs_m,
    offs_n,
    bh,
    dropout_p,
    keep_scale,
    seed_lo,
    seed_hi,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    """(P ∘ Z, dS) of one tile from its masked scores s and row statistics (m, log l), Z the dropout scale."""
    p = tl.exp((s - m[:, None]) - log_l[:, None])  # s - m first: exact for any m; m = +inf (no key seen): p = 0
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if DROPOUT:
        keep = _dropout_keep(seed_lo, seed_hi, bh, offs_m, offs_n, dropout_p)
        z = tl.where(keep, keep_scale, 0.0)
        return p * z, p * (dp * z - delta[:, None])
    return p, p * (dp - delta[:, None])


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, Qb, DOb, Mb, stat, Delta, q0, lo, hi, cut, skip, offs_n, Lb, Sb, sqt, sqd, sot, sod, sml, sms, slt,
    offs_d, D, offs_dv, DV, scale, left, right, num_global, dropout_p, keep_scale, seed_lo, seed_hi, bh,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block, accumulated over the query blocks [lo, hi) of one head."""
    for t in range(lo, hi, BM):
        i0 = _block_start(t, cut, skip, WINDOWED)
        offs_m = i0 + tl.arange(0, BM)
        rows = offs_m < Lb
        q = _load_tile(Qb, q0, offs_m, Lb, sqt, offs_d, D, sqd)
        do = _load_tile(DOb, q0, offs_m, Lb, sot, offs_dv, DV, sod)
        row_off = (q0 + offs_m).to(tl.int64) * slt
        m = tl.load(stat + row_off, mask=rows, other=float("inf"))
        log_l = tl.load(stat + row_off + 1, mask=rows, other=0.0)
        delta = tl.load(Delta + row_off, mask=rows, other=0.0)
        mptrs = _mask_ptrs(Mb, offs_m, sml, offs_n, sms)
        s = _scores(
            q, k, offs_m, offs_n, Lb, Sb, scale, mptrs, left, right, num_global, CAUSAL, WINDOWED, MASK_KIND, PREC
        )
        pz, ds = _bwd_probs(
            s, m, log_l, delta, do, v, offs_m, offs_n, bh, dropout_p, keep_scale, seed_lo, seed_hi, DROPOUT, PREC
        )
        dv += tl.dot(tl.trans(pz).to(do.dtype), do, input_precision=PREC)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_KEY, prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Mask, CuQ, CuK, DO, Lse, Delta, DK, DV_,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smh, sml, sms, slb, slh, slt,
    H, group, L, S, D, DV, scale, left, right, num_global, dropout_p, keep_scale, seed_lo, seed_hi, L_BUCKET, S_BUCKET,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    """dK, dV (laid out like K, V, strides sk*/sv*) of one key block, summed over its query heads."""
    j0, b, hk = _program(S, BN, H // group, False)
    q0, Lb = _seq(CuQ, b, L, VARLEN)
    k0, Sb = _seq(CuK, b, S, VARLEN)
    if j0 >= Sb:
        return
    offs_n = j0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k = _load_tile(K + b * skb + hk * skh, k0, offs_n, Sb, skt, offs_d, D, skd)
    v = _load_tile(V + b * svb + hk * svh, k0, offs_n, Sb, svt, offs_dv, DV, svd)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    lo, mid, hi, cut, skip = _visible(j0, j0 + BN, Lb, right, left, num_global, BM, CAUSAL, False, WINDOWED)
    for g in range(group):
        h = hk * group + g  # int64 like hk (a loop counter is int32 whatever its bounds)
        Qb = Q + b * sqb + h * sqh
        DOb = DO + b * sob + h * soh
        Mb = Mask + b * smb + h * smh
        stat = Lse + b * slb + h * slh
        Db = Delta + b * slb + h * slh
        bh = b * H + h
        # fmt: off
        # Causal without a window: the query blocks [lo, mid) hold the diagonal, those above it see every key.
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qb, DOb, Mb, stat, Db, q0, lo, mid, cut, skip, offs_n, Lb, Sb, sqt, sqd,
                              sot, sod, sml, sms, slt, offs_d, D, offs_dv, DV, scale, left, right, num_global,
                              dropout_p, keep_scale, seed_lo, seed_hi, bh, CAUSAL, WINDOWED, MASK_KIND, DROPOUT, PREC,
                              BM)
        if CAUSAL and not WINDOWED:
            dk, dv = _dkdv_blocks(dk, dv, k, v, Qb, DOb, Mb, stat, Db, q0, mid, hi, cut, skip, offs_n, Lb, Sb, sqt,
                                  sqd, sot, sod, sml, sms, slt, offs_d, D, offs_dv, DV, scale, left, right,
                                  num_global, dropout_p, keep_scale, seed_lo, seed_hi, bh, False, False, MASK_KIND,
                                  DROPOUT, PREC, BM)
        # fmt: on
    _store_tile(DK + b * skb + hk * skh, dk * scale, k0, offs_n, Sb, skt, offs_d, D, skd)
    _store_tile(DV_ + b * svb + hk * svh, dv, k0, offs_n, Sb, svt, offs_dv, DV, svd)


@triton.jit
def _dq_blocks(
    dq, q, do, m, log_l, delta, Kb, Vb, Mb, DMb, k0, lo, hi, cut, skip, offs_m, Lb, Sb, S, skt, skd, svt, svd, sml, sms,
    offs_d, D, offs_dv, DV, scale, left, right, num_global, dropout_p, keep_scale, seed_lo, seed_hi, bh,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, BN: tl.constexpr, WRITE_DMASK: tl.constexpr,
):  # fmt: skip
    """dQ of one query block over the key blocks [lo, hi); dS into DMb (rows of S fp32) if asked."""
    for t in range(lo, hi, BN):
        j0 = _block_start(t, cut, skip, WINDOWED)
        offs_n = j0 + tl.arange(0, BN)
        k = _load_tile(Kb, k0, offs_n, Sb, skt, offs_d, D, skd)
        v = _load_tile(Vb, k0, offs_n, Sb, svt, offs_dv, DV, svd)
        mptrs = _mask_ptrs(Mb, offs_m, sml, offs_n, sms)
        s = _scores(
            q, k, offs_m, offs_n, Lb, Sb, scale, mptrs, left, right, num_global, CAUSAL, WINDOWED, MASK_KIND, PREC
        )
        _, ds = _bwd_probs(
            s, m, log_l, delta, do, v, offs_m, offs_n, bh, dropout_p, keep_scale, seed_lo, seed_hi, DROPOUT, PREC
        )
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if WRITE_DMASK:
            tl.store(_mask_ptrs(DMb, offs_m, S, offs_n, 1), ds, mask=(offs_m < Lb)[:, None] & (offs_n < Sb)[None, :])
    return dq


@triton.autotune(configs=_configs("dq"), key=_KEY, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Mask, CuQ, CuK, DO, Lse, Delta, DQ, DMask,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smh, sml, sms, slb, slh, slt,
    H, group, L, S, D, DV, scale, left, right, num_global, dropout_p, keep_scale, seed_lo, seed_hi, L_BUCKET, S_BUCKET,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, WRITE_DMASK: tl.constexpr,
):  # fmt: skip
    """dQ (laid out like Q) of one query block; dS into DMask (contiguous (B, H, L, S) fp32) if asked."""
    i0, b, h = _program(L, BM, H, CAUSAL)
    hk = h // group
    q0, Lb = _seq(CuQ, b, L, VARLEN)
    k0, Sb = _seq(CuK, b, S, VARLEN)
    if i0 >= Lb:
        return
    offs_m = i0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    rows = offs_m < Lb
    q = _load_tile(Q + b * sqb + h * sqh, q0, offs_m, Lb, sqt, offs_d, D, sqd)
    do = _load_tile(DO + b * sob + h * soh, q0, offs_m, Lb, sot, offs_dv, DV, sod)
    row_off = b * slb + h * slh + (q0 + offs_m).to(tl.int64) * slt
    m = tl.load(Lse + row_off, mask=rows, other=float("inf"))
    log_l = tl.load(Lse + row_off + 1, mask=rows, other=0.0)
    delta = tl.load(Delta + row_off, mask=rows, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    bh = b * H + h
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    Mb = Mask + b * smb + h * smh
    DMb = DMask + bh * L * S
    lo, mid, hi, cut, skip = _visible(i0, i0 + BM, Sb, left, right, num_global, BN, CAUSAL, True, WINDOWED)
    # fmt: off
    dq = _dq_blocks(dq, q, do, m, log_l, delta, Kb, Vb, Mb, DMb, k0, lo, mid, cut, skip, offs_m, Lb, Sb, S, skt, skd,
                    svt, svd, sml, sms, offs_d, D, offs_dv, DV, scale, left, right, num_global, dropout_p, keep_scale,
                    seed_lo, seed_hi, bh, CAUSAL and WINDOWED, WINDOWED, MASK_KIND, DROPOUT, PREC, BN, WRITE_DMASK)
    if CAUSAL and not WINDOWED:
        dq = _dq_blocks(dq, q, do, m, log_l, delta, Kb, Vb, Mb, DMb, k0, mid, hi, cut, skip, offs_m, Lb, Sb, S, skt,
                        skd, svt, svd, sml, sms, offs_d, D, offs_dv, DV, scale, left, right, num_global, dropout_p,
                        keep_scale, seed_lo, seed_hi, bh, True, False, MASK_KIND, DROPOUT, PREC, BN, WRITE_DMASK)
    # fmt: on
    _store_tile(DQ + b * sqb + h * sqh, dq * scale, q0, offs_m, Lb, sqt, offs_d, D, sqd)


def _strides4(t: torch.Tensor | None, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a dense (B, H, T, D) or packed (total, H, D) tensor."""
    if varlen:
        return (0, t.stride(1), t.stride(0), t.stride(2))
    return tuple(t.stride())


def _common(
    q, k, v, mask, cu_q, out, lse, max_q, max_k, scale, causal, windowed, left, right, num_global, dropout_p, seed
):
    varlen = cu_q is not None
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    H, Hk = q.shape[-2 if varlen else 1], k.shape[-2 if varlen else 1]
    D, DV = q.shape[-1], v.shape[-1]
    mask_strides = tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)
    lse_strides = (0, lse.stride(0), lse.stride(1)) if varlen else tuple(lse.stride()[:3])  # pairs adjacent
    args = [
        *_strides4(q, varlen),
        *_strides4(k, varlen),
        *_strides4(v, varlen),
        *_strides4(out, varlen),
        *mask_strides,
        *lse_strides,
        H,
        H // Hk,
        max_q,
        max_k,
        D,
        DV,
        scale,
        left,
        right,
        num_global,
        dropout_p,
        1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0,  # keep_scale; p = 1 keeps nothing
        seed & 0x7FFFFFFF,
        seed >> 32,
        triton.next_power_of_2(max_q),
        triton.next_power_of_2(max_k),
    ]
    meta = {
        "CAUSAL": causal,
        "WINDOWED": windowed,
        "MASK_KIND": 0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        "VARLEN": varlen,
        "DROPOUT": dropout_p > 0.0,
        "PREC": precision(q.dtype),
        "BD": max(16, triton.next_power_of_2(D)),
        "BDV": max(16, triton.next_power_of_2(DV)),
    }
    return batch, H, Hk, args, meta


def precision(dtype: torch.dtype) -> str:
    """The dots' input precision. fp16 / bf16 run on tensor cores either way; fp32 uses TF32 where torch's
    matmuls may (torch.backends.cuda.matmul.allow_tf32), else IEEE fp32 products on smaller tiles (IEEE_TILES)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _optional(dummy: torch.Tensor, *ts: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """ts with dummy standing in for the absent ones (pointers the kernel never dereferences)."""
    return tuple(dummy if t is None else t for t in ts)


def attention_fwd(
    q,
    k,
    v,
    mask,
    cu_q,
    cu_k,
    out,
    lse,
    max_len_q,
    max_len_k,
    scale,
    causal,
    windowed,
    left,
    right,
    num_global,
    dropout_p,
    seed,
):
    """Fills out and lse (see mmkern.ops._attention_op._attention_op)."""
    batch, H, _, args, meta = _common(
        q,
        k,
        v,
        mask,
        cu_q,
        out,
        lse,
        max_len_q,
        max_len_k,
        scale,
        causal,
        windowed,
        left,
        right,
        num_global,
        dropout_p,
        seed,
    )
    grid = lambda m: (triton.cdiv(max_len_q, m["BM"]) * batch * H,)
    _attention_fwd_kernel[grid](q, k, v, *_optional(lse, mask, cu_q, cu_k), out, lse, *args, **meta)


def attention_bwd(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    mask,
    cu_q,
    cu_k,
    dq,
    dk,
    dv,
    dmask,
    max_len_q,
    max_len_k,
    scale,
    causal,
    windowed,
    left,
    right,
    num_global,
    dropout_p,
    seed,
):
    """Fills dq, dk, dv (contiguous, like q, k, v) and dmask when given."""
    row_delta = (grad_out.float() * out.float()).sum(-1)
    delta = torch.empty_like(lse)  # laid out like the statistics, in their first slot
    delta[..., 0] = row_delta.t() if cu_q is not None else row_delta
    batch, H, Hk, args, meta = _common(
        q,
        k,
        v,
        mask,
        cu_q,
        grad_out,
        lse,
        max_len_q,
        max_len_k,
        scale,
        causal,
        windowed,
        left,
        right,
        num_global,
        dropout_p,
        seed,
    )
    ptrs = _optional(lse, mask, cu_q, cu_k)
    # dK/dV share q/k/v strides with their inputs only if those are contiguous too: pass contiguous inputs.
    grid_kv = lambda m: (triton.cdiv(max_len_k, m["BN"]) * batch * Hk,)
    _attention_bwd_dkdv_kernel[grid_kv](q, k, v, *ptrs, grad_out, lse, delta, dk, dv, *args, **meta)
    grid_q = lambda m: (triton.cdiv(max_len_q, m["BM"]) * batch * H,)
    _attention_bwd_dq_kernel[grid_q](
        q, k, v, *ptrs, grad_out, lse, delta, dq, *_optional(lse, dmask), *args, **meta, WRITE_DMASK=dmask is not None
    )
