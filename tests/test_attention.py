"""Fused attention against the float64 reference (forward and gradients) and against torch's math SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import assert_close, dtypes_for, kernel_backends
from hypothesis import given
from hypothesis import strategies as st

from mmkern import reference
from mmkern.ops import attention as attn_ops
from mmkern.ops import scaled_dot_product_attention, sdpa_patch, varlen_attention

# The cpu backend's cases run at every ISA level this CPU supports (see conftest.py).
pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

KERNELS = kernel_backends("cpu")
MASK_KINDS = ["none", "bool_ls", "key_padding", "bool_full", "float_full", "float_ls_inf"]


def _small(backend: str) -> bool:
    """The Triton interpreter is slow: it gets small shapes."""
    return backend == "triton" and not torch.cuda.is_available()


def _make_mask(kind, B, H, L, S, gen):
    if kind == "none":
        return None
    if kind == "bool_ls":
        return torch.rand(L, S, generator=gen) > 0.3
    if kind == "key_padding":
        return torch.rand(B, 1, 1, S, generator=gen) > 0.4
    if kind == "bool_full":
        mask = torch.rand(B, H, L, S, generator=gen) > 0.5
        mask[..., 0, :] = False  # a fully masked row
        return mask
    if kind == "float_full":
        return torch.randn(B, H, L, S, generator=gen)
    mask = torch.randn(L, S, generator=gen)  # additive with -inf entries and a fully -inf row
    mask[torch.rand(L, S, generator=gen) > 0.7] = float("-inf")
    mask[L // 2] = float("-inf")
    return mask


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad)


def _check(backend, dtype, B, H, Hk, L, S, D, Dv, causal, mask_kind, seed, window=None, num_global=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=gen).to(dtype)
    k = torch.randn(B, Hk, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hk, S, Dv, generator=gen).to(dtype)
    mask = _make_mask(mask_kind, B, H, L, S, gen)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    grad = torch.randn(B, H, L, Dv, generator=gen).to(dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    mask_in = mask.clone().requires_grad_() if mask is not None and mask.is_floating_point() else mask
    out = scaled_dot_product_attention(
        *inputs, mask_in, is_causal=causal, enable_gqa=H != Hk, backend=backend, window=window, num_global=num_global
    )
    got = _grads(out, inputs + [mask_in], grad)

    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_mask = mask.double().requires_grad_() if mask is not None and mask.is_floating_point() else mask
    expected = reference.scaled_dot_product_attention(
        *ref_in, ref_mask, is_causal=causal, enable_gqa=H != Hk, window=window, num_global=num_global
    )
    want = _grads(expected, ref_in + [ref_mask], grad.double())
    assert_close(out, expected, dtype, "out")
    for name, g, w in zip(["dq", "dk", "dv", "dmask"], got, want):
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        assert_close(g, w, dtype, name, factor=4.0)
    return out


@pytest.mark.parametrize("backend", KERNELS)
@given(data=st.data())
def test_sdpa_matches_reference(backend, data):
    small = _small(backend)
    lengths = [1, 7, 16, 33] if small else [1, 7, 64, 130, 197, 333]
    dims = [16, 24, 40, 64] if small else [16, 24, 40, 64, 72, 128, 200, 256]
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), "dtype")
    B = data.draw(st.sampled_from([1, 2, 3]), "B")
    Hk = data.draw(st.sampled_from([1, 2, 3]), "Hk")
    group = data.draw(st.sampled_from([1, 1, 2]), "group")
    L = data.draw(st.sampled_from(lengths), "L")
    S = data.draw(st.sampled_from(lengths), "S")
    D = data.draw(st.sampled_from(dims), "D")
    Dv = data.draw(st.sampled_from([D, D, 32]), "Dv")
    causal = data.draw(st.booleans(), "causal")
    mask_kind = data.draw(st.sampled_from(MASK_KINDS), "mask")
    _check(backend, dtype, B, Hk * group, Hk, L, S, D, Dv, causal, mask_kind, data.draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", KERNELS)
@given(data=st.data())
def test_sliding_window_matches_dense_mask(backend, data):
    small = _small(backend)
    L = data.draw(st.sampled_from([1, 20, 45] if small else [1, 100, 300, 500]), "L")
    left = data.draw(st.sampled_from([0, 3, 17, 64, 300]), "left")
    right = data.draw(st.sampled_from([0, 5, 130]), "right")
    num_global = data.draw(st.sampled_from([0, 1, 3]), "num_global")
    causal = data.draw(st.booleans(), "causal")
    mask_kind = data.draw(st.sampled_from(["none", "key_padding", "float_full"]), "mask")
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), "dtype")
    _check(
        backend,
        dtype,
        1,
        2,
        2,
        L,
        L,
        32,
        32,
        causal,
        mask_kind,
        data.draw(st.integers(0, 2**16)),
        window=(left, right),
        num_global=num_global,
    )


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_window_band_far_from_global_tokens(backend, causal):
    """Key / query blocks between the global tokens and the band are skipped (Triton: one block loop that jumps
    from the global blocks to the band), which the short lengths above never reach: 200 tokens, a narrow window."""
    _check(backend, torch.float32, 1, 2, 1, 200, 200, 16, 16, causal, "key_padding", 7, window=(3, 40), num_global=3)


@pytest.mark.parametrize("backend", KERNELS)
def test_matches_torch_math_sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    B, H, L, S, D = (2, 2, 17, 33, 24) if _small(backend) else (2, 3, 197, 77, 72)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (L, S, S))
    masks = [None, torch.rand(B, 1, 1, S, generator=gen) > 0.2, torch.randn(H, L, S, generator=gen)]
    for mask in masks:
        for causal in (False, True):
            if causal and mask is not None:
                continue  # torch rejects attn_mask together with is_causal
            with sdpa_kernel(SDPBackend.MATH):
                expected = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal and L <= S, scale=0.3)
            got = scaled_dot_product_attention(q, k, v, mask, is_causal=causal and L <= S, scale=0.3, backend=backend)
            assert_close(got, expected, torch.float32, f"out (mask={mask is not None}, causal={causal})", factor=4.0)
    # GQA, as torch's enable_gqa does it.
    kg, vg = k[:, :1], v[:, :1]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)
    assert_close(
        scaled_dot_product_attention(q, kg, vg, enable_gqa=True, backend=backend),
        expected,
        torch.float32,
        "gqa",
        factor=4.0,
    )


@pytest.mark.parametrize("backend", KERNELS)
def test_rows_that_see_nothing_are_zero(backend):
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (9, 4, 4))
    out = scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)  # top-left: rows see >= 1 key
    mask = torch.zeros(9, 4, dtype=torch.bool)
    mask[::2] = True
    out = scaled_dot_product_attention(q, k, v, mask, backend=backend)
    assert torch.equal(out[:, :, 1::2], torch.zeros_like(out[:, :, 1::2]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 1::2], torch.zeros_like(q.grad[:, :, 1::2]))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_with_the_same_mask(backend, dtype):
    B, H, L, S, D, p = 2, 3, 37, 45, 24, 0.3
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(dtype) for n in (L, S, S))
    grad = torch.randn(B, H, L, D, generator=gen).to(dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(123)
    out = scaled_dot_product_attention(*inputs, dropout_p=p, is_causal=True, backend=backend)
    got = torch.autograd.grad(out, inputs, grad)
    torch.manual_seed(123)
    keep = attn_ops.dropout_keep_mask((B, H, L, S), p, attn_ops.draw_seed())
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*ref_in, dropout_p=p, is_causal=True, dropout_mask=keep)
    want = torch.autograd.grad(expected, ref_in, grad.double())
    assert_close(out, expected, dtype, "out")
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, w, dtype, name, factor=4.0)


def test_dropout_mask_statistics():
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        keep = attn_ops.dropout_keep_mask((4, 4, 64, 64), p, attn_ops.draw_seed())
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    a = attn_ops.dropout_keep_mask((2, 2, 32, 32), 0.5, 7)
    assert torch.equal(a, attn_ops.dropout_keep_mask((2, 2, 32, 32), 0.5, 7))
    assert not torch.equal(a, attn_ops.dropout_keep_mask((2, 2, 32, 32), 0.5, 8))
    # Neighbouring elements, rows and heads are uncorrelated.
    keep = attn_ops.dropout_keep_mask((1, 2, 128, 128), 0.5, 3).float() - 0.5
    for shifted in (keep[..., 1:], keep[..., 1:, :], keep[:, 1:]):
        original = keep[..., : shifted.shape[-2], : shifted.shape[-1]][:, : shifted.shape[1]]
        assert abs((shifted * original).mean().item()) < 0.01


@pytest.mark.parametrize("backend", KERNELS)
@given(data=st.data())
def test_varlen_matches_per_sequence_loop(backend, data):
    small = _small(backend)
    n = data.draw(st.integers(1, 3 if small else 4), "num_seqs")
    lens_q = data.draw(
        st.lists(st.sampled_from([0, 1, 9, 17] if small else [0, 1, 9, 77, 200]), min_size=n, max_size=n), "lens_q"
    )
    same = data.draw(st.booleans(), "self_attention")
    lens_k = lens_q if same else data.draw(st.lists(st.sampled_from([1, 5, 33]), min_size=n, max_size=n), "lens_k")
    causal = data.draw(st.booleans(), "causal")
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), "dtype")
    H, Hk, D = 2, data.draw(st.sampled_from([1, 2]), "Hk"), data.draw(st.sampled_from([16, 48]), "D")
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(int(cu_q[-1]), H, D, generator=gen).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hk, D, generator=gen).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hk, D, generator=gen).to(dtype)
    grad = torch.randn_like(q)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*inputs, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend=backend)
    got = torch.autograd.grad(out, inputs, grad)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    expected = reference.varlen_attention(*ref_in, cu_q, cu_k, causal=causal)
    want = torch.autograd.grad(expected, ref_in, grad.double(), allow_unused=True)
    assert_close(out, expected, dtype, "out")
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, torch.zeros_like(g, dtype=torch.float64) if w is None else w, dtype, name, factor=4.0)


@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_window(backend):
    lens = [30, 1, 50]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 2, 16) for _ in range(3))
    out = varlen_attention(q, k, v, cu, cu, 50, 50, causal=True, window=(4, 0), num_global=1, backend=backend)
    expected = reference.varlen_attention(
        q.double(), k.double(), v.double(), cu, cu, causal=True, window=(4, 0), num_global=1
    )
    assert_close(out, expected, torch.float32, "out")


def test_backward_is_deterministic():
    q, k, v = (torch.randn(1, 2, 300, 64, requires_grad=True) for _ in range(3))
    with torch.autograd.set_grad_enabled(True):
        torch.use_deterministic_algorithms(True)
        try:
            grads = []
            for _ in range(2):
                out = scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
                grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
        finally:
            torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_noncontiguous_and_batched_leading_dims():
    base = torch.randn(2, 5, 3, 40, 16)  # (B0, L, H, ...) layout as models produce it, then transposed
    q = base.transpose(1, 2)  # (2, 3, 5, 40, 16): two batch dims, non-contiguous
    out = scaled_dot_product_attention(q, q, q, is_causal=True)
    expected = reference.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
    assert_close(out, expected, torch.float32, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_head_dim_strided_inputs(dtype):
    """Inputs whose head dim is not unit-stride take the CPU kernels' strided load/pack/store paths (the
    contiguous ones are vectorised separately); forward and all gradients must match."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 24, 70, generator=gen).to(dtype).transpose(-1, -2) for _ in range(3))
    grad = torch.randn(2, 3, 70, 24, generator=gen).to(dtype)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*inputs, is_causal=True, backend="cpu")
    got = _grads(out, inputs, grad)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*ref_in, is_causal=True)
    want = _grads(expected, ref_in, grad.double())
    assert_close(out, expected, dtype, "out")
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert_close(g, w, dtype, name, factor=4.0)


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 2, 33, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 1, 33) > 0.2

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, mask):
        return scaled_dot_product_attention(q, k, v, mask, backend="cpu").sum()

    loss = f(q, k, v, mask)
    loss.backward()
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask).sum()
    assert abs(loss.item() - expected.item()) < 1e-4


def test_opcheck():
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 2, 9, 9, requires_grad=True)
    args = (q, k, v, mask, None, None, 9, 9, 0.25, True, -1, -1, 0, 0.0, 0, "cpu")
    torch.library.opcheck(torch.ops.mmkern.attention, args)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    qp = torch.randn(9, 2, 16, requires_grad=True)
    torch.library.opcheck(
        torch.ops.mmkern.attention, (qp, qp, qp, None, cu, cu, 5, 5, 0.25, False, 2, 1, 1, 0.0, 0, "cpu")
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"query": torch.randn(1, 2, 4, 8), "key": torch.randn(1, 2, 4, 9)}, "key"),
        ({"key": torch.randn(1, 3, 4, 8)}, "key"),
        ({"attn_mask": torch.ones(3, 5, dtype=torch.bool)}, "attn_mask"),
        ({"attn_mask": torch.ones(4, 4, dtype=torch.int64)}, "attn_mask"),
        ({"dropout_p": 1.5}, "dropout_p"),
        ({"window": (-1, 2)}, "window"),
        ({"num_global": 2}, "num_global"),
        ({"backend": "nope"}, "backend"),
        (  # the kernels' head dims: up to 256 (the default takes torch's SDPA beyond, see test_cpu_policy.py)
            {
                "query": torch.randn(1, 2, 4, 300),
                "key": torch.randn(1, 2, 4, 300),
                "value": torch.randn(1, 2, 4, 8),
                "backend": "cpu",
            },
            "query",
        ),
    ],
)
def test_validation(kwargs, name):
    args = {"query": torch.randn(1, 2, 4, 8), "key": torch.randn(1, 2, 4, 8), "value": torch.randn(1, 2, 4, 8)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        scaled_dot_product_attention(**args)


def test_varlen_validation():
    q = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        varlen_attention(q, q, q, torch.tensor([0, 6]), torch.tensor([0, 6], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        cu = torch.tensor([0, 9], dtype=torch.int32)
        varlen_attention(q, q, q, cu, cu, 9, 9, backend="cpu")
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)  # a sequence of 4 tokens: a bound of 3 would leave a row 0
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="max_seqlen_q: 3 is shorter than the longest sequence"):
            varlen_attention(q, q, q, cu, cu, 3, 4, backend=backend)
        with pytest.raises(ValueError, match="max_seqlen_k"):
            varlen_attention(q, q, q, cu, cu, 4, 3, backend=backend)


def _count_mmkern_calls(monkeypatch) -> list:
    """The calls that the override sends to mmkern's kernels from now on (the rest go to torch's own SDPA)."""
    calls = []
    run = sdpa_patch.scaled_dot_product_attention
    monkeypatch.setattr(sdpa_patch, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    return calls


def test_sdpa_override_on_a_hugging_face_model(monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=32,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 13))
    attention_mask = torch.ones(2, 13, dtype=torch.long)
    attention_mask[1, 9:] = 0  # key padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        calls = _count_mmkern_calls(monkeypatch)
        with sdpa_patch.sdpa_override():
            got = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        assert len(calls) == 2, "mmkern did not run the model's attention"
        assert F.scaled_dot_product_attention is sdpa_patch._torch_sdpa
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdpa_override_leaves_plain_cuda_calls_to_torch(monkeypatch):
    q = torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.float16)
    mask = torch.rand(64, 64, device="cuda") > 0.2
    calls = _count_mmkern_calls(monkeypatch)
    with sdpa_patch.sdpa_override():
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        assert len(calls) == 0, "a call torch runs itself went to mmkern"
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)  # torch raises here, mmkern runs it
        assert len(calls) == 1
    with sdpa_patch.sdpa_override(backend="triton"):  # an explicit backend takes every call it can run
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", kernel_backends("cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("B", "H", "Hk", "L", "S", "D", "causal", "mask_kind", "window"),
    [
        (2, 4, 2, 197, 197, 64, False, "key_padding", None),
        (1, 2, 2, 77, 130, 72, True, "float_ls_inf", None),
        (3, 2, 1, 333, 65, 256, True, "none", None),
        (1, 2, 2, 600, 600, 40, False, "bool_full", (37, 5)),
    ],
)
def test_gpu_backends_match_reference(backend, dtype, B, H, Hk, L, S, D, causal, mask_kind, window):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=gen)
    k, v = (torch.randn(B, Hk, S, D, generator=gen) for _ in range(2))
    mask = _make_mask(mask_kind, B, H, L, S, gen)
    grad = torch.randn(B, H, L, D, generator=gen)
    cuda = [t.cuda().to(dtype).requires_grad_() for t in (q, k, v)]
    cmask = (
        None if mask is None else (mask.cuda().to(dtype).requires_grad_() if mask.is_floating_point() else mask.cuda())
    )
    out = scaled_dot_product_attention(
        *cuda,
        cmask,
        is_causal=causal,
        enable_gqa=H != Hk,
        backend=backend,
        window=window,
        num_global=1 if window else 0,
    )
    got = _grads(out, cuda + [cmask], grad.cuda().to(dtype))
    ref_in = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref_mask = mask.to(dtype).double().requires_grad_() if mask is not None and mask.is_floating_point() else mask
    expected = reference.scaled_dot_product_attention(
        *ref_in, ref_mask, is_causal=causal, enable_gqa=H != Hk, window=window, num_global=1 if window else 0
    )
    want = _grads(expected, ref_in + [ref_mask], grad.to(dtype).double())
    assert_close(out.cpu(), expected, dtype, "out", factor=2.0)
    for name, g, w in zip(["dq", "dk", "dv", "dmask"], got, want):
        assert_close(g.cpu(), w, dtype, name, factor=8.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dropout_triton_matches_cpu_mask():
    B, H, L, S, D, p = 1, 2, 70, 90, 32, 0.25
    q, k, v = (torch.randn(B, H, n, D, device="cuda") for n in (L, S, S))
    torch.manual_seed(7)
    out = scaled_dot_product_attention(q, k, v, dropout_p=p, backend="triton")
    torch.manual_seed(7)
    keep = attn_ops.dropout_keep_mask((B, H, L, S), p, attn_ops.draw_seed())
    expected = reference.scaled_dot_product_attention(
        q.cpu().double(), k.cpu().double(), v.cpu().double(), dropout_p=p, dropout_mask=keep
    )
    assert_close(out.cpu(), expected, torch.float32, "out")


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_backward_both_parallel_schedules(threads):
    """The cpu backward runs per (batch, kv head) when there are >= 4 such tasks per thread, else in two passes
    over key and query blocks: both schedules, with GQA, a float mask gradient and dropout."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, Hk in ((1, 2), (4, 4)):  # 2 tasks: two passes; 16 tasks: one pass per (batch, kv head)
            _check("cpu", torch.float32, B, 2 * Hk, Hk, 70, 150, 40, 24, True, "float_full", B * 10 + threads)
            gen = torch.Generator().manual_seed(threads)
            q, k, v = (torch.randn(B, Hk, 50, 16, generator=gen).requires_grad_() for _ in range(3))
            torch.manual_seed(0)
            out = scaled_dot_product_attention(q, k, v, dropout_p=0.2, backend="cpu")
            got = torch.autograd.grad(out.square().sum(), (q, k, v))
            torch.manual_seed(0)
            keep = attn_ops.dropout_keep_mask((B, Hk, 50, 50), 0.2, attn_ops.draw_seed())
            ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
            expected = reference.scaled_dot_product_attention(*ref_in, dropout_p=0.2, dropout_mask=keep)
            want = torch.autograd.grad(expected.square().sum(), ref_in)
            for name, g, w in zip(["dq", "dk", "dv"], got, want):
                assert_close(g, w, torch.float32, name, factor=4.0)
    finally:
        torch.set_num_threads(previous)
