"""Fused scaled dot-product attention (torch SDPA semantics) and packed variable-length attention.

    out = softmax(scale · Q Kᵀ + mask) V,    scale = 1/√E by default

Forward kernels keep a running max and sum per query row (online softmax) and store only the row's
log-sum-exp (fp32, O(L)); the backward pass recomputes the probabilities tile by tile from it, so no L×S
matrix exists in either pass (an explicit attn_mask is, of course, read as given). fp32 accumulation for
fp32 / fp16 / bf16 storage.

Deliberate difference from torch: a query row that can see no key (causal with L > S, a fully masked row,
an all -inf float mask row) gives 0 and gradient 0 instead of NaN.

Dropout draws its keep-mask from a counter-based Philox generator keyed by a seed taken from torch's
default generator (so torch.manual_seed makes it reproducible); the backward pass regenerates the same
mask and the cpu and triton backends draw the same one (`dropout_keep_mask`).
"""

from __future__ import annotations

import math

import torch

from mmkern import _native, backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import check_tensor, native_dtype
from mmkern.ops._eager import eager_function, needs_grad, plain_eager

MAX_HEAD_DIM = 256


def _window_args(window, num_global: int, L: int, S: int) -> tuple[int, int, int]:
    """(left, right, num_global) for the kernels; left = -1 means no window. Bounds are clamped to the
    sequence lengths so that index arithmetic cannot overflow."""
    if not isinstance(num_global, int) or num_global < 0:
        raise ValueError(f"num_global: expected a non-negative int, got {num_global!r}")
    if window is None:
        if num_global:
            raise ValueError("num_global: global tokens only make sense together with a window")
        return -1, -1, 0
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise ValueError(f"window: expected (left, right) ints, got {window!r}")
    left, right = window
    if left < 0 or right < 0:
        raise ValueError(f"window: left and right must be >= 0, got {window!r}")
    bound = max(L, S) + 1
    return min(left, bound), min(right, bound), num_global


def _default_scale(head_dim: int) -> float:
    """1/sqrt(E); with E = 0 every score is an empty dot product, 0, and torch attends uniformly: any finite scale
    keeps it so (1/sqrt(0) would make 0 * inf = NaN scores)."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _reference_dtype(query: torch.Tensor) -> torch.dtype:
    """The reference backend computes fp16 / bf16 inputs in fp32, as the kernels (and torch's SDPA) do: softmax and
    products rounded to 16 bits lost several times torch's accuracy."""
    return torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype


def _broadcasts_to(shape, full) -> bool:
    """Whether `shape` broadcasts to `full` (torch.broadcast_shapes costs ~40 us a call, as much as the
    kernel of a small layer)."""
    return len(shape) <= len(full) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(full)))


def draw_seed() -> int:
    """A 62-bit dropout seed from torch's default CPU generator (two 31-bit halves, see the Triton kernel)."""
    lo, hi = torch.randint(0, 2**31, (2,)).tolist()
    return lo | (hi << 32)


def dropout_keep_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: int) -> torch.Tensor:
    """The keep-mask (B, H, L, S) bool that every backend draws for `seed` (True = kept)."""
    keep = torch.empty(shape, dtype=torch.bool)
    _native.native().attention_dropout_mask_cpu(_native.tensor_arg(keep), float(dropout_p), seed, _native.num_threads())
    return keep


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
    window: tuple[int, int] | None = None,
    num_global: int = 0,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention on mmkern kernels.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev); fp32 / fp16 / bf16 (fp64 on
            the reference backend); E, Ev <= 256. Hk must equal Hq unless enable_gqa (then Hq % Hk == 0).
        attn_mask: None, bool (True = attend) or float (added to the scores, -inf allowed; gets a gradient
            when it requires one), broadcastable to (..., Hq, L, S), e.g. (L, S) or (B, 1, 1, S).
        dropout_p: probability of dropping an attention weight (applied whenever > 0, like torch; 1 gives zeros).
        is_causal: query i sees keys j <= i (top-left aligned, as torch does, also when L != S). Unlike torch,
            it combines with attn_mask (both apply), e.g. a causal text tower with a (B, 1, 1, S) padding mask.
        scale: score scale, default 1/sqrt(E) (E = 0: every score is 0, as in torch).
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends; on CPU tensors the
            default is the native kernel or torch's own SDPA, whichever measured faster, see cpu_policy).
        window: (left, right): query i sees only keys in [i - left, i + right] (with causal and masks).
        num_global: with a window, the first num_global queries and keys see / are seen by every position.

    Returns: (..., Hq, L, Ev) in the query's dtype. Rows that see no key are 0.
    """
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, window, num_global)


def qkv_packed_attention(
    qkv: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    backend: str | None = None,
    window: tuple[int, int] | None = None,
    num_global: int = 0,
) -> torch.Tensor:
    """Self-attention on a packed projection: qkv (B, L, 3, H, D), a fused qkv Linear's output viewed so, ->
    (B, L, H, D), ready to flatten for the output projection.

    The same as scaled_dot_product_attention on the (B, H, L, D) views of q, k and v (every other argument
    alike), but the cpu backend in eager mode writes dq, dk and dv into one (B, L, 3, H, D) gradient, where
    autograd would stack three and copy them into the projection's layout (~3 ms of the 63 ms forward + backward
    of a ViT-S attention layer at batch 16).
    """
    check_tensor(qkv, "qkv")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected (B, L, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = _unpack(qkv)
    out = _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, False, backend, window, num_global, packed=qkv)
    return out.transpose(1, 2)


def _sdpa(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, window, num_global, packed=None
):
    """scaled_dot_product_attention; `packed`: the (B, L, 3, H, D) tensor whose views query, key and value are."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
        if t.dim() < 2:
            raise ValueError(f"{name}: expected at least 2 dimensions (..., L, E), got shape {tuple(t.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"key/value: dtypes {key.dtype}/{value.dtype} differ from query's {query.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError("key/value: must be on the query's device")
    if query.dim() != key.dim() or query.dim() != value.dim():
        raise ValueError("key/value: must have as many dimensions as query")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"key: batch dims {tuple(key.shape[:-3])} differ from query's {tuple(query.shape[:-3])}")
    L, E = query.shape[-2:]
    S, Ek = key.shape[-2:]
    if Ek != E:
        raise ValueError(f"key: head dim {Ek} differs from query's {E}")
    if value.shape[-2] != S or value.shape[:-2] != key.shape[:-2]:
        raise ValueError(f"value: shape {tuple(value.shape)} does not match key's {tuple(key.shape)}")
    Hq = query.shape[-3] if query.dim() >= 3 else 1
    Hk = key.shape[-3] if key.dim() >= 3 else 1
    if Hq != Hk and not (enable_gqa and Hk > 0 and Hq % Hk == 0):
        raise ValueError(f"key: {Hk} heads vs query's {Hq}: needs enable_gqa=True and Hq a multiple of Hk")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p <= 1, got {dropout_p}")
    left, right, num_global = _window_args(window, num_global, L, S)
    batch = query.shape[:-3]
    full = (*batch, Hq, L, S)
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask", dtypes=None)
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: on {attn_mask.device}, but query is on {query.device}")
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise ValueError(f"attn_mask: expected a bool or float mask, got {attn_mask.dtype}")
        if not _broadcasts_to(attn_mask.shape, full):
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to {full}")
    # PyTorch has no path for windows, global tokens, dropout whose mask matches the other backends', is_causal
    # with a mask, or an empty key set (torch gives NaN rows); elsewhere cpu_policy decides on CPU tensors.
    no_torch_path = (
        "windowed attention" if left >= 0
        else "dropout" if dropout_p > 0.0
        else "is_causal combined with attn_mask" if is_causal and attn_mask is not None
        else "an empty key set" if S == 0
        else None
    )  # fmt: skip
    native_dims = max(E, value.shape[-1]) <= MAX_HEAD_DIM
    chosen = backends.resolve(
        backend,
        query.device,
        "triton",
        lambda: (
            no_torch_path is not None
            or (native_dims and cpu_policy.attention(L, S, E, is_causal, needs_grad(query, key, value)))
        ),
    )
    native_dtype(chosen, "query", query)
    if chosen == "torch":
        if no_torch_path is not None:
            raise ValueError(f"backend: 'torch' has no path for {no_torch_path}; use backend='cpu'")
        return _torch_path(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    if chosen == "reference":
        compute = _reference_dtype(query)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(compute)
        dropout_mask = None
        if dropout_p > 0.0:
            dropout_mask = torch.rand(full, device=query.device) >= dropout_p
        win = None if left < 0 else (left, right)
        out = reference.scaled_dot_product_attention(
            query.to(compute),
            key.to(compute),
            value.to(compute),
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            dropout_mask=dropout_mask,
            window=win,
            num_global=num_global,
        )
        return out.to(query.dtype)
    if not native_dims:
        raise ValueError(f"query: head dims up to {MAX_HEAD_DIM} are supported, got {E} / {value.shape[-1]}")
    if dropout_p > 0.0 and chosen == "cuda":
        raise ValueError("dropout_p: the cuda backend has no dropout; use backend='triton' or dropout_p=0")
    B = math.prod(batch)
    if query.dim() == 4:  # already (B, H, L, E): skip three reshape calls (~5 us, as much as a small kernel)
        q4, k4, v4 = query, key, value
    else:
        q4 = query.reshape(B, Hq, L, E)
        k4 = key.reshape(B, Hk, S, E)
        v4 = value.reshape(B, Hk, S, value.shape[-1])
    mask4 = None
    if attn_mask is not None:
        mask4 = attn_mask if attn_mask.dtype == torch.bool else attn_mask.float()
        mask4 = mask4.expand(full).reshape(B, Hq, L, S)
    seed = draw_seed() if dropout_p > 0.0 else 0
    scale = _default_scale(E) if scale is None else float(scale)
    params = (L, S, scale, is_causal, left, right, num_global, float(dropout_p), seed, chosen)
    if packed is not None and chosen == "cpu" and plain_eager(packed, mask4):
        out, _ = _EagerPackedAttention.apply(packed, mask4, *params)
    else:
        out, _ = _attention(q4, k4, v4, mask4, None, None, *params)
    if query.dim() == 4:
        return out
    return out.reshape(*batch, Hq, L, value.shape[-1]) if query.dim() >= 3 else out.reshape(L, value.shape[-1])


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    window: tuple[int, int] | None = None,
    num_global: int = 0,
) -> torch.Tensor:
    """Attention over packed sequences: sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] and attends only
    within itself (causal / window positions count from the sequence's start).

    Args:
        q: (total_q, H, D); k: (total_k, H_kv, D); v: (total_k, H_kv, Dv); H % H_kv == 0 (GQA).
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,), non-decreasing, on the tensors' device.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds suffice). A shorter one is a
            ValueError for CPU tensors; on a GPU, as with flash-attn, it is the caller's contract (checking would
            stop the host for the device once per call, once per layer of a packed tower).

    Returns: (total_q, H, Dv); rows outside every sequence and rows that see no key are 0.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=3)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(t, name, ndim=1, dtypes=(torch.int32,))
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_k: must have the length of cu_seqlens_q (num_seqs + 1)")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("k/v: must have q's dtype and device")
    if k.shape[-1] != q.shape[-1] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k/v: shapes {tuple(k.shape)} / {tuple(v.shape)} do not match q {tuple(q.shape)}")
    H, Hk = q.shape[1], k.shape[1]
    if Hk == 0 or H % Hk:
        raise ValueError(f"k: {Hk} heads must divide q's {H}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and cu_seqlens_q.numel() > 1:
        # The kernels cover max_seqlen rows and keys of each sequence: a longer one would silently keep zeros.
        longest_q, longest_k = torch.stack([cu_seqlens_q.diff().max(), cu_seqlens_k.diff().max()]).tolist()
        for name, n, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
            if longest > n:
                raise ValueError(f"{name}: {n} is shorter than the longest sequence ({longest} tokens)")
    left, right, num_global = _window_args(window, num_global, max_seqlen_q, max_seqlen_k)
    chosen = backends.resolve(backend, q.device, cuda_default="triton")
    native_dtype(chosen, "q", q)
    if chosen == "torch":
        why = "" if q.device.type == "cpu" else f" (triton: {backends.unavailable_reason('triton', q.device.type)})"
        raise ValueError(f"backend: packed varlen attention has no PyTorch path; use backend='cpu' or 'triton'{why}")
    if chosen == "reference":
        win = None if left < 0 else (left, right)
        compute = _reference_dtype(q)
        out = reference.varlen_attention(
            q.to(compute),
            k.to(compute),
            v.to(compute),
            cu_seqlens_q,
            cu_seqlens_k,
            causal=causal,
            scale=scale,
            window=win,
            num_global=num_global,
        )
        return out.to(q.dtype)
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"q: head dims up to {MAX_HEAD_DIM} are supported, got {q.shape[-1]} / {v.shape[-1]}")
    scale = _default_scale(q.shape[-1]) if scale is None else float(scale)
    out, _ = _attention(
        q,
        k,
        v,
        None,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        causal,
        left,
        right,
        num_global,
        0.0,
        0,
        chosen,
    )
    return out


# ---- custom ops -------------------------------------------------------------------------------------------
# One op serves both layouts: dense (B, H, T, D) tensors with an optional (B, H, L, S) mask view, or packed
# (total, H, D) tensors with cu_seqlens. Window: left < 0 means none.


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


def _scalars(max_q, max_k, scale, causal, left, right, num_global):
    return (max_q, max_k, scale, causal, left >= 0, max(left, 0), max(right, 0), num_global)


def _forward_impl(q, k, v, mask, cu_q, cu_k, *params):
    """The body of mmkern::attention (params: max_q, max_k, scale, causal, left, right, num_global, dropout_p,
    seed, backend)."""
    max_q, max_k, scale, causal, left, right, num_global, dropout_p, seed, backend = params
    if backend == "cpu" and cu_q is None:  # the CPU kernel writes every row; filling first costs ~15% at ViT sizes
        out = _new_out(q, v, cu_q)
        lse = q.new_empty(_lse_shape(q, cu_q, max_q), dtype=torch.float32)
    else:  # rows outside every packed sequence stay 0 (out) / inf (lse)
        out = _new_out(q, v, cu_q, zero=True)
        lse = q.new_full(_lse_shape(q, cu_q, max_q), float("inf"), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    scalars = _scalars(max_q, max_k, scale, causal, left, right, num_global)
    if backend == "triton":
        from mmkern.kernels.triton.attention import attention_fwd

        attention_fwd(q, k, v, mask, cu_q, cu_k, out, lse, *scalars, dropout_p, seed)
        return out, lse
    args = [_native.tensor_arg(t) for t in (q, k, v, mask, cu_q, cu_k, out, lse)]
    if backend == "cpu":
        _native.native().attention_fwd_cpu(*args, *scalars, dropout_p, seed, _native.num_threads())
    else:
        _native.native().attention_fwd_cuda(*args, *scalars, _native.cuda_stream(q.device))
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
    scalars = _scalars(max_q, max_k, scale, causal, left, right, num_global)
    dm = dmask if need_mask_grad else None
    if backend == "triton":
        from mmkern.kernels.triton.attention import attention_bwd

        attention_bwd(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, dq, dk, dv, dm, *scalars, dropout_p, seed)
    elif backend == "cpu":
        args = [_native.tensor_arg(t) for t in (q, k, v, mask, cu_q, cu_k, out, grad_out, lse, dq, dk, dv, dm)]
        _native.native().attention_bwd_cpu(*args, *scalars, dropout_p, seed, _native.num_threads())
    else:
        delta = torch.empty_like(lse)  # the kernels address it like lse, one value per row in the first slot
        args = [_native.tensor_arg(t) for t in (q, k, v, mask, cu_q, cu_k, out, grad_out, lse, dq, dk, dv, dm, delta)]
        _native.native().attention_bwd_cuda(*args, *scalars, _native.cuda_stream(q.device))
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


def _torch_path(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """torch's own F.scaled_dot_product_attention with mmkern's rule for a row that sees no key: output 0 and
    gradient 0 where torch gives NaN. Such rows attend to every key instead and are zeroed after, so that no NaN
    enters the backward (masking NaN outputs would still leave NaN in dq, dk and dv)."""
    blind = None
    if attn_mask is not None:
        sees = attn_mask if attn_mask.dtype == torch.bool else attn_mask != -math.inf
        blind = ~sees.any(-1, keepdim=True)
        if bool(blind.any()):
            attn_mask = attn_mask | blind if attn_mask.dtype == torch.bool else attn_mask.masked_fill(blind, 0.0)
        else:
            blind = None
    out = _torch_sdpa(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    return out if blind is None else out.masked_fill(blind, 0.0)


def _attention(q, k, v, mask, cu_q, cu_k, *params):
    """mmkern::attention, or in plain eager mode _EagerAttention (the custom-op dispatch costs ~0.25 ms per
    forward + backward, measured on 1 thread)."""
    if plain_eager(q, k, v, mask, cu_q, cu_k):
        return _EagerAttention.apply(q, k, v, mask, cu_q, cu_k, *params)
    return torch.ops.mmkern.attention(q, k, v, mask, cu_q, cu_k, *params)


# ---- routing torch's F.scaled_dot_product_attention through mmkern ---------------------------------------

_torch_sdpa = torch.nn.functional.scaled_dot_product_attention
override_calls = 0  # calls that the override ran on mmkern kernels (the rest fell back to torch)


def _override_supported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, backend) -> bool:
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
    global override_calls
    if not _override_supported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, backend):
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
    override_calls += 1
    return scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend
    )


def enable_sdpa_override(backend: str | None = None) -> None:
    """Routes every later `torch.nn.functional.scaled_dot_product_attention` call (timm, Hugging Face
    `attn_implementation="sdpa"`, ...) through mmkern; calls mmkern cannot run (nested tensors, fp64, head
    dims > 256, dropout on the cuda backend) go to torch's own function, and so do, on CUDA tensors without an
    explicit backend, the calls torch can run itself (all but causal + attn_mask): its flash / cuDNN kernels
    are likely faster there until a GPU measurement says otherwise. Undo with disable_sdpa_override()."""
    import functools

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
