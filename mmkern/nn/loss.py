"""Contrastive loss modules: single device or torch.distributed, memory-flat in the batch size."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmkern.ops.contrastive import clip_loss, siglip_loss
from mmkern.ops.contrastive_dist import clip_loss_distributed, siglip_loss_distributed

# Whether this torch was built with torch.distributed: fixed for the process, read once rather than on every call.
_DIST_AVAILABLE = dist.is_available()


def _distributed(group) -> bool:
    return _DIST_AVAILABLE and dist.is_initialized() and dist.get_world_size(group) > 1


class ClipLoss(nn.Module):
    """CLIP loss ½·(CE(s·I·Tᵀ) + CE(s·T·Iᵀ)) over the global batch.

    forward(image_features (b, D), text_features (b, D), logit_scale 0-dim, logit_bias=None, output_dict=False) ->
    0-dim loss, open_clip's signature (its training loop calls `loss(**model_out, output_dict=True)`, with a
    logit_bias when the model has one). A bias adds the same constant to every logit, which the softmax cancels:
    the loss does not depend on it and its gradient is 0, as in open_clip. On one process: `mmkern.ops.clip_loss`.
    Under torch.distributed (world size > 1 in `group`), each rank passes its local rows and gets open_clip's
    `ClipLoss(local_loss=True, gather_with_grad=True)` loss and gradients, with O(b·D + B) memory per rank (text
    blocks pass around a ring).
    """

    def __init__(self, *, group=None, backend: str | None = None):
        super().__init__()
        self.group, self.backend = group, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if _distributed(self.group):
            loss = clip_loss_distributed(
                image_features, text_features, logit_scale, group=self.group, backend=self.backend
            )
        else:
            loss = clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            # Keeps the bias in the graph (DDP wants every parameter used): gradient 0, as open_clip's.
            loss = loss + (0 * logit_bias.sum()).to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's sigmoid loss −Σ log σ(y·(s·I·Tᵀ + b)) / b_local over the global batch.

    forward(image_features (b, D), text_features (b, D), logit_scale 0-dim, logit_bias 0-dim,
    output_dict=False) -> 0-dim loss. Under torch.distributed each rank's positives are its own pairs and
    every rank's texts are its negatives (open_clip `SigLipLoss(rank, world_size)`), memory-flat.
    """

    def __init__(self, *, group=None, backend: str | None = None):
        super().__init__()
        self.group, self.backend = group, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias: torch.Tensor, output_dict: bool = False):
        if _distributed(self.group):
            loss = siglip_loss_distributed(
                image_features, text_features, logit_scale, logit_bias, group=self.group, backend=self.backend
            )
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
