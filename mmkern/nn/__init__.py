"""nn.Modules built on mmkern.ops."""

from mmkern.nn.attention import Attention, CrossAttention, KVCache
from mmkern.nn.blocks import Block, Mlp, fused_elementwise
from mmkern.nn.loss import ClipLoss, SigLipLoss
from mmkern.nn.patch_embed import PatchEmbed, resample_pos_embed

__all__ = [
    "Attention",
    "Block",
    "ClipLoss",
    "CrossAttention",
    "KVCache",
    "Mlp",
    "PatchEmbed",
    "SigLipLoss",
    "fused_elementwise",
    "resample_pos_embed",
]
