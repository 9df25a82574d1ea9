"""Scaled dot-product attention and packed variable-length attention.

INTERIM: this file fixes the public signatures so that the model layer can be built against them;
every backend still runs mmkern.reference here. The attention issue replaces the body with the fused
kernels (cpu, cuda, triton) behind torch custom ops.
"""

from __future__ import annotations

import torch

from mmkern import reference


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention semantics on (..., H, L, E); a query row that
    can see no key gives 0, not NaN."""
    dropout_mask = None
    if dropout_p > 0.0:
        shape = (*query.shape[:-1], key.shape[-2])
        dropout_mask = torch.rand(shape, device=query.device) >= dropout_p
    return reference.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask=dropout_mask
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Packed attention: q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens int32 (num_seqs + 1,)."""
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale)
