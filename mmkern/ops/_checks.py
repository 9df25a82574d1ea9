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


# The ops' common case passes every check: the helpers below test the whole of it in one expression, reading each
# tensor attribute once (~50-120 ns a read), and only a failure takes the slower path that finds and names the problem.


def _matches(t, dtype: torch.dtype, device: torch.device | None, shape: tuple[int, ...] | None = None) -> bool:
    """t is a tensor of this dtype, device (None: the CPU) and shape (None: any)."""
    return (
        isinstance(t, torch.Tensor)
        and t.dtype is dtype  # dtypes are singletons: `is` costs half of `==`
        and (t.is_cpu if device is None else t.device == device)  # is_cpu: no torch.device object to build
        and (shape is None or t.shape == shape)
    )


def check_like(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every given argument is None or a tensor with the device and dtype of `reference`."""
    dtype = reference.dtype
    device = None if reference.is_cpu else reference.device
    for name, t in others.items():
        if t is None or _matches(t, dtype, device):
            continue
        check_tensor(t, name, dtypes=None)
        if t.device != reference.device:
            raise ValueError(f"{name}: on {t.device}, but {reference_name} is on {reference.device}")
        raise ValueError(f"{name}: dtype {t.dtype} differs from {reference_name}'s {dtype}")


def check_rows(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """The row ops' tensors (bias_gelu, add_layer_norm, rms_norm): x (..., N) a float tensor with at least one dim;
    residual None or x's shape; weight and bias None or (N,); each in x's dtype and on x's device."""
    check_tensor(x, "x")
    shape, dtype = x.shape, x.dtype
    if not shape:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    device = None if x.is_cpu else x.device
    if residual is not None and not _matches(residual, dtype, device, shape):
        check_tensor(residual, "residual")
        check_like("x", x, residual=residual)
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(shape)}")
    vector = (shape[-1],)  # a plain tuple: slicing a torch.Size builds another one (~0.2 µs)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not _matches(t, dtype, device, vector):
            check_tensor(t, name, ndim=1)
            check_like("x", x, **{name: t})
            raise ValueError(f"{name}: expected {vector} to match the last dim of x, got {tuple(t.shape)}")


def native_dtype(backend: str, name: str, t: torch.Tensor) -> None:
    """Native and Triton kernels store fp32/fp16/bf16; float64 runs only on the reference and torch backends."""
    if backend not in ("reference", "torch") and t.dtype == torch.float64:
        raise ValueError(f"{name}: float64 runs only on the reference and torch backends, not {backend!r}")
