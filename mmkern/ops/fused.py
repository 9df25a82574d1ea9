"""Fused element-wise ops of a Transformer block: bias + GELU, and residual add + LayerNorm.

    bias_gelu(x, b)              = GELU(x + b)                         (after a bias-free fc1 matmul)
    add_layer_norm(x, r, w, b)   = (s, LN(s)·w + b),  s = x + r        (the new residual stream and its norm)

Both are memory-bound, so the gain is in the passes over memory they save: one read of each input and one write
of each output, forward and backward (grad of x and of the bias / LayerNorm parameters in the same pass). Math in
fp32 for every storage dtype; `s` is rounded to the storage dtype before it is normalised, as the unfused
`x + r` would be. GELU to a few fp32 ulps (max abs error 4e-7 over [-20, 20]): erf through erfc on the side that
keeps relative precision (1e-5 relative far into the negative tail), tanh through the equivalent x·σ(2u) form (see
csrc/include/mmkern/fused.h).

Speed on the CPU (benchmarks/bench_fused.py, figures in the README): the kernels beat torch's ops at ViT-B/16
widths, but each call costs more in Python than a native torch op (validation, autograd.Function, allocation,
argument marshalling), which at the demo's widths eats the gain; hence mmkern.nn.fused_elementwise() stays opt-in.
"""

from __future__ import annotations

import torch

from mmkern import _native, backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import check_like, check_tensor, native_dtype
from mmkern.ops._eager import eager_function, needs_grad, plain_eager

GELU_KINDS = {"none": 0, "tanh": 1}  # must match csrc/include/mmkern/fused.h GeluKind


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none", *, backend: str | None = None
) -> torch.Tensor:
    """GELU(x + bias), as torch.nn.functional.gelu(x + bias, approximate=approximate).

    Args:
        x: (..., N), any strides; fp32, fp16, bf16 (fp64 on the reference backend).
        bias: (N,) in x's dtype, or None.
        approximate: "none" (exact erf GELU) or "tanh".
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: (..., N) contiguous, x's dtype. Differentiable in x and bias.
    """
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        check_like("x", x, bias=bias)
        if bias.shape[0] != x.shape[-1]:
            raise ValueError(f"bias: expected ({x.shape[-1]},) to match the last dim of x, got {tuple(bias.shape)}")
    if approximate not in GELU_KINDS:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    chosen = backends.resolve(backend, x.device, "triton", lambda: cpu_policy.bias_gelu(x.numel(), needs_grad(x, bias)))
    native_dtype(chosen, "x", x)
    if chosen in ("reference", "torch"):  # F.gelu(x + bias)
        return reference.bias_gelu(x, bias, approximate)
    if plain_eager(x, bias):
        return _BiasGelu.apply(x, bias, approximate, chosen)
    return torch.ops.mmkern.bias_gelu(x, bias, approximate, chosen)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s, (D,), weight, bias, eps)) with s = x + residual, or s = x without a residual.

    Args:
        x: (..., D), any strides; fp32, fp16, bf16 (fp64 on the reference backend).
        residual: same shape and dtype as x, or None.
        weight, bias: (D,) in x's dtype, or None (1 and 0).
        eps: added to the variance.

    Returns: s (x itself when residual is None, else a new contiguous tensor) and the normalised (..., D),
    both in x's dtype. Differentiable in x, residual, weight and bias, through both outputs.
    """
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    check_like("x", x, residual=residual, weight=weight, bias=bias)
    if residual is not None:
        check_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t, name, ndim=1)
            if t.shape[0] != D:
                raise ValueError(f"{name}: expected ({D},) to match the last dim of x, got {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    chosen = backends.resolve(backend, x.device, "triton", cpu_policy.add_layer_norm)
    native_dtype(chosen, "x", x)
    if chosen in ("reference", "torch"):  # x + residual, F.layer_norm
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    op = _AddLayerNorm.apply if plain_eager(x, residual, weight, bias) else torch.ops.mmkern.add_layer_norm
    s, out, _, _ = op(x, residual, weight, bias, float(eps), chosen)
    return (x if residual is None else s), out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) as a 2-D (rows, N) view where the strides allow one, else a contiguous copy."""
    return t.reshape(-1, t.shape[-1])


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of t's shape, dtype and device (empty_like costs a third of torch.empty(shape, ...))."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _run(backend: str, name: str, device: torch.device, tensors: dict, scalars: dict) -> None:
    """Runs kernel `name` of `backend` (the Triton launcher of that name, or the native entry point) with its
    parameters by name."""
    if backend == "triton":
        from mmkern.kernels.triton import fused

        getattr(fused, name)(**tensors, **scalars)
    else:
        _native.launch(name, device, tensors, scalars)


# The kernels behind both entry points: destination-passing launches on 2-D (rows, N) views.


def _bias_gelu_fwd(x, bias, approximate, backend):
    out = _contiguous_like(x)
    if x.numel():
        tensors = {"x": _rows(x), "bias": bias, "out": out.view(-1, x.shape[-1])}
        _run(backend, "bias_gelu_fwd", x.device, tensors, {"kind": GELU_KINDS[approximate]})
    return out


def _bias_gelu_bwd(grad_out, x, bias, approximate, need_bias, backend):
    """(grad_x, grad_bias in fp32 or an empty tensor)."""
    N = x.shape[-1]
    grad_x = _contiguous_like(x)
    grad_bias = x.new_empty((N,) if need_bias else (0,), dtype=torch.float32)
    if x.numel():
        tensors = {
            "grad_out": _rows(grad_out),
            "x": _rows(x),
            "bias": bias,
            "grad_x": grad_x.view(-1, N),
            "grad_bias": grad_bias if need_bias else None,
        }
        _run(backend, "bias_gelu_bwd", x.device, tensors, {"kind": GELU_KINDS[approximate]})
    elif need_bias:
        grad_bias.zero_()
    return grad_x, grad_bias


def _stats_shape(x):
    return (x.numel() // x.shape[-1] if x.shape[-1] else 0,)


def _add_layer_norm_fwd(x, residual, weight, bias, eps, backend):
    """(s or an empty tensor without a residual, out, mean fp32 (rows,), rstd fp32 (rows,))."""
    D = x.shape[-1]
    s = _contiguous_like(x) if residual is not None else x.new_empty((0,))
    out = _contiguous_like(x)
    mean = torch.empty(_stats_shape(x), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel():
        s2 = s.view(-1, D) if residual is not None else None
        r2 = _rows(residual) if residual is not None else None
        tensors = {
            "x": _rows(x),
            "residual": r2,
            "weight": weight,
            "bias": bias,
            "sum_out": s2,
            "out": out.view(-1, D),
            "mean": mean,
            "rstd": rstd,
        }
        _run(backend, "add_layer_norm_fwd", x.device, tensors, {"eps": eps})
    return s, out, mean, rstd


def _add_layer_norm_bwd(grad_out, grad_sum, s, weight, mean, rstd, need_params, backend):
    """(grad_x = grad_residual, grad_weight fp32, grad_bias fp32); the last two empty unless need_params."""
    D = s.shape[-1]
    grad_x = _contiguous_like(s)
    pshape = (D,) if need_params else (0,)
    grad_w = torch.empty(pshape, dtype=torch.float32, device=s.device)
    grad_b = torch.empty(pshape, dtype=torch.float32, device=s.device)
    if s.numel():
        gs = _rows(grad_sum) if grad_sum is not None else None
        gw, gb = (grad_w, grad_b) if need_params else (None, None)
        tensors = {
            "grad_out": _rows(grad_out),
            "grad_sum": gs,
            "s": _rows(s),
            "weight": weight,
            "mean": mean,
            "rstd": rstd,
            "grad_x": grad_x.view(-1, D),
            "grad_weight": gw,
            "grad_bias": gb,
        }
        _run(backend, "add_layer_norm_bwd", s.device, tensors, {})
    elif need_params:
        grad_w.zero_(), grad_b.zero_()
    return grad_x, grad_w, grad_b


# ---- custom ops (torch.compile, opcheck) ----


@torch.library.custom_op("mmkern::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor | None, approximate: str, backend: str) -> torch.Tensor:
    return _bias_gelu_fwd(x, bias, approximate, backend)


@_bias_gelu_op.register_fake
def _(x, bias, approximate, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("mmkern::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bias in fp32 or an empty tensor)."""
    return _bias_gelu_bwd(grad_out, x, bias, approximate, need_bias, backend)


@_bias_gelu_backward_op.register_fake
def _(grad_out, x, bias, approximate, need_bias, backend):
    shape = (x.shape[-1],) if need_bias else (0,)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(shape, dtype=torch.float32)


def _bias_gelu_setup(ctx, inputs, output, eager=False):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend, ctx.eager = approximate, backend, eager


def _bias_gelu_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    need_bias = bias is not None and ctx.needs_input_grad[1]
    run = _bias_gelu_bwd if ctx.eager else torch.ops.mmkern.bias_gelu_backward
    grad_x, grad_bias = run(grad_out, x, bias, ctx.approximate, need_bias, ctx.backend)
    return grad_x, (grad_bias.to(bias.dtype) if need_bias else None), None, None


_bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


@torch.library.custom_op("mmkern::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s or an empty tensor without a residual, out, mean fp32 (rows,), rstd fp32 (rows,))."""
    return _add_layer_norm_fwd(x, residual, weight, bias, eps, backend)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, backend):
    s = torch.empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty(_stats_shape(x), dtype=torch.float32, device=x.device)
    return s, torch.empty(x.shape, dtype=x.dtype, device=x.device), mean, torch.empty_like(mean)


@torch.library.custom_op("mmkern::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(
    grad_out: torch.Tensor,
    grad_sum: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_params: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x = grad_residual, grad_weight fp32, grad_bias fp32); the last two empty unless need_params."""
    return _add_layer_norm_bwd(grad_out, grad_sum, s, weight, mean, rstd, need_params, backend)


@_add_layer_norm_backward_op.register_fake
def _(grad_out, grad_sum, s, weight, mean, rstd, need_params, backend):
    pshape = (s.shape[-1],) if need_params else (0,)
    grad_w = torch.empty(pshape, dtype=torch.float32, device=s.device)
    return torch.empty(s.shape, dtype=s.dtype, device=s.device), grad_w, torch.empty_like(grad_w)


def _add_layer_norm_setup(ctx, inputs, output, eager=False):
    x, residual, weight, bias, _, backend = inputs
    s, _, mean, rstd = output
    ctx.has_residual, ctx.backend, ctx.eager = residual is not None, backend, eager
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)
    # An unused output (the sum after the last block, say) then arrives as None instead of a zero-filled tensor.
    ctx.set_materialize_grads(False)


def _add_layer_norm_backward(ctx, grad_s, grad_out, _grad_mean, _grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if grad_out is None:
        grad_out = torch.zeros_like(s)
    if not ctx.has_residual or (grad_s is not None and grad_s.numel() == 0):
        grad_s = None
    run = _add_layer_norm_bwd if ctx.eager else torch.ops.mmkern.add_layer_norm_backward
    grad_x, grad_w, grad_b = run(grad_out, grad_s, s, weight, mean, rstd, need_w or need_b, ctx.backend)
    w_dtype, b_dtype = ctx.param_dtypes
    return (
        grad_x if need_x else None,
        grad_x if (need_r and ctx.has_residual) else None,
        grad_w.to(w_dtype) if need_w else None,
        grad_b.to(b_dtype) if need_b else None,
        None,
        None,
    )


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)

# Plain eager mode: the same kernels and autograd formulas without the custom-op dispatch (see mmkern/ops/_eager.py).
_BiasGelu = eager_function("_BiasGelu", _bias_gelu_fwd, _bias_gelu_setup, _bias_gelu_backward)
_AddLayerNorm = eager_function("_AddLayerNorm", _add_layer_norm_fwd, _add_layer_norm_setup, _add_layer_norm_backward)
