"""Fused patch embedding: Conv2d(kernel=P, stride=P) + flatten + prefix tokens + position embedding.

    out[b, :T]     = prefix_tokens + pos_embed[:T]
    out[b, T + n]  = Σ_k patch(b, n)[k] · weight[:, k] + bias + pos_embed[T + n]

with patch n = (gy, gx) in row-major order and k = (c, py, px) in the order of a Conv2d weight, so timm,
open_clip and Hugging Face weights load unchanged. The cpu and cuda kernels gather patches inside the
GEMM (no (B, N, C·P·P) im2col buffer); fp32 accumulation for every storage dtype.
"""

from __future__ import annotations

import torch

from mmkern import _native, backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import check_like, check_tensor, native_dtype
from mmkern.ops._eager import eager_function, needs_grad, plain_eager


def check_prefix_and_bias(prefix_tokens, bias, E: int) -> int:
    """Validates prefix_tokens (T, E) and bias (E,) (either may be None); returns T (0 without prefix tokens)."""
    T = 0
    if prefix_tokens is not None:
        check_tensor(prefix_tokens, "prefix_tokens", ndim=2)
        if prefix_tokens.shape[1] != E:
            raise ValueError(f"prefix_tokens: expected (T, {E}), got {tuple(prefix_tokens.shape)}")
        T = prefix_tokens.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != E:
            raise ValueError(f"bias: expected ({E},), got {tuple(bias.shape)}")
    return T


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    prefix_tokens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embeds image patches as tokens.

    Args:
        images: (B, C, H, W), any strides (channels_last included); H and W multiples of P.
        weight: (E, C, P, P), a Conv2d(kernel_size=P, stride=P) weight.
        bias: (E,) or None, added to patch tokens only.
        pos_embed: (T + N, E) or (1, T + N, E) or None, added to every token.
        prefix_tokens: (T, E) or None: class / register tokens placed before the N = (H/P)·(W/P) patches.
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: (B, T + N, E) in the dtype of `images` (fp32, fp16, bf16; fp64 on the reference backend).
    """
    check_tensor(images, "images", ndim=4)
    check_tensor(weight, "weight", ndim=4)
    check_like("images", images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    E, C, P, P2 = weight.shape
    if P != P2 or P == 0:
        raise ValueError(f"weight: expected a square (E, C, P, P) kernel, got shape {tuple(weight.shape)}")
    _, C_img, H, W = images.shape
    if C_img != C:
        raise ValueError(f"weight: has {C} input channels but images has {C_img}")
    if H % P or W % P:
        raise ValueError(f"images: H={H} and W={W} must be multiples of the patch size {P}")
    T = check_prefix_and_bias(prefix_tokens, bias, E)
    N = (H // P) * (W // P)
    if pos_embed is not None:
        check_tensor(pos_embed, "pos_embed", ndim=(2, 3))
        pos_shape = tuple(pos_embed.shape)
        if len(pos_shape) == 3 and pos_shape[0] != 1:
            raise ValueError(f"pos_embed: expected (T + N, E) or (1, T + N, E), got {pos_shape}")
        if pos_shape[-2:] != (T + N, E):
            raise ValueError(f"pos_embed: expected length T + N = {T} + {N} = {T + N} and width {E}, got {pos_shape}")
        if len(pos_shape) == 3:
            pos_embed = pos_embed[0]
    # On GPUs the Triton kernel's tl.dot runs on tensor cores while the cuda kernel is SIMT fp32 FMA.
    bf16 = images.dtype == torch.bfloat16
    if backends.cpu_default(backend, images):  # the common case first: no backend named, CPU tensors
        chosen = "cpu" if cpu_policy.patch_embed(bf16) else "torch"
    else:
        chosen = backends.resolve(backend, images.device, "triton")
    if chosen in ("reference", "torch"):  # conv2d + flatten + cat + add, as a user writes it
        return reference.patch_embed(images, weight, bias, pos_embed, prefix_tokens)
    native_dtype(chosen, "images", images)
    tensors = (images, weight, bias, pos_embed, prefix_tokens)
    if not plain_eager(*tensors):
        return torch.ops.mmkern.patch_embed(*tensors, chosen)
    if needs_grad(*tensors):  # see mmkern/ops/_eager.py
        return _EagerPatchEmbed.apply(*tensors, chosen)
    return _forward_impl(*tensors, chosen)  # without autograd, no node to build


def _output_shape(images, weight, prefix_tokens):
    P = weight.shape[-1]
    T = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    return (images.shape[0], T + (images.shape[2] // P) * (images.shape[3] // P), weight.shape[0])


def _forward_impl(images, weight, bias, pos_embed, prefix_tokens, backend):
    """The body of mmkern::patch_embed."""
    out = images.new_empty(_output_shape(images, weight, prefix_tokens))
    if backend in ("cpu", "cuda"):
        tensors = {
            "images": images,
            "weight": weight,
            "bias": bias,
            "pos_embed": pos_embed,
            "prefix_tokens": prefix_tokens,
            "out": out,
        }
        _native.launch("patch_embed_fwd", images.device, tensors, {})
    else:
        from mmkern.kernels.triton.patch_embed import patch_embed_fwd

        patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens, out)
    return out


@torch.library.custom_op("mmkern::patch_embed", mutates_args=())
def _patch_embed_op(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    prefix_tokens: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return _forward_impl(images, weight, bias, pos_embed, prefix_tokens, backend)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, prefix_tokens, backend):
    return images.new_empty(_output_shape(images, weight, prefix_tokens))


def _backward_impl(grad_out, images, weight, num_prefix, need_images, need_weight, backend):
    """The body of mmkern::patch_embed_backward: (grad_images or an empty tensor, grad_weight in fp32 or an empty
    tensor)."""
    grad_images = torch.empty_like(images, memory_format=torch.contiguous_format) if need_images else None
    grad_weight = weight.new_empty(weight.shape, dtype=torch.float32) if need_weight else None
    if backend in ("cpu", "cuda"):
        tensors = {
            "grad_out": grad_out,
            "images": images,
            "weight": weight,
            "grad_images": grad_images,
            "grad_weight": grad_weight,
        }
        _native.launch("patch_embed_bwd", images.device, tensors, {"num_prefix": num_prefix})
    else:
        from mmkern.kernels.triton.patch_embed import patch_embed_bwd

        patch_embed_bwd(grad_out, images, weight, num_prefix, grad_images, grad_weight)
    empty = images.new_empty(0)
    return (
        grad_images if grad_images is not None else empty,
        grad_weight if grad_weight is not None else empty.float(),
    )


@torch.library.custom_op("mmkern::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    num_prefix: int,
    need_images: bool,
    need_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, images, weight, num_prefix, need_images, need_weight, backend)


@_patch_embed_backward_op.register_fake
def _(grad_out, images, weight, num_prefix, need_images, need_weight, backend):
    grad_images = (
        torch.empty_like(images, memory_format=torch.contiguous_format) if need_images else images.new_empty(0)
    )
    grad_weight = weight.new_empty(weight.shape, dtype=torch.float32) if need_weight else weight.new_empty(0).float()
    return grad_images, grad_weight


def _setup_context(ctx, inputs, output, eager=False):
    images, weight, bias, pos_embed, prefix_tokens, backend = inputs
    ctx.save_for_backward(images, weight)
    ctx.num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    ctx.backend, ctx.eager = backend, eager
    ctx.has = (bias is not None, pos_embed is not None, prefix_tokens is not None)


def _backward(ctx, grad_out):
    images, weight = ctx.saved_tensors
    need_images, need_weight, need_bias, need_pos, need_prefix = ctx.needs_input_grad[:5]
    T = ctx.num_prefix
    grad_images = grad_weight = grad_bias = grad_pos = grad_prefix = None
    if need_images or need_weight:
        run = _backward_impl if ctx.eager else torch.ops.mmkern.patch_embed_backward
        gi, gw = run(grad_out, images, weight, T, need_images, need_weight, ctx.backend)
        grad_images = gi if need_images else None
        grad_weight = gw.to(weight.dtype) if need_weight else None
    # The remaining gradients are memory-bound reductions, left to torch. One pass over grad_out sums the
    # batch; bias and prefix gradients come from that small (T + N, E) sum. (Reducing grad_out[:, T:] over
    # dims (0, 1) directly is several times slower on CPUs.)
    if need_bias or need_pos or need_prefix:
        token_sums = grad_out.sum(dim=0, dtype=torch.float32)
        if need_bias:
            grad_bias = token_sums[T:].sum(dim=0).to(grad_out.dtype)
        if need_pos:
            grad_pos = token_sums.to(grad_out.dtype)
        if need_prefix:
            grad_prefix = token_sums[:T].to(grad_out.dtype)
    return grad_images, grad_weight, grad_bias, grad_pos, grad_prefix, None


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


_EagerPatchEmbed = eager_function("_EagerPatchEmbed", _forward_impl, _setup_context, _backward)
