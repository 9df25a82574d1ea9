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
    dtype, cpu = reference.dtype, reference.is_cpu
    for name, t in others.items():
        if t is None or (t.dtype == dtype and ((cpu and t.is_cpu) or t.device == reference.device)):
            continue
        if t.device != reference.device:
            raise ValueError(f"{name}: on {t.device}, but {reference_name} is on {reference.device}")
        raise ValueError(f"{name}: dtype {t.dtype} differs from {reference_name}'s {dtype}")


# The ops' common case passes every check: each helper below tests the whole of it in one expression (a few
# attribute reads, ~0.1 us a tensor), and only a failure takes the slower path that finds and names the problem.


def check_same(x_name: str, x: torch.Tensor, name: str, t: torch.Tensor | None) -> None:
    """t is None or a tensor of x's shape, dtype and device (x already checked)."""
    if t is None or (
        isinstance(t, torch.Tensor)
        and t.dtype is x.dtype  # dtypes are singletons: `is` costs half of `==`
        and ((t.is_cpu and x.is_cpu) or t.device == x.device)
        and t.shape == x.shape
    ):
        return
    check_tensor(t, name)
    check_like(x_name, x, **{name: t})
    raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {x_name}'s {tuple(x.shape)}")


def check_vectors(x_name: str, x: torch.Tensor, **vectors: torch.Tensor | None) -> None:
    """Each given tensor is None or (N,) for x (..., N), in x's dtype and on x's device (x already checked)."""
    shape = (x.shape[-1],)  # shape, not size(-1): size parses its argument (~0.3 µs)
    dtype, cpu = x.dtype, x.is_cpu
    for name, t in vectors.items():
        if t is None or (
            isinstance(t, torch.Tensor)
            and t.dtype is dtype
            and ((cpu and t.is_cpu) or t.device == x.device)
            and t.shape == shape
        ):
            continue
        n = shape[0]
        check_tensor(t, name, ndim=1)
        check_like(x_name, x, **{name: t})
        raise ValueError(f"{name}: expected ({n},) to match the last dim of {x_name}, got {tuple(t.shape)}")


def native_dtype(backend: str, name: str, t: torch.Tensor) -> None:
    """Native and Triton kernels store fp32/fp16/bf16; float64 runs only on the reference and torch backends."""
    if backend not in ("reference", "torch") and t.dtype == torch.float64:
        raise ValueError(f"{name}: float64 runs only on the reference and torch backends, not {backend!r}")
