"""Triton kernels of the memory-flat contrastive losses (see mmkern/ops/contrastive.py for the math).

One forward kernel reduces rows of z = s·A·Bᵀ + b to statistics (online-max LSE and its d/ds, or SigLIP
sums); CLIP's column statistics are the same kernel with A and B swapped, so no cross-program merge or
atomics are needed. One backward kernel gives dA = G·B for the rows it owns, with G = ∂L/∂z recomputed per
tile from the saved LSEs; dX and dY are two launches with the roles swapped. Each program owns its output
rows, so results are deterministic. dA is accumulated in the fp32 output in global memory (a program's rows
stay in L2), because a (BLOCK_M, D) accumulator does not fit in registers for D = 512..1024.

fp32 inputs use IEEE fp32 dots (TF32 would cost ~3 digits at s = 100); fp16/bf16 inputs use tensor-core dots
with fp32 accumulation, and G (tiny for large B) goes into the backward dot as TF32, not fp16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Term kinds of G for the rows of A (own) and of B (other): none, softmax against that side's LSE,
# sigmoid weighted by that side's row weights.
NONE, SOFTMAX, SIGMOID = 0, 1, 2


@triton.jit
def _logits(
    a_ptr,
    b_ptr,
    rows,
    cols,
    M,
    N,
    D,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a  # 64-bit: row * stride passes 2^31 for big batches
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_rows + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < D), other=0.0)
        b = tl.load(b_rows + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < D), other=0.0)
        d += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return d


@triton.jit
def _sigmoid_grad(z, pos):
    # -sigmoid(-z) for positives (no cancellation against 1), sigmoid(z) for negatives.
    return tl.where(pos, -1.0 / (1.0 + tl.exp(z)), 1.0 / (1.0 + tl.exp(-z)))


@triton.jit
def _contrastive_fwd_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    sb_ptr,
    M,
    N,
    D,
    stride_a,
    stride_b,
    SIGMOID_MODE: tl.constexpr,
    DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.load(sb_ptr)
    bias = tl.load(sb_ptr + 1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    e = tl.zeros((BLOCK_M,), tl.float32)
    g = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols[None, :] < N
        d = _logits(a_ptr, b_ptr, rows, cols, M, N, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        z = s * d + bias
        if SIGMOID_MODE:
            pos = (rows[:, None] == cols[None, :]) & DIAG
            zz = tl.where(pos, -z, z)
            sp = tl.maximum(zz, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zz)))
            sg = _sigmoid_grad(z, pos)
            l += tl.sum(tl.where(valid, sp, 0.0), axis=1)
            e += tl.sum(tl.where(valid, sg * d, 0.0), axis=1)
            g += tl.sum(tl.where(valid, sg, 0.0), axis=1)
        else:  # with DIAG the positives stay out: LSE over the negatives (see mmkern/contrastive.h)
            z = tl.where(valid & ~((rows[:, None] == cols[None, :]) & DIAG), z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
            p = tl.exp(z - tl.where(m_new == float("-inf"), 0.0, m_new)[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            e = e * alpha + tl.sum(p * d, axis=1)
            m = m_new
    ok = rows < M
    if SIGMOID_MODE:
        tl.store(out_ptr + rows, l, mask=ok)
        tl.store(out_ptr + M + rows, e, mask=ok)
        tl.store(out_ptr + 2 * M + rows, g, mask=ok)
    else:
        tl.store(out_ptr + rows, m + tl.log(l), mask=ok)
        tl.store(out_ptr + M + rows, tl.where(l > 0.0, e / l, 0.0), mask=ok)
        tl.store(out_ptr + 2 * M + rows, tl.full((BLOCK_M,), 1.0, tl.float32), mask=ok)


@triton.jit
def _contrastive_bwd_kernel(
    a_ptr,
    b_ptr,
    da_ptr,
    sb_ptr,
    lse_a_ptr,
    g_a_ptr,
    lse_b_ptr,
    g_b_ptr,
    M,
    N,
    D,
    stride_a,
    stride_b,
    TERM_A: tl.constexpr,
    TERM_B: tl.constexpr,
    DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    s = tl.load(sb_ptr)
    bias = tl.load(sb_ptr + 1)
    da_rows = da_ptr + rows.to(tl.int64)[:, None] * D
    lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0)
    g_a = tl.load(g_a_ptr + rows, mask=row_ok, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        d = _logits(a_ptr, b_ptr, rows, cols, M, N, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        z = s * d + bias
        pos = (rows[:, None] == cols[None, :]) & DIAG
        G = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if TERM_A == 1:
            G += g_a[:, None] * tl.exp(z - lse_a[:, None])
        if TERM_A == 2:
            G += g_a[:, None] * _sigmoid_grad(z, pos)
        if TERM_B != 0:
            lse_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=0.0)
            g_b = tl.load(g_b_ptr + cols, mask=col_ok, other=0.0)
            if TERM_B == 1:
                G += g_b[None, :] * tl.exp(z - lse_b[None, :])
            else:
                G += g_b[None, :] * _sigmoid_grad(z, pos)
        if TERM_A != 2 and TERM_B != 2:  # softmax positives (DIAG) are not part of G: the caller adds theirs
            G = tl.where(pos, 0.0, G)
        G = tl.where(row_ok[:, None] & col_ok[None, :], G, 0.0)
        b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            b = tl.load(b_rows + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < D), other=0.0).to(tl.float32)
            out = da_rows + ks[None, :]
            out_ok = row_ok[:, None] & (ks[None, :] < D)
            acc = tl.load(out, mask=out_ok, other=0.0)
            acc += tl.dot(G, b, input_precision=PRECISION)
            tl.store(out, acc, mask=out_ok)


def _config(x: torch.Tensor) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _sb(scale, bias, device):
    return torch.stack([scale.float(), bias.float()]).to(device).contiguous()


def _row_stats(a, b, sb, sigmoid, diag, out):
    M, D = a.shape
    cfg = _config(a)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _contrastive_fwd_kernel[grid](
        a, b, out, sb, M, b.shape[0], D, a.stride(0), b.stride(0), sigmoid, diag, PRECISION=_precision(a), **cfg
    )


def contrastive_fwd(x, y, scale, bias, mode, diagonal, rows, cols):
    """Fills rows (3, B) and, for CLIP (mode 1), cols (2, K) with the statistics; x (B, D), y (K, D) contiguous."""
    sb = _sb(scale, bias, x.device)
    _row_stats(x, y, sb, mode == 2, diagonal, rows)
    if mode == 1:
        tmp = torch.empty((3, y.shape[0]), dtype=torch.float32, device=x.device)
        _row_stats(y, x, sb, False, diagonal, tmp)
        cols.copy_(tmp[:2])


def _grad(a, b, sb, lse_a, g_a, lse_b, g_b, term_a, term_b, diag, da):
    M, D = a.shape
    cfg = _config(a)
    dummy = torch.zeros(1, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    # The backward dot takes G in fp32: for fp16/bf16 features TF32 keeps G's range (G ~ 1/B).
    _contrastive_bwd_kernel[grid](
        a,
        b,
        da,
        sb,
        lse_a if lse_a is not None else dummy,
        g_a if g_a is not None else dummy,
        lse_b if lse_b is not None else dummy,
        g_b if g_b is not None else dummy,
        M,
        b.shape[0],
        D,
        a.stride(0),
        b.stride(0),
        term_a,
        term_b,
        diag,
        PRECISION=_precision(a),
        **cfg,
    )


def contrastive_bwd(x, y, scale, bias, mode, diagonal, row_lse, col_lse, gr, gc, dx, dy):
    """dx (B, D) += G·Y and dy (K, D) += Gᵀ·X in fp32 for G = ∂L/∂z (see mmkern/ops/contrastive.py)."""
    sb = _sb(scale, bias, x.device)
    if mode == 2:
        _grad(x, y, sb, None, gr, None, None, SIGMOID, NONE, diagonal, dx)
        _grad(y, x, sb, None, None, None, gr, NONE, SIGMOID, diagonal, dy)
    elif mode == 1:
        _grad(x, y, sb, row_lse, gr, col_lse, gc, SOFTMAX, SOFTMAX, diagonal, dx)
        _grad(y, x, sb, col_lse, gc, row_lse, gr, SOFTMAX, SOFTMAX, diagonal, dy)
    else:
        _grad(x, y, sb, row_lse, gr, None, None, SOFTMAX, NONE, diagonal, dx)
        _grad(y, x, sb, None, None, row_lse, gr, NONE, SOFTMAX, diagonal, dy)
