"""RMSNorm with an optional residual add, as in LLaMA-style pre-norm blocks:

    rms_norm(x, r, w, eps) = (s, s · rsqrt(mean(s², -1) + eps) · w),   s = x + r   (the new residual stream, its norm)

Memory-bound: the kernels read each input once and write each output once, forward and backward (the x / residual
and weight gradients in one pass), where the PyTorch path makes a pass per op. Math in fp32 for every storage dtype;
`s` is rounded to the storage dtype before it is normalised, as the unfused `x + r` would be. The kernels' math and
the backward formula: csrc/include/mmkern/rms_norm.h. Registered through mmkern/ops/_register.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkern import backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import check_rows, native_dtype
from mmkern.ops._eager import needs_grad
from mmkern.ops._register import define_op, launch_kernel, new_like, rows


def rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s, (D,), weight, eps)) with s = x + residual, or s = x without a residual.

    Args:
        x: (..., D), any strides; fp32, fp16, bf16 (fp64 on the reference and torch backends).
        residual: same shape and dtype as x, or None.
        weight: (D,) in x's dtype, or None (ones).
        eps: added to the mean square.
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: s (x itself when residual is None, else a new contiguous tensor) and the normalised (..., D), both in
    x's dtype. Differentiable in x, residual and weight, through both outputs.
    """
    check_rows(x, residual, weight)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    if backends.cpu_default(backend, x):  # the common case first: no backend named, CPU tensors
        chosen = "cpu" if cpu_policy.rms_norm(x.numel(), needs_grad(x, residual, weight), x.dtype) else "torch"
    else:
        chosen = backends.resolve(backend, x.device, "triton")
    if chosen == "reference":
        return reference.rms_norm(x, residual, weight, eps)
    if chosen == "torch":  # what a user writes
        s = x if residual is None else x + residual
        return s, F.rms_norm(s, (s.shape[-1],), weight, eps)
    native_dtype(chosen, "x", x)
    s, out, _ = _rms_norm(x, residual, weight, float(eps), chosen)
    return (x if residual is None else s), out


# ---- kernels, destination-passing (see mmkern/ops/_register.py) ----


def _fwd_alloc(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s = x + residual, or an empty tensor without a residual; out; rstd fp32 (...,))."""
    s = new_like(x) if residual is not None else x.new_empty((0,))
    return s, new_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _inference(x, residual, weight, eps, backend):
    """The forward without autograd: on the CPU without rstd, which only the backward reads (the kernel takes it
    absent; two allocations fewer with the placeholder s). The CUDA kernel takes it absent too, but it is given it
    until a GPU run has checked that; the Triton kernel writes it always."""
    if backend != "cpu":
        outputs = _fwd_alloc(x, residual, weight, eps, backend)
        _fwd_launch(x, residual, weight, eps, backend, *outputs)
        return outputs
    s, out = (new_like(x) if residual is not None else None), new_like(x)
    _fwd_launch(x, residual, weight, eps, backend, s, out, None)
    return s, out, None


def _fwd_launch(x, residual, weight, eps, backend, s, out, rstd):
    if x.numel():
        sum_out = s.view(-1, x.shape[-1]) if residual is not None else None
        tensors = {"x": rows(x), "residual": rows(residual), "weight": weight, "sum_out": sum_out,
                   "out": out.view(-1, x.shape[-1]), "rstd": None if rstd is None else rstd.view(-1)}  # fmt: skip
        launch_kernel(backend, "rms_norm", "rms_norm_fwd", x.device, tensors, {"eps": eps})


def _bwd_alloc(
    grad_out: torch.Tensor,
    grad_sum: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    need_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x = grad_residual, grad_weight fp32 (D,) or an empty tensor unless need_weight)."""
    return new_like(s), s.new_empty((s.shape[-1],) if need_weight else (0,), dtype=torch.float32)


def _bwd_launch(grad_out, grad_sum, s, weight, rstd, need_weight, backend, grad_x, grad_w):
    if not s.numel():
        grad_w.zero_()
        return
    D = s.shape[-1]
    tensors = {"grad_out": rows(grad_out), "grad_sum": rows(grad_sum), "s": rows(s), "weight": weight,
               "rstd": rstd.view(-1), "grad_x": grad_x.view(-1, D), "grad_weight": grad_w if need_weight else None}  # fmt: skip
    if backend != "triton":  # cuda: per-warp weight-gradient partials, summed without atomics; none on the cpu
        tensors["partial"] = _partials(s.numel() // D, D, s.device) if backend == "cuda" and need_weight else None
    launch_kernel(backend, "rms_norm", "rms_norm_bwd", s.device, tensors, {})


def _partials(rows: int, d: int, device: torch.device) -> torch.Tensor:
    """(warps, D) fp32 scratch of the CUDA backward: a warp per 4 rows, at most 16 per multiprocessor (enough in
    flight for a memory-bound kernel, while the partials' own traffic stays a fraction of the gradient's)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.empty((max(1, min(16 * sms, -(-rows // 4))), d), dtype=torch.float32, device=device)


def _save(ctx, inputs, outputs):
    x, residual, weight, _, ctx.backend = inputs
    s, _, rstd = outputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if residual is not None else x, weight, rstd)


def _grads(ctx, run_backward, grad_s, grad_out, _grad_rstd):
    s, weight, rstd = ctx.saved_tensors
    need_x, need_r, need_w = ctx.needs_input_grad[:3]
    if grad_out is None:
        grad_out = torch.zeros_like(s)
    if not ctx.has_residual or (grad_s is not None and grad_s.numel() == 0):
        grad_s = None
    grad_x, grad_w = run_backward(grad_out, grad_s, s, weight, rstd, need_w, ctx.backend)
    grad_r = grad_x if need_r and ctx.has_residual else None
    return (grad_x if need_x else None), grad_r, (grad_w.to(weight.dtype) if need_w else None), None, None


_rms_norm = define_op("rms_norm", (_fwd_alloc, _fwd_launch), (_bwd_alloc, _bwd_launch), _save, _grads,
                      non_differentiable=(2,), inference=_inference)  # fmt: skip
