"""Fused element-wise ops of a Transformer block: bias + GELU, and residual add + LayerNorm.

    bias_gelu(x, b)              = GELU(x + b)                         (after a bias-free fc1 matmul)
    add_layer_norm(x, r, w, b)   = (s, LN(s)·w + b),  s = x + r        (the new residual stream and its norm)

Both are memory-bound, so the gain is in the passes over memory they save: one read of each input and one write
of each output, forward and backward (grad of x and of the bias / LayerNorm parameters in the same pass). Math in
fp32 for every storage dtype; `s` is rounded to the storage dtype before it is normalised, as the unfused
`x + r` would be. GELU to a few fp32 ulps (max abs error 4e-7 over [-20, 20]): erf through erfc on the side that
keeps relative precision (1e-5 relative far into the negative tail), tanh through the equivalent x·σ(2u) form (see
csrc/include/mmkern/fused.h).

Speed on the CPU (benchmarks/bench_fused.py, figures in the README): the native kernels beat x + r then
F.layer_norm and F.gelu(x + b) from about 2^12-2^16 elements (by level, dtype and mode: cpu_policy), where the
default path runs them; below that a native call's fixed cost (~10 us at 8x64 against torch's ~3 us: allocation,
argument marshalling, autograd) loses, and the default takes the PyTorch path. mmkern.nn.fused_elementwise() stays
opt-in: on the demo's training step it measured within the machine's noise of the unfused modules.
Registered through mmkern/ops/_register.py.
"""

from __future__ import annotations

import torch

from mmkern import backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import check_rows, native_dtype
from mmkern.ops._eager import needs_grad
from mmkern.ops._register import define_op, launch_kernel, new_like, rows

GELU_KINDS = {"none": 0, "tanh": 1}  # must match csrc/include/mmkern/fused.h GeluKind

_gelu_ = torch._C._nn.gelu_  # in place on the fresh x + bias: one allocation fewer than F.gelu(x + bias)


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none", *, backend: str | None = None
) -> torch.Tensor:
    """GELU(x + bias), as torch.nn.functional.gelu(x + bias, approximate=approximate).

    Args:
        x: (..., N), any strides; fp32, fp16, bf16 (fp64 on the reference and torch backends).
        bias: (N,) in x's dtype, or None.
        approximate: "none" (exact erf GELU) or "tanh".
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: (..., N) in x's dtype (contiguous from the kernels; the torch path keeps the strides x + bias has).
    Differentiable in x and bias.
    """
    check_rows(x, bias=bias)
    if approximate not in GELU_KINDS:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    grad = needs_grad(x, bias)
    if backends.cpu_default(backend, x):  # the common case first: no backend named, CPU tensors
        chosen = "cpu" if cpu_policy.bias_gelu(x.numel(), grad, x.dtype) else "torch"
    else:
        chosen = backends.resolve(backend, x.device, "triton")
    if chosen == "torch":  # F.gelu(x + bias), what a user writes; without autograd, GELU in place on the sum
        if grad or bias is None:
            return reference.bias_gelu(x, bias, approximate)
        return _gelu_(x + bias, approximate=approximate)
    if chosen == "reference":
        return reference.bias_gelu(x, bias, approximate)
    native_dtype(chosen, "x", x)
    return _bias_gelu(x, bias, approximate, chosen)


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
        x: (..., D), any strides; fp32, fp16, bf16 (fp64 on the reference and torch backends).
        residual: same shape and dtype as x, or None.
        weight, bias: (D,) in x's dtype, or None (1 and 0).
        eps: added to the variance.
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: s (x itself when residual is None, else a new tensor) and the normalised (..., D), both in x's dtype.
    Differentiable in x, residual, weight and bias, through both outputs.
    """
    check_rows(x, residual, weight, bias)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    if backends.cpu_default(backend, x):
        grad = needs_grad(x, residual, weight, bias)
        chosen = "cpu" if cpu_policy.add_layer_norm(x.numel(), grad, x.dtype) else "torch"
    else:
        chosen = backends.resolve(backend, x.device, "triton")
    if chosen == "torch":  # x + residual, then F.layer_norm (torch.layer_norm: the same op without F's Python)
        s = x if residual is None else x + residual
        return s, torch.layer_norm(s, (x.shape[-1],), weight, bias, eps)
    if chosen == "reference":
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    native_dtype(chosen, "x", x)
    s, out, _, _ = _add_layer_norm(x, residual, weight, bias, float(eps), chosen)
    return (x if residual is None else s), out


# ---- kernels, destination-passing on 2-D (rows, N) views (see mmkern/ops/_register.py) ----


def _gelu_alloc(x: torch.Tensor, bias: torch.Tensor | None, approximate: str, backend: str) -> torch.Tensor:
    return new_like(x)


def _gelu_launch(x, bias, approximate, backend, out):
    if x.numel():
        tensors = {"x": rows(x), "bias": bias, "out": rows(out)}
        launch_kernel(backend, "fused", "bias_gelu_fwd", x.device, tensors, {"kind": GELU_KINDS[approximate]})


def _gelu_bwd_alloc(
    grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str, need_bias: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bias in fp32 (N,), or an empty tensor unless need_bias)."""
    return new_like(x), x.new_empty((x.shape[-1],) if need_bias else (0,), dtype=torch.float32)


def _gelu_bwd_launch(grad_out, x, bias, approximate, need_bias, backend, grad_x, grad_bias):
    if not x.numel():
        grad_bias.zero_()
        return
    tensors = {"grad_out": rows(grad_out), "x": rows(x), "bias": bias, "grad_x": rows(grad_x),
               "grad_bias": grad_bias if need_bias else None}  # fmt: skip
    launch_kernel(backend, "fused", "bias_gelu_bwd", x.device, tensors, {"kind": GELU_KINDS[approximate]})


def _gelu_save(ctx, inputs, output):
    x, bias, ctx.approximate, ctx.backend = inputs
    ctx.save_for_backward(x, bias)


def _gelu_grads(ctx, run_backward, grad_out):
    x, bias = ctx.saved_tensors
    need_bias = bias is not None and ctx.needs_input_grad[1]
    grad_x, grad_bias = run_backward(grad_out, x, bias, ctx.approximate, need_bias, ctx.backend)
    return grad_x, (grad_bias.to(bias.dtype) if need_bias else None), None, None


_bias_gelu = define_op("bias_gelu", (_gelu_alloc, _gelu_launch), (_gelu_bwd_alloc, _gelu_bwd_launch), _gelu_save,
                       _gelu_grads)  # fmt: skip


def _ln_alloc(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, or an empty tensor without a residual; out; mean fp32 (rows,); rstd fp32 (rows,))."""
    s = new_like(x) if residual is not None else x.new_empty((0,))
    stats = (x.numel() // x.shape[-1] if x.shape[-1] else 0,)
    return s, new_like(x), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def _ln_inference(x, residual, weight, bias, eps, backend):
    """The forward without autograd: on the CPU without mean and rstd, which only the backward reads (the kernel
    takes them absent; three allocations fewer, ~1 us each, with the placeholder s). The CUDA kernel takes them absent
    too, but it is given them until a GPU run has checked that; the Triton kernel writes them always."""
    if backend != "cpu":
        outputs = _ln_alloc(x, residual, weight, bias, eps, backend)
        _ln_launch(x, residual, weight, bias, eps, backend, *outputs)
        return outputs
    s, out = (new_like(x) if residual is not None else None), new_like(x)
    _ln_launch(x, residual, weight, bias, eps, backend, s, out, None, None)
    return s, out, None, None


def _ln_launch(x, residual, weight, bias, eps, backend, s, out, mean, rstd):
    if x.numel():
        tensors = {"x": rows(x), "residual": rows(residual), "weight": weight, "bias": bias,
                   "sum_out": rows(s) if residual is not None else None, "out": rows(out), "mean": mean, "rstd": rstd}  # fmt: skip
        launch_kernel(backend, "fused", "add_layer_norm_fwd", x.device, tensors, {"eps": eps})


def _ln_bwd_alloc(
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
    pshape = (s.shape[-1],) if need_params else (0,)
    return new_like(s), s.new_empty(pshape, dtype=torch.float32), s.new_empty(pshape, dtype=torch.float32)


def _ln_bwd_launch(grad_out, grad_sum, s, weight, mean, rstd, need_params, backend, grad_x, grad_w, grad_b):
    if not s.numel():
        grad_w.zero_(), grad_b.zero_()
        return
    gw, gb = (grad_w, grad_b) if need_params else (None, None)
    tensors = {"grad_out": rows(grad_out), "grad_sum": rows(grad_sum), "s": rows(s), "weight": weight, "mean": mean,
               "rstd": rstd, "grad_x": rows(grad_x), "grad_weight": gw, "grad_bias": gb}  # fmt: skip
    if backend != "triton":  # cuda: per-block partial sums of grad_weight / grad_bias, summed without atomics
        D = s.shape[-1]
        tensors["partial"] = _ln_partials(s.numel() // D, D, s.device) if backend == "cuda" and need_params else None
    launch_kernel(backend, "fused", "add_layer_norm_bwd", s.device, tensors, {})


def _ln_partials(rows: int, d: int, device: torch.device) -> torch.Tensor:
    """(blocks, 2, D) fp32 scratch of the CUDA LayerNorm backward: 128-thread blocks striding over the rows, at most
    8 per multiprocessor (1,056 on an H100 / H200), each summing grad_weight / grad_bias over its rows."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.empty((max(1, min(8 * sms, rows)), 2, d), dtype=torch.float32, device=device)


def _ln_save(ctx, inputs, outputs):
    x, residual, weight, bias, _, ctx.backend = inputs
    s, _, mean, rstd = outputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _ln_grads(ctx, run_backward, grad_s, grad_out, _grad_mean, _grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if grad_out is None:
        grad_out = torch.zeros_like(s)
    if not ctx.has_residual or (grad_s is not None and grad_s.numel() == 0):
        grad_s = None
    grad_x, grad_w, grad_b = run_backward(grad_out, grad_s, s, weight, mean, rstd, need_w or need_b, ctx.backend)
    w_dtype, b_dtype = ctx.param_dtypes
    return (
        grad_x if need_x else None,
        grad_x if (need_r and ctx.has_residual) else None,
        grad_w.to(w_dtype) if need_w else None,
        grad_b.to(b_dtype) if need_b else None,
        None,
        None,
    )


_add_layer_norm = define_op("add_layer_norm", (_ln_alloc, _ln_launch), (_ln_bwd_alloc, _ln_bwd_launch), _ln_save,
                            _ln_grads, non_differentiable=(2, 3), inference=_ln_inference)  # fmt: skip
