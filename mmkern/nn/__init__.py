"""nn.Modules built on mmkern.ops."""

from mmkern.nn.attention import Attention, CrossAttention, KVCache
from mmkern.nn.blocks import Block, Mlp
from mmkern.nn.patch_embed import PatchEmbed, resample_pos_embed

__all__ = ["Attention", "Block", "CrossAttention", "KVCache", "Mlp", "PatchEmbed", "resample_pos_embed"]
