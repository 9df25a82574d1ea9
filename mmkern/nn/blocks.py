"""Transformer building blocks: Mlp and one Block that covers the encoder (pre-norm ViT/CLIP or post-norm BERT),
the cross-attention block (ALBEF/BLIP fusion layers) and the decoder block with a KV cache."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mmkern import ops
from mmkern.nn.attention import Attention, CrossAttention, KVCache, dropout, select_rows


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


# Activations that run fused with fc1's bias (mmkern.ops.bias_gelu), as torch's nn.GELU(approximate=...).
_FUSED_GELU = {"gelu": "none", "gelu_tanh": "tanh"}


# Whether Block / Mlp run the fused element-wise ops. Off by default: the kernels beat torch's alone, but each fused
# call costs more in Python than a torch op, and inside the models that cancels the gain (figures in the README,
# from `python -m benchmarks.bench_fused --models`). No GPU measurement exists yet. fused_elementwise() turns them on.
_fuse_elementwise = False


@contextlib.contextmanager
def fused_elementwise(enabled: bool = True):
    """Within the block, Block and Mlp run residual add + LayerNorm and fc1's bias + GELU as the fused
    mmkern.ops.add_layer_norm / bias_gelu (same results to rounding, same state dicts)."""
    global _fuse_elementwise
    previous, _fuse_elementwise = _fuse_elementwise, enabled
    try:
        yield
    finally:
        _fuse_elementwise = previous


def _fusable(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """The fused ops take one dtype for all tensors; under autocast the unfused modules keep autocast's casts."""
    if not _fuse_elementwise or torch.is_autocast_enabled(x.device.type):
        return False
    return all(p is None or p.dtype == x.dtype for p in params)


NORMS = ("layer", "rms")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """nn.LayerNorm (kind "layer") or nn.RMSNorm ("rms": weight only, keys `weight`) over the last dim."""
    if kind not in NORMS:
        raise ValueError(f"norm: expected 'layer' or 'rms', got {kind!r}")
    return nn.LayerNorm(dim, eps=eps) if kind == "layer" else nn.RMSNorm(dim, eps=eps)


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + residual (x when residual is None): one fused mmkern.ops.add_layer_norm /
    rms_norm for a LayerNorm / RMSNorm over the last dim, else the plain add and module."""
    fusable = _fuse_elementwise and isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) and len(norm.normalized_shape) == 1
    if fusable and isinstance(norm, nn.RMSNorm) and _fusable(x, norm.weight):
        eps = torch.finfo(x.dtype).eps if norm.eps is None else norm.eps  # nn.RMSNorm's default
        return ops.rms_norm(x, residual, norm.weight, eps)
    if fusable and isinstance(norm, nn.LayerNorm) and _fusable(x, norm.weight, norm.bias):
        return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    s = x if residual is None else x + residual
    return s, norm(s)


def apply_norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """module(x), on the fused kernel under fused_elementwise() (add_norm without a residual)."""
    return add_norm(x, None, module)[1]


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm keys `fc1`, `fc2`). Under fused_elementwise() GELU runs fused with fc1's
    bias: fc1's matmul without its bias, then mmkern.ops.bias_gelu (one pass instead of a bias add and a GELU)."""

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
        self.drop = dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        if self.act_name in _FUSED_GELU and _fusable(x, fc1.weight, fc1.bias):
            h = ops.bias_gelu(F.linear(x, fc1.weight), fc1.bias, _FUSED_GELU[self.act_name])
        else:
            h = self.act(fc1(x))
        return self.drop(self.fc2(self.drop(h)))


class LayerScale(nn.Module):
    """timm's LayerScale (CaiT, DeiT-3, DINOv2, the register ViTs): x * gamma, a learned per-channel scale."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Transformer layer: self-attention, optional cross-attention to a context, MLP; each with a residual.

    norm_first=True is the pre-norm layer of ViT / CLIP / GPT (x + f(norm(x))); False the post-norm layer of
    BERT (norm(x + f(x))). `cross_dim` adds `cross_attn` over a context (B, S, cross_dim) between the two.
    `window` / `num_global` make the self-attention local (see Attention); they are config, not parameters.
    `norm` "rms" puts RMSNorm (weight only) where LayerNorm is by default. `init_values` (pre-norm only) scales
    each branch by a learned per-channel LayerScale before its residual add, as timm does.
    Keys: norm1, attn.{qkv,proj}, [ls1.gamma], [norm_cross, cross_attn.{q,kv,proj}], norm2, mlp.{fc1,fc2}, [ls2.gamma].

    forward(x (B, L, D) or packed (total, D), attn_mask=None, is_causal=False, context=None, context_mask=None,
    kv_cache=None, cu_seqlens=None, max_seqlen=None) -> same shape as x. With `rows` (an int, or (B,) int64 with
    one position per sequence; packed: (N,) int64 row indices, one per sequence, giving (N, D)) it returns only
    those rows, (B, 1, D): the last layer of a token-pooled encoder
    then attends from, and runs its MLP on, the pooled token alone (Attention.forward_rows).

    Under fused_elementwise() each residual add runs fused with the norm that follows it in the block.
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
        norm: str = "layer",
        init_values: float | None = None,
    ):
        super().__init__()
        if init_values is not None and not norm_first:
            raise ValueError("init_values: LayerScale is defined for pre-norm blocks (norm_first=True)")
        self.norm_first = norm_first
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, window=window, num_global=num_global
        )
        self.cross_attn = None
        if cross_dim is not None:
            self.norm_cross = make_norm(norm, dim, eps)
            self.cross_attn = CrossAttention(
                dim, num_heads, kv_dim=cross_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
            )
        self.norm2 = make_norm(norm, dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

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
        *,
        rows: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        if rows is not None and (kv_cache is not None or (cu_seqlens is not None and is_causal)):
            raise ValueError("rows: selecting output rows works without a kv_cache, and packed only when not causal")

        def attn(h):
            if rows is not None and cu_seqlens is not None:
                return self.attn.forward_rows_packed(h, rows, cu_seqlens, max_seqlen)
            if rows is not None:
                return self.attn.forward_rows(h, rows, attn_mask, is_causal)
            return self.attn(h, attn_mask, is_causal, kv_cache, cu_seqlens, max_seqlen)

        def keep(x):  # the residual stream at the rows the attention output covers
            if rows is None:
                return x
            return x.index_select(0, rows) if cu_seqlens is not None else select_rows(x, rows)

        cross = self.cross_attn is not None and context is not None
        if not self.norm_first:  # post-norm (BERT): x = norm(x + f(x))
            x = add_norm(keep(x), attn(x), self.norm1)[1]
            if cross:
                x = add_norm(x, self.cross_attn(x, context, context_mask), self.norm_cross)[1]
            return add_norm(x, self.mlp(x), self.norm2)[1]
        # pre-norm, timm's x = x + attn(norm1(x)); x = x + mlp(norm2(x)), the add that a norm follows run with it
        x, h = add_norm(keep(x), self.ls1(attn(apply_norm(x, self.norm1))), self.norm_cross if cross else self.norm2)
        if cross:
            x, h = add_norm(x, self.cross_attn(h, context, context_mask), self.norm2)
        return x + self.ls2(self.mlp(h))


def run_blocks(blocks, x: torch.Tensor, final_norm: nn.Module | None, call, rows=None) -> torch.Tensor:
    """final_norm(blocks(x)) (no norm when None), `call(blk, x, rows=...)` running one block (e.g. under gradient
    checkpointing). `rows` (see Block): the last block computes those rows only and the result is (B, 1, D)."""
    for i, blk in enumerate(blocks):
        x = call(blk, x, rows=rows if i == len(blocks) - 1 else None)
    if rows is not None and not len(blocks):
        x = select_rows(x, rows)
    return x if final_norm is None else apply_norm(x, final_norm)
