"""Vision Transformer (ViT, arXiv 2010.11929) on mmkern ops, with the options of timm's and CLIP's towers.

State-dict keys follow timm: patch_embed.proj, cls_token (1, 1, D), reg_token (1, R, D), pos_embed (1, L, D),
norm_pre, blocks.i.{norm1, attn.qkv, attn.proj, [ls1.gamma], norm2, mlp.fc1, mlp.fc2, [ls2.gamma]}, norm | fc_norm,
attn_pool, head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmkern import ops
from mmkern.nn import Block, CrossAttention, Mlp, PatchEmbed
from mmkern.nn.attention import layer_windows
from mmkern.nn.blocks import run_blocks


def _drop_tokens(
    packed: ops.PackedPatches, num_prefix: int, keep_rate: float | Callable[[int, int], float]
) -> ops.PackedPatches:
    """Keeps each image's prefix tokens and a random share of its patch tokens, in their order (NaViT: the rate may
    depend on the image's grid); at least one patch token per image."""
    rows, sizes, start = [], [], 0
    device = packed.tokens.device
    for h, w in packed.grid_sizes:
        rate = keep_rate(h, w) if callable(keep_rate) else keep_rate
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"keep_rate: expected a fraction in (0, 1], got {rate} for a {h}x{w} grid")
        n = h * w
        keep = max(1, round(n * rate))
        patches = torch.randperm(n, device=device)[:keep].sort().values + start + num_prefix
        rows += [torch.arange(start, start + num_prefix, device=device), patches]
        sizes.append(num_prefix + keep)
        start += num_prefix + n
    cu = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    tokens = packed.tokens.index_select(0, torch.cat(rows))
    return ops.PackedPatches(tokens, cu, packed.grid_sizes, max(sizes))


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    eps: float = 1e-6
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embedding covers the patches only (DeiT-3, SigLIP)
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP's ln_pre); CLIP also has no patch bias
    patch_bias: bool = True
    pool: str = "token"  # token | avg | map | none
    fc_norm: bool = False  # final LayerNorm after pooling instead of on every token
    # `map` attends over the patch tokens only, as timm's VisionTransformer does (pool_include_prefix=False);
    # True also lets it see the class and register tokens.
    pool_include_prefix: bool = False
    init_values: float | None = None  # LayerScale in every block (timm's init_values: DeiT-3, DINOv2, register ViTs)
    num_classes: int = 0  # head width; 0 = no head (CLIP uses it as the bias-free projection)
    head_bias: bool = True
    dynamic_img_size: bool = False
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training
    drop: float = 0.0
    # One (left, right) token window or None (global) per block; prefix tokens (class, registers) stay global.
    windows: tuple[tuple[int, int] | None, ...] | None = None

    def __post_init__(self):
        self.windows = layer_windows(self.windows, self.depth)

    def to_dict(self) -> dict:
        return asdict(self)


class AttentionPool(CrossAttention):
    """timm's AttentionPoolLatent (MAP head of SigLIP): a learned latent query attends to the tokens, then
    latent + mlp(norm(latent)). Keys: latent, q, kv, proj, norm, mlp.{fc1, fc2}. (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__(dim, num_heads)
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(self.latent.expand(x.shape[0], -1, -1), x)
        return (out + self.mlp(self.norm(out)))[:, 0]

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Packed tokens (total, D), segment i = rows cu_seqlens[i]:cu_seqlens[i + 1] -> (N, D): the latent
        attends to each segment's own tokens (varlen attention, one query per segment)."""
        N, D, H = cu_seqlens.numel() - 1, x.shape[-1], self.num_heads
        q = self.q(self.latent[0].expand(N, -1)).view(N, H, self.head_dim)
        k, v = self.kv(x).view(-1, 2, H, self.head_dim).unbind(1)
        cu_q = torch.arange(N + 1, dtype=torch.int32, device=x.device)
        o = ops.varlen_attention(q, k, v, cu_q, cu_seqlens, 1, max_seqlen)
        out = self.proj_drop(self.proj(o.reshape(N, D)))
        return out + self.mlp(self.norm(out))


class VisionTransformer(nn.Module):
    """images (B, C, H, W) -> forward: pooled features through the head (B, num_classes or width).

    forward_features(images, num_layers=None, norm=True) -> tokens (B, T + N, width), T = class + register tokens.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        c = self.config = config or ViTConfig(**overrides)
        if c.pool not in ("token", "avg", "map", "none"):
            raise ValueError(f"pool: expected token, avg, map or none, got {c.pool!r}")
        if c.pool == "token" and not c.class_token:
            raise ValueError("pool: 'token' pooling needs class_token=True")
        D = c.width
        self.patch_embed = PatchEmbed(
            c.img_size, c.patch_size, c.in_chans, D, bias=c.patch_bias, dynamic_img_size=c.dynamic_img_size
        )
        self.num_prefix_tokens = int(c.class_token) + c.reg_tokens
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02) if c.class_token else None
        self.reg_token = nn.Parameter(torch.randn(1, c.reg_tokens, D) * 0.02) if c.reg_tokens else None
        pos_len = self.patch_embed.num_patches + (0 if c.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_len, D) * 0.02)
        self.norm_pre = nn.LayerNorm(D, eps=c.eps) if c.pre_norm else nn.Identity()
        T = self.num_prefix_tokens
        self.blocks = nn.ModuleList(
            Block(
                D,
                c.heads,
                c.mlp_ratio,
                c.qkv_bias,
                c.act,
                c.eps,
                drop=c.drop,
                window=w,
                num_global=T,
                init_values=c.init_values,
            )
            for w in c.windows or (None,) * c.depth
        )
        self.norm = nn.Identity() if c.fc_norm else nn.LayerNorm(D, eps=c.eps)
        self.fc_norm = nn.LayerNorm(D, eps=c.eps) if c.fc_norm else nn.Identity()
        self.attn_pool = AttentionPool(D, c.heads, c.mlp_ratio, c.act, c.eps) if c.pool == "map" else None
        self.head = nn.Linear(D, c.num_classes, bias=c.head_bias) if c.num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.pooled_rows_only = True

    @property
    def output_dim(self) -> int:
        return self.config.num_classes or self.config.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _prefix_tokens(self) -> torch.Tensor | None:
        tokens = [t[0] for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat(tokens) if tokens else None

    def _patch_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Keeps the prefix tokens and a random (1 - p) share of the patch tokens of each image."""
        T, N = self.num_prefix_tokens, x.shape[1] - self.num_prefix_tokens
        keep = max(1, int(N * (1.0 - self.config.patch_dropout)))
        idx = torch.rand(x.shape[0], N, device=x.device).argsort(dim=1)[:, :keep] + T
        patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :T], patches], dim=1)

    def forward_features(
        self, images: torch.Tensor, num_layers: int | None = None, norm: bool = True, rows: int | None = None
    ) -> torch.Tensor:
        """Tokens after the first `num_layers` blocks (all by default), final norm applied when `norm`. With
        `rows` (a token index) the last block computes that token only and the result is (B, 1, width)."""
        prefix = self._prefix_tokens()
        x = self.patch_embed(images, self.pos_embed, prefix)
        if self.training and self.config.patch_dropout > 0:
            x = self._patch_dropout(x)
        x = self.norm_pre(x)
        ckpt = self.grad_checkpointing and self.training

        def call(blk, x, **kw):
            if ckpt:
                return checkpoint(blk, x, use_reentrant=False, **kw)
            return blk(x, **kw)

        return run_blocks(self.blocks[:num_layers], x, self.norm if norm else None, call, rows)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T + N, D) -> (B, D) by the configured pooling (`none` returns the tokens)."""
        pool = self.config.pool
        if pool == "token":
            x = tokens[:, 0]
        elif pool == "avg":
            x = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        elif pool == "map":
            x = self.attn_pool(tokens if self.config.pool_include_prefix else tokens[:, self.num_prefix_tokens :])
        else:
            x = tokens
        return self.fc_norm(x)

    def forward_features_packed(
        self,
        images: list[torch.Tensor],
        keep_rate: float | Callable[[int, int], float] | None = None,
        max_patches: int | None = None,
        interpolation: str = "bicubic",
        antialias: bool = True,
        norm: bool = True,
        pooled_rows: bool = False,
    ) -> ops.PackedPatches:
        """Images of their own sizes (a list of (C, H_i, W_i), sides multiples of the patch size unless
        `max_patches` resizes them, see ops.patch_embed_packed) packed into one sequence without padding (NaViT):
        the position grid is resampled to each image's grid (`interpolation`, `antialias`: timm's bicubic by
        default, "bilinear" for SigLIP 2 NaFlex) and every block attends within each image (varlen attention,
        windows included). `keep_rate` (a fraction, or a function of the patch grid (h, w) giving one) keeps that
        share of each image's patch tokens, drawn at random (NaViT token dropping; the prefix tokens stay).
        Returns PackedPatches whose tokens are the final (normed) tokens (total, width); with `pooled_rows` the last
        block computes each image's first token (its class token) only, and tokens is (N, width)."""
        weight, bias = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        packed = ops.patch_embed_packed(
            [image.to(weight.dtype) for image in images],
            weight,
            bias,
            pos_embed=self.pos_embed,
            prefix_tokens=self._prefix_tokens(),
            pos_grid=self.patch_embed.grid_size,
            interpolation=interpolation,
            antialias=antialias,
            max_patches=max_patches,
        )
        if keep_rate is not None:
            packed = _drop_tokens(packed, self.num_prefix_tokens, keep_rate)
        x, cu, n = self.norm_pre(packed.tokens), packed.cu_seqlens, packed.max_seqlen
        ckpt = self.grad_checkpointing and self.training

        def call(blk, x, **kw):
            if ckpt:
                return checkpoint(blk, x, use_reentrant=False, cu_seqlens=cu, max_seqlen=n, **kw)
            return blk(x, cu_seqlens=cu, max_seqlen=n, **kw)

        rows = cu[:-1].long() if pooled_rows else None
        if rows is not None and not len(self.blocks):  # no block to run for the rows alone
            x, rows = x.index_select(0, rows), None
        return packed._replace(tokens=run_blocks(self.blocks, x, self.norm if norm else None, call, rows))

    def pool_packed(self, packed: ops.PackedPatches) -> torch.Tensor:
        """Per-image pooling of packed tokens -> (N, width): the class token, the mean of the image's own patch
        tokens, or attention pooling over them (`map`; over the prefix tokens too with pool_include_prefix); `none` is
        not defined for packed images."""
        pool, x, cu, T = self.config.pool, packed.tokens, packed.cu_seqlens, self.num_prefix_tokens
        if pool == "token":
            return self.fc_norm(x.index_select(0, cu[:-1].long()))
        if pool not in ("avg", "map"):
            raise ValueError("pool: 'none' returns padded tokens; use forward_features_packed for packed tokens")
        starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
        keep = torch.arange(x.shape[0], device=x.device) - starts[segment] >= T  # the patch tokens only
        if pool == "avg":
            sums = x.new_zeros(len(lengths), x.shape[1], dtype=torch.float32)
            sums.index_add_(0, segment[keep], x[keep].float())
            x = (sums / (lengths - T).clamp(min=1).unsqueeze(1)).to(x.dtype)
        elif self.config.pool_include_prefix:
            x = self.attn_pool.forward_packed(x, cu, packed.max_seqlen)
        else:
            cu_patches = cu - T * torch.arange(len(cu), dtype=cu.dtype, device=cu.device)
            x = self.attn_pool.forward_packed(x[keep], cu_patches, packed.max_seqlen - T)
        return self.fc_norm(x)

    def forward_packed(self, images: list[torch.Tensor], **kwargs) -> torch.Tensor:
        """images: a list of (C, H_i, W_i) of any sizes -> pooled features through the head (N, num_classes or
        width), one row per image; keywords as forward_features_packed. Class-token pooling runs the last block for
        the class tokens alone, as forward does (pooled_rows_only)."""
        if self.config.pool == "token" and self.pooled_rows_only:
            return self.head(self.fc_norm(self.forward_features_packed(images, pooled_rows=True, **kwargs).tokens))
        return self.head(self.pool_packed(self.forward_features_packed(images, **kwargs)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Class-token pooling reads token 0 only, so the last block runs for that token alone (see Block `rows`);
        # pooled_rows_only = False runs it over every token (same result to rounding, for A/B measurements).
        rows = 0 if self.config.pool == "token" and self.pooled_rows_only else None
        return self.head(self.pool(self.forward_features(images, rows=rows)))
