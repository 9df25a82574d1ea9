"""Plain-eager attention: the kernels and autograd formula of mmkern::attention without the custom-op dispatch
(see mmkern.ops._eager), and the packed-qkv path whose backward writes one (B, L, 3, H, D) gradient."""

from __future__ import annotations

import torch

from mmkern.ops._attention_op import _backward, _backward_impl, _forward_impl, _setup_context
from mmkern.ops._eager import eager_function, needs_grad, plain_eager

_EagerAttention = eager_function("_EagerAttention", _forward_impl, _setup_context, _backward)


def _unpack(qkv):
    """The (B, H, L, D) q, k, v views of a packed (B, L, 3, H, D) qkv."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class _EagerPackedAttention(torch.autograd.Function):
    """Plain-eager cpu attention on the q, k, v views of a packed qkv (B, L, 3, H, D): the kernels and formula of
    _EagerAttention, with one (B, L, 3, H, D) gradient that the backward kernel writes dq, dk and dv into."""

    @staticmethod
    def forward(ctx, qkv, mask, *params):
        out, lse = _forward_impl(*_unpack(qkv), mask, None, None, *params)
        ctx.save_for_backward(qkv, out, lse, mask)
        ctx.params = params
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        qkv, out, lse, mask = ctx.saved_tensors
        need_mask_grad = mask is not None and ctx.needs_input_grad[1]
        *params, backend = ctx.params
        dqkv = torch.empty_like(qkv)
        grads = _unpack(dqkv)
        dmask = _backward_impl(
            grad_out, *_unpack(qkv), out, lse, mask, None, None, *params, need_mask_grad, backend, grads=grads
        )[3]
        return (dqkv, dmask if need_mask_grad else None) + (None,) * len(ctx.params)


def _attention(q, k, v, mask, cu_q, cu_k, *params):
    """mmkern::attention, or in plain eager mode _EagerAttention (which skips the custom-op dispatch, see
    mmkern.ops._eager), or without autograd the forward kernels alone (an autograd node costs several µs)."""
    if plain_eager(q, k, v, mask, cu_q, cu_k):
        if needs_grad(q, k, v, mask):
            return _EagerAttention.apply(q, k, v, mask, cu_q, cu_k, *params)
        return _forward_impl(q, k, v, mask, cu_q, cu_k, *params)
    return torch.ops.mmkern.attention(q, k, v, mask, cu_q, cu_k, *params)
