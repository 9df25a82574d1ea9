"""Patch embedding module on the fused mmkern.ops.patch_embed (Conv2d + flatten + prefix + position add)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkern import ops


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 0
) -> torch.Tensor:
    """Bicubic (antialiased) resize of the patch part of a position embedding (..., T + Gh·Gw, E), as timm's
    resample_abs_pos_embed does: in fp32, the T prefix rows untouched. Returns (T + Gh'·Gw', E)."""
    pos_embed = pos_embed.reshape(-1, pos_embed.shape[-1])
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
    E = grid.shape[-1]
    grid = grid.float().reshape(1, *old_grid, E).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, E).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=0)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, T + N, E), N = (H/P)·(W/P) patches in row-major order.

    State-dict keys `proj.weight` (E, C, P, P) and `proj.bias` (E,) like timm's PatchEmbed, so timm, open_clip
    and Hugging Face weights load unchanged. forward(images, pos_embed=None, prefix_tokens=None):
    `prefix_tokens` (T, E) are class / register tokens written before the patches; `pos_embed` is laid out for
    the module's `img_size`, (T + N0, E) or (1, T + N0, E), or (N0, E) covering the patches only. With
    `dynamic_img_size=True` other image sizes (multiples of P) resample its patch part bicubically, like timm.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size: only square patches are supported, got {self.patch_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size: {self.img_size} is not a multiple of the patch size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size, bias=bias)

    def forward(
        self, images: torch.Tensor, pos_embed: torch.Tensor | None = None, prefix_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        H, W = images.shape[-2:]
        P = self.patch_size[0]
        grid = (H // P, W // P)
        if (H, W) != self.img_size and not self.dynamic_img_size:
            raise ValueError(
                f"images: size {(H, W)} differs from img_size {self.img_size}; "
                "set dynamic_img_size=True to resample the position embedding"
            )
        T = 0 if prefix_tokens is None else prefix_tokens.shape[0]
        if pos_embed is not None:
            E = pos_embed.shape[-1]
            pos_embed = pos_embed.reshape(-1, E)
            if pos_embed.shape[0] == self.num_patches and T:  # position embedding of the patches only
                pos_embed = torch.cat([pos_embed.new_zeros(T, E), pos_embed])
            if pos_embed.shape[0] != T + self.num_patches:
                raise ValueError(f"pos_embed: expected {T} + {self.num_patches} rows, got {pos_embed.shape[0]}")
            pos_embed = resample_pos_embed(pos_embed, self.grid_size, grid, T)
        # Pixels follow the weights' dtype (uint8-normalised fp32 images into a bf16 model, say).
        images = images.to(self.proj.weight.dtype)
        return ops.patch_embed(
            images, self.proj.weight, self.proj.bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens
        )

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, dynamic_img_size={self.dynamic_img_size}"
