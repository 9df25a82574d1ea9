"""Routing torch's F.scaled_dot_product_attention through mmkern (timm, Hugging Face `attn_implementation="sdpa"`,
any model that calls the functional form): enable_sdpa_override / disable_sdpa_override / sdpa_override."""

from __future__ import annotations

import functools

import torch

from mmkern import backends
from mmkern.ops.attention import MAX_HEAD_DIM, _torch_sdpa, scaled_dot_product_attention


def _supported(query, key, value, attn_mask, dropout_p, is_causal, backend) -> bool:
    """Whether mmkern runs this call; the rest go to torch's own function."""
    tensors = (query, key, value) + (() if attn_mask is None else (attn_mask,))
    if not all(isinstance(t, torch.Tensor) and not t.is_nested for t in tensors):
        return False
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16) or query.dim() < 2:
        return False
    if key.dtype != query.dtype or value.dtype != query.dtype or max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return False
    if query.dim() != key.dim() or query.shape[:-3] != key.shape[:-3]:
        return False
    chosen = backend or backends.selected_backend()
    if chosen is None and query.device.type == "cuda" and not (is_causal and attn_mask is not None):
        # A call torch can run goes to torch's flash / cuDNN / memory-efficient kernels, likely faster on an
        # H100 / H200 until a GPU measurement says otherwise; mmkern takes what torch cannot (causal + mask).
        return False
    try:
        chosen = backends.resolve(chosen, query.device, cuda_default="triton")
    except ValueError:
        return False
    return not (dropout_p > 0.0 and chosen == "cuda")


def _sdpa_override(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, backend=None
):
    if not _supported(query, key, value, attn_mask, dropout_p, is_causal, backend):
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    return scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend
    )


def enable_sdpa_override(backend: str | None = None) -> None:
    """Routes every later `torch.nn.functional.scaled_dot_product_attention` call (timm, Hugging Face
    `attn_implementation="sdpa"`, ...) through mmkern; calls mmkern cannot run (nested tensors, fp64, head
    dims > 256, dropout on the cuda backend) go to torch's own function, and so do, on CUDA tensors without an
    explicit backend, the calls torch can run itself (all but causal + attn_mask): its flash / cuDNN kernels
    are likely faster there until a GPU measurement says otherwise. Undo with disable_sdpa_override()."""
    torch.nn.functional.scaled_dot_product_attention = functools.partial(_sdpa_override, backend=backend)


def disable_sdpa_override() -> None:
    """Restores torch's own scaled_dot_product_attention."""
    torch.nn.functional.scaled_dot_product_attention = _torch_sdpa


class sdpa_override:
    """Context manager form of enable_sdpa_override / disable_sdpa_override (restores what was there)."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __enter__(self):
        self.previous = torch.nn.functional.scaled_dot_product_attention
        enable_sdpa_override(self.backend)
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.previous
        return False
