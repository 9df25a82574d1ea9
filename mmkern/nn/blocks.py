"""Transformer building blocks: Mlp and one Block that covers the encoder (pre-norm ViT/CLIP or post-norm BERT),
the cross-attention block (ALBEF/BLIP fusion layers) and the decoder block with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.nn.attention import Attention, CrossAttention, KVCache


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's x·σ(1.702·x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm keys `fc1`, `fc2`)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act_name, self.act = act, activation(act)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Transformer layer: self-attention, optional cross-attention to a context, MLP; each with a residual.

    norm_first=True is the pre-norm layer of ViT / CLIP / GPT (x + f(norm(x))); False the post-norm layer of
    BERT (norm(x + f(x))). `cross_dim` adds `cross_attn` over a context (B, S, cross_dim) between the two.
    `window` / `num_global` make the self-attention local (see Attention); they are config, not parameters.
    Keys: norm1, attn.{qkv,proj}, [norm_cross, cross_attn.{q,kv,proj}], norm2, mlp.{fc1,fc2}.

    forward(x (B, L, D) or packed (total, D), attn_mask=None, is_causal=False, context=None, context_mask=None,
    kv_cache=None, cu_seqlens=None, max_seqlen=None) -> same shape as x.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act: str = "gelu",
        eps: float = 1e-6,
        norm_first: bool = True,
        cross_dim: int | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        window: tuple[int, int] | None = None,
        num_global: int = 0,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, window=window, num_global=num_global
        )
        self.cross_attn = None
        if cross_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = CrossAttention(
                dim, num_heads, kv_dim=cross_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
            )
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def _residual(self, x, norm, fn):
        return x + fn(norm(x)) if self.norm_first else norm(x + fn(x))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        x = self._residual(
            x, self.norm1, lambda h: self.attn(h, attn_mask, is_causal, kv_cache, cu_seqlens, max_seqlen)
        )
        if self.cross_attn is not None and context is not None:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, context, context_mask))
        return self._residual(x, self.norm2, self.mlp)
