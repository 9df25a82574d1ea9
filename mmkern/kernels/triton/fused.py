"""Triton kernels of the fused element-wise ops (see mmkern/ops/fused.py for the math).

bias + GELU runs over (BLOCK_M, BLOCK_N) tiles of the (rows, N) view; its backward writes grad_x and one fp32
partial bias gradient per row tile, which the launcher sums. add + LayerNorm gives each program BLOCK_M whole
rows (BLOCK_D >= D); its backward accumulates the weight / bias gradients of its rows in registers and writes
one fp32 partial per program. GELU uses the same formulas as the CPU and CUDA kernels
(csrc/include/mmkern/fused.h): Φ from erfc(|x|/√2) = t·exp(-z²)·Q(t), tanh GELU as x·σ(2u).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cdf_pdf(x):
    z = tl.abs(x) * 0.70710678118654752
    t = 1.0 / (1.0 + 0.4 * z)
    q = 0.050189096 * t - 0.18262291
    q = q * t + 0.1686568
    q = q * t - 0.0052670646
    q = q * t + 0.14128326
    q = q * t + 0.16857648
    q = q * t + 0.20783883
    q = q * t + 0.22566976
    q = q * t + 0.22567587
    e = tl.exp(-z * z)
    half_erfc = 0.5 * t * e * q
    cdf = tl.where(x < 0.0, half_erfc, 1.0 - half_erfc)
    return cdf, 0.39894228040143268 * e


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        v = 1.5957691216057308 * (x + 0.044715 * x * x * x)
        return x / (1.0 + tl.exp(-v))
    else:
        cdf, _ = _cdf_pdf(x)
        return x * cdf


@triton.jit
def _gelu_grad(x, TANH: tl.constexpr):
    if TANH:
        x2 = x * x
        v = 1.5957691216057308 * (x + 0.044715 * x2 * x)
        e = tl.exp(-v)
        s = 1.0 / (1.0 + e)
        one_minus_s = tl.where(v < 0.0, 1.0 - s, s * e)
        dv = 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * x2)
        return s + x * s * one_minus_s * dv
    else:
        cdf, pdf = _cdf_pdf(x)
        return cdf + x * pdf


@triton.jit
def _bias_gelu_fwd_kernel(
    x, bias, out, M, N, sx_m, sx_n, s_b, so_m,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rm = rm.to(tl.int64)  # row * stride passes 2^31 past 2^31 elements (ViT-B's GELU input at batch 4096)
    v = tl.load(x + rm[:, None] * sx_m + rn[None, :] * sx_n, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias + rn * s_b, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = _gelu(v, TANH)
    tl.store(out + rm[:, None] * so_m + rn[None, :], y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    go, x, bias, gx, partial, M, N, sg_m, sg_n, sx_m, sx_n, s_b, sgx_m,
    HAS_BIAS: tl.constexpr, NEED_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rm = rm.to(tl.int64)
    v = tl.load(x + rm[:, None] * sx_m + rn[None, :] * sx_n, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias + rn * s_b, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    g = tl.load(go + rm[:, None] * sg_m + rn[None, :] * sg_n, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, g * _gelu_grad(v, TANH), 0.0)
    tl.store(gx + rm[:, None] * sgx_m + rn[None, :], d.to(gx.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.store(partial + pid_m.to(tl.int64) * N + rn, tl.sum(d, axis=0), mask=rn < N)


def _tiles(M, N):
    block_n = min(128, triton.next_power_of_2(max(N, 1)))
    block_m = max(1, min(64, 4096 // block_n, triton.next_power_of_2(max(M, 1))))
    return block_m, block_n


def bias_gelu_fwd(x, bias, out, kind):
    """x (M, N) any strides, bias (N,) or None, out (M, N) row-contiguous; kind 0 erf, 1 tanh."""
    M, N = x.shape
    bm, bn = _tiles(M, N)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    b = bias if bias is not None else x
    _bias_gelu_fwd_kernel[grid](
        x, b, out, M, N, x.stride(0), x.stride(1), b.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, TANH=kind == 1, BLOCK_M=bm, BLOCK_N=bn,
    )  # fmt: skip


def bias_gelu_bwd(grad_out, x, bias, grad_x, grad_bias, kind):
    """grad_x (M, N) row-contiguous; grad_bias fp32 (N,) or None (then not computed)."""
    M, N = x.shape
    bm, bn = _tiles(M, N)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    partial = torch.empty(grid[0] * N if grad_bias is not None else 1, dtype=torch.float32, device=x.device)
    b = bias if bias is not None else x
    _bias_gelu_bwd_kernel[grid](
        grad_out, x, b, grad_x, partial, M, N, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        b.stride(0), grad_x.stride(0),
        HAS_BIAS=bias is not None, NEED_BIAS=grad_bias is not None, TANH=kind == 1, BLOCK_M=bm, BLOCK_N=bn,
    )  # fmt: skip
    if grad_bias is not None:
        grad_bias.copy_(partial.view(grid[0], N).sum(dim=0))


@triton.jit
def _add_ln_fwd_kernel(
    x, r, w, b, s, out, mean, rstd, M, D, eps, sx_m, sx_d, sr_m, sr_d, s_w, s_b, ss_m, so_m,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    mask = (rm[:, None] < M) & dmask[None, :]
    v = tl.load(x + rm[:, None] * sx_m + rd[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(r + rm[:, None] * sr_m + rd[None, :] * sr_d, mask=mask, other=0.0).to(tl.float32)
        rounded = v.to(s.dtype.element_ty)  # normalise the sum as stored, like the unfused add
        tl.store(s + rm[:, None] * ss_m + rd[None, :], rounded, mask=mask)
        v = rounded.to(tl.float32)
    mu = tl.sum(v, axis=1) / D
    # The first pass's mean corrected in the second, as the CPU kernel does (fused.cpp, row_sq_dev): mu += Σ(s - mu)/D
    # and Σ(s - mu')² = Σ(s - mu)² - (Σ(s - mu))²/D; its rounding would otherwise reach x̂ times rstd (|mean| >> std).
    c = tl.where(mask, v - mu[:, None], 0.0)
    dev = tl.sum(c, axis=1)
    mu += dev / D
    rs = 1.0 / tl.sqrt(tl.maximum(tl.sum(c * c, axis=1) - dev * dev / D, 0.0) / D + eps)
    y = tl.where(mask, v - mu[:, None], 0.0) * rs[:, None]
    if HAS_W:
        y *= tl.load(w + rd * s_w, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(b + rd * s_b, mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None] * so_m + rd[None, :], y.to(out.dtype.element_ty), mask=mask)
    tl.store(mean + rm, mu, mask=rm < M)
    tl.store(rstd + rm, rs, mask=rm < M)


@triton.jit
def _add_ln_bwd_kernel(
    go, gs, s, w, mean, rstd, gx, pw, pb, M, D, sg_m, sg_d, sgs_m, sgs_d, ss_m, ss_d, s_w, sgx_m, rows_per_prog,
    HAS_GS: tl.constexpr, HAS_W: tl.constexpr, NEED_PARAMS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    if HAS_W:
        wv = tl.load(w + rd * s_w, mask=dmask, other=0.0).to(tl.float32)
    else:
        wv = tl.where(dmask, 1.0, 0.0)
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_M):
        rm = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = (rm < M) & (rm < (pid + 1) * rows_per_prog)
        mask = rmask[:, None] & dmask[None, :]
        mu = tl.load(mean + rm, mask=rmask, other=0.0)
        rs = tl.load(rstd + rm, mask=rmask, other=0.0)
        xh = (tl.load(s + rm[:, None] * ss_m + rd[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)
              - mu[:, None]) * rs[:, None]  # fmt: skip
        xh = tl.where(mask, xh, 0.0)
        g_o = tl.load(go + rm[:, None] * sg_m + rd[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        g = g_o * wv[None, :]
        mg = tl.sum(g, axis=1) / D
        mgx = tl.sum(g * xh, axis=1) / D
        d = rs[:, None] * (g - mg[:, None] - xh * mgx[:, None])
        if HAS_GS:
            d += tl.load(gs + rm[:, None] * sgs_m + rd[None, :] * sgs_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx + rm[:, None] * sgx_m + rd[None, :], d.to(gx.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            acc_w += tl.sum(g_o * xh, axis=0)
            acc_b += tl.sum(g_o, axis=0)
    if NEED_PARAMS:
        tl.store(pw + pid.to(tl.int64) * D + rd, acc_w, mask=dmask)
        tl.store(pb + pid.to(tl.int64) * D + rd, acc_b, mask=dmask)


def _ln_block(M, D):
    block_d = triton.next_power_of_2(max(D, 1))
    return max(1, min(16, 4096 // block_d, triton.next_power_of_2(max(M, 1)))), block_d


def add_layer_norm_fwd(x, residual, weight, bias, sum_out, out, mean, rstd, eps):
    """x, residual (M, D) any strides; sum_out (or None), out (M, D) row-contiguous; mean, rstd fp32 (M,)."""
    M, D = x.shape
    bm, bd = _ln_block(M, D)
    r = residual if residual is not None else x
    s = sum_out if sum_out is not None else out
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    _add_ln_fwd_kernel[(triton.cdiv(M, bm),)](
        x, r, w, b, s, out, mean, rstd, M, D, eps, x.stride(0), x.stride(1), r.stride(0), r.stride(1),
        w.stride(0), b.stride(0), s.stride(0), out.stride(0),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=bm, BLOCK_D=bd,
    )  # fmt: skip


def add_layer_norm_bwd(grad_out, grad_sum, s, weight, mean, rstd, grad_x, grad_weight, grad_bias):
    """grad_x (M, D) row-contiguous; grad_weight, grad_bias fp32 (D,) or None (then not computed)."""
    M, D = s.shape
    bm, bd = _ln_block(M, D)
    programs = max(1, min(triton.cdiv(M, bm), 256))
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs), bm) * bm
    programs = triton.cdiv(M, rows_per_prog)
    need = grad_weight is not None or grad_bias is not None
    pw = torch.empty(programs * D if need else 1, dtype=torch.float32, device=s.device)
    pb = torch.empty_like(pw)
    gs = grad_sum if grad_sum is not None else grad_out
    w = weight if weight is not None else s
    _add_ln_bwd_kernel[(programs,)](
        grad_out, gs, s, w, mean, rstd, grad_x, pw, pb, M, D, grad_out.stride(0), grad_out.stride(1),
        gs.stride(0), gs.stride(1), s.stride(0), s.stride(1), w.stride(0), grad_x.stride(0), rows_per_prog,
        HAS_GS=grad_sum is not None, HAS_W=weight is not None, NEED_PARAMS=need, BLOCK_M=bm, BLOCK_D=bd,
    )  # fmt: skip
    if grad_weight is not None:
        grad_weight.copy_(pw.view(programs, D).sum(dim=0))
    if grad_bias is not None:
        grad_bias.copy_(pb.view(programs, D).sum(dim=0))
