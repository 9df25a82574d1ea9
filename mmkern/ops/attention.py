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
from mmkern.ops._attention_eager import _attention, _EagerPackedAttention, _unpack
from mmkern.ops._checks import FLOAT_DTYPES, check_tensor, native_dtype
from mmkern.ops._eager import needs_grad, plain_eager

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
    """Whether `shape` broadcasts to `full` (torch.broadcast_shapes costs as much as the kernel of a
    small layer)."""
    return len(shape) <= len(full) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(full)))


def draw_seed() -> int:
    """A 62-bit dropout seed from torch's default CPU generator (two 31-bit halves, see the Triton kernel)."""
    lo, hi = torch.randint(0, 2**31, (2,)).tolist()
    return lo | (hi << 32)


def dropout_keep_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: int) -> torch.Tensor:
    """The keep-mask (B, H, L, S) bool that every backend draws for `seed` (True = kept)."""
    keep = torch.empty(shape, dtype=torch.bool)
    _native.launch("attention_dropout_mask", keep.device, {"keep": keep}, {"dropout_p": float(dropout_p), "seed": seed})
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
    autograd would stack three and copy them into the projection's layout.
    """
    check_tensor(qkv, "qkv")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected (B, L, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = _unpack(qkv)
    out = _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, False, backend, window, num_global, packed=qkv)
    return out.transpose(1, 2)


def _check_qkv(query, key, value) -> None:
    """Names the first of query, key and value that is not a float tensor of query's dtype and device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"key/value: dtypes {key.dtype}/{value.dtype} differ from query's {query.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError("key/value: must be on the query's device")


def _check_ranks(qs: tuple, ks: tuple, vs: tuple) -> None:
    """Names the first shape with fewer than 2 dims, else says that the ranks differ."""
    for name, shape in (("query", qs), ("key", ks), ("value", vs)):
        if len(shape) < 2:
            raise ValueError(f"{name}: expected at least 2 dimensions (..., L, E), got shape {shape}")
    raise ValueError("key/value: must have as many dimensions as query")


def _check_mask(attn_mask, query: torch.Tensor, full: tuple) -> None:
    """attn_mask is a bool or float tensor on query's device that broadcasts to `full` (..., Hq, L, S)."""
    check_tensor(attn_mask, "attn_mask", dtypes=None)
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask: on {attn_mask.device}, but query is on {query.device}")
    if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        raise ValueError(f"attn_mask: expected a bool or float mask, got {attn_mask.dtype}")
    if not _broadcasts_to(attn_mask.shape, full):
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to {full}")


def _sdpa(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, window, num_global, packed=None
):
    """scaled_dot_product_attention; `packed`: the (B, L, 3, H, D) tensor whose views query, key and value are."""
    if not (  # the common case in one expression, each attribute read once: CPU tensors of one float dtype
        isinstance(query, torch.Tensor)
        and isinstance(key, torch.Tensor)
        and isinstance(value, torch.Tensor)
        and (dtype := query.dtype) in FLOAT_DTYPES
        and key.dtype is dtype  # dtypes are singletons: `is` costs half of `==`
        and value.dtype is dtype
        and query.is_cpu
        and key.is_cpu
        and value.is_cpu
    ):
        _check_qkv(query, key, value)  # names what is wrong, or passes tensors of one dtype on another device
    # Plain tuples: slicing a torch.Size builds a new torch.Size (~0.2 µs each).
    qs, ks, vs = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    if len(qs) < 2 or len(ks) != len(qs) or len(vs) != len(qs):
        _check_ranks(qs, ks, vs)
    # (..., H, L, E); 2-D tensors (L, E) are one head
    *batch, Hq, L, E = qs if len(qs) > 2 else (1, *qs)
    *batch_k, Hk, S, Ek = ks if len(ks) > 2 else (1, *ks)
    if batch_k != batch:
        raise ValueError(f"key: batch dims {tuple(batch_k)} differ from query's {tuple(batch)}")
    if Ek != E:
        raise ValueError(f"key: head dim {Ek} differs from query's {E}")
    if vs[:-1] != ks[:-1]:
        raise ValueError(f"value: shape {vs} does not match key's {ks}")
    Ev = vs[-1]
    if Hq != Hk and not (enable_gqa and Hk > 0 and Hq % Hk == 0):
        raise ValueError(f"key: {Hk} heads vs query's {Hq}: needs enable_gqa=True and Hq a multiple of Hk")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p <= 1, got {dropout_p}")
    left, right, num_global = _window_args(window, num_global, L, S)
    full = (*batch, Hq, L, S)
    if attn_mask is not None:
        _check_mask(attn_mask, query, full)
    # PyTorch has no path for windows, global tokens, dropout whose mask matches the other backends', is_causal
    # with a mask, or an empty key set (torch gives NaN rows); elsewhere cpu_policy decides on CPU tensors.
    no_torch_path = (
        "windowed attention" if left >= 0
        else "dropout" if dropout_p > 0.0
        else "is_causal combined with attn_mask" if is_causal and attn_mask is not None
        else "an empty key set" if S == 0
        else None
    )  # fmt: skip
    native_dims = E <= MAX_HEAD_DIM and Ev <= MAX_HEAD_DIM
    if backends.cpu_default(backend, query):  # the common case first: no backend named, CPU tensors
        native = no_torch_path is not None or (
            native_dims
            and cpu_policy.attention(math.prod(batch) * Hq, L, S, E, is_causal, needs_grad(query, key, value))
        )
        chosen = "cpu" if native else "torch"
    else:
        chosen = backends.resolve(backend, query.device, "triton")
    if chosen == "torch":
        if no_torch_path is not None:
            raise ValueError(f"backend: 'torch' has no path for {no_torch_path}; use backend='cpu'")
        return _torch_path(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    native_dtype(chosen, "query", query)
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
        raise ValueError(f"query: head dims up to {MAX_HEAD_DIM} are supported, got {E} / {Ev}")
    if dropout_p > 0.0 and chosen == "cuda":
        raise ValueError("dropout_p: the cuda backend has no dropout; use backend='triton' or dropout_p=0")
    B = math.prod(batch)
    if len(qs) == 4:  # already (B, H, L, E): skip three reshape calls (as costly as a small kernel)
        q4, k4, v4 = query, key, value
    else:
        q4 = query.reshape(B, Hq, L, E)
        k4 = key.reshape(B, Hk, S, E)
        v4 = value.reshape(B, Hk, S, Ev)
    mask4 = None
    if attn_mask is not None:
        mask4 = attn_mask if attn_mask.dtype == torch.bool else attn_mask.float()
        mask4 = mask4.expand(full).reshape(B, Hq, L, S)
    seed = draw_seed() if dropout_p > 0.0 else 0
    scale = _default_scale(E) if scale is None else float(scale)
    params = (L, S, scale, is_causal, left, right, num_global, float(dropout_p), seed, chosen)
    if packed is not None and chosen == "cpu" and plain_eager(packed, mask4) and needs_grad(packed, mask4):
        out, _ = _EagerPackedAttention.apply(packed, mask4, *params)
    else:
        out, _ = _attention(q4, k4, v4, mask4, None, None, *params)
    if len(qs) == 4:
        return out
    return out.reshape(*batch, Hq, L, Ev) if len(qs) >= 3 else out.reshape(L, Ev)


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


_torch_sdpa = torch.nn.functional.scaled_dot_product_attention  # torch's own, also while sdpa_override is on


def _torch_path(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """torch's own F.scaled_dot_product_attention with mmkern's rule for a row that sees no key: output 0 and
    gradient 0 where torch gives NaN. Such rows attend to every key instead and are zeroed after, so that no NaN
    enters the backward (masking NaN outputs would still leave NaN in dq, dk and dv)."""
    blind = None
    if attn_mask is not None:
        sees = attn_mask if attn_mask.dtype == torch.bool else attn_mask != -math.inf
        blind = ~sees.any(-1, keepdim=True)
        # Skipping the fix where no row is blind is an eager shortcut; a compiled graph cannot branch on data.
        if torch.compiler.is_compiling() or bool(blind.any()):
            attn_mask = attn_mask | blind if attn_mask.dtype == torch.bool else attn_mask.masked_fill(blind, 0.0)
        else:
            blind = None
    out = _torch_sdpa(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    return out if blind is None else out.masked_fill(blind, 0.0)
