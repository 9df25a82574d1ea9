"""Model layer: ViT, text Transformer, CLIP/SigLIP, fusion encoder, vision-language decoder, weights."""

from mmkern.models.checkpoint import load_checkpoint, save_checkpoint
from mmkern.models.clip import CLIP, CLIPConfig, retrieve
from mmkern.models.convert import clip_from_hf, clip_from_openai, text_from_bert, vit_from_hf_clip_vision, vit_from_timm
from mmkern.models.fusion import FusionConfig, FusionEncoder
from mmkern.models.presets import clip_config, create_clip, create_vit, vit_config
from mmkern.models.sentence import SentenceEncoder, load_sentence_encoder
from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig
from mmkern.models.vl_decoder import VisionLanguageDecoder, VLDecoderConfig, causal_lm_loss

__all__ = [
    "CLIP",
    "CLIPConfig",
    "FusionConfig",
    "FusionEncoder",
    "SentenceEncoder",
    "TextConfig",
    "TextTransformer",
    "VLDecoderConfig",
    "ViTConfig",
    "VisionLanguageDecoder",
    "VisionTransformer",
    "causal_lm_loss",
    "clip_config",
    "clip_from_hf",
    "clip_from_openai",
    "create_clip",
    "create_vit",
    "load_checkpoint",
    "load_sentence_encoder",
    "retrieve",
    "save_checkpoint",
    "text_from_bert",
    "vit_config",
    "vit_from_hf_clip_vision",
    "vit_from_timm",
]
