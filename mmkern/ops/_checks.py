"""Argument validation shared by the ops: every failure is a ValueError that names the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(t, name: str, *, ndim: int | tuple[int, ...] | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004  (one error type for bad input)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported; expected one of {', '.join(map(str, dtypes))}")


def check_like(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every given tensor has the device and dtype of `reference`."""
    device, dtype = reference.device, reference.dtype
    for name, t in others.items():
        if t is None or (t.dtype == dtype and t.device == device):
            continue
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, but {reference_name} is on {device}")
        raise ValueError(f"{name}: dtype {t.dtype} differs from {reference_name}'s {dtype}")


def native_dtype(backend: str, name: str, t: torch.Tensor) -> None:
    """Native and Triton kernels store fp32/fp16/bf16; float64 runs only on the reference and torch backends."""
    if backend not in ("reference", "torch") and t.dtype == torch.float64:
        raise ValueError(f"{name}: float64 runs only on the reference and torch backends, not {backend!r}")
