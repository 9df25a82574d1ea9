"""Plain-PyTorch implementations of every mmkern op: the test oracle (run in float64) and the
`reference` backend. Written for clarity, not speed: they materialise what the kernels avoid (im2col,
the L×S score matrix, the B×B logit matrix). Autograd gives their gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_embed(images, weight, bias=None, pos_embed=None, prefix_tokens=None):
    """images (B, C, H, W), weight (E, C, P, P) -> (B, T + N, E); see mmkern.ops.patch_embed."""
    patch = weight.shape[-1]
    x = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if prefix_tokens is not None:
        x = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed  # (T + N, E) or (1, T + N, E): broadcast over the batch
    return x


def patch_embed_packed(images, weight, bias=None, pos_grid=None, prefix_tokens=None, mode="bicubic", antialias=True):
    """images: list of (C, h_i·P, w_i·P); pos_grid (Gh, Gw, E) or None -> packed (Σ T + h_i·w_i, E); see
    mmkern.ops.patch_embed_packed. The grid is resampled per image as timm's resample_abs_pos_embed does (in fp32 at
    least, skipped where the sizes match)."""
    rows = []
    for image in images:
        x = F.conv2d(image[None], weight, bias, stride=weight.shape[-1])[0]  # (E, h, w)
        if pos_grid is not None:
            grid = pos_grid.permute(2, 0, 1)[None]
            if tuple(grid.shape[-2:]) != tuple(x.shape[-2:]):
                work = grid if grid.dtype == torch.float64 else grid.float()
                grid = F.interpolate(work, size=x.shape[-2:], mode=mode, antialias=antialias, align_corners=False)
            x = x + grid[0].to(x.dtype)
        x = x.flatten(1).t()
        rows.append(x if prefix_tokens is None else torch.cat([prefix_tokens, x]))
    return torch.cat(rows)


def attention_allowed(
    query_len: int,
    key_len: int,
    *,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    num_global: int = 0,
    query_offset: int = 0,
    device=None,
) -> torch.Tensor:
    """Boolean (L, S) matrix of the (query, key) pairs that structural masking leaves visible.

    Causal masking is aligned top-left, as torch's SDPA does: query i sees keys j <= i. A window
    (left, right) keeps keys in [i - left, i + right]; the first `num_global` queries and keys ignore
    the window (they see and are seen by every position), but never the causal mask. `query_offset` P
    places the queries at positions P..P+L-1 (new tokens after a KV cache of P positions).
    """
    i = torch.arange(query_offset, query_offset + query_len, device=device).unsqueeze(1)
    j = torch.arange(key_len, device=device).unsqueeze(0)
    allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    if window is not None:
        left, right = window
        in_window = (j >= i - left) & (j <= i + right)
        if num_global:
            in_window = in_window | (i < num_global) | (j < num_global)
        allowed = allowed & in_window
    if is_causal:
        allowed = allowed & (j <= i)
    return allowed


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask=None,
    window: tuple[int, int] | None = None,
    num_global: int = 0,
):
    """torch SDPA semantics on (..., H, L, E) tensors, except that a query row that can see no key
    gives 0 (and gradient 0) instead of NaN.

    Dropout needs the keep-mask (..., H, L, S) passed as `dropout_mask` (True = keep), because the
    kernels draw it from their own counter-based generator; kept probabilities are scaled by 1/(1-p).
    """
    L, S = query.shape[-2], key.shape[-2]
    if scale is None:  # E = 0: every score is an empty dot product, 0, as in torch (not 0 * inf)
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    allowed = attention_allowed(L, S, is_causal=is_causal, window=window, num_global=num_global, device=query.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows that see no key: softmax would give NaN. Give them 0 and keep their gradient finite.
    row_visible = ~(scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(row_visible, scores, torch.zeros_like(scores)), dim=-1) * row_visible
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("dropout_mask: the reference needs the keep-mask when dropout_p > 0")
        probs = probs * dropout_mask * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)  # p = 1: zeros, as torch
    return probs @ value


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    num_global: int = 0,
):
    """Packed attention: q (total_q, H, D), k/v (total_k, H_kv, D); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]. Each sequence attends only within itself."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    pieces = []
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        o = scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            k[k0:k1].transpose(0, 1),
            v[k0:k1].transpose(0, 1),
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
            window=window,
            num_global=num_global,
        )
        pieces.append((q0, q1, o.transpose(0, 1)))
    if not pieces:
        return out
    return torch.cat([out[: pieces[0][0]]] + [o for _, _, o in pieces] + [out[pieces[-1][1] :]], dim=0)


def infonce(query, keys, logit_scale, labels=None):
    """Mean cross-entropy of logit_scale · query·keysᵀ (B, K) against labels (default arange(B))."""
    logits = logit_scale * (query @ keys.T)
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels)


def clip_loss(image_features, text_features, logit_scale):
    """½·(CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)), open_clip's ClipLoss on one device."""
    logits = logit_scale * (image_features @ text_features.T)
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """open_clip's SigLipLoss: -Σ log σ(y·(s·I·Tᵀ + b)) / B, y = +1 on the diagonal, -1 elsewhere."""
    logits = logit_scale * (image_features @ text_features.T) + logit_bias
    n = image_features.shape[0]
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def bias_gelu(x, bias=None, approximate="none"):
    """GELU(x + bias) (..., N); see mmkern.ops.bias_gelu."""
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5):
    """(s, LayerNorm(s)) with s = x + residual (x without one); see mmkern.ops.add_layer_norm."""
    s = x if residual is None else x + residual
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def rms_norm(x, residual=None, weight=None, eps=1e-6):
    """(s, s · rsqrt(mean(s²) + eps) · weight) with s = x + residual (x without one); see mmkern.ops.rms_norm. The
    formula itself (the oracle), where the `torch` backend calls F.rms_norm. fp16 / bf16 compute in fp32 (as
    F.rms_norm does): rstd³ in the backward overflows fp16 for rows of small values."""
    s = x if residual is None else x + residual
    t = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    out = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps)
    out = out if weight is None else out * weight
    return s, out.to(s.dtype)
