"""CLIP and SigLIP losses across torch.distributed ranks, memory-flat in the global batch.

Each rank holds its local rows x_r, y_r (b of the B = N·b pairs) and gets exactly what open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)` (and its `SigLipLoss`) gives it:

    loss_r (CLIP)   = ½·mean_{i∈r} [LSE_j z_ij + LSE_j z_ji − 2 z_ii]      (j over all B)
                    = ½·mean_{i∈r} [softplus(LSE_(j≠i) z_ij − z_ii) + softplus(LSE_(j≠i) z_ji − z_ii)]
    loss_r (SigLIP) = Σ_{i∈r, all j} softplus(−y_ij·z_ij) / b
    ∂/∂x_r, ∂/∂y_r  = Σ_q ∂loss_q/∂(x_r, y_r)   (the gather's backward sums over ranks)
    ∂/∂s, ∂/∂b      = ∂loss_r/∂s, ∂loss_r/∂b    (this rank's own loss only: DDP averages it once)

Forward: the text blocks y_q travel around the ring (send to rank+1, receive from rank−1), the next block in
flight while the kernel works on the current one. Row statistics merge locally; column statistics (CLIP)
are written per block and merged across ranks with two O(B) all-reduces (max, then sums of exp). Backward:
the blocks travel again with a fp32 dY accumulator that arrives back at its owner after N hops. Per-rank
memory is O(b·D + B); no rank ever holds more than two text blocks. The positive pairs stay out of the
statistics (the own block runs with `diagonal`, see mmkern/ops/contrastive.py _Loss): the second form of the
CLIP loss is never negative and keeps its digits at s = 100, where LSE − z loses them to cancellation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkern import backends
from mmkern.ops.contrastive import ROWS_COLS, SIGMOID, _as_scalar, _check_pair, _pair_dot, contrastive_stats


def _exchange(send: list[torch.Tensor], recv: list[torch.Tensor], group):
    """Starts sending `send` to rank+1 and receiving `recv` from rank−1; returns the requests."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send] + [dist.P2POp(dist.irecv, t, prv, group) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for r in requests:
        r.wait()


def _merge_lse(lse, ds, lse_q, ds_q):
    """Merges softmax statistics (log-sum-exp and the softmax-weighted mean of d) of two column sets."""
    new = torch.logaddexp(lse, lse_q)
    return new, ds * torch.exp(lse - new) + ds_q * torch.exp(lse_q - new)


class _RingStats(torch.autograd.Function):
    """(row values (b,), own column values (b,) or empty) over the global batch; see the module doc."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, mode, backend, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        b = x.shape[0]
        cur, rows = y.contiguous(), None
        col_lse = x.new_empty((world, b), dtype=torch.float32)
        col_ds = torch.empty_like(col_lse)
        with torch.no_grad():
            for step in range(world):
                q = (rank - step) % world
                requests = []
                if step < world - 1:
                    nxt = torch.empty_like(cur)
                    requests = _exchange([cur], [nxt], group)
                r_q, c_q = contrastive_stats(x, cur, scale, bias, mode, backend, diagonal=q == rank)
                if rows is None:
                    rows = r_q.clone()
                elif mode == SIGMOID:
                    rows += r_q
                else:
                    rows[0], rows[1] = _merge_lse(rows[0], rows[1], r_q[0], r_q[1])
                if mode == ROWS_COLS:
                    col_lse[q], col_ds[q] = c_q[0], c_q[1]
                _wait(requests)
                if step < world - 1:
                    cur = nxt
            if mode == ROWS_COLS:
                # LSE over all ranks' rows: shift by the global max, sum exp and exp-weighted means.
                top = col_lse.clone()
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                w = torch.exp(col_lse - top.clamp_min(torch.finfo(torch.float32).min))  # top -inf: no negative
                sums = torch.stack([w, w * col_ds])
                dist.all_reduce(sums, group=group)
                col_lse = top + torch.log(sums[0])
                col_ds = torch.where(sums[0] > 0, sums[1] / sums[0], 0.0)
        cols = col_lse[rank] if mode == ROWS_COLS else x.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(x, y, scale, bias, rows, col_lse, col_ds[rank] if mode == ROWS_COLS else cols)
        ctx.mode, ctx.backend, ctx.group = mode, backend, group
        return rows[0].clone(), cols.clone()

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        x, y, scale, bias, rows, col_lse, own_col_ds = ctx.saved_tensors
        mode, backend, group = ctx.mode, ctx.backend, ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        b = x.shape[0]
        gr = grad_rows.float().contiguous() if grad_rows is not None else rows.new_zeros(b)
        if mode == ROWS_COLS:
            gc = grad_cols.float().contiguous() if grad_cols is not None else rows.new_zeros(b)
            gc_all = [torch.empty_like(gc) for _ in range(world)]
            dist.all_gather(gc_all, gc, group=group)
        row_stats = rows.clone()  # plane 0: global row LSE
        cur = y.contiguous()
        acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for step in range(world):
            q = (rank - step) % world
            requests = []
            if step < world - 1:
                nxt = torch.empty_like(cur)
                requests = _exchange([cur], [nxt], group)
            cols_q = torch.stack([col_lse[q], col_lse[q]]) if mode == ROWS_COLS else rows.new_zeros((2, 0))
            gc_q = gc_all[q] if mode == ROWS_COLS else rows.new_zeros(0)
            dx_q, dy_q = torch.ops.mmkern.contrastive_stats_backward(
                gr, gc_q, x, cur, scale, bias, row_stats, cols_q, mode, q == rank, backend
            )
            dx += dx_q
            acc += dy_q
            # The accumulator goes one hop further after the last block: back to the block's owner.
            nacc = torch.empty_like(acc)
            _wait(requests)
            _wait(_exchange([acc], [nacc], group) if world > 1 else [])
            acc = nacc if world > 1 else acc
            if step < world - 1:
                cur = nxt
        s = scale.float()
        grad_x = (s * dx).to(x.dtype)
        grad_y = (s * acc).to(y.dtype)
        grad_scale = (gr * rows[1]).sum()
        if mode == ROWS_COLS:
            grad_scale = grad_scale + (gc * own_col_ds).sum()
        grad_bias = (gr * rows[2]).sum()
        return grad_x, grad_y, grad_scale.to(scale.dtype), grad_bias.to(bias.dtype), None, None, None


def _setup(image_features, text_features, logit_scale, group, backend):
    _check_pair(image_features, text_features, "image_features", "text_features", same_rows=True)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    chosen = backends.resolve(backend, image_features.device)
    if chosen == "reference" or image_features.dtype == torch.float64:
        raise ValueError(f"backend: the distributed losses run on kernel backends, not {chosen!r} / float64")
    world = dist.get_world_size(group)
    sizes = [torch.zeros(2, dtype=torch.int64, device=image_features.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(image_features.shape, device=image_features.device), group=group)
    if any(not torch.equal(s, sizes[0]) for s in sizes):
        raise ValueError(f"image_features: every rank needs the same (b, D); got {[tuple(s.tolist()) for s in sizes]}")
    return logit_scale, chosen


def clip_loss_distributed(image_features, text_features, logit_scale, *, group=None, backend=None) -> torch.Tensor:
    """This rank's open_clip `ClipLoss(local_loss=True, gather_with_grad=True)` loss; features (b, D) local
    rows (same b on every rank), logit_scale a 0-dim tensor. Collective: every rank calls it (and backward)."""
    logit_scale, chosen = _setup(image_features, text_features, logit_scale, group, backend)
    zero = torch.zeros((), dtype=torch.float32, device=image_features.device)
    rows, cols = _RingStats.apply(image_features, text_features, logit_scale, zero, ROWS_COLS, chosen, group)
    positives = logit_scale.float() * _pair_dot(image_features, text_features)
    loss = 0.5 * (F.softplus(rows - positives).mean() + F.softplus(cols - positives).mean())
    return loss.to(image_features.dtype)


def siglip_loss_distributed(
    image_features, text_features, logit_scale, logit_bias, *, group=None, backend=None
) -> torch.Tensor:
    """This rank's open_clip `SigLipLoss` loss (local positives, every rank's texts as negatives)."""
    logit_scale, chosen = _setup(image_features, text_features, logit_scale, group, backend)
    logit_bias = _as_scalar(logit_bias, "logit_bias", image_features)
    rows, _ = _RingStats.apply(image_features, text_features, logit_scale, logit_bias, SIGMOID, chosen, group)
    return (rows.sum() / image_features.shape[0]).to(image_features.dtype)
