"""Vision-language decoder (LLaVA, arXiv 2304.08485): vision tower -> projector -> causal Transformer LM, with
the projected image tokens written over placeholder tokens in the prompt.

The prompt carries `tokens_per_image` placeholder ids (`image_token_id`) per image, as Hugging Face's
LlavaProcessor expands them; their embeddings are replaced by the image features in order. Packed batches
(several sequences in one row, `cu_seqlens`) run through varlen_attention; generate() decodes with a KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig
from mmkern.nn import KVCache

IGNORE_INDEX = -100


def _lm() -> TextConfig:
    return TextConfig(vocab_size=32000, context_length=2048, width=768, depth=12, heads=12, pool="none")


@dataclass
class VLDecoderConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    lm: TextConfig = field(default_factory=_lm)
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu
    image_token_id: int = 31999
    vision_layer: int = -2  # features of this block (LLaVA: the second to last), without the final norm
    drop_prefix: bool = True  # drop class/register tokens (LLaVA's "default" feature selection)
    tie_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLDecoderConfig:
        return cls(**{**d, "vision": ViTConfig(**d["vision"]), "lm": TextConfig(**d["lm"])})


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """Next-token cross-entropy in fp32; labels equal to -100 (prompt, image, padding) are ignored. Packed rows
    (cu_seqlens) never predict a sequence's first token from the previous sequence."""
    labels = labels.reshape(-1, labels.shape[-1])
    targets = labels[:, 1:].clone()
    if cu_seqlens is not None:
        starts = cu_seqlens[1:-1].long()
        targets[0, starts - 1] = IGNORE_INDEX
    logits = logits.reshape(labels.shape[0], labels.shape[1], -1)[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


class VisionLanguageDecoder(nn.Module):
    """forward(input_ids (B, L), images (num_images, C, H, W) or None, attention_mask=None) -> logits (B, L, V).

    Packed: input_ids (1, total) with cu_seqlens (num_seqs + 1,) int32 and max_seqlen; positions restart per
    sequence and attention stays inside each sequence.
    """

    def __init__(self, config: VLDecoderConfig | None = None, **overrides):
        super().__init__()
        c = self.config = config or VLDecoderConfig(**overrides)
        Dv, D = c.vision.width, c.lm.width
        self.visual = VisionTransformer(ViTConfig(**{**c.vision.to_dict(), "num_classes": 0, "pool": "none"}))
        self.lm = TextTransformer(TextConfig(**{**c.lm.to_dict(), "causal": True, "pool": "none", "output_dim": 0}))
        if c.projector == "linear":
            self.projector = nn.Linear(Dv, D)
        elif c.projector == "mlp2x_gelu":
            self.projector = nn.Sequential(nn.Linear(Dv, D), nn.GELU(), nn.Linear(D, D))
        else:
            raise ValueError(f"projector: expected 'linear' or 'mlp2x_gelu', got {c.projector!r}")
        self.lm_head = nn.Linear(D, c.lm.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.lm.token_embedding.weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.lm.set_grad_checkpointing(enable)

    @property
    def tokens_per_image(self) -> int:
        n = self.visual.patch_embed.num_patches
        return n if self.config.drop_prefix else n + self.visual.num_prefix_tokens

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(num_images, C, H, W) -> projected image tokens (num_images, tokens_per_image, lm width)."""
        layer = self.config.vision_layer
        num_layers = None if layer == -1 else (layer % self.config.vision.depth) + 1
        x = self.visual.forward_features(images, num_layers=num_layers, norm=layer == -1)
        if self.config.drop_prefix:
            x = x[:, self.visual.num_prefix_tokens :]
        return self.projector(x)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None, position_ids: torch.Tensor | None):
        """Token + position embeddings with image features written over the placeholder tokens."""
        x = self.lm.embed(input_ids, position_ids=position_ids)
        is_image = input_ids == self.config.image_token_id
        feats = None if images is None else self.encode_images(images)
        if not torch.compiler.is_compiling():  # the count check needs a host sync; compiled graphs skip it
            n_slots, n_feats = int(is_image.sum()), 0 if feats is None else feats.shape[0] * feats.shape[1]
            if n_slots != n_feats:
                raise ValueError(
                    f"input_ids: {n_slots} image placeholder tokens, but the images give {n_feats} "
                    f"image tokens ({self.tokens_per_image} per image)"
                )
        if feats is None:
            return x
        return x.masked_scatter(is_image.unsqueeze(-1), feats.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        if cu_seqlens is not None:
            return self._forward_packed(input_ids, images, cu_seqlens, max_seqlen)
        position_ids = None
        if attention_mask is not None:  # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed(input_ids, images, position_ids)
        return self.lm_head(self.lm.run_blocks(x, attention_mask, final_norm=self.lm.norm))

    def _forward_packed(self, input_ids, images, cu_seqlens, max_seqlen):
        ids = input_ids.reshape(-1)
        starts = cu_seqlens[:-1].long()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_start = torch.repeat_interleave(starts, lengths)
        position_ids = torch.arange(ids.shape[0], device=ids.device) - seq_start
        max_seqlen = max_seqlen or int(lengths.max())
        x = self.embed(ids, images, position_ids)
        ckpt = self.lm.grad_checkpointing and self.training
        for blk in self.lm.blocks:
            args = (x, None, True, None, None, None, cu_seqlens, max_seqlen)
            x = checkpoint(blk, *args, use_reentrant=False) if ckpt else blk(*args)
        return self.lm_head(self.lm.norm(x)).reshape(*input_ids.shape, -1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decodes up to max_new_tokens after left-padded prompts (B, L) -> (B, L + generated).

        temperature 0 is greedy; otherwise softmax sampling at that temperature, optionally from the top_k
        logits. Rows that produced eos_token_id keep emitting it until all rows are done.
        """
        B, L = input_ids.shape
        if L + max_new_tokens > self.config.lm.context_length:
            raise ValueError(
                f"max_new_tokens: {L} + {max_new_tokens} positions exceed context_length "
                f"{self.config.lm.context_length}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        caches = [KVCache(L + max_new_tokens) for _ in self.lm.blocks]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        x = self.embed(input_ids, images, positions)
        attn = mask[:, None, None, :] & causal
        out, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            for blk, cache in zip(self.lm.blocks, caches):
                x = blk(x, attn, kv_cache=cache)
            logits = self.lm_head(self.lm.norm(x[:, -1])).float()
            nxt = self._pick(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            positions = positions[:, -1:] + 1
            x = self.lm.embed(nxt[:, None], position_ids=positions)
            attn = mask[:, None, None, :]
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
