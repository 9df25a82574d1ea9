"""The public functional API: PyTorch custom ops with validation, autograd and backend dispatch."""

from mmkern.ops.attention import qkv_packed_attention, scaled_dot_product_attention, varlen_attention
from mmkern.ops.contrastive import clip_loss, infonce, siglip_loss
from mmkern.ops.fused import add_layer_norm, bias_gelu
from mmkern.ops.patch_embed import patch_embed
from mmkern.ops.patch_embed_packed import PackedPatches, patch_embed_packed
from mmkern.ops.rms_norm import rms_norm
from mmkern.ops.sdpa_patch import disable_sdpa_override, enable_sdpa_override, sdpa_override

__all__ = [
    "PackedPatches",
    "add_layer_norm",
    "bias_gelu",
    "clip_loss",
    "disable_sdpa_override",
    "enable_sdpa_override",
    "infonce",
    "patch_embed",
    "patch_embed_packed",
    "qkv_packed_attention",
    "rms_norm",
    "scaled_dot_product_attention",
    "sdpa_override",
    "siglip_loss",
    "varlen_attention",
]
