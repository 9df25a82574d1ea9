"""Triton patch embedding: the patch gather happens inside the GEMM's tile loads (no im2col buffer).

Forward, over token rows m = b·N + n (patch n = (gy, gx) row-major) and patch elements k = (c, py, px)
in Conv2d weight order:
    out[b, T + n, e] = Σ_k images[b, c, gy·P + py, gx·P + px] · weight[e, k] + bias[e] + pos[T + n, e]
    out[b, t, e]     = prefix[t, e] + pos[t, e]                                    (t < T)
Backward, with G = grad_out[:, T:, :] viewed as (B·N, E):
    grad_weight (E, K) = Gᵀ · patches          (fp32, the caller casts)
    grad_images[patch k of row m] = (G · W)[m, k]   (each pixel belongs to exactly one patch)

Every product accumulates in fp32; fp32 inputs use IEEE products (no TF32) so fp32 results keep fp32
accuracy. Launch tiles are autotuned on a GPU; under TRITON_INTERPRET one small config runs.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(shapes):
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) candidates for GEMMs with a few hundred to a few thousand
# columns; the gathered operand cannot use TMA, so moderate tiles with 3-4 stages do best.
_SHAPES = [
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 256, 32, 8, 3),
]
# The packed kernel's epilogue holds a gathered (BLOCK_M, BLOCK_N) position tile beside the accumulator: ptxas spills
# every tile with 128 columns on sm_80 (`python -m benchmarks.triton_compile --only patch_embed/.*packed`, fp16,
# triton 3.7.1: 128 x 128 x 32 152 B, 128 x 128 x 64 208 B, 64 x 128 152 B; 128 x 256 240 B on sm_90 and 440 B on
# sm_80 with 3.9), so it keeps the 64-column tiles, which spill on neither target.
_PACKED_SHAPES = [s for s in _SHAPES if s[1] == 64]


@triton.jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _patch_element_offsets(k, P: tl.constexpr, s_c, s_y, s_x):
    """Offset of patch element k = (c, py, px) from the patch origin (int64: c * s_c can pass 2^31)."""
    c = (k // (P * P)).to(tl.int64)
    r = k % (P * P)
    return c * s_c + (r // P) * s_y + (r % P) * s_x


@triton.jit
def _patch_origin_offsets(m, N, GW, P: tl.constexpr, s_b, s_y, s_x):
    """Offset of pixel (0, 0) of token row m = b·N + n, in int64 (large batches overflow int32)."""
    b = (m // N).to(tl.int64)
    n = m % N
    return b * s_b + ((n // GW) * P).to(tl.int64) * s_y + ((n % GW) * P).to(tl.int64) * s_x


@triton.autotune(configs=_configs(_SHAPES), key=["M", "E", "K"])
@triton.jit
def _patch_embed_fwd_kernel(
    img, w, bias, pos, out,
    M, E, K, N, GW, T,
    s_ib, s_ic, s_iy, s_ix,
    s_we, s_wc, s_wy, s_wx,
    s_bias, s_pt, s_pe, s_ob, s_ot, s_oe,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < E
    origin = _patch_origin_offsets(rm, N, GW, P, s_ib, s_iy, s_ix)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(
            img + origin[:, None] + _patch_element_offsets(k, P, s_ic, s_iy, s_ix)[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w + rn[None, :] * s_we + _patch_element_offsets(k, P, s_wc, s_wy, s_wx)[:, None],
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = _dot(a, b, acc)
    token = T + rm % N
    if HAS_BIAS:
        acc += tl.load(bias + rn * s_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        acc += tl.load(pos + token[:, None] * s_pt + rn[None, :] * s_pe, mask=mask, other=0.0).to(tl.float32)
    dst = out + (rm // N).to(tl.int64)[:, None] * s_ob + token[:, None] * s_ot + rn[None, :] * s_oe
    tl.store(dst, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_prefix_kernel(
    prefix, pos, out, E, T, s_rt, s_re, s_pt, s_pe, s_ob, s_ot, s_oe,
    HAS_POS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b·T + t
    b = row // T
    t = row % T
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < E
    v = tl.load(prefix + t * s_rt + e * s_re, mask=ok, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(pos + t * s_pt + e * s_pe, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + b.to(tl.int64) * s_ob + t * s_ot + e * s_oe, v.to(out.dtype.element_ty), mask=ok)


@triton.autotune(configs=_configs(_SHAPES), key=["M", "E", "K"])
@triton.jit
def _patch_embed_bwd_images_kernel(
    go, w, gi,
    M, E, K, N, GW, T,
    s_gb, s_gt, s_ge,
    s_we, s_wc, s_wy, s_wx,
    s_ib, s_ic, s_iy, s_ix,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grad_images tile: rows m of G times columns k of W (E, K); the reduction runs over E."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    re = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    g_rows = (rm // N).to(tl.int64) * s_gb + (T + rm % N) * s_gt
    w_cols = _patch_element_offsets(rk, P, s_wc, s_wy, s_wx)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_K):
        e = e0 + re
        e_ok = e < E
        a = tl.load(go + g_rows[:, None] + e[None, :] * s_ge, mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        b = tl.load(w + e[:, None] * s_we + w_cols[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, b, acc)
    origin = _patch_origin_offsets(rm, N, GW, P, s_ib, s_iy, s_ix)
    dst = gi + origin[:, None] + _patch_element_offsets(rk, P, s_ic, s_iy, s_ix)[None, :]
    tl.store(dst, acc.to(gi.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.autotune(configs=_configs(_SHAPES), key=["M", "E", "K"])
@triton.jit
def _patch_embed_bwd_weight_kernel(
    go, img, gw,
    M, E, K, N, GW, T,
    s_gb, s_gt, s_ge,
    s_ib, s_ic, s_iy, s_ix,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grad_weight tile: rows e of Gᵀ times columns k of the patch matrix; the reduction runs over the
    M token rows. grad_weight is fp32 (E, K) contiguous."""
    re = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_K)
    e_ok = re < E
    k_ok = rk < K
    k_offsets = _patch_element_offsets(rk, P, s_ic, s_iy, s_ix)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, M, BLOCK_K):
        r = r0 + rr
        r_ok = r < M
        g_rows = (r // N).to(tl.int64) * s_gb + (T + r % N) * s_gt
        a = tl.load(go + g_rows[None, :] + re[:, None] * s_ge, mask=e_ok[:, None] & r_ok[None, :], other=0.0)
        origin = _patch_origin_offsets(r, N, GW, P, s_ib, s_iy, s_ix)
        b = tl.load(img + origin[:, None] + k_offsets[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, b, acc)
    tl.store(gw + re[:, None] * K + rk[None, :], acc, mask=e_ok[:, None] & k_ok[None, :])


def _grid(rows, cols):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]))


def patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens, out) -> None:
    """Writes out (B, T + N, E) from images (B, C, H, W), weight (E, C, P, P), bias (E,) or None,
    pos_embed (T + N, E) or None, prefix_tokens (T, E) or None; all one dtype (fp32/fp16/bf16)."""
    B, C, H, W = images.shape
    E, _, P, _ = weight.shape
    GW = W // P
    N = (H // P) * GW
    T = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    M, K = B * N, C * P * P
    with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
        if M > 0 and E > 0:
            _patch_embed_fwd_kernel[_grid(M, E)](
                images, weight, bias if bias is not None else out, pos_embed if pos_embed is not None else out, out,
                M, E, K, N, GW, T,
                *images.stride(), *weight.stride(),
                bias.stride(0) if bias is not None else 0,
                *(pos_embed.stride() if pos_embed is not None else (0, 0)),
                *out.stride(),
                P=P, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            )  # fmt: skip
        if T > 0 and B > 0 and E > 0:
            block = min(1024, triton.next_power_of_2(E))
            _patch_embed_prefix_kernel[(B * T, triton.cdiv(E, block))](
                prefix_tokens, pos_embed if pos_embed is not None else out, out, E, T,
                *prefix_tokens.stride(), *(pos_embed.stride() if pos_embed is not None else (0, 0)), *out.stride(),
                HAS_POS=pos_embed is not None, BLOCK=block,
            )  # fmt: skip


def patch_embed_bwd(grad_out, images, weight, num_prefix, grad_images, grad_weight_fp32) -> None:
    """Writes grad_images (B, C, H, W, images' dtype) and grad_weight_fp32 (E, C, P, P, fp32, contiguous),
    each when not None, from grad_out (B, T + N, E) with T = num_prefix."""
    B, C, H, W = images.shape
    E, _, P, _ = weight.shape
    GW = W // P
    N = (H // P) * GW
    M, K = B * N, C * P * P
    with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
        if grad_weight_fp32 is not None:
            if M == 0:
                grad_weight_fp32.zero_()
            elif E > 0 and K > 0:
                _patch_embed_bwd_weight_kernel[_grid(E, K)](
                    grad_out, images, grad_weight_fp32, M, E, K, N, GW, num_prefix,
                    *grad_out.stride(), *images.stride(), P=P,
                )  # fmt: skip
        if grad_images is not None and M > 0 and K > 0:
            if E == 0:
                grad_images.zero_()
                return
            _patch_embed_bwd_images_kernel[_grid(M, K)](
                grad_out, weight, grad_images, M, E, K, N, GW, num_prefix,
                *grad_out.stride(), *weight.stride(), *grad_images.stride(), P=P,
            )  # fmt: skip


# The position grid is `pos`: an argument named `grid` clashes with the launch keyword of triton 3.4.
@triton.autotune(configs=_configs(_PACKED_SHAPES), key=["M", "E", "K"])
@triton.jit
def _patch_embed_packed_fwd_kernel(
    a_ptr, w, bias, pos, tap_ptr, tap_index, tap_weight, out_rows, out,
    M, E, K, MOST_TAPS,
    s_am, s_ak, s_we, s_wk, s_bias, s_gt, s_ge, s_or, s_oe,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Packed patch rows (M, K) times weight (E, K)ᵀ; the epilogue adds bias and the position taps of each row
    (CSR, at most MOST_TAPS per row) and stores row m at out_rows[m]."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < E
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(
            a_ptr + rm.to(tl.int64)[:, None] * s_am + k[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(w + rn[None, :] * s_we + k[:, None] * s_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + rn * s_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        # (BLOCK_M, 1) columns, not (BLOCK_M,) vectors: with vectors triton 3.6's layout pass breaks this loop
        # ("'tt.load' op failed to verify that mask type matches ptr type").
        first = tl.load(tap_ptr + rm[:, None], mask=m_ok[:, None], other=0)
        count = tl.load(tap_ptr + rm[:, None] + 1, mask=m_ok[:, None], other=0) - first
        for s in range(MOST_TAPS):
            t_ok = m_ok[:, None] & (s < count)
            row = tl.load(tap_index + first + s, mask=t_ok, other=0).to(tl.int64)
            tw = tl.load(tap_weight + first + s, mask=t_ok, other=0.0)
            g = tl.load(pos + row * s_gt + rn[None, :] * s_ge, mask=t_ok & n_ok[None, :], other=0.0)
            acc += tw * g.to(tl.float32)
    dst = tl.load(out_rows + rm, mask=m_ok, other=0)
    tl.store(out + dst[:, None] * s_or + rn[None, :] * s_oe, acc.to(out.dtype.element_ty), mask=mask)


def patch_embed_packed_fwd(
    patches, weight, bias, pos_grid, tap_ptr, tap_index, tap_weight, out_rows, out, most_taps
) -> None:
    """Writes the patch rows of out (R, E) from patches (M, K), weight (E, K), bias (E,) or None, pos_grid (G, E)
    or None with its CSR taps (tap_ptr (M + 1,) int64, tap_index int32, tap_weight fp32, at most `most_taps` per
    row) and out_rows (M,) int64; see mmkern.ops.patch_embed_packed."""
    M, K = patches.shape
    E = weight.shape[0]
    has_pos = pos_grid is not None
    with torch.cuda.device(patches.device) if patches.is_cuda else contextlib.nullcontext():
        if M > 0 and E > 0:
            _patch_embed_packed_fwd_kernel[_grid(M, E)](
                patches, weight, bias if bias is not None else out, pos_grid if has_pos else out,
                tap_ptr if has_pos else out_rows, tap_index if has_pos else out_rows,
                tap_weight if has_pos else out, out_rows, out,
                M, E, K, most_taps if has_pos else 0,
                *patches.stride(), *weight.stride(),
                bias.stride(0) if bias is not None else 0,
                *(pos_grid.stride() if has_pos else (0, 0)),
                *out.stride(),
                HAS_BIAS=bias is not None, HAS_POS=has_pos,
            )  # fmt: skip
