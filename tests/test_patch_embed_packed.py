"""mmkern.ops.patch_embed_packed against the float64 reference (per-image conv2d + F.interpolate of the position grid,
as timm's dynamic_img_size does): forward and every gradient, on every backend available here, for hypothesis-drawn
image sizes (1×1 grids, 1×N strips, very unequal sizes); the resize rule; bad input; opcheck; torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmkern import backends
from mmkern.ops.patch_embed_packed import _patch_embed_packed_op, fit_grid, patch_embed_packed, pos_taps
from tests.checks import assert_close, backends_for, dtypes_for, kernel_backends

pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

CASES = [(b, d) for b in backends_for("cpu") for d in dtypes_for(b)]


def _make(grids, C, P, E, T, base, pos_kind, has_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    images = [rand(C, h * P, w * P) for h, w in grids]
    weight = rand(E, C, P, P, scale=(C * P * P) ** -0.5)
    bias = rand(E) if has_bias else None
    G = base[0] * base[1]
    pos = {None: None, "prefix": rand(1, T + G, E), "patches": rand(G, E)}[pos_kind]
    prefix = rand(T, E) if T else None
    return images, weight, bias, pos, prefix


def _run(backend, inputs, base, mode, antialias, grad_seed=0):
    images, weight, bias, pos, prefix = (
        [t.detach().requires_grad_() for t in x]
        if isinstance(x, list)
        else None
        if x is None
        else x.detach().requires_grad_()
        for x in inputs
    )
    out = patch_embed_packed(
        images, weight, bias, pos_embed=pos, prefix_tokens=prefix, pos_grid=base, interpolation=mode,
        antialias=antialias, backend=backend,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.tokens.shape, generator=gen, dtype=torch.float64).to(out.tokens.dtype)
    leaves = [*images, *(t for t in (weight, bias, pos, prefix) if t is not None)]
    grads = torch.autograd.grad(out.tokens, leaves, grad_out)
    return out, grads


GRIDS = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4)


@pytest.mark.parametrize(("backend", "dtype"), CASES)
@settings(max_examples=6)
@given(
    grids=GRIDS,
    E=st.sampled_from([1, 7, 20]),
    T=st.integers(0, 2),
    base=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    pos_kind=st.sampled_from([None, "prefix", "patches"]),
    mode=st.sampled_from(["bicubic", "bilinear"]),
    antialias=st.booleans(),
    has_bias=st.booleans(),
)
@example(grids=[(1, 1)], E=7, T=1, base=(4, 4), pos_kind="prefix", mode="bicubic", antialias=True, has_bias=True)
@example(grids=[(1, 9), (9, 1)], E=7, T=0, base=(3, 3), pos_kind="patches", mode="bilinear", antialias=True, has_bias=False)  # fmt: skip
@example(grids=[(8, 8), (1, 1), (2, 2)], E=20, T=2, base=(2, 2), pos_kind="prefix", mode="bicubic", antialias=True, has_bias=True)  # fmt: skip
@example(grids=[(1, 1)], E=1, T=0, base=(1, 2), pos_kind="prefix", mode="bicubic", antialias=False, has_bias=False)  # fmt: skip
def test_matches_reference(backend, dtype, grids, E, T, base, pos_kind, mode, antialias, has_bias):
    C, P = 2, 3
    inputs = _make(grids, C, P, E, T, base, pos_kind, has_bias, dtype, seed=len(grids) + E)
    out, grads = _run(backend, inputs, base, mode, antialias)
    ref_inputs = [[t.double() for t in x] if isinstance(x, list) else None if x is None else x.double() for x in inputs]
    ref, ref_grads = _run("reference", ref_inputs, base, mode, antialias)
    assert out.tokens.dtype == dtype
    assert out.grid_sizes == ref.grid_sizes == [tuple(g) for g in grids]
    assert torch.equal(out.cu_seqlens, ref.cu_seqlens) and out.cu_seqlens.dtype == torch.int32
    assert out.max_seqlen == max(T + h * w for h, w in grids)
    # a token sums C·P·P products that can cancel (E = 1, one patch: 0.18 of their 3.35): its error scales with the
    # same embedding of the absolute values
    abs_inputs = [[t.abs() for t in x] if isinstance(x, list) else None if x is None else x.abs() for x in ref_inputs]
    magnitude = _run("reference", abs_inputs, base, mode, antialias)[0].tokens
    assert_close(out.tokens, ref.tokens, dtype, "tokens", magnitude=magnitude)
    ref_grads = list(ref_grads)
    # the reference backend is F.interpolate, with torch's own backward
    if (
        backend != "reference"
        and pos_kind is not None
        and not all(_torch_adjoint_ok(base, g, mode, antialias) for g in grids)
    ):
        ref_grads[len(grids) + 1 + has_bias] = _grid_grad(ref_inputs, base, mode, antialias, T, pos_kind, ref)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        # grid rows sum many grad rows through signed bicubic weights: the error scales with the sum of magnitudes
        assert_close(g, r, dtype, f"grad {i}", factor=4)


def _jacobian(base, grid, mode, antialias):
    """(h·w, Gh·Gw) float64: what F.interpolate's forward does to each one-hot grid."""
    G = base[0] * base[1]
    basis = torch.eye(G, dtype=torch.float64).view(1, G, *base)
    return F.interpolate(basis, size=grid, mode=mode, antialias=antialias, align_corners=False)[0].flatten(1).t()


def _torch_adjoint_ok(base, grid, mode, antialias) -> bool:
    """Whether torch's backward of F.interpolate is the transpose of its forward. It is not for some antialiased
    resizes to width 1 (torch 2.13: (3, 3) -> (9, 1) reads input row 0 only forward, every row backward); the op's
    gradient is the true transpose of the forward it matches."""
    x = torch.zeros(1, 1, *base, dtype=torch.float64, requires_grad=True)
    y = F.interpolate(x, size=grid, mode=mode, antialias=antialias, align_corners=False)
    g = torch.arange(y.numel(), dtype=torch.float64).view_as(y).sin()
    (gx,) = torch.autograd.grad(y, x, g)
    return torch.allclose(gx.flatten(), _jacobian(base, grid, mode, antialias).t() @ g.flatten())


def _grid_grad(inputs, base, mode, antialias, T, pos_kind, ref):
    """The float64 gradient of the position embedding as the transpose of F.interpolate's forward."""
    gen = torch.Generator().manual_seed(0)
    grad_out = torch.randn(ref.tokens.shape, generator=gen, dtype=torch.float64)
    E = grad_out.shape[1]
    grid_grad = torch.zeros(base[0] * base[1], E, dtype=torch.float64)
    prefix_grad = torch.zeros(T, E, dtype=torch.float64)
    for (h, w), start in zip(ref.grid_sizes, ref.cu_seqlens.tolist()):
        prefix_grad += grad_out[start : start + T]
        grid_grad += _jacobian(base, (h, w), mode, antialias).t() @ grad_out[start + T : start + T + h * w]
    return torch.cat([prefix_grad, grid_grad])[None] if pos_kind == "prefix" else grid_grad


def test_reference_is_timm_resampling():
    """The oracle's grid is resampled as timm's resample_abs_pos_embed does; the taps reproduce F.interpolate."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(5, 7, 6, generator=gen, dtype=torch.float64)
    for size, mode, aa in [((3, 11), "bicubic", True), ((1, 1), "bicubic", True), ((9, 2), "bilinear", False)]:
        want = F.interpolate(grid.permute(2, 0, 1)[None], size=size, mode=mode, antialias=aa, align_corners=False)
        want = want[0].flatten(1).t()
        index, weight = pos_taps((5, 7), size, mode, aa)
        assert (_jacobian((5, 7), size, mode, aa).gather(1, index.long()).float() == weight).all()
        got = (grid.reshape(35, 6)[index.long()] * weight.double()[..., None]).sum(1)
        assert (got - want).abs().max() < 1e-6


def test_max_patches_resizes():
    assert fit_grid(64, 64, 16, 1000) == (4, 4)  # fits: kept
    assert fit_grid(512, 128, 16, 16) == (8, 2)
    assert fit_grid(10, 1000, 16, 8) == (1, 8)  # a 1:100 strip keeps one row
    h, w = fit_grid(300, 200, 16, 50)
    assert h * w <= 50 and h > w
    weight = torch.randn(4, 3, 16, 16)
    out = patch_embed_packed([torch.randn(3, 100, 37), torch.randn(3, 512, 512)], weight, max_patches=16)
    assert out.grid_sizes == [fit_grid(100, 37, 16, 16), (4, 4)]
    assert out.tokens.shape == (sum(h * w for h, w in out.grid_sizes), 4)


def test_bad_input():
    w = torch.randn(4, 3, 2, 2)
    img = torch.randn(3, 4, 6)
    cases = [
        (lambda: patch_embed_packed([], w), "images"),
        (lambda: patch_embed_packed(img, w), "images"),
        (lambda: patch_embed_packed([torch.randn(3, 5, 4)], w), "images\\[0\\]"),
        (lambda: patch_embed_packed([img, torch.randn(2, 4, 4)], w), "images\\[1\\]"),
        (lambda: patch_embed_packed([img.half()], w), "weight"),
        (lambda: patch_embed_packed([img], w, torch.randn(5)), "bias"),
        (lambda: patch_embed_packed([img], w, pos_embed=torch.randn(7, 4)), "pos_embed"),
        (lambda: patch_embed_packed([img], w, pos_embed=torch.randn(9, 4), pos_grid=(2, 2)), "pos_embed"),
        (lambda: patch_embed_packed([img], w, pos_embed=torch.randn(4, 4), interpolation="area"), "interpolation"),
        (lambda: patch_embed_packed([img], w, max_patches=0), "max_patches"),
        (lambda: patch_embed_packed([img], w, backend="nope"), "backend"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(1 + 6 + 2, 2 * 2 * 2, generator=gen, requires_grad=True)
    weight = torch.randn(5, 2, 2, 2, generator=gen, requires_grad=True)
    grid = torch.randn(4, 5, generator=gen, requires_grad=True)
    prefix = torch.randn(1, 5, generator=gen, requires_grad=True)
    args = (patches, weight, None, grid, prefix, [1, 1, 2, 3, 1, 2], [2, 2], "bicubic", True, backend)
    torch.library.opcheck(_patch_embed_packed_op, args)


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(2)
    weight, pos = torch.randn(6, 3, 2, 2, generator=gen), torch.randn(1 + 9, 6, generator=gen)
    prefix = torch.randn(1, 6, generator=gen)
    images = [torch.randn(3, 4, 8, generator=gen), torch.randn(3, 2, 2, generator=gen)]

    def fn(a, b):
        return patch_embed_packed([a, b], weight, pos_embed=pos, prefix_tokens=prefix).tokens

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*images)
    assert_close(got, fn(*images), torch.float32, "compiled")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    """The cuda and triton kernels on CUDA tensors, forward and backward, against the float64 reference on the CPU."""
    if backends.unavailable_reason(backend, "cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    grids, base = [(1, 1), (3, 17), (14, 14), (9, 2)], (14, 14)
    inputs = _make(grids, 3, 4, 48, 1, base, "prefix", True, dtype, seed=7)
    on_gpu = [[t.cuda() for t in x] if isinstance(x, list) else x.cuda() for x in inputs]
    out, grads = _run(backend, on_gpu, base, "bicubic", True)
    ref_inputs = [[t.double() for t in x] if isinstance(x, list) else x.double() for x in inputs]
    ref, ref_grads = _run("reference", ref_inputs, base, "bicubic", True)
    ref_grads = list(ref_grads)
    if not all(_torch_adjoint_ok(base, g, "bicubic", True) for g in grids):
        ref_grads[len(grids) + 2] = _grid_grad(ref_inputs, base, "bicubic", True, 1, "prefix", ref)
    assert_close(out.tokens.cpu(), ref.tokens, dtype, "tokens")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g.cpu(), r, dtype, f"grad {i}", factor=4)


@pytest.mark.skipif(
    backends.unavailable_reason("triton", "cpu") is not None,
    reason="Triton runs CPU tensors only under the interpreter",
)
@pytest.mark.parametrize("with_pos", [True, False])
def test_triton_packed_kernel_matches_the_formula(with_pos):
    """The Triton kernel under the interpreter: rows with 0 to 5 position taps, scattered output rows."""
    from mmkern.kernels.triton.patch_embed import patch_embed_packed_fwd

    gen = torch.Generator().manual_seed(0)
    M, K, E, G = 37, 48, 40, 23
    patches, weight, bias = torch.randn(M, K, generator=gen), torch.randn(E, K, generator=gen), torch.randn(E)
    counts = torch.randint(0, 6, (M,), generator=gen)
    tap_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    tap_index = torch.randint(0, G, (int(tap_ptr[-1]),), generator=gen, dtype=torch.int32)
    tap_weight, grid = torch.rand(int(tap_ptr[-1]), generator=gen), torch.randn(G, E, generator=gen)
    out_rows = torch.randperm(M + 5, generator=gen)[:M]
    out = torch.zeros(M + 5, E)
    taps = (grid, tap_ptr, tap_index, tap_weight) if with_pos else (None, None, None, None)
    patch_embed_packed_fwd(patches, weight, bias, *taps, out_rows, out, int(counts.max()) if with_pos else 0)
    want = torch.zeros(M + 5, E, dtype=torch.float64)
    rows = patches.double() @ weight.double().T + bias.double()
    if with_pos:
        for m in range(M):
            taken = slice(int(tap_ptr[m]), int(tap_ptr[m + 1]))
            rows[m] += (tap_weight[taken, None].double() * grid[tap_index[taken].long()].double()).sum(0)
    want[out_rows] = rows
    assert_close(out, want, torch.float32, "out")
