"""mmkern checkpoints: safetensors files with the model class and config in the header metadata.

Writes are atomic, tied parameters are stored once and re-tied on load, and loading reads data only (see
mmkern.models.state_dict); a truncated or corrupted file is a ValueError that names it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmkern.models.clip import CLIP, CLIPConfig
from mmkern.models.fusion import FusionConfig, FusionEncoder
from mmkern.models.state_dict import load_state_dict, read_weights, save_weights
from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig
from mmkern.models.vl_decoder import VisionLanguageDecoder, VLDecoderConfig

MODEL_CLASSES = {  # name -> (class, config from dict)
    "VisionTransformer": (VisionTransformer, lambda d: ViTConfig(**d)),
    "TextTransformer": (TextTransformer, lambda d: TextConfig(**d)),
    "CLIP": (CLIP, CLIPConfig.from_dict),
    "FusionEncoder": (FusionEncoder, FusionConfig.from_dict),
    "VisionLanguageDecoder": (VisionLanguageDecoder, VLDecoderConfig.from_dict),
}


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Writes model's state dict, class name and config (when it has one) to a .safetensors file atomically."""
    meta = {"format": "mmkern", "model_class": type(model).__name__}
    if hasattr(model, "config"):
        meta["config"] = json.dumps(model.config.to_dict())
    return save_weights(model.state_dict(), path, {**meta, **(metadata or {})})


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Loads a checkpoint into `model`, or builds the model it was saved from (class + config) when None."""
    state, meta = read_weights(path)
    if model is None:
        name = meta.get("model_class")
        if name not in MODEL_CLASSES or "config" not in meta:
            raise ValueError(f"path: {path} does not name an mmkern model class and config; pass model=")
        cls, make_config = MODEL_CLASSES[name]
        try:
            config = make_config(json.loads(meta["config"]))
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # bad JSON, or fields that do not fit
            raise ValueError(f"{path}: the {name} config in its metadata is corrupted ({type(e).__name__}: {e})") from e
        model = cls(config)
    return load_state_dict(model, state)
