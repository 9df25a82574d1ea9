"""State dicts as files, and strict loading: the helpers that the model files, the converters and the trainer's
checkpoints share (a leaf module: it imports no model).

A tied weight (one tensor under two names) is stored once and listed in the file's "aliases" metadata, and
read_weights restores the second name. Writes are atomic (mmkern._files.atomic_write). Reading takes data only
(safetensors, or torch.load with weights_only=True; no pickle); a truncated or corrupted file is a ValueError that
names it.
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

from mmkern._files import atomic_write


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


def save_weights(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Writes state_dict (on the CPU) and metadata to a .safetensors file atomically. A name whose tensor is exactly
    an earlier name's (a tied weight) is stored once, as an alias; a tensor that only shares memory with another
    (a view of part of it) is stored as a copy, since safetensors refuses shared memory."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in state_dict.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        key = (*storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu().contiguous()
        tensors[name] = t.clone() if storage in storages else t
        storages.add(storage)
    meta = {**(metadata or {}), "aliases": json.dumps(aliases)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


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


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with tied names restored, metadata) of a file written by save_weights."""
    state, meta = read_safetensors(path)
    try:
        for name, target in json.loads(meta.get("aliases", "{}")).items():
            state[name] = state[target]
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: the 'aliases' metadata is corrupted ({type(e).__name__}: {e})") from e
    return state, meta
