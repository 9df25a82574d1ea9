"""Model layer: ViT, text Transformer, CLIP/SigLIP, fusion encoder, vision-language decoder, weights."""

from mmkern.models.clip import CLIP, CLIPConfig, retrieve
from mmkern.models.fusion import FusionConfig, FusionEncoder
from mmkern.models.presets import clip, clip_config, vit, vit_config
from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig
from mmkern.models.vl_decoder import VisionLanguageDecoder, VLDecoderConfig, causal_lm_loss

__all__ = [
    "CLIP",
    "CLIPConfig",
    "FusionConfig",
    "FusionEncoder",
    "TextConfig",
    "TextTransformer",
    "VLDecoderConfig",
    "ViTConfig",
    "VisionLanguageDecoder",
    "VisionTransformer",
    "causal_lm_loss",
    "clip",
    "clip_config",
    "retrieve",
    "vit",
    "vit_config",
]
