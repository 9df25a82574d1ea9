"""InfoNCE / CLIP / SigLIP contrastive losses.

INTERIM: this file fixes the public signatures so that the model layer can be built against them;
every backend still runs mmkern.reference here. The contrastive issue replaces the body with the
memory-flat kernels (cpu, cuda, triton) behind torch custom ops.
"""

from __future__ import annotations

import torch

from mmkern import reference


def clip_loss(image_features, text_features, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """½·(CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)); features (B, D), logit_scale a 0-dim tensor."""
    return reference.clip_loss(image_features, text_features, logit_scale)


def infonce(query, keys, logit_scale, *, labels=None, backend: str | None = None) -> torch.Tensor:
    """Mean CE of s·query·keysᵀ (B, K ≥ B) against labels (default arange(B))."""
    return reference.infonce(query, keys, logit_scale, labels)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend: str | None = None) -> torch.Tensor:
    """open_clip's sigmoid loss -Σ log σ(y·(s·I·Tᵀ + b)) / B."""
    return reference.siglip_loss(image_features, text_features, logit_scale, logit_bias)
