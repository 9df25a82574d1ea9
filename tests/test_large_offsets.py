"""64-bit offsets: every kernel reads and writes strided views whose strides stay below 2^31 but whose
index × stride passes it (so an int32 offset wraps and the access lands out of bounds).

The views live in one storage of a little over 2^31 fp32 elements (8.6 GB of address space; only the pages
the views touch are ever allocated). Triton kernels run through their launchers under TRITON_INTERPRET=1, whose
int32 arithmetic wraps as the GPU's does; the same launch on contiguous copies is the expected result. The CPU
kernels go through the public ops.
"""

from __future__ import annotations

import pytest
import torch

from mmkern import backends
from mmkern.ops import add_layer_norm, bias_gelu, clip_loss, patch_embed, scaled_dot_product_attention, varlen_attention

needs_triton = pytest.mark.skipif(
    backends.unavailable_reason("triton", "cpu") is not None,
    reason="Triton runs CPU tensors only under the interpreter",
)
BIG = 2**29  # 4 * BIG = 2^31: the fifth row / head / batch of a view with stride BIG lies past 2^31


@pytest.fixture(scope="module")
def storage():
    return torch.empty(4 * BIG + 2**16, dtype=torch.float32)


@pytest.fixture
def huge(storage):
    """view(shape, strides) -> a random fp32 view into the huge storage, each at its own offset."""
    used = [0]
    gen = torch.Generator().manual_seed(0)

    def view(shape, strides):
        assert used[0] + 4096 <= 2**16, "views overlap"
        t = storage.as_strided(shape, strides, used[0])
        used[0] += 4096
        t.copy_(torch.randn(shape, generator=gen))
        return t

    return view


def _dense(t):
    return t.contiguous().clone()


def _assert_same(got, want, name):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ---- Triton kernels, through their launchers ------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("feature", ["plain", "causal_float_mask_dropout", "window"])
def test_triton_attention_head_offsets_past_2_31(huge, feature):
    from mmkern.kernels.triton.attention import attention_bwd, attention_fwd

    B, H, L, D = 1, 5, 16, 16
    shape, strides = (B, H, L, D), (H * BIG, BIG, D, 1)
    q, k, v, out, grad, dq, dk, dv = (huge(shape, strides) for _ in range(8))
    mask = huge((B, H, L, L), (H * BIG, BIG, L, 1)) if "mask" in feature else None
    causal, dropout = "causal" in feature, 0.2 if "dropout" in feature else 0.0
    window = (3, 2, 1) if feature == "window" else (0, 0, 0)
    scalars = (L, L, D**-0.5, causal, feature == "window", *window, dropout, 7)

    def run(q, k, v, mask, out, grad, dq, dk, dv):
        lse = torch.empty(B, H, L, 2)
        attention_fwd(q, k, v, mask, None, None, out, lse, *scalars)
        dmask = torch.zeros(B, H, L, L) if mask is not None else None
        attention_bwd(grad, q, k, v, out, lse, mask, None, None, dq, dk, dv, dmask, *scalars)
        return out, lse, dq, dk, dv, dmask

    want = run(*(None if t is None else _dense(t) for t in (q, k, v, mask, out, grad, dq, dk, dv)))
    got = run(q, k, v, mask, out, grad, dq, dk, dv)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv", "dmask"], got, want):
        if w is not None:
            _assert_same(g, w, name)


@needs_triton
def test_triton_varlen_token_offsets_past_2_31(huge):
    from mmkern.kernels.triton.attention import attention_bwd, attention_fwd

    T, H, D = 9, 2, 16  # token 8 of a view with token stride 2^28 starts at 2^31
    shape, strides = (T, H, D), (BIG // 2, D, 1)
    q, k, v, out, grad, dq, dk, dv = (huge(shape, strides) for _ in range(8))
    cu = torch.tensor([0, 3, T], dtype=torch.int32)
    scalars = (6, 6, D**-0.5, True, False, 0, 0, 0, 0.0, 0)

    def run(q, k, v, out, grad, dq, dk, dv):
        out.zero_()
        lse = torch.full((H, T, 2), float("inf"))
        attention_fwd(q, k, v, None, cu, cu, out, lse, *scalars)
        dq.zero_(), dk.zero_(), dv.zero_()
        attention_bwd(grad, q, k, v, out, lse, None, cu, cu, dq, dk, dv, None, *scalars)
        return out, lse, dq, dk, dv

    want = run(*(_dense(t) for t in (q, k, v, out, grad, dq, dk, dv)))
    got = run(q, k, v, out, grad, dq, dk, dv)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        _assert_same(g, w, name)


@needs_triton
def test_triton_fused_row_offsets_past_2_31(huge):
    from mmkern.kernels.triton import fused

    M, N = 5, 16
    shape, strides = (M, N), (BIG, 1)
    x, res, out, s, grad, gx = (huge(shape, strides) for _ in range(6))
    w, b = torch.randn(N), torch.randn(N)

    def run(x, res, out, s, grad, gx):
        fused.bias_gelu_fwd(x, b, out, 0)
        gb = torch.empty(N)
        fused.bias_gelu_bwd(grad, x, b, gx, gb, 0)
        results = [out.clone(), gx.clone(), gb]
        mean, rstd = torch.empty(M), torch.empty(M)
        fused.add_layer_norm_fwd(x, res, w, b, s, out, mean, rstd, 1e-5)
        gw, gbias = torch.empty(N), torch.empty(N)
        fused.add_layer_norm_bwd(grad, grad, s, w, mean, rstd, gx, gw, gbias)
        return results + [s, out, mean, rstd, gx, gw, gbias]

    want = run(*(_dense(t) for t in (x, res, out, s, grad, gx)))
    got = run(x, res, out, s, grad, gx)
    for i, (g, w_) in enumerate(zip(got, want)):
        _assert_same(g, w_, f"result {i}")


@needs_triton
def test_triton_contrastive_row_offsets_past_2_31(huge):
    from mmkern.kernels.triton import contrastive

    B, D = 5, 16
    x, y = (huge((B, D), (BIG, 1)) for _ in range(2))
    scale, bias = torch.tensor(10.0), torch.tensor(0.0)

    def run(x, y):
        rows, cols = torch.empty(3, B), torch.empty(2, B)
        contrastive.contrastive_fwd(x, y, scale, bias, 1, True, rows, cols)
        dx, dy = torch.zeros(B, D), torch.zeros(B, D)
        g = torch.full((B,), 1.0 / B)
        contrastive.contrastive_bwd(x, y, scale, bias, 1, True, rows[0], cols[0], g, g, dx, dy)
        return rows, cols, dx, dy

    for name, g, w in zip(["rows", "cols", "dx", "dy"], run(x, y), run(_dense(x), _dense(y))):
        _assert_same(g, w, name)


@needs_triton
def test_triton_patch_embed_batch_offsets_past_2_31(huge):
    from mmkern.kernels.triton import patch_embed as pe

    B, C, HW, P, E = 5, 1, 16, 8, 16
    shape, strides = (B, C, HW, HW), (BIG, HW * HW, HW, 1)
    images, grad_images = huge(shape, strides), huge(shape, strides)
    weight = torch.randn(E, C, P, P)
    N = (HW // P) ** 2

    def run(images, grad_images):
        out = torch.empty(B, N, E)
        pe.patch_embed_fwd(images, weight, None, None, None, out)
        gw = torch.empty(E, C, P, P)
        pe.patch_embed_bwd(out, images, weight, 0, grad_images, gw)
        return out, grad_images.clone(), gw

    for name, g, w in zip(["out", "grad_images", "grad_weight"], run(images, grad_images), run(*map(_dense, (images, grad_images)))):  # fmt: skip
        _assert_same(g, w, name)


@needs_triton
def test_triton_patch_embed_packed_row_offsets_past_2_31(huge):
    from mmkern.kernels.triton import patch_embed as pe

    M, K, E = 5, 16, 16  # patch rows, output rows and position-grid rows with row stride BIG: row 4 lies past 2^31
    patches, out, grid_rows = huge((M, K), (BIG, 1)), huge((M, E), (BIG, 1)), huge((M, E), (BIG, 1))
    weight, bias = torch.randn(E, K), torch.randn(E)
    tap_ptr = torch.arange(0, 2 * M + 1, 2, dtype=torch.int64)
    tap_index = torch.tensor([4, 0, 3, 4, 2, 1, 4, 4, 0, 3], dtype=torch.int32)
    tap_weight = torch.rand(2 * M)
    out_rows = torch.tensor([4, 2, 0, 3, 1], dtype=torch.int64)

    def run(patches, grid_rows, out):
        pe.patch_embed_packed_fwd(patches, weight, bias, grid_rows, tap_ptr, tap_index, tap_weight, out_rows, out, 2)
        return out.clone()

    _assert_same(run(patches, grid_rows, out), run(*map(_dense, (patches, grid_rows, out))), "out")


# ---- CPU kernels, through the public ops ----------------------------------------------------------------


def _grads(fn, *inputs):
    out = fn(*inputs)
    loss = out if out.dim() == 0 else (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    return [out.detach()] + list(torch.autograd.grad(loss, inputs))


def _strided_and_dense(huge, shape, strides, n):
    """n strided leaves that require grad, and their dense copies."""
    strided = [huge(shape, strides).requires_grad_() for _ in range(n)]
    return strided, [_dense(t.detach()).requires_grad_() for t in strided]


def _packed_attention(q, k, v):
    """varlen_attention on the (tokens, H, D) views of q, k, v (1, H, 16, D): two sequences of 7 and 9 tokens."""
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
    return varlen_attention(q, k, v, cu, cu, 9, 9, causal=True, backend="cpu")


@pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None, reason="native CPU kernels not built")
@pytest.mark.parametrize(
    "op",
    [
        pytest.param(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu"), id="sdpa"),
        pytest.param(_packed_attention, id="varlen"),
    ],
)
def test_cpu_attention_head_offsets_past_2_31(huge, op):
    strided, dense = _strided_and_dense(huge, (1, 5, 16, 16), (5 * BIG, BIG, 16, 1), 3)
    for name, g, w in zip(["out", "dq", "dk", "dv"], _grads(op, *strided), _grads(op, *dense)):
        _assert_same(g, w, name)


@pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None, reason="native CPU kernels not built")
@pytest.mark.parametrize(
    "op",
    [
        pytest.param(lambda x, r: bias_gelu(x, r[0], backend="cpu"), id="bias_gelu"),
        pytest.param(lambda x, r: add_layer_norm(x, r, backend="cpu")[1], id="add_layer_norm"),
        pytest.param(lambda x, r: clip_loss(x, r, 10.0, backend="cpu"), id="clip_loss"),
        pytest.param(
            lambda x, r: patch_embed(x.view(5, 1, 4, 4), r[:2].reshape(2, 1, 4, 4), backend="cpu"), id="patch_embed"
        ),
    ],
)
def test_cpu_row_offsets_past_2_31(huge, op):
    strided, dense = _strided_and_dense(huge, (5, 16), (BIG, 1), 2)
    for i, (g, w) in enumerate(zip(_grads(op, *strided), _grads(op, *dense))):
        _assert_same(g, w, f"result {i}")
