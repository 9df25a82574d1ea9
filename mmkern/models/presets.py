"""Configurations of the common model sizes.

ViT-Ti/S/B/L (DeiT / timm widths) with patch 14, 16 or 32; CLIP ViT-B/16 and ViT-L/14 with the shapes of
open_clip's `ViT-B-16` / `ViT-L-14` and Hugging Face's openai/clip-vit-{base-patch16,large-patch14}.
OpenAI weights use quick_gelu (the default here); open_clip's LAION-trained towers use act="gelu".
"""

from __future__ import annotations

from mmkern.models.clip import CLIP, CLIPConfig
from mmkern.models.text import TextConfig
from mmkern.models.vit import VisionTransformer, ViTConfig

VIT_SIZES = {  # width, depth, heads
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
}


def vit_config(size: str, patch_size: int = 16, img_size: int = 224, **overrides) -> ViTConfig:
    """size in ti, s, b, l; patch_size 14, 16 or 32."""
    if size not in VIT_SIZES:
        raise ValueError(f"size: expected one of {', '.join(VIT_SIZES)}, got {size!r}")
    if patch_size not in (14, 16, 32):
        raise ValueError(f"patch_size: expected 14, 16 or 32, got {patch_size}")
    width, depth, heads = VIT_SIZES[size]
    return ViTConfig(
        **{"img_size": img_size, "patch_size": patch_size, "width": width, "depth": depth, "heads": heads, **overrides}
    )


def create_vit(size: str, patch_size: int = 16, img_size: int = 224, **overrides) -> VisionTransformer:
    """VisionTransformer of a preset size, e.g. create_vit("b", 16, num_classes=1000)."""
    return VisionTransformer(vit_config(size, patch_size, img_size, **overrides))


def _clip_vision(width, depth, heads, patch, img_size, act) -> ViTConfig:
    return ViTConfig(
        img_size=img_size,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=heads,
        act=act,
        eps=1e-5,
        pre_norm=True,
        patch_bias=False,
    )


def _clip_text(width, heads, act) -> TextConfig:
    return TextConfig(vocab_size=49408, context_length=77, width=width, depth=12, heads=heads, act=act, eps=1e-5)


def clip_config(name: str, act: str = "quick_gelu", img_size: int | None = None) -> CLIPConfig:
    """name: "ViT-B/16", "ViT-B/32" or "ViT-L/14"."""
    shapes = {  # embed_dim, vision (width, depth, heads, patch), text (width, heads)
        "ViT-B/16": (512, (768, 12, 12, 16), (512, 8)),
        "ViT-B/32": (512, (768, 12, 12, 32), (512, 8)),
        "ViT-L/14": (768, (1024, 24, 16, 14), (768, 12)),
    }
    if name not in shapes:
        raise ValueError(f"name: expected one of {', '.join(shapes)}, got {name!r}")
    embed_dim, (vw, vd, vh, p), (tw, th) = shapes[name]
    return CLIPConfig(
        embed_dim=embed_dim, vision=_clip_vision(vw, vd, vh, p, img_size or 224, act), text=_clip_text(tw, th, act)
    )


def create_clip(name: str, act: str = "quick_gelu", img_size: int | None = None) -> CLIP:
    """CLIP with the shapes of the named OpenAI / open_clip model, randomly initialised."""
    return CLIP(clip_config(name, act, img_size))
