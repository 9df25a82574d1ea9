"""The public functional API: PyTorch custom ops with validation, autograd and backend dispatch."""

from mmkern.ops.patch_embed import patch_embed

__all__ = ["patch_embed"]
