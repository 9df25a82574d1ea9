"""CPU attention kernel paths that the general tests may not reach: the demo model's strided q/k/v views,
both sides of the kernel's size thresholds (rows kept in registers up to 32 keys, K/V read in place up to 64
keys, one key block up to 256, a 128-key grid under a window), rows that see no key under a window, the
eager autograd path against the mmkern::attention custom op, the task hand-out on 1-3 threads, and
qkv_packed_attention's one-buffer gradient."""

from __future__ import annotations

import pytest
import torch
from checks import assert_close
from hypothesis import given
from hypothesis import strategies as st

from mmkern import reference
from mmkern.ops import attention as attn_ops
from mmkern.ops import qkv_packed_attention, scaled_dot_product_attention
from mmkern.ops._eager import plain_eager

# The cpu backend's cases run at every ISA level this CPU supports (see conftest.py).
pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

# Lengths on both sides of every threshold: 32 (register rows), 64 (in-place K/V rows), 256 (one key block).
LENGTHS = [1, 5, 16, 17, 32, 33, 64, 65, 197, 256, 257]


def _views(B, H, L, D, dtype, gen):
    """qkv (B, L, 3, H, D) leaf and its q, k, v views (B, H, L, D): rows of D floats 3 H D apart."""
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(dtype).requires_grad_()
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _padding_mask(B, L, causal, gen):
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    keys = torch.arange(L)[None, :] < lengths[:, None]
    mask = keys[:, None, None, :]
    return mask & torch.ones(L, L, dtype=torch.bool).tril() if causal else mask


@given(data=st.data())
def test_strided_views_as_the_demo_calls(data):
    """Forward and gradients through the qkv views, with the text model's (B, 1, L, L) causal + padding mask or
    a (B, 1, 1, L) key-padding mask or none, at lengths around the kernel's thresholds."""
    B = data.draw(st.sampled_from([1, 3]), "B")
    H = data.draw(st.sampled_from([1, 2]), "H")
    L = data.draw(st.sampled_from(LENGTHS), "L")
    D = data.draw(st.sampled_from([16, 24, 64]), "D")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), "dtype")
    mask_kind = data.draw(st.sampled_from(["none", "keys", "causal_keys", "is_causal"]), "mask")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    qkv, (q, k, v) = _views(B, H, L, D, dtype, gen)
    mask = None if mask_kind in ("none", "is_causal") else _padding_mask(B, L, mask_kind == "causal_keys", gen)
    causal = mask_kind == "is_causal"
    grad = torch.randn(B, H, L, D, generator=gen).to(dtype)
    out = scaled_dot_product_attention(q, k, v, mask, is_causal=causal, backend="cpu")
    (got,) = torch.autograd.grad(out, qkv, grad)
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.permute(2, 0, 3, 1, 4).unbind(0)
    expected = reference.scaled_dot_product_attention(rq, rk, rv, mask, is_causal=causal)
    (want,) = torch.autograd.grad(expected, ref_qkv, grad.double())
    assert_close(out, expected, dtype, "out")
    assert_close(got, want, dtype, "dqkv", factor=4.0)


@given(data=st.data())
def test_cross_window_rows_without_keys(data):
    """A window with L > S leaves late queries without keys (output and gradients 0); GQA and a float mask
    gradient ride along; S > 128 puts several blocks of the window's 128-key grid in play."""
    L = data.draw(st.sampled_from([40, 300]), "L")
    S = data.draw(st.sampled_from([7, 20, 150]), "S")
    left, right = data.draw(st.sampled_from([(3, 0), (0, 2), (40, 5)]), "window")
    causal = data.draw(st.booleans(), "causal")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    q = torch.randn(2, 4, L, 32, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 2, S, 32, generator=gen).requires_grad_() for _ in range(2))
    mask = torch.randn(2, 4, L, S, generator=gen).requires_grad_()
    grad = torch.randn(2, 4, L, 32, generator=gen)
    out = scaled_dot_product_attention(
        q, k, v, mask, is_causal=causal, enable_gqa=True, window=(left, right), backend="cpu"
    )
    got = torch.autograd.grad(out, (q, k, v, mask), grad)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    expected = reference.scaled_dot_product_attention(
        *ref[:3], ref[3], is_causal=causal, enable_gqa=True, window=(left, right)
    )
    want = torch.autograd.grad(expected, ref, grad.double())
    assert_close(out, expected, torch.float32, "out")
    for name, g, w in zip(["dq", "dk", "dv", "dmask"], got, want):
        assert_close(g, w, torch.float32, name, factor=4.0)


@pytest.mark.parametrize("scale", [0.3, -0.7, 0.0])
def test_any_score_scale(scale):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 24, generator=gen).requires_grad_() for n in (33, 70, 70))
    out = scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, backend="cpu")
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*ref, is_causal=True, scale=scale)
    want = torch.autograd.grad(expected.square().sum(), ref)
    assert_close(out, expected, torch.float32, "out")
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, w, torch.float32, name, factor=4.0)


def test_eager_path_equals_the_custom_op():
    """Plain eager calls skip the custom-op dispatch (same kernels, same autograd formula): results must be
    bitwise those of torch.ops.mmkern.attention, which tracing, compiling and fake tensors still use."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 17, 16, generator=gen).requires_grad_() for _ in range(3))
    mask = torch.randn(2, 2, 17, 17, generator=gen).requires_grad_()
    grad = torch.randn(2, 2, 17, 16, generator=gen)
    params = (17, 17, 0.25, True, -1, -1, 0, 0.0, 0, "cpu")
    assert plain_eager(q, k, v, mask, None, None)
    eager_out, _ = attn_ops._attention(q, k, v, mask, None, None, *params)
    op_out, _ = torch.ops.mmkern.attention(q, k, v, mask, None, None, *params)
    assert torch.equal(eager_out, op_out)
    for a, b in zip(
        torch.autograd.grad(eager_out, (q, k, v, mask), grad), torch.autograd.grad(op_out, (q, k, v, mask), grad)
    ):
        assert torch.equal(a, b)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq = torch.empty(2, 2, 17, 16)
        assert not plain_eager(fq, fq, fq, None, None, None)
        out, _ = attn_ops._attention(fq, fq, fq, None, None, None, *params)  # the op's fake kernel
        assert out.shape == (2, 2, 17, 16)


@pytest.mark.parametrize("B, H", [(1, 1), (4, 3)])
@pytest.mark.parametrize("L, causal", [(197, False), (300, True), (600, False)])
def test_backward_delta_in_tile_and_from_out(B, H, L, causal):
    """delta = rowsum(dO o O) is formed in the tile as rowsum(P o dP) when a query block's keys are one tile (197
    keys; the early query blocks of a causal 300) and read from O otherwise (600 keys; the late causal blocks), in
    the two-pass backward (B H = 1) and the one-pass one (B H = 12): gradients against float64 either way."""
    gen = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, H, L, 16, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, L, 16, generator=gen)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference.scaled_dot_product_attention(*ref, is_causal=causal), ref, grad.double())
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, w, torch.float32, name, factor=4.0)


@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_long_sequence_forward_blocks(mask_kind):
    """Full attention with 1024+ queries and keys runs its forward in query blocks of 256 (the backward in blocks
    of 128): a ragged last query block (1100 = 4 x 256 + 76), several key blocks with online rescaling (1030 keys),
    a float mask, against float64 in forward and backward."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 1100, 32, generator=gen).requires_grad_()
    k, v = (torch.randn(1, 2, 1030, 32, generator=gen).requires_grad_() for _ in range(2))
    mask = torch.randn(1, 1, 1100, 1030, generator=gen) if mask_kind == "float" else None
    grad = torch.randn(1, 2, 1100, 32, generator=gen)
    out = scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*ref, None if mask is None else mask.double())
    want = torch.autograd.grad(expected, ref, grad.double())
    assert_close(out, expected, torch.float32, "out")
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, w, torch.float32, name, factor=4.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_small_tasks_on_every_thread_count(threads):
    """259 (batch, head) tasks of 9 queries: the kernels hand them out 8 at a time (a partial last chunk) and each
    thread claims its next chunk ahead; every output row must still be written once, in forward and backward."""
    gen = torch.Generator().manual_seed(threads)
    q, k, v = (torch.randn(37, 7, 9, 16, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(37, 7, 9, 16, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = scaled_dot_product_attention(q, k, v, backend="cpu")
        got = torch.autograd.grad(out, (q, k, v), grad)
    finally:
        torch.set_num_threads(previous)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*ref)
    want = torch.autograd.grad(expected, ref, grad.double())
    assert_close(out, expected, torch.float32, "out")
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, w, torch.float32, name, factor=4.0)


@given(data=st.data())
def test_qkv_packed_matches_reference_and_the_views(data):
    """qkv_packed_attention (B, L, 3, H, D) -> (B, L, H, D): output and the gradients of qkv (written by the kernel
    into one buffer) and of a float mask against float64, and bitwise those of scaled_dot_product_attention on the
    q, k, v views (whose gradients autograd stacks), with every mask kind, causal and windows."""
    B = data.draw(st.sampled_from([1, 3]), "B")
    H = data.draw(st.sampled_from([1, 2]), "H")
    L = data.draw(st.sampled_from([1, 17, 197]), "L")
    D = data.draw(st.sampled_from([16, 40]), "D")
    mask_kind = data.draw(st.sampled_from(["none", "keys", "float"]), "mask")
    causal = data.draw(st.booleans(), "causal")
    window = data.draw(st.sampled_from([None, (5, 2)]), "window")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    qkv = torch.randn(B, L, 3, H, D, generator=gen).requires_grad_()
    mask = None
    if mask_kind == "keys":
        mask = _padding_mask(B, L, False, gen)
    elif mask_kind == "float":
        mask = torch.randn(B, H, L, L, generator=gen).requires_grad_()
    grad = torch.randn(B, L, H, D, generator=gen)
    inputs = [qkv] + ([mask] if mask_kind == "float" else [])

    out = qkv_packed_attention(qkv, mask, is_causal=causal, window=window, backend="cpu")
    got = torch.autograd.grad(out, inputs, grad)
    views = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out_views = scaled_dot_product_attention(*views, mask, is_causal=causal, window=window, backend="cpu")
    assert torch.equal(out, out_views.transpose(1, 2))
    for g, w in zip(got, torch.autograd.grad(out_views.transpose(1, 2), inputs, grad)):
        assert torch.equal(g, w)

    ref = [t.detach().double().requires_grad_() for t in inputs]
    rq, rk, rv = ref[0].permute(2, 0, 3, 1, 4).unbind(0)
    ref_mask = ref[1] if mask_kind == "float" else mask
    expected = reference.scaled_dot_product_attention(rq, rk, rv, ref_mask, is_causal=causal, window=window)
    expected = expected.transpose(1, 2)
    assert_close(out, expected, torch.float32, "out")
    for name, g, w in zip(["dqkv", "dmask"], got, torch.autograd.grad(expected, ref, grad.double())):
        assert_close(g, w, torch.float32, name, factor=4.0)


def test_qkv_packed_dropout_and_other_backends():
    """With dropout the packed and the view paths draw the same mask from the same seed; the reference backend
    (which runs the views) agrees; a qkv of the wrong shape is refused by name."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 33, 3, 2, 16, generator=gen).requires_grad_()
    grad = torch.randn(2, 33, 2, 16, generator=gen)
    results = []
    for packed in (True, False):
        torch.manual_seed(7)
        if packed:
            out = qkv_packed_attention(qkv, dropout_p=0.3, backend="cpu")
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cpu").transpose(1, 2)
        results.append((out, *torch.autograd.grad(out, qkv, grad)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    cpu = qkv_packed_attention(qkv.detach(), is_causal=True, backend="cpu")
    ref = qkv_packed_attention(qkv.detach().double(), is_causal=True, backend="reference")
    assert_close(cpu, ref, torch.float32, "out")
    with pytest.raises(ValueError, match="qkv"):
        qkv_packed_attention(torch.randn(2, 33, 2, 2, 16))
