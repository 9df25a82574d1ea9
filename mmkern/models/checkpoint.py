"""mmkern checkpoints: safetensors files with the model class and config in the header metadata.

Writes are atomic (a temporary file in the same folder, then os.replace), so a crash never leaves a torn
checkpoint. Tied parameters (one tensor under two names) are stored once and re-tied on load. Loading reads data
only (safetensors and JSON, no pickle); a truncated or corrupted file is a ValueError that names it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmkern.models.clip import CLIP, CLIPConfig
from mmkern.models.fusion import FusionConfig, FusionEncoder
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


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """ValueError listing every missing key, unexpected key and shape mismatch between model and state_dict."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if own[k].shape != state_dict[k].shape
    )
    problems = [
        f"{title} ({len(keys)}):\n  " + "\n  ".join(keys)
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"state_dict does not fit {type(model).__name__}:\n" + "\n".join(problems))


def load_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Strict load that reports all problems at once (check_state_dict); returns the model."""
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Writes model's state dict, class name and config (when it has one) to a .safetensors file atomically."""
    path = Path(path)
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:  # tied weight: stored once
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    meta = {"format": "mmkern", "model_class": type(model).__name__, "aliases": json.dumps(aliases)}
    if hasattr(model, "config"):
        meta["config"] = json.dumps(model.config.to_dict())
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. A missing file is FileNotFoundError; one that is truncated or
    corrupted (safetensors checks that its header and the file size agree) is a ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118  (safe_open is not a dict)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError for unreadable files
        raise ValueError(f"{path}: not a readable safetensors file, it is truncated or corrupted ({e})") from e


def load_torch_data(path: str | os.PathLike, hint: str = "") -> Any:
    """torch.load(path, weights_only=True): tensors (on the CPU) and plain Python data only; a pickled object in
    the file is refused, never constructed or run. A missing file is FileNotFoundError; a refused, truncated or
    corrupted one a ValueError naming it (`hint`, e.g. how to convert an old file, is appended to the refusal)."""
    try:
        # map_location: a file saved from a GPU still loads on a machine without one (or on another rank's GPU);
        # optimizer.load_state_dict moves its state to the parameters' device
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # what weights_only raises for anything but plain data
        why = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n\n|$)", str(e), re.DOTALL)
        why = " ".join((why.group(1) if why else str(e).splitlines()[0]).split())
        # `from None`: torch's own message suggests weights_only=False, which is exactly what must not happen here
        raise ValueError(
            f"{path}: refused to load ({why}). mmkern reads checkpoint files as data only and never runs code from "
            f"them. {hint}".rstrip()
        ) from None
    except Exception as e:  # torch reports a torn zip, an empty file or garbage in many ways
        raise ValueError(f"{path}: cannot be read, it is truncated or corrupted ({type(e).__name__}: {e})") from e


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with tied names restored, metadata) of an mmkern checkpoint."""
    state, meta = read_safetensors(path)
    try:
        for name, target in json.loads(meta.get("aliases", "{}")).items():
            state[name] = state[target]
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: the 'aliases' metadata is corrupted ({type(e).__name__}: {e})") from e
    return state, meta


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Loads a checkpoint into `model`, or builds the model it was saved from (class + config) when None."""
    state, meta = read_checkpoint(path)
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
