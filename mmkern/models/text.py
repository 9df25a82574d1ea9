"""Text Transformer on mmkern ops: causal CLIP text tower (pre-norm, EOT pooling) or bidirectional BERT-style
encoder (post-norm, padding masks, CLS / mean pooling, token type embeddings), learned positions.

Keys: token_embedding, pos_embed (context_length, D), type_embedding, embed_norm, blocks.i.*, norm, proj.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmkern.nn import Block
from mmkern.nn.attention import layer_windows, select_rows
from mmkern.nn.blocks import make_norm, run_blocks


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    eps: float = 1e-5
    causal: bool = True
    norm_first: bool = True  # pre-norm (CLIP, GPT); False = post-norm (BERT)
    embed_norm: bool = False  # LayerNorm on the embeddings (BERT)
    final_norm: bool = True  # LayerNorm after the blocks (CLIP's ln_final)
    norm: str = "layer"  # every norm of the tower: "layer" (LayerNorm) or "rms" (RMSNorm, LLaMA-style: no bias)
    type_vocab_size: int = 0  # token type (segment) embeddings, BERT
    pool: str = "eot"  # eot | cls | mean | last | none
    eot_token_id: int | None = None  # None: the EOT token is the largest id (OpenAI CLIP's argmax rule)
    output_dim: int = 0  # bias-free projection after pooling; 0 = none
    cross_dim: int | None = None  # blocks from `cross_from` on cross-attend to a context of this width
    cross_from: int = 0
    drop: float = 0.0
    # One (left, right) token window or None (global) per block; a causal tower only uses left. The first
    # num_global tokens (e.g. BERT's CLS) see and are seen by every position in windowed blocks.
    windows: tuple[tuple[int, int] | None, ...] | None = None
    num_global: int = 0

    def __post_init__(self):
        self.windows = layer_windows(self.windows, self.depth)

    def to_dict(self) -> dict:
        return asdict(self)


def padding_mask(attention_mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for the attention op from a (B, L) 1/0 token mask: a (B, 1, 1, L) bool key mask,
    with is_causal kept. mmkern's op combines the two (torch's SDPA does not), so no (B, 1, L, L) mask is built
    and the kernels still skip the key blocks above the diagonal."""
    if attention_mask is None:
        return None, causal
    return attention_mask.bool()[:, None, None, :], causal


class TextTransformer(nn.Module):
    """input_ids (B, L) int64 -> forward: pooled (and projected) features (B, output_dim or width).

    forward_features(input_ids, attention_mask=None, token_type_ids=None, context=None, context_mask=None)
    -> tokens (B, L, width). attention_mask (B, L): 1 for tokens, 0 for padding.
    """

    def __init__(self, config: TextConfig | None = None, **overrides):
        super().__init__()
        c = self.config = config or TextConfig(**overrides)
        if c.pool not in ("eot", "cls", "mean", "last", "none"):
            raise ValueError(f"pool: expected eot, cls, mean, last or none, got {c.pool!r}")
        D = c.width
        self.token_embedding = nn.Embedding(c.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.randn(c.context_length, D) * 0.01)
        self.type_embedding = nn.Embedding(c.type_vocab_size, D) if c.type_vocab_size else None
        self.embed_norm = make_norm(c.norm, D, c.eps) if c.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(
                D,
                c.heads,
                c.mlp_ratio,
                c.qkv_bias,
                c.act,
                c.eps,
                norm_first=c.norm_first,
                drop=c.drop,
                cross_dim=c.cross_dim if i >= c.cross_from else None,
                window=c.windows[i] if c.windows else None,
                num_global=c.num_global,
                norm=c.norm,
            )
            for i in range(c.depth)
        )
        self.norm = make_norm(c.norm, D, c.eps) if c.final_norm else nn.Identity()
        self.proj = nn.Linear(D, c.output_dim, bias=False) if c.output_dim else nn.Identity()
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.grad_checkpointing = False
        self.pooled_rows_only = True

    @property
    def output_dim(self) -> int:
        return self.config.output_dim or self.config.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, D); position_ids (B, L) or (L,) default to 0..L-1."""
        L = input_ids.shape[-1]
        if position_ids is None and L > self.config.context_length:
            raise ValueError(f"input_ids: length {L} exceeds context_length {self.config.context_length}")
        pos = self.pos_embed[:L] if position_ids is None else self.pos_embed[position_ids]
        x = self.token_embedding(input_ids) + pos
        if self.type_embedding is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_embedding(types)
        return self.embed_norm(x)

    def run_blocks(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        blocks=None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        final_norm: nn.Module | None = None,
        rows: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Runs `blocks` (all by default) over embedded tokens x (B, L, D), then `final_norm` if given. With `rows`
        (see Block) -> (B, 1, D) at those rows."""
        mask, is_causal = padding_mask(attention_mask, self.config.causal)
        ckpt = self.grad_checkpointing and self.training
        blocks = self.blocks if blocks is None else blocks

        def call(blk, x, **kw):
            args = (x, mask, is_causal, context, context_mask)
            return checkpoint(blk, *args, use_reentrant=False, **kw) if ckpt else blk(*args, **kw)

        return run_blocks(blocks, x, final_norm, call, rows)

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rows: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Tokens (B, L, width); with `rows` (see Block) the last block computes those rows only -> (B, 1, width)."""
        x = self.embed(input_ids, token_type_ids)
        return self.run_blocks(x, attention_mask, None, context, context_mask, final_norm=self.norm, rows=rows)

    def pool_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The token each sequence is pooled from: an int (cls: 0), (B,) int64 (eot, last), or None (mean, none)."""
        pool = self.config.pool
        if pool == "cls":
            return 0
        if pool == "eot":
            eot = self.config.eot_token_id
            return input_ids.argmax(dim=-1) if eot is None else (input_ids == eot).int().argmax(dim=-1)
        if pool == "last":
            if attention_mask is None:
                return input_ids.shape[1] - 1
            return attention_mask.long().sum(dim=1).sub(1).clamp(min=0)
        return None

    def pool(self, tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, L, D) -> (B, D) by the configured pooling (`none` returns the tokens)."""
        rows = self.pool_rows(input_ids, attention_mask)
        if rows is not None:
            return select_rows(tokens, rows)[:, 0]
        if self.config.pool == "mean":
            if attention_mask is None:
                return tokens.mean(dim=1)
            m = attention_mask.to(tokens.dtype).unsqueeze(-1)
            return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Token pooling reads one row per sequence, so the last block runs for that row alone (see Block `rows`);
        # pooled_rows_only = False runs it over every token (same result to rounding, for A/B measurements).
        rows = self.pool_rows(input_ids, attention_mask) if self.pooled_rows_only else None
        if rows is None:
            tokens = self.forward_features(input_ids, attention_mask, token_type_ids)
            return self.proj(self.pool(tokens, input_ids, attention_mask))
        return self.proj(self.forward_features(input_ids, attention_mask, token_type_ids, rows=rows)[:, 0])
