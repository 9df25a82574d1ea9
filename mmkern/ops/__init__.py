"""The public functional API: PyTorch custom ops with validation, autograd and backend dispatch."""

from mmkern.ops.attention import scaled_dot_product_attention, varlen_attention
from mmkern.ops.contrastive import clip_loss, infonce, siglip_loss
from mmkern.ops.patch_embed import patch_embed

__all__ = ["clip_loss", "infonce", "patch_embed", "scaled_dot_product_attention", "siglip_loss", "varlen_attention"]
