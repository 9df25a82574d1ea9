"""Fusion encoder (ALBEF arXiv 2107.07651, BLIP arXiv 2201.12086): a BERT-style text encoder whose upper layers
see the image, with image-text matching (ITM) and masked-language-modelling (MLM) heads.

Where and how the image enters is configuration:
- fusion="cross", fusion_layer=k: layers k.. cross-attend to the image tokens (middle fusion; ALBEF k = 6 of 12,
  BLIP k = 0);
- fusion="concat", fusion_layer=0: one Transformer over [image tokens; text tokens] (early fusion);
- fusion_layer=depth: the towers never meet (late fusion, CLIP-like); ITM then reads both [CLS] features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig


def _bert_text() -> TextConfig:
    return TextConfig(
        vocab_size=30522,
        context_length=512,
        width=768,
        depth=12,
        heads=12,
        eps=1e-12,
        causal=False,
        norm_first=False,
        embed_norm=True,
        final_norm=False,
        type_vocab_size=2,
        pool="cls",
    )


@dataclass
class FusionConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=_bert_text)
    fusion: str = "cross"  # cross | concat
    fusion_layer: int = 6
    itc_dim: int = 256  # width of the image-text contrastive projections; 0 = none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FusionConfig:
        return cls(**{**d, "vision": ViTConfig(**d["vision"]), "text": TextConfig(**d["text"])})


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder to the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class FusionEncoder(nn.Module):
    """Vision tower + image-conditioned text encoder + ITM / MLM heads (+ ITC projections).

    Typical ALBEF step: image_embeds = encode_image(images); text = encode_text(ids, mask);
    itc on image_features(image_embeds) / text_features(text); fused = fuse(text, mask, image_embeds);
    itm_logits(fused, image_embeds); mlm_logits(fuse(encode_text(masked_ids, mask), mask, image_embeds)).
    """

    def __init__(self, config: FusionConfig | None = None, **overrides):
        super().__init__()
        c = self.config = config or FusionConfig(**overrides)
        if c.fusion not in ("cross", "concat"):
            raise ValueError(f"fusion: expected 'cross' or 'concat', got {c.fusion!r}")
        if not 0 <= c.fusion_layer <= c.text.depth:
            raise ValueError(f"fusion_layer: expected 0..{c.text.depth}, got {c.fusion_layer}")
        Dv, D = c.vision.width, c.text.width
        cross = c.fusion == "cross"
        self.visual = VisionTransformer(ViTConfig(**{**c.vision.to_dict(), "num_classes": 0, "pool": "token"}))
        self.text = TextTransformer(
            TextConfig(
                **{
                    **c.text.to_dict(),
                    "causal": False,
                    "output_dim": 0,
                    "cross_dim": Dv if cross else None,
                    "cross_from": c.fusion_layer,
                }
            )
        )
        self.late = c.fusion_layer == c.text.depth
        self.image_proj = nn.Linear(Dv, D) if (not cross or self.late) and Dv != D else nn.Identity()
        self.itm_head = nn.Linear(2 * D if self.late else D, 2)
        self.mlm_head = MLMHead(D, c.text.vocab_size, c.text.eps)
        self.vision_proj = nn.Linear(Dv, c.itc_dim) if c.itc_dim else None
        self.text_proj = nn.Linear(D, c.itc_dim) if c.itc_dim else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> image tokens (B, 1 + N, vision width), [CLS] first."""
        return self.visual.forward_features(images)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text-only part: the layers below fusion_layer -> (B, L, width)."""
        x = self.text.embed(input_ids, token_type_ids)
        return self.text.run_blocks(x, attention_mask, self.text.blocks[: self.config.fusion_layer])

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC features (B, itc_dim) of the image [CLS] token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised ITC features (B, itc_dim) of the text-only [CLS] token."""
        return F.normalize(self.text_proj(text_tokens[:, 0]), dim=-1)

    def fuse(
        self, text_tokens: torch.Tensor, attention_mask: torch.Tensor | None, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Layers from fusion_layer on, conditioned on the image -> fused text tokens (B, L, width)."""
        blocks = self.text.blocks[self.config.fusion_layer :]
        if self.config.fusion == "cross":
            return self.text.run_blocks(
                text_tokens, attention_mask, blocks, context=image_embeds, final_norm=self.text.norm
            )
        img = self.image_proj(image_embeds)
        B, N, L = img.shape[0], img.shape[1], text_tokens.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=img.device)
        mask = torch.cat([torch.ones(B, N, dtype=torch.bool, device=img.device), attention_mask.bool()], dim=1)
        x = self.text.run_blocks(torch.cat([img, text_tokens], dim=1), mask, blocks)
        return self.text.norm(x[:, N:])

    def itm_logits(self, fused: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2) match / no-match logits from the fused [CLS] (late fusion: [text CLS; image CLS])."""
        if self.late:
            return self.itm_head(torch.cat([fused[:, 0], self.image_proj(image_embeds[:, 0])], dim=-1))
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, L, vocab_size) token logits."""
        return self.mlm_head(fused)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """-> fused text tokens (B, L, width) of the image-text pairs."""
        image_embeds = self.encode_image(images)
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image_embeds)
