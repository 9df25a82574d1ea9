"""The custom ops mmkern::attention and mmkern::attention_backward: kernel dispatch, fake kernels and autograd.

One op serves both layouts: dense (B, H, T, D) tensors with an optional (B, H, L, S) mask view, or packed
(total, H, D) tensors with cu_seqlens. Window: left < 0 means none. The public functions, their validation and
the semantics are in mmkern.ops.attention.
"""

from __future__ import annotations

import torch

from mmkern import _native


def _lse_shape(q, cu_q, L):
    """Row statistics: each row's log-sum-exp as the pair (m, log l), the max score and the log of its sum of
    exp(s - m), kept apart because m + log l in fp32 drops log l once |m| >= 2^24 (a row of finfo.min mask).
    A row that sees no key stores (+inf, 0)."""
    return (q.shape[1], q.shape[0], 2) if cu_q is not None else (q.shape[0], q.shape[1], L, 2)


def _new_out(q, v, cu_q, zero: bool = False) -> torch.Tensor:
    """The output, shaped like q with v's head dim. Dense outputs are (B, H, L, Dv) views of (B, L, H, Dv) memory,
    as torch's own SDPA returns them: the usual o.transpose(1, 2).reshape(B, L, H * Dv) before the output
    projection is then a view instead of a copy of the output, and the gradient that comes back through it has
    the same layout. The kernels of every backend take the strides they are given."""
    if cu_q is not None:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    B, H, L, _ = q.shape
    out = (q.new_zeros if zero else q.new_empty)((B, L, H, v.shape[-1]))
    return out.transpose(1, 2)


def _scalars(max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed):
    """The kernels' scalar parameters by name (csrc/include/mmkern/attention.h AttentionFwdParams)."""
    return {
        "max_len_q": max_q,
        "max_len_k": max_k,
        "scale": scale,
        "causal": causal,
        "windowed": left >= 0,
        "left": max(left, 0),
        "right": max(right, 0),
        "num_global": num_global,
        "dropout_p": dropout_p,
        "seed": seed,
    }


def _forward_impl(q, k, v, mask, cu_q, cu_k, *params):
    """The body of mmkern::attention (params: max_q, max_k, scale, causal, left, right, num_global, dropout_p,
    seed, backend)."""
    max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed, backend = params
    if backend == "cpu" and cu_q is None:  # the CPU kernel writes every row; filling it first would be a second pass
        out = _new_out(q, v, cu_q)
        lse = q.new_empty(_lse_shape(q, cu_q, max_q), dtype=torch.float32)
    else:  # rows outside every packed sequence stay 0 (out) / inf (lse)
        out = _new_out(q, v, cu_q, zero=True)
        lse = q.new_full(_lse_shape(q, cu_q, max_q), float("inf"), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    tensors = {"q": q, "k": k, "v": v, "mask": mask, "cu_q": cu_q, "cu_k": cu_k, "out": out, "lse": lse}
    scalars = _scalars(max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed)
    if backend == "triton":
        from mmkern.kernels.triton.attention import attention_fwd

        attention_fwd(**tensors, **scalars)
    else:
        _native.launch("attention_fwd", q.device, tensors, scalars)
    return out, lse


@torch.library.custom_op("mmkern::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
    num_global: int,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q with v's head dim, lse fp32: (B, H, L, 2) dense or (H, total_q, 2) packed, see _lse_shape)."""
    params = (max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed, backend)
    return _forward_impl(q, k, v, mask, cu_q, cu_k, *params)


@_attention_op.register_fake
def _(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed, backend):
    return _new_out(q, v, cu_q), q.new_empty(_lse_shape(q, cu_q, max_q), dtype=torch.float32)


def _backward_impl(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, *params, grads=None):
    """The body of mmkern::attention_backward (params: those of the forward before backend, need_mask_grad,
    backend): (dq, dk, dv, dmask), dmask (B, H, L, S) fp32 when need_mask_grad, else empty. grads: (dq, dk, dv)
    to write into (dense cpu only), else they are allocated."""
    max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed, need_mask_grad, backend = params
    if backend != "cpu":  # the CPU kernel reads any strides
        grad_out = grad_out.contiguous()
    if backend == "triton":  # its kernels write each gradient with the strides of its input
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # The CPU kernel writes every row of dense gradients; elsewhere rows outside all sequences stay zero.
    alloc = torch.empty_like if backend == "cpu" and cu_q is None else torch.zeros_like
    dq, dk, dv = grads if grads is not None else (alloc(q), alloc(k), alloc(v))
    dmask = q.new_zeros(mask.shape if need_mask_grad else (0,), dtype=torch.float32)
    if out.numel() == 0 or k.shape[-3 if cu_q is None else 0] == 0:
        return dq, dk, dv, dmask
    tensors = {
        "q": q,
        "k": k,
        "v": v,
        "mask": mask,
        "cu_q": cu_q,
        "cu_k": cu_k,
        "out": out,
        "lse": lse,
        "grad_out": grad_out,
        "dq": dq,
        "dk": dk,
        "dv": dv,
        "dmask": dmask if need_mask_grad else None,
    }
    scalars = _scalars(max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed)
    if backend == "triton":
        from mmkern.kernels.triton.attention import attention_bwd

        attention_bwd(**tensors, **scalars)
    else:
        # CUDA's workspace, addressed like lse: one value per row in the first slot.
        tensors["delta"] = torch.empty_like(lse) if backend == "cuda" else None
        _native.launch("attention_bwd", q.device, tensors, scalars)
    return dq, dk, dv, dmask


@torch.library.custom_op("mmkern::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
    num_global: int,
    dropout_p: float,
    seed: int,
    need_mask_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask): dmask is (B, H, L, S) fp32 when need_mask_grad, else empty."""
    params = (max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed, need_mask_grad, backend)
    return _backward_impl(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, *params)


@_attention_backward_op.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    mask,
    cu_q,
    cu_k,
    max_q,
    max_k,
    scale,
    causal,
    left,
    right,
    num_global,
    dropout_p,
    seed,
    need_mask_grad,
    backend,
):
    dmask = q.new_empty(mask.shape if need_mask_grad else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output, eager=False):
    q, k, v, mask, cu_q, cu_k = inputs[:6]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k)
    ctx.params = inputs[6:]
    ctx.eager = eager
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask, cu_q, cu_k = ctx.saved_tensors
    need_mask_grad = mask is not None and ctx.needs_input_grad[3]
    *params, backend = ctx.params
    run = _backward_impl if ctx.eager else torch.ops.mmkern.attention_backward
    dq, dk, dv, dmask = run(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, *params, need_mask_grad, backend)
    return (dq, dk, dv, dmask if need_mask_grad else None) + (None,) * 12


_attention_op.register_autograd(_backward, setup_context=_setup_context)
