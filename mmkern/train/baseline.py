"""The same CLIP as mmkern.models.CLIP, written on plain PyTorch ops: Conv2d patch embedding,
F.scaled_dot_product_attention and the naive B x B cross-entropy CLIP loss. Same state-dict keys, so one set of
weights loads into both; the demo measures training throughput of the two in the same run.

Covers the CLIP configurations the trainer and the benchmarks build (class-token ViT without registers or MAP
pooling, with or without CLIP's pre-norm; causal, pre-norm text tower pooled on the EOT id or, without one, on the
largest id); anything else raises ValueError."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.models import CLIP, CLIPConfig
from mmkern.nn.blocks import activation


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, act: str, eps: float, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.act = heads, activation(act)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, mask=None, causal=False):
        B, L, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        x = x + self.attn.proj(o.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.norm2(x))))


class PlainCLIP(nn.Module):
    """forward(images, input_ids, attention_mask) -> (image_features, text_features, scale, None), like CLIP."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        v, t = config.vision, config.text
        if (
            v.reg_tokens
            or v.pool != "token"
            or v.fc_norm
            or v.windows
            or t.windows
            or not t.causal
            or not t.norm_first
            or t.type_vocab_size
            or config.init_logit_bias is not None
        ):
            raise ValueError("config: PlainCLIP covers class-token ViTs and causal EOT-pooled text towers only")
        self.visual, self.text = nn.Module(), nn.Module()
        vis, txt = self.visual, self.text
        vis.patch_embed = nn.Module()
        vis.patch_embed.proj = nn.Conv2d(v.in_chans, v.width, v.patch_size, v.patch_size, bias=v.patch_bias)
        n = (v.img_size // v.patch_size) ** 2
        vis.cls_token = nn.Parameter(torch.zeros(1, 1, v.width))
        vis.pos_embed = nn.Parameter(torch.zeros(1, n + 1, v.width))
        vis.norm_pre = nn.LayerNorm(v.width, eps=v.eps) if v.pre_norm else nn.Identity()
        vis.blocks = nn.ModuleList(
            _Block(v.width, v.heads, v.mlp_ratio, v.act, v.eps, v.qkv_bias) for _ in range(v.depth)
        )
        vis.norm = nn.LayerNorm(v.width, eps=v.eps)
        vis.head = nn.Linear(v.width, config.embed_dim, bias=False)
        txt.token_embedding = nn.Embedding(t.vocab_size, t.width)
        txt.pos_embed = nn.Parameter(torch.zeros(t.context_length, t.width))
        txt.blocks = nn.ModuleList(
            _Block(t.width, t.heads, t.mlp_ratio, t.act, t.eps, t.qkv_bias) for _ in range(t.depth)
        )
        txt.norm = nn.LayerNorm(t.width, eps=t.eps)
        txt.proj = nn.Linear(t.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.eot = t.eot_token_id

    def encode_image(self, images):
        vis = self.visual
        x = vis.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = vis.norm_pre(torch.cat([vis.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vis.pos_embed)
        for blk in vis.blocks:
            x = blk(x)
        return vis.head(vis.norm(x)[:, 0])

    def encode_text(self, ids, attention_mask=None):
        txt, L = self.text, ids.shape[1]
        x = txt.token_embedding(ids) + txt.pos_embed[:L]
        mask = None
        if attention_mask is not None:
            causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
            mask = attention_mask.bool()[:, None, None, :] & causal
        for blk in txt.blocks:
            x = blk(x, mask, causal=True)
        eot = ids.argmax(-1) if self.eot is None else (ids == self.eot).int().argmax(-1)
        return txt.proj(txt.norm(x)[torch.arange(ids.shape[0], device=ids.device), eot])

    @classmethod
    def from_clip(cls, model: CLIP) -> PlainCLIP:
        """The twin of an mmkern CLIP: its config and weights, on its device."""
        plain = cls(model.config).to(model.logit_scale.device)
        plain.load_state_dict(model.state_dict())
        return plain

    def forward(self, images, input_ids, attention_mask=None):
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return img, txt, self.logit_scale.exp().clamp(max=100.0), None


def naive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The B x B logits matrix and two cross-entropies, as open_clip's ClipLoss computes on one device."""
    logits = scale * img.float() @ txt.float().T
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def plain_loss_fn(model: PlainCLIP, batch: dict):
    img, txt, scale, _ = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return naive_clip_loss(img, txt, scale)


def every_row_copy(model: CLIP) -> CLIP:
    """A copy of an mmkern CLIP whose towers run their last blocks over every token (pooled_rows_only off), as
    PlainCLIP's do: measured against PlainCLIP it shows what the kernels alone give."""
    twin = copy.deepcopy(model)
    twin.visual.pooled_rows_only = twin.text.pooled_rows_only = False
    return twin
