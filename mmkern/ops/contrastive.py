"""InfoNCE / CLIP / SigLIP contrastive losses that never build the B×K logit matrix.

With z_ij = s·x_i·y_j + b (s = logit_scale, b = logit_bias, d_ij = x_i·y_j):

    infonce     = mean_i [ LSE_j z_ij − z_i,label_i ]
    clip_loss   = ½·mean_i [ LSE_j z_ij + LSE_j z_ji − 2 z_ii ]          (open_clip ClipLoss, one device)
    siglip_loss = Σ_ij softplus(−y_ij·z_ij) / B, y = 2·I − 1              (open_clip SigLipLoss)

One custom op, `mmkern::contrastive_stats`, runs the kernel: it streams tiles of d through the GEMM and keeps
per row (and per column for CLIP) the online-max log-sum-exp (fp32) and its derivative in s (the
softmax-weighted mean of d); for the sigmoid loss the row sums of softplus(z), σ(z)·d and σ(z). Its backward
recomputes each tile once and produces G·Y and Gᵀ·X for G = ∂L/∂z; the gradients of s and b are O(B)
epilogues over the saved statistics. The softmax losses' positive (diagonal / label) logits are O(B·D) torch
code; diagonal positives stay out of the kernel's LSEs, and each row's loss is softplus(LSE_neg − z_ii) (never
negative, no cancellation at s = 100); the sigmoid loss treats its positives inside the kernel (softplus(−z)).
Memory: O(B·D) for packed operands and gradients plus O(B) statistics.

Each loss is one autograd node (_Loss) around those kernels; in plain eager mode it calls them without the
custom-op dispatcher. On the CPU, a batch of at most FUSED_MAX_LOGITS logits that needs gradients runs forward
and gradient kernels in one call that keeps its logit tiles (≤ ~4 MiB) in between; backward then only scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkern import _native, backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import FLOAT_DTYPES, check_tensor, native_dtype
from mmkern.ops._eager import plain_eager

# Must match csrc/include/mmkern/contrastive.h Mode.
ROWS, ROWS_COLS, SIGMOID = 0, 1, 2


def _as_scalar(value, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        # The common case in one expression: a 0-dim float tensor, and it and the features on the CPU.
        if value.dtype in FLOAT_DTYPES and value.dim() == 0 and value.is_cpu and like.is_cpu:
            return value
    elif isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    check_tensor(value, name)
    if value.dim() != 0:
        if value.shape != (1,):
            raise ValueError(f"{name}: expected a 0-dim or (1,) tensor, got shape {tuple(value.shape)}")
        # open_clip's CLIP(nonscalar_logit_scale=True) keeps logit_scale / logit_bias as (1,) parameters (for FSDP).
        value = value.reshape(())
    if not (value.is_cpu and like.is_cpu) and value.device != like.device:
        raise ValueError(f"{name}: on {value.device}, but the features are on {like.device}")
    return value


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, *, same_rows: bool):
    """Validates a (B, D) and b (K, D) features; returns (B, K, D)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        shape_a, shape_b = a.shape, b.shape
        # The common case in one expression, each attribute read once: 2-D CPU tensors of one float dtype.
        if (
            len(shape_a) == 2
            and len(shape_b) == 2
            and (dtype := a.dtype) in FLOAT_DTYPES
            and b.dtype is dtype  # dtypes are singletons: `is` costs half of `==`
            and a.is_cpu
            and b.is_cpu
        ):
            (B, D), (K, Db) = shape_a, shape_b
            if D == Db and B > 0 and D > 0 and K > 0 and (K == B or not same_rows):
                return B, K, D
    # Otherwise every check in turn: the first that fails names the argument (tensors off the CPU pass here).
    check_tensor(a, name_a, ndim=2)
    check_tensor(b, name_b, ndim=2)
    (B, D), (K, Db) = a.shape, b.shape
    if b.dtype != a.dtype:
        raise ValueError(f"{name_b}: dtype {b.dtype} differs from {name_a}'s {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"{name_b}: on {b.device}, but {name_a} is on {a.device}")
    if D != Db:
        raise ValueError(f"{name_b}: feature width D={Db} differs from {name_a}'s D={D}")
    if B == 0 or D == 0:
        raise ValueError(f"{name_a}: expected B ≥ 1 rows and D ≥ 1 features, got shape {tuple(a.shape)}")
    if same_rows and K != B:
        raise ValueError(f"{name_b}: batch size B={K} differs from {name_a}'s B={B}")
    if K == 0:
        raise ValueError(f"{name_b}: expected at least one row")
    return B, K, D


# F.cross_entropy(logits, labels) through its ATen op: F's Python wrapper costs ~0.5 µs a call.
_cross_entropy_loss = torch._C._nn.cross_entropy_loss
_MEAN = 1  # at::Reduction::Mean


def _naive_clip(x, y, scale):
    """The torch backend's CLIP loss: reference.clip_loss, the B x B logits and two cross-entropies as a user writes
    them, calling the cross-entropy's ATen op directly."""
    logits = scale * (x @ y.T)
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (_cross_entropy_loss(logits, labels, None, _MEAN) + _cross_entropy_loss(logits.T, labels, None, _MEAN))


def _naive_infonce(query, keys, scale, labels):
    """The torch backend's InfoNCE: reference.infonce through the cross-entropy's ATen op."""
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device)
    return _cross_entropy_loss(scale * (query @ keys.T), labels, None, _MEAN)


def _choose(backend: str | None, x: torch.Tensor, loss: str, B: int, K: int, D: int) -> str:
    """The backend; on the CPU default, the native loss where cpu_policy.contrastive says it measured faster."""
    if backends.cpu_default(backend, x):  # the common case first: no backend named, CPU tensors
        return "cpu" if cpu_policy.contrastive(loss, B, K, D) else "torch"
    return backends.resolve(backend, x.device)


def _pair_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise a_i·b_i in fp32 (B,)."""
    return (a.float() * b.float()).sum(dim=1)


def clip_loss(image_features, text_features, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric CLIP loss ½·(CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)) without the B×B logits.

    Args:
        image_features, text_features: (B, D), same dtype (fp32/fp16/bf16; fp64 on `reference`) and device.
        logit_scale: 0-dim tensor, the multiplier s (open_clip passes `logit_scale.exp()`; a (1,) tensor, as
            open_clip's nonscalar_logit_scale keeps it, also works); gets a gradient.
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: 0-dim loss in the features' dtype (computed in fp32).
    """
    B, _, D = _check_pair(image_features, text_features, "image_features", "text_features", same_rows=True)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    chosen = _choose(backend, image_features, "clip", B, B, D)
    if chosen == "torch":
        return _naive_clip(image_features, text_features, logit_scale)
    native_dtype(chosen, "image_features", image_features)
    if chosen == "reference":
        return reference.clip_loss(image_features, text_features, logit_scale)
    return _loss(image_features, text_features, logit_scale, None, None, ROWS_COLS, chosen)


def infonce(query, keys, logit_scale, *, labels=None, backend: str | None = None) -> torch.Tensor:
    """One-direction InfoNCE: mean cross-entropy of s·query·keysᵀ against `labels`.

    Args:
        query: (B, D); keys: (K, D) with K ≥ B when labels is None (rows past B are extra negatives: a queue,
            a memory bank, hard negatives). Same dtype and device.
        logit_scale: 0-dim tensor s; gets a gradient.
        labels: (B,) int64 indices into keys, default arange(B).

    Returns: 0-dim loss in the query's dtype.
    """
    B, K, D = _check_pair(query, keys, "query", "keys", same_rows=False)
    logit_scale = _as_scalar(logit_scale, "logit_scale", query)
    if labels is None:
        if K < B:
            raise ValueError(f"keys: without labels keys needs at least B={B} rows, got {K}")
    else:
        check_tensor(labels, "labels", ndim=1, dtypes=(torch.int64, torch.int32))
        if labels.device != query.device:
            raise ValueError(f"labels: on {labels.device}, but query is on {query.device}")
        if labels.shape[0] != B:
            raise ValueError(f"labels: expected ({B},), got {tuple(labels.shape)}")
        in_range_checkable = labels.device.type == "cpu" and not torch.compiler.is_compiling()
        if in_range_checkable and bool(((labels < 0) | (labels >= K)).any()):
            raise ValueError(f"labels: values must lie in [0, {K})")
    labels = None if labels is None else labels.long()
    chosen = _choose(backend, query, "infonce", B, K, D)
    if chosen == "torch":
        return _naive_infonce(query, keys, logit_scale, labels)
    native_dtype(chosen, "query", query)
    if chosen == "reference":
        return reference.infonce(query, keys, logit_scale, labels)
    return _loss(query, keys, logit_scale, None, labels, ROWS, chosen)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend: str | None = None) -> torch.Tensor:
    """open_clip's sigmoid loss −Σ_ij log σ(y_ij·(s·x_i·y_j + b)) / B, y = +1 on the diagonal, −1 elsewhere.

    Args:
        image_features, text_features: (B, D), same dtype and device.
        logit_scale, logit_bias: 0-dim tensors s and b; both get gradients.

    Returns: 0-dim loss in the features' dtype.
    """
    B, _, D = _check_pair(image_features, text_features, "image_features", "text_features", same_rows=True)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    logit_bias = _as_scalar(logit_bias, "logit_bias", image_features)
    chosen = _choose(backend, image_features, "siglip", B, B, D)
    if chosen in ("reference", "torch"):  # the naive loss
        return reference.siglip_loss(image_features, text_features, logit_scale, logit_bias)
    native_dtype(chosen, "image_features", image_features)
    return _loss(image_features, text_features, logit_scale, logit_bias, None, SIGMOID, chosen)


# Batches with B·K up to this many logits run the CPU kernel's fused path when gradients are needed: statistics
# and unit-weight gradients in one call, the logits kept in between (one product X·Yᵀ, not two); backward then
# only scales them. Must match csrc/cpu/contrastive.cpp kFusedMaxLogits.
FUSED_MAX_LOGITS = 1 << 18


def _loss(x, y, scale, bias, labels, mode: int, backend: str) -> torch.Tensor:
    """The loss of `mode` (ROWS: infonce, ROWS_COLS: clip, SIGMOID: siglip) as one autograd node.

    A small batch costs little more than its Python: composing the loss from the statistics with autograd-tracked
    torch ops, and dispatching the kernels as custom ops, made a small batch (B = 128, D = 64) cost several times its
    kernels' time. So the loss and its gradients are written out here,
    around the kernels, and in plain eager mode (see _eager.py) the kernels are called without the dispatcher.
    """
    if bias is None:
        bias = torch.zeros((), dtype=torch.float32, device=x.device)
    eager = plain_eager(x, y, scale, bias, labels)
    fused = (
        eager
        and backend == "cpu"
        and x.shape[0] * y.shape[0] <= FUSED_MAX_LOGITS
        and torch.is_grad_enabled()
        and (x.requires_grad or y.requires_grad)
    )
    return _Loss.apply(x, y, scale, bias, labels, mode, backend, eager, fused)


class _Loss(torch.autograd.Function):
    """With the statistics r (rows), c (columns) of contrastive_stats, k = 2 for CLIP (rows and columns) and 1
    otherwise, z_i = s·x_i·y_i + b the positive logits and w = σ(r − z), w' = σ(c − z):

    ROWS_COLS, ROWS without labels (positives on the diagonal, left out of the kernel's softmax statistics):
               L = (Σ_i softplus(r_i − z_i) [+ Σ_i softplus(c_i − z_i)]) / kB     r_i = LSE_(j≠i) z_ij
    ROWS with labels, p = Σ_i x_i·y_(label_i):
               L = (Σ_i r_i − s·p) / B                                           r_i = LSE_j z_ij
    SIGMOID    L = Σ_i r_i / B                        r_i = Σ_j softplus(±z_ij), positives inside the kernel

    softplus(r_i − z_i) is LSE_j z_ij − z_ii exactly, but never negative, 0 for a row without negatives (B = 1),
    and free of the cancellation of two fp32 numbers near s that LSE − z had (~1e-7·s absolute: the whole loss of
    saturated pairs at s = 100). The kernel's G weighs row i's negatives by w_i (column j's by w'_j), so that
    e^(z_ij − r_i)·w_i = e^(z_ij − LSE_j z_ij); the positive's part of G, −(w_i + w'_i) (−k with labels), is added
    here: dx = f·(G·Y + (G_ii)·y_i), dy = f·(Gᵀ·X + (G_ii)·x_i) with f = dL·s / (k·B); dL/ds and dL/db are sums over
    the kernel's ∂/∂s and ∂/∂b planes. Few torch ops on purpose: at small B each one costs a share of the kernels'
    time. The loss comes back in x's dtype; gradients are summed in fp32. `fused` (see FUSED_MAX_LOGITS)
    computes G·Y and Gᵀ·X in forward.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, labels, mode, backend, eager, fused):
        ctx.mode, ctx.backend, ctx.eager = mode, backend, eager
        diagonal = mode == SIGMOID or labels is None
        if fused:
            rows, cols, gx, gy = _fused_impl(x, y, scale, bias, mode, diagonal)
        else:
            rows, cols = (_forward_impl if eager else torch.ops.mmkern.contrastive_stats)(
                x, y, scale, bias, mode, diagonal, backend
            )
            gx = gy = None
        B, k = x.shape[0], 2 if mode == ROWS_COLS else 1
        if mode == SIGMOID:
            ctx.save_for_backward(x, y, scale, bias, labels, rows, cols, None, None, gx, gy)
            return _own(rows[0].sum() / B, x.dtype)
        if labels is not None:
            pos = (x.float() * y[labels].float()).sum()
            if fused:
                gx.sub_(y[labels], alpha=k)
                gy.index_add_(0, labels, x.float(), alpha=-k)
            ctx.save_for_backward(x, y, scale, bias, labels, rows, cols, pos, None, gx, gy)
            return _own(torch.addcmul(rows[0].sum(), scale.float(), pos, value=-k).div_(k * B), x.dtype)
        d = _pair_dot(x, _head(y, B))
        z = torch.addcmul(bias.float(), scale.float(), d)  # the positives' logits
        # softplus(LSE_neg - z) is LSE(all) - z without its cancellation, but at z = +inf it gives the limit 0 where
        # LSE(all) - z is inf - inf = NaN, torch's loss: a -inf feature (an overflowed fp16 one) must not vanish.
        t = (torch.stack([rows[0], cols[0]]) if k == 2 else rows[:1]) - z.masked_fill(z == float("inf"), float("nan"))
        w = torch.sigmoid(t)  # (k, B): the weights of the negatives, see the class doc
        if fused:
            _add_positives(gx, gy, x, y, w.sum(0) if k == 2 else w[0])
        ctx.save_for_backward(x, y, scale, bias, labels, rows, cols, d, w, gx, gy)
        return _own(F.softplus(t).sum().div_(k * B), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias, labels, rows, cols, d, w, gx, gy = ctx.saved_tensors
        mode, B = ctx.mode, x.shape[0]
        k, g = 2 if mode == ROWS_COLS else 1, grad.float()
        grad_x = grad_y = grad_scale = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            f = g * scale.float() / (k * B)
            if gx is None:  # in place: no more (B, D) buffers at the peak of a large batch
                gr = rows.new_ones(B) if w is None else w[0]
                gc = (rows.new_ones(B) if w is None else w[1]) if mode == ROWS_COLS else gr[:0]
                run = _backward_impl if ctx.eager else torch.ops.mmkern.contrastive_stats_backward
                diagonal = mode == SIGMOID or w is not None
                gx, gy = run(gr, gc, x, y, scale, bias, rows, cols, mode, diagonal, ctx.backend)
                if labels is not None:
                    gx.sub_(y[labels], alpha=k)
                    gy.index_add_(0, labels, x.float(), alpha=-k)
                elif w is not None:
                    _add_positives(gx, gy, x, y, w.sum(0) if k == 2 else w[0])
                gx, gy = gx.mul_(f), gy.mul_(f)
            else:  # saved by the fused forward: a second backward (retain_graph) must find them unchanged
                gx, gy = gx * f, gy * f
            grad_x, grad_y = gx.to(x.dtype), gy.to(y.dtype)
        if ctx.needs_input_grad[2]:
            if mode == SIGMOID:
                ds = rows[1].sum()
            elif w is None:
                ds = rows[1].sum().sub_(d, alpha=k)  # d: p with labels
            else:
                ds = (w * ((torch.stack([rows[1], cols[1]]) if k == 2 else rows[1:2]) - d)).sum()
            grad_scale = ds.mul_(g).div_(k * B).to(scale.dtype)
        if ctx.needs_input_grad[3]:  # softplus(r - z): the bias shifts r and z alike
            db = torch.zeros_like(g) if w is not None else rows[2].sum()
            grad_bias = db.mul_(g).div_(B).to(bias.dtype)
        return grad_x, grad_y, grad_scale, grad_bias, None, None, None, None, None


def _own(loss, dtype):
    """The fp32 loss in `dtype`, always a new tensor. torch 2.11's dynamo routes the gradient of an
    autograd.Function's output to the wrong slot, so the whole backward sees 0, when the output is also an
    intermediate of its forward: `.to` to the same dtype returns its input, an in-place op its target
    (pytorch/pytorch#180642; 2.13 and 2.15 are right)."""
    return loss.to(dtype, copy=True)


def _add_positives(gx, gy, x, y, weight):
    """Adds the positive pairs' part of G, -weight_i at (i, i) (B,), to G·Y and Gᵀ·X in place."""
    B = x.shape[0]
    gx.addcmul_(weight[:, None], _head(y, B), value=-1.0)
    _head(gy, B).addcmul_(weight[:, None], x, value=-1.0)


def _head(t, B):
    """Rows [0, B) of t; t itself when that is all of it (a slice is one more op on the small-batch path)."""
    return t if t.shape[0] == B else t[:B]


def contrastive_stats(x, y, scale, bias, mode: int, backend: str, *, diagonal: bool = False):
    """Row statistics (3, B) and column statistics (2, K, or 0 columns unless mode is ROWS_COLS), fp32.

    Rows: softmax modes (LSE_j z_ij, ∂/∂s, 1); SIGMOID (Σ_j softplus(±z_ij) and its ∂/∂s, ∂/∂b), where
    `diagonal` makes (i, i) the positive pairs (−z) and every other pair a negative (+z). In softmax modes
    `diagonal` leaves the pairs (i, i) out of the row and column LSEs (−inf when nothing is left, ∂/∂s then 0)
    and out of the backward's G: the caller adds the positives' terms.
    Columns: (LSE_i z_ij, ∂/∂s). Differentiable in x, y, scale and bias through the value planes
    (planes 1 and 2 are the derivatives themselves and are treated as constants). Used by the
    distributed losses on (local rows, remote block) pairs.
    """
    return torch.ops.mmkern.contrastive_stats(x, y, scale, bias, mode, diagonal, backend)


def _stat_shapes(x, y, mode):
    return (3, x.shape[0]), (2, y.shape[0] if mode == ROWS_COLS else 0)


def _logit_tensors(x, y, scale, bias) -> dict:
    """The native kernels' x, y and scale_bias: [s, b] as fp32 on the device (GPU kernels read them there, so no
    host sync)."""
    return {"x": x, "y": y, "scale_bias": torch.stack([scale.float(), bias.float()]).contiguous()}


def _forward_impl(x, y, scale, bias, mode, diagonal, backend):
    row_shape, col_shape = _stat_shapes(x, y, mode)
    rows = x.new_empty(row_shape, dtype=torch.float32)
    cols = x.new_zeros(col_shape, dtype=torch.float32)
    if backend in ("cpu", "cuda"):
        if backend == "cuda":
            x, y = x.contiguous(), y.contiguous()
        tensors = _logit_tensors(x, y, scale, bias)
        tensors.update(row_stats=rows, col_stats=cols if mode == ROWS_COLS else None)
        _native.launch("contrastive_fwd", x.device, tensors, {"mode": mode, "diagonal": diagonal})
    else:
        from mmkern.kernels.triton.contrastive import contrastive_fwd

        contrastive_fwd(x.contiguous(), y.contiguous(), scale, bias, mode, diagonal, rows, cols)
    return rows, cols


@torch.library.custom_op("mmkern::contrastive_stats", mutates_args=())
def _stats_op(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mode: int, diagonal: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, y, scale, bias, mode, diagonal, backend)


@_stats_op.register_fake
def _(x, y, scale, bias, mode, diagonal, backend):
    row_shape, col_shape = _stat_shapes(x, y, mode)
    return x.new_empty(row_shape, dtype=torch.float32), x.new_empty(col_shape, dtype=torch.float32)


def _backward_impl(grad_rows, grad_cols, x, y, scale, bias, rows, cols, mode, diagonal, backend):
    """(G·Y (B, D), Gᵀ·X (K, D)) in fp32 for G_ij = grad_rows_i·∂rows_i/∂z_ij + grad_cols_j·∂cols_j/∂z_ij."""
    alloc = torch.empty if backend == "cpu" else torch.zeros  # the CPU kernel overwrites; the others accumulate
    dx = alloc(x.shape, dtype=torch.float32, device=x.device)
    dy = alloc(y.shape, dtype=torch.float32, device=y.device)
    gr = grad_rows.float().contiguous()
    gc = grad_cols.float().contiguous() if mode == ROWS_COLS else None
    row_lse = rows[0].contiguous()
    col_lse = cols[0].contiguous() if mode == ROWS_COLS else None
    if backend in ("cpu", "cuda"):
        if backend == "cuda":
            x, y = x.contiguous(), y.contiguous()
        tensors = _logit_tensors(x, y, scale, bias)
        tensors.update(row_lse=row_lse, col_lse=col_lse, gr=gr, gc=gc, dx=dx, dy=dy)
        _native.launch("contrastive_bwd", x.device, tensors, {"mode": mode, "diagonal": diagonal})
    else:
        from mmkern.kernels.triton.contrastive import contrastive_bwd

        contrastive_bwd(x.contiguous(), y.contiguous(), scale, bias, mode, diagonal, row_lse, col_lse, gr, gc, dx, dy)
    return dx, dy


@torch.library.custom_op("mmkern::contrastive_stats_backward", mutates_args=())
def _stats_backward_op(
    grad_rows: torch.Tensor,
    grad_cols: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    mode: int,
    diagonal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_rows, grad_cols, x, y, scale, bias, rows, cols, mode, diagonal, backend)


@_stats_backward_op.register_fake
def _(grad_rows, grad_cols, x, y, scale, bias, rows, cols, mode, diagonal, backend):
    return x.new_empty(x.shape, dtype=torch.float32), y.new_empty(y.shape, dtype=torch.float32)


def _fused_impl(x, y, scale, bias, mode, diagonal):
    """Statistics and unit-weight G·Y, Gᵀ·X (gr = gc = 1) in one CPU kernel call: (rows, cols, dx, dy)."""
    rows = x.new_empty((3, x.shape[0]), dtype=torch.float32)
    cols = x.new_empty((2, y.shape[0] if mode == ROWS_COLS else 0), dtype=torch.float32)
    dx = x.new_empty(x.shape, dtype=torch.float32)
    dy = y.new_empty(y.shape, dtype=torch.float32)
    tensors = _logit_tensors(x, y, scale, bias)
    tensors.update(row_stats=rows, col_stats=cols if mode == ROWS_COLS else None, dx=dx, dy=dy)
    _native.launch("contrastive_fused", x.device, tensors, {"mode": mode, "diagonal": diagonal})
    return rows, cols, dx, dy


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, mode, diagonal, backend = inputs
    rows, cols = output
    ctx.save_for_backward(x, y, scale, bias, rows, cols)
    ctx.mode, ctx.diagonal, ctx.backend = mode, diagonal, backend


def _backward(ctx, grad_rows, grad_cols):
    x, y, scale, bias, rows, cols = ctx.saved_tensors
    gr = grad_rows[0] if grad_rows is not None else rows.new_zeros(rows.shape[1])
    gc = grad_cols[0] if grad_cols is not None and cols.shape[1] else cols.new_zeros(cols.shape[1])
    grad_x = grad_y = grad_scale = grad_bias = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gx, gy = torch.ops.mmkern.contrastive_stats_backward(
            gr, gc, x, y, scale, bias, rows, cols, ctx.mode, ctx.diagonal, ctx.backend
        )
        s = scale.float()
        grad_x = gx.mul_(s).to(x.dtype)  # in place: no second (B, D) fp32 buffer at the peak
        grad_y = gy.mul_(s).to(y.dtype)
    if ctx.needs_input_grad[2]:
        grad_scale = ((gr * rows[1]).sum() + (gc * cols[1]).sum()).to(scale.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = ((gr * rows[2]).sum() + gc.sum()).to(bias.dtype)
    return grad_x, grad_y, grad_scale, grad_bias, None, None, None


_stats_op.register_autograd(_backward, setup_context=_setup_context)
