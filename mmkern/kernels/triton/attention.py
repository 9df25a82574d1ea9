"""Triton flash attention, forward and backward (see mmkern.ops.attention for the semantics).

Forward: one program per (query block, batch·head); key blocks stream past with an online softmax
(running max m, sum l), out = acc / l and the row statistics (m, log l) are stored (the log-sum-exp as a
pair: m + log l in fp32 would drop log l once |m| >= 2^24). Key blocks that no query of the
block can see (causal, window) are never loaded.

Backward, without atomics (so it is deterministic): delta = rowsum(dO ∘ O) is computed first; one kernel
owns a key block and accumulates dK, dV over the query blocks of its head group; another owns a query block
and accumulates dQ (and writes dS as the float mask's gradient). Both recompute P = exp((S - m) - log l).

The visibility rules and the Philox dropout draw mirror csrc/include/mmkern/attention.h exactly, so this
kernel drops the same elements as the CPU kernel for the same seed.
"""

# No `from __future__ import annotations`: triton <= 3.2 then sees the string "tl.constexpr" and misses it.
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(bwd: bool):
    if _INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1)]
    sizes = [(64, 64), (128, 64), (64, 32), (128, 32)] if not bwd else [(64, 64), (32, 64), (64, 32), (32, 32)]
    return [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn in sizes
        for w in (4, 8)
        for s in (2, 3)
    ]


_KEY = ["D", "DV", "CAUSAL", "WINDOWED", "MASK_KIND", "VARLEN", "DROPOUT", "L", "S"]


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
def _block_any(i0, i1, j0, j1, left, right, num_global, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """attn::block_any_visible: False only if no (query, key) pair of the block is visible."""
    ok = True
    if CAUSAL:
        ok = j0 <= i1 - 1
    if WINDOWED:
        ok = ok & ((i0 < num_global) | (j0 < num_global) | ((j1 - 1 >= i0 - left) & (j0 <= i1 - 1 + right)))
    return ok


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
    return base + (t0 + offs_t)[:, None] * st + offs_c[None, :] * sc, (offs_t < n_t)[:, None] & (offs_c < n_c)[None, :]


@triton.jit
def _load_tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc):
    """Tile of rows t0 + offs_t, zero past n_t rows and n_c columns."""
    ptrs, ok = _tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _store_tile(base, x, t0, offs_t, n_t, st, offs_c, n_c, sc):
    ptrs, ok = _tile(base, t0, offs_t, n_t, st, offs_c, n_c, sc)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok)


@triton.autotune(configs=_configs(False), key=_KEY)
@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    CuQ,
    CuK,
    Out,
    Lse,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    smb,
    smh,
    sml,
    sms,
    slb,
    slh,
    slt,
    H,
    group,
    L,
    S,
    D,
    DV,
    scale,
    left,
    right,
    num_global,
    dropout_p,
    keep_scale,
    seed_lo,
    seed_hi,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // group
    q0, Lb = _seq(CuQ, b, L, VARLEN)
    k0, Sb = _seq(CuK, b, S, VARLEN)
    i0 = tl.program_id(0) * BM
    if i0 >= Lb:
        return
    offs_m = i0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = _load_tile(Q + b * sqb + h * sqh, q0, offs_m, Lb, sqt, offs_d, D, sqd)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    hi = Sb
    if CAUSAL:
        hi = tl.minimum(hi, i0 + BM)
    for j0 in range(0, hi, BN):
        if _block_any(i0, i0 + BM, j0, j0 + BN, left, right, num_global, CAUSAL, WINDOWED):
            offs_n = j0 + tl.arange(0, BN)
            k = _load_tile(K + b * skb + hk * skh, k0, offs_n, Sb, skt, offs_d, D, skd)
            mptrs = Mask + b * smb + h * smh + offs_m[:, None] * sml + offs_n[None, :] * sms
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
            v = _load_tile(V + b * svb + hk * svh, k0, offs_n, Sb, svt, offs_dv, DV, svd)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    empty = l_i == 0.0  # rows that see no key give 0 and store (m, log l) = (+inf, 0): attn::row_stat_max
    safe_l = tl.where(empty, 1.0, l_i)
    inv = tl.where(empty, 0.0, 1.0 / safe_l)
    out = acc * inv[:, None]
    _store_tile(Out + b * sob + h * soh, out, q0, offs_m, Lb, sot, offs_dv, DV, sod)
    stat = Lse + b * slb + h * slh + (q0 + offs_m) * slt
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


@triton.autotune(configs=_configs(True), key=_KEY)
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    CuQ,
    CuK,
    DO,
    Lse,
    Delta,
    DK,
    DV_,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    smb,
    smh,
    sml,
    sms,
    slb,
    slh,
    slt,
    H,
    group,
    L,
    S,
    D,
    DV,
    scale,
    left,
    right,
    num_global,
    dropout_p,
    keep_scale,
    seed_lo,
    seed_hi,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """dK, dV (laid out like K, V, strides sk*/sv*) of one key block, summed over its query heads."""
    bhk = tl.program_id(1)
    Hk = H // group
    b = bhk // Hk
    hk = bhk % Hk
    q0, Lb = _seq(CuQ, b, L, VARLEN)
    k0, Sb = _seq(CuK, b, S, VARLEN)
    j0 = tl.program_id(0) * BN
    if j0 >= Sb:
        return
    offs_n = j0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k = _load_tile(K + b * skb + hk * skh, k0, offs_n, Sb, skt, offs_d, D, skd)
    v = _load_tile(V + b * svb + hk * svh, k0, offs_n, Sb, svt, offs_dv, DV, svd)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    lo = 0
    if CAUSAL:
        lo = j0 // BM * BM
    for h in range(hk * group, hk * group + group):
        for i0 in range(lo, Lb, BM):
            if _block_any(i0, i0 + BM, j0, j0 + BN, left, right, num_global, CAUSAL, WINDOWED):
                offs_m = i0 + tl.arange(0, BM)
                rows = offs_m < Lb
                q = _load_tile(Q + b * sqb + h * sqh, q0, offs_m, Lb, sqt, offs_d, D, sqd)
                do = _load_tile(DO + b * sob + h * soh, q0, offs_m, Lb, sot, offs_dv, DV, sod)
                row_off = b * slb + h * slh + (q0 + offs_m) * slt
                m = tl.load(Lse + row_off, mask=rows, other=float("inf"))
                log_l = tl.load(Lse + row_off + 1, mask=rows, other=0.0)
                delta = tl.load(Delta + row_off, mask=rows, other=0.0)
                mptrs = Mask + b * smb + h * smh + offs_m[:, None] * sml + offs_n[None, :] * sms
                s = _scores(
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
                    CAUSAL,
                    WINDOWED,
                    MASK_KIND,
                    PREC,
                )
                pz, ds = _bwd_probs(
                    s,
                    m,
                    log_l,
                    delta,
                    do,
                    v,
                    offs_m,
                    offs_n,
                    b * H + h,
                    dropout_p,
                    keep_scale,
                    seed_lo,
                    seed_hi,
                    DROPOUT,
                    PREC,
                )
                dv += tl.dot(tl.trans(pz).to(do.dtype), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    _store_tile(DK + b * skb + hk * skh, dk * scale, k0, offs_n, Sb, skt, offs_d, D, skd)
    _store_tile(DV_ + b * svb + hk * svh, dv, k0, offs_n, Sb, svt, offs_dv, DV, svd)


@triton.autotune(configs=_configs(True), key=_KEY)
@triton.jit
def _attention_bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    CuQ,
    CuK,
    DO,
    Lse,
    Delta,
    DQ,
    DMask,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    smb,
    smh,
    sml,
    sms,
    slb,
    slh,
    slt,
    H,
    group,
    L,
    S,
    D,
    DV,
    scale,
    left,
    right,
    num_global,
    dropout_p,
    keep_scale,
    seed_lo,
    seed_hi,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    WRITE_DMASK: tl.constexpr,
):
    """dQ (laid out like Q) of one query block; dS into DMask (contiguous (B, H, L, S) fp32) if asked."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // group
    q0, Lb = _seq(CuQ, b, L, VARLEN)
    k0, Sb = _seq(CuK, b, S, VARLEN)
    i0 = tl.program_id(0) * BM
    if i0 >= Lb:
        return
    offs_m = i0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    rows = offs_m < Lb
    q = _load_tile(Q + b * sqb + h * sqh, q0, offs_m, Lb, sqt, offs_d, D, sqd)
    do = _load_tile(DO + b * sob + h * soh, q0, offs_m, Lb, sot, offs_dv, DV, sod)
    row_off = b * slb + h * slh + (q0 + offs_m) * slt
    m = tl.load(Lse + row_off, mask=rows, other=float("inf"))
    log_l = tl.load(Lse + row_off + 1, mask=rows, other=0.0)
    delta = tl.load(Delta + row_off, mask=rows, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    hi = Sb
    if CAUSAL:
        hi = tl.minimum(hi, i0 + BM)
    for j0 in range(0, hi, BN):
        if _block_any(i0, i0 + BM, j0, j0 + BN, left, right, num_global, CAUSAL, WINDOWED):
            offs_n = j0 + tl.arange(0, BN)
            k = _load_tile(K + b * skb + hk * skh, k0, offs_n, Sb, skt, offs_d, D, skd)
            v = _load_tile(V + b * svb + hk * svh, k0, offs_n, Sb, svt, offs_dv, DV, svd)
            mptrs = Mask + b * smb + h * smh + offs_m[:, None] * sml + offs_n[None, :] * sms
            s = _scores(
                q, k, offs_m, offs_n, Lb, Sb, scale, mptrs, left, right, num_global, CAUSAL, WINDOWED, MASK_KIND, PREC
            )
            _, ds = _bwd_probs(
                s, m, log_l, delta, do, v, offs_m, offs_n, bh, dropout_p, keep_scale, seed_lo, seed_hi, DROPOUT, PREC
            )
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            if WRITE_DMASK:
                tl.store(
                    DMask + ((b * H + h) * L + offs_m[:, None]) * S + offs_n[None, :],
                    ds,
                    mask=rows[:, None] & (offs_n < Sb)[None, :],
                )
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
    ]
    meta = {
        "CAUSAL": causal,
        "WINDOWED": windowed,
        "MASK_KIND": 0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        "VARLEN": varlen,
        "DROPOUT": dropout_p > 0.0,
        "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "BD": max(16, triton.next_power_of_2(D)),
        "BDV": max(16, triton.next_power_of_2(DV)),
    }
    return batch, H, Hk, args, meta


def _optional(dummy: torch.Tensor, *ts: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """ts with dummy standing in for the absent ones (pointers the kernel never dereferences)."""
    return tuple(dummy if t is None else t for t in ts)


def attention_fwd(
    q, k, v, mask, cu_q, cu_k, out, lse, max_q, max_k, scale, causal, windowed, left, right, num_global, dropout_p, seed
):
    """Fills out and lse (see mmkern.ops.attention._attention_op)."""
    batch, H, _, args, meta = _common(
        q, k, v, mask, cu_q, out, lse, max_q, max_k, scale, causal, windowed, left, right, num_global, dropout_p, seed
    )
    grid = lambda m: (triton.cdiv(max_q, m["BM"]), batch * H)
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
    max_q,
    max_k,
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
        max_q,
        max_k,
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
    grid_kv = lambda m: (triton.cdiv(max_k, m["BN"]), batch * Hk)
    _attention_bwd_dkdv_kernel[grid_kv](q, k, v, *ptrs, grad_out, lse, delta, dk, dv, *args, **meta)
    grid_q = lambda m: (triton.cdiv(max_q, m["BM"]), batch * H)
    _attention_bwd_dq_kernel[grid_q](
        q, k, v, *ptrs, grad_out, lse, delta, dq, *_optional(lse, dmask), *args, **meta, WRITE_DMASK=dmask is not None
    )
