"""CLIP (arXiv 2103.00020) and SigLIP (arXiv 2303.15343): an image tower and a text tower projected into one
embedding space, a learnable temperature (logit scale, clamped at 100) and, for SigLIP, a logit bias."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmkern import ops
from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig

MAX_LOGIT_SCALE = 100.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (SigLIP: -10) to add a learnable logit bias

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        return cls(**{**d, "vision": ViTConfig(**d["vision"]), "text": TextConfig(**d["text"])})


class CLIP(nn.Module):
    """Two towers whose heads project to `embed_dim`: `visual` (VisionTransformer) and `text` (TextTransformer).

    forward(images, input_ids, attention_mask=None) -> (image_features, text_features, logit_scale, logit_bias):
    L2-normalised (B, embed_dim) features, exp(logit_scale) clamped at 100, and the bias or None.
    """

    def __init__(self, config: CLIPConfig | None = None, **overrides):
        super().__init__()
        c = self.config = config or CLIPConfig(**overrides)
        vision = ViTConfig(**{**c.vision.to_dict(), "num_classes": c.embed_dim, "head_bias": False})
        text = TextConfig(**{**c.text.to_dict(), "output_dim": c.embed_dim})
        self.visual = VisionTransformer(vision)
        self.text = TextTransformer(text)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.init_logit_scale)))
        self.logit_bias = None if c.init_logit_bias is None else nn.Parameter(torch.tensor(float(c.init_logit_bias)))

    @classmethod
    def from_hf(cls, model_or_state_dict, config=None) -> CLIP:
        """From a Hugging Face `CLIPModel` (or its state dict, with its `CLIPConfig` or ours if the head count is
        not width / 64); see mmkern.models.convert.clip_from_hf."""
        from mmkern.models.convert import clip_from_hf

        return clip_from_hf(model_or_state_dict, config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(
        self, images: torch.Tensor | list[torch.Tensor], normalize: bool = False, **packed
    ) -> torch.Tensor:
        """images / pixel_values (B, 3, H, W), or a list of (3, H_i, W_i) of any sizes run packed at their own
        resolution (VisionTransformer.forward_packed, whose keywords `packed` takes) -> (B, embed_dim)."""
        x = self.visual.forward_packed(images, **packed) if isinstance(images, (list, tuple)) else self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) or None -> (B, embed_dim)."""
        x = self.text(input_ids, attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 (the clamp open_clip applies to the parameter after each step)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(input_ids, attention_mask, normalize=True)
        return image_features, text_features, self.scale(), self.logit_bias

    def loss(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Contrastive loss of a batch: mmkern.ops.clip_loss, or siglip_loss when the model has a logit bias.
        The loss runs in fp32 whatever autocast made of the features."""
        img, txt, scale, bias = self(images, input_ids, attention_mask)
        img, txt = img.float(), txt.float()
        if bias is None:
            return ops.clip_loss(img, txt, scale.float())
        return ops.siglip_loss(img, txt, scale.float(), bias.float())

    @torch.no_grad()
    def zero_shot_classifier(
        self, tokenize, classnames: list[str], templates: list[str], batch_size: int = 256
    ) -> torch.Tensor:
        """(embed_dim, num_classes) weights: per class, the mean of the normalised text embeddings of every
        template ('a photo of a {}.') filled with the class name, renormalised (open_clip's recipe).
        `tokenize(list[str])` returns input_ids (N, L) or (input_ids, attention_mask)."""
        prompts = [t.format(c) for c in classnames for t in templates]
        feats = []
        for i in range(0, len(prompts), batch_size):
            tok = tokenize(prompts[i : i + batch_size])
            ids, mask = tok if isinstance(tok, tuple) else (tok, None)
            device = self.logit_scale.device
            feats.append(self.encode_text(ids.to(device), None if mask is None else mask.to(device), normalize=True))
        per_class = torch.cat(feats).float().view(len(classnames), len(templates), -1).mean(dim=1)
        return F.normalize(per_class, dim=-1).T.contiguous()

    @torch.no_grad()
    def classify(self, images: torch.Tensor, classifier: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Zero-shot logits (B, num_classes) = scale · normalised image features @ classifier, in batches."""
        out = [
            self.encode_image(images[i : i + batch_size], normalize=True).float() @ classifier
            for i in range(0, images.shape[0], batch_size)
        ]
        return self.scale().float() * torch.cat(out)


def retrieve(queries: torch.Tensor, gallery: torch.Tensor, k: int = 5, batch_size: int = 1024):
    """Top-k retrieval by cosine similarity: queries (Q, D), gallery (G, D) -> (scores, indices), each (Q, k)."""
    gallery = F.normalize(gallery.float(), dim=-1)
    k = min(k, gallery.shape[0])
    scores, indices = [], []
    for i in range(0, queries.shape[0], batch_size):
        s = F.normalize(queries[i : i + batch_size].float(), dim=-1) @ gallery.T
        top = s.topk(k, dim=-1)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)
