"""Triton kernels of RMSNorm with an optional residual add (see mmkern/ops/rms_norm.py for the math).

Each program takes BLOCK_M whole rows (BLOCK_D >= D). The backward accumulates the weight gradient of its rows in
registers and writes one fp32 partial per program, which the launcher sums (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(
    x, r, w, s, out, rstd, M, D, eps, sx_m, sx_d, sr_m, sr_d, s_w, ss_m, so_m,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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
    rs = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / D + eps)
    y = v * rs[:, None]
    if HAS_W:
        y *= tl.load(w + rd * s_w, mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None] * so_m + rd[None, :], y.to(out.dtype.element_ty), mask=mask)
    tl.store(rstd + rm, rs, mask=rm < M)


@triton.jit
def _rms_norm_bwd_kernel(
    go, gs, s, w, rstd, gx, pw, M, D, sg_m, sg_d, sgs_m, sgs_d, ss_m, ss_d, s_w, sgx_m, rows_per_prog,
    HAS_GS: tl.constexpr, HAS_W: tl.constexpr, NEED_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    if HAS_W:
        wv = tl.load(w + rd * s_w, mask=dmask, other=0.0).to(tl.float32)
    else:
        wv = tl.where(dmask, 1.0, 0.0)
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_M):
        rm = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = (rm < M) & (rm < (pid + 1) * rows_per_prog)
        mask = rmask[:, None] & dmask[None, :]
        rs = tl.load(rstd + rm, mask=rmask, other=0.0)
        xh = tl.load(s + rm[:, None] * ss_m + rd[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32) * rs[:, None]
        g_o = tl.load(go + rm[:, None] * sg_m + rd[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        g = g_o * wv[None, :]
        mgx = tl.sum(g * xh, axis=1) / D
        d = rs[:, None] * (g - xh * mgx[:, None])
        if HAS_GS:
            d += tl.load(gs + rm[:, None] * sgs_m + rd[None, :] * sgs_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx + rm[:, None] * sgx_m + rd[None, :], d.to(gx.dtype.element_ty), mask=mask)
        if NEED_W:
            acc_w += tl.sum(g_o * xh, axis=0)
    if NEED_W:
        tl.store(pw + pid.to(tl.int64) * D + rd, acc_w, mask=dmask)


def _block(M, D):
    block_d = triton.next_power_of_2(max(D, 1))
    return max(1, min(16, 4096 // block_d, triton.next_power_of_2(max(M, 1)))), block_d


def rms_norm_fwd(x, residual, weight, sum_out, out, rstd, eps):
    """x, residual (M, D) any strides; sum_out (or None), out (M, D) row-contiguous; rstd fp32 (M,)."""
    M, D = x.shape
    bm, bd = _block(M, D)
    r = residual if residual is not None else x
    s = sum_out if sum_out is not None else out
    w = weight if weight is not None else x
    _rms_norm_fwd_kernel[(triton.cdiv(M, bm),)](
        x, r, w, s, out, rstd, M, D, eps, x.stride(0), x.stride(1), r.stride(0), r.stride(1), w.stride(0),
        s.stride(0), out.stride(0),
        HAS_RES=residual is not None, HAS_W=weight is not None, BLOCK_M=bm, BLOCK_D=bd,
    )  # fmt: skip


def rms_norm_bwd(grad_out, grad_sum, s, weight, rstd, grad_x, grad_weight):
    """grad_x (M, D) row-contiguous; grad_weight fp32 (D,) or None (then not computed)."""
    M, D = s.shape
    bm, bd = _block(M, D)
    programs = max(1, min(triton.cdiv(M, bm), 256))
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs), bm) * bm
    programs = triton.cdiv(M, rows_per_prog)
    pw = torch.empty(programs * D if grad_weight is not None else 1, dtype=torch.float32, device=s.device)
    gs = grad_sum if grad_sum is not None else grad_out
    w = weight if weight is not None else s
    _rms_norm_bwd_kernel[(programs,)](
        grad_out, gs, s, w, rstd, grad_x, pw, M, D, grad_out.stride(0), grad_out.stride(1), gs.stride(0),
        gs.stride(1), s.stride(0), s.stride(1), w.stride(0), grad_x.stride(0), rows_per_prog,
        HAS_GS=grad_sum is not None, HAS_W=weight is not None, NEED_W=grad_weight is not None, BLOCK_M=bm,
        BLOCK_D=bd,
    )  # fmt: skip
    if grad_weight is not None:
        grad_weight.copy_(pw.view(programs, D).sum(dim=0))
