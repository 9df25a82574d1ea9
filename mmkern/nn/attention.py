"""Multi-head attention modules on mmkern.ops: self-attention (timm layout `qkv`, `proj`), cross-attention
(`q`, `kv`, `proj`, the layout of timm's attention pool) and a key/value cache for decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkern import ops, reference


class KVCache:
    """Keys and values of one attention layer, (B, H, max_len, Dh), filled left to right.

    Decoding appends the new tokens' keys/values with `update` and attends over everything cached so far.
    The buffers are allocated on the first update, in the keys' dtype (which autocast decides).
    """

    def __init__(self, max_len: int):
        self.max_len, self.len = max_len, 0
        self.k = self.v = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, L, Dh) for the next L positions -> all cached (B, H, len + L, Dh)."""
        end = self.len + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"kv_cache: {end} positions exceed the cache length {self.max_len}")
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.v = v.new_zeros(v.shape[0], v.shape[1], self.max_len, v.shape[3])
        self.k[:, :, self.len : end] = k
        self.v[:, :, self.len : end] = v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


def cached_mask(attn_mask, past: int, L: int, S: int, is_causal: bool, window, num_global: int, device):
    """attn_mask combined with the causal / window / global structure for L queries at positions past..past+L-1
    over S keys (reference.attention_allowed). Bool masks are and-ed, float masks get -inf."""
    allowed = reference.attention_allowed(
        L, S, is_causal=is_causal, window=window, num_global=num_global, query_offset=past, device=device
    )
    return restrict_mask(attn_mask, allowed)


def restrict_mask(attn_mask, allowed: torch.Tensor) -> torch.Tensor:
    """attn_mask (None, bool or additive float) limited to the bool `allowed` pairs: and-ed, or -inf outside."""
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return attn_mask.masked_fill(~allowed, float("-inf"))


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p == 0: a no-op Dropout still costs a function call per use, and a
    small model's layer makes several."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def select_rows(x: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) -> (B, 1, ...): row `rows` of every sequence (an int), or row rows[b] of sequence b ((B,) int64)."""
    if isinstance(rows, int):
        return x[:, rows : rows + 1]
    return x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)


def rows_mask(attn_mask, rows: int | torch.Tensor, B: int, S: int, is_causal: bool, device):
    """The mask for one query per sequence at position `rows` (see select_rows) over S keys: the matching row of
    attn_mask (broadcastable to (B, H, L, S)) and, for is_causal (torch's top-left alignment), keys <= that
    position. -> None or a mask broadcastable to (B, H, 1, S); bool masks are and-ed, float masks get -inf."""
    mask = attn_mask
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if mask.shape[2] > 1:  # a mask per query row: keep the selected ones
            if isinstance(rows, int):
                mask = mask[:, :, rows : rows + 1]
            else:
                mask = mask.expand(B, -1, -1, -1)
                mask = mask.gather(2, rows.view(B, 1, 1, 1).expand(B, mask.shape[1], 1, S))
    if not is_causal:
        return mask
    pos = torch.tensor(rows, device=device) if isinstance(rows, int) else rows
    return restrict_mask(mask, (torch.arange(S, device=device) <= pos.reshape(-1, 1)).view(-1, 1, 1, S))


def layer_windows(windows, depth: int) -> tuple[tuple[int, int] | None, ...] | None:
    """Checks a per-layer window list (one (left, right) or None = global entry per layer) and returns it as
    tuples, so that a config read back from JSON (lists) equals the one saved."""
    if windows is None:
        return None
    if len(windows) != depth:
        raise ValueError(f"windows: expected one entry per layer ({depth}), got {len(windows)}")
    for w in windows:
        if w is not None and not (len(w) == 2 and all(isinstance(n, int) and n >= 0 for n in w)):
            raise ValueError(f"windows: each entry must be None or (left, right) ints >= 0, got {w!r}")
    return tuple(None if w is None else tuple(w) for w in windows)


class Attention(nn.Module):
    """Multi-head self-attention, state-dict compatible with timm's `Attention` (`qkv`, `proj`).

    forward(x (B, L, D), attn_mask=None, is_causal=False, kv_cache=None) -> (B, L, D). `attn_mask` is a
    bool (True = attend) or additive float mask broadcastable to (B, H, L, S). Packed sequences: x
    (total, D) with `cu_seqlens` (num_seqs + 1,) int32 and `max_seqlen` go through varlen_attention.
    `window` (left, right) makes the layer local: query i sees keys [i - left, i + right] only, except the
    first `num_global` tokens, which see and are seen by every position (see ops.scaled_dot_product_attention).
    With a `kv_cache` holding P positions, the new queries are positions P..P+L-1 for is_causal and the window,
    so cached decoding gives the rows an uncached pass over the whole sequence gives.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window: tuple[int, int] | None = None,
        num_global: int = 0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        # The ops take num_global only together with a window.
        self.window, self.num_global = window, num_global if window is not None else 0
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_drop, self.proj_drop = attn_drop, dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        drop = self.attn_drop if self.training else 0.0
        if cu_seqlens is not None:
            q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
            cu, n = cu_seqlens, max_seqlen
            o = ops.varlen_attention(
                q, k, v, cu, cu, n, n, causal=is_causal, window=self.window, num_global=self.num_global
            )
            return self.proj_drop(self.proj(o.flatten(-2)))
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        window, num_global = self.window, self.num_global
        if kv_cache is None:
            o = ops.qkv_packed_attention(qkv, attn_mask, drop, is_causal, window=window, num_global=num_global)
            return self.proj_drop(self.proj(o.reshape(B, L, -1)))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        past = kv_cache.len
        k, v = kv_cache.update(k, v)
        if past and (window is not None or is_causal):
            # The op counts query positions from 0 (and aligns is_causal top-left), but the new queries sit at
            # positions past..past+L-1: spell the structure out as an (L, S) mask for them instead.
            attn_mask = cached_mask(attn_mask, past, L, k.shape[2], is_causal, window, num_global, x.device)
            is_causal, window, num_global = False, None, 0
        o = ops.scaled_dot_product_attention(q, k, v, attn_mask, drop, is_causal, window=window, num_global=num_global)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, L, -1)))

    def forward_rows(
        self, x: torch.Tensor, rows: int | torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """forward(x, attn_mask, is_causal) at one query row per sequence (see select_rows) -> (B, 1, D). Keys and
        values still come from every token, but the query projection, the attention and `proj` run for those rows
        only: all a token-pooled encoder needs from its last layer. Local (windowed) layers run whole."""
        if self.window is not None:
            return select_rows(self.forward(x, attn_mask, is_causal), rows)
        B, L, D = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(select_rows(x, rows), w[:D], None if b is None else b[:D])
        k, v = F.linear(x, w[D:], None if b is None else b[D:]).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q.view(B, 1, self.num_heads, self.head_dim), k, v))
        mask = rows_mask(attn_mask, rows, B, L, is_causal, x.device)
        o = ops.scaled_dot_product_attention(q, k, v, mask, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, 1, D)))

    def forward_rows_packed(
        self, x: torch.Tensor, rows: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """forward(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen) for packed x (total, D) at `rows` ((N,) int64,
        one row of each sequence, e.g. its class token) only -> (N, D); see forward_rows. Local layers run whole."""
        if self.window is not None:
            return self.forward(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).index_select(0, rows)
        D, H, hd = x.shape[-1], self.num_heads, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x.index_select(0, rows), w[:D], None if b is None else b[:D]).view(-1, H, hd)
        k, v = F.linear(x, w[D:], None if b is None else b[D:]).view(-1, 2, H, hd).unbind(1)
        cu_q = torch.arange(rows.shape[0] + 1, dtype=torch.int32, device=x.device)  # one query per sequence
        o = ops.varlen_attention(q, k, v, cu_q, cu_seqlens, 1, max_seqlen)
        return self.proj_drop(self.proj(o.reshape(-1, D)))


class CrossAttention(nn.Module):
    """Multi-head attention from x (B, L, D) to context (B, S, kv_dim): `q`, `kv`, `proj` linears.

    `context_mask` is (B, S) bool (True = attend) or anything broadcastable to (B, H, L, S).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        kv_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_drop, self.proj_drop = attn_drop, dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        S = context.shape[1]
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, S, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if context_mask is not None and context_mask.dim() == 2:
            context_mask = context_mask[:, None, None, :]
        o = ops.scaled_dot_product_attention(q, k, v, context_mask, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, L, -1)))
