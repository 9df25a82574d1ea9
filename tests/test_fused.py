"""mmkern.ops.bias_gelu and mmkern.ops.add_layer_norm against the float64 reference: forward and every gradient,
on every backend available here, for hypothesis-drawn shapes and layouts; non-finite values; bad input; opcheck;
torch.compile; and the model blocks that use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import mmkern
from mmkern import _native, reference
from mmkern.nn import Block, Mlp, fused_elementwise
from mmkern.ops import fused, rms_norm
from mmkern.ops.fused import add_layer_norm, bias_gelu
from tests.checks import (
    INFERENCE_CASES,
    LAYOUTS,
    RTOL,
    assert_close,
    backends_for,
    dtypes_for,
    kernel_backends,
    relative_error,
    spy_launches,
)
from tests.checks import layout as _layout
from tests.checks import randn as _rand

# The cpu backend's cases run at every ISA level this CPU supports (see conftest.py).
pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

CASES = [(b, d) for b in backends_for("cpu") for d in dtypes_for(b)]
IDS = [f"{b}-{str(d)[6:]}" for b, d in CASES]


def _grads(out, leaves, grad_outs):
    present = [t for t in leaves if t is not None]
    outs = [o for o, g in zip(out, grad_outs) if g is not None]
    return torch.autograd.grad(outs, present, [g for g in grad_outs if g is not None], allow_unused=True)


def _sum_factor(terms: torch.Tensor, total: torch.Tensor) -> float:
    """Tolerance factor for a gradient reduced over rows, total = Σ_rows terms: fp32 rounding of the terms is
    relative to Σ|terms|, which cancellation can make far larger than |total|."""
    magnitude = terms.double().abs().reshape(-1, terms.shape[-1]).sum(0).max().item()
    return max(1.0, magnitude / max(total.double().abs().max().item(), 1e-30))


def _check_gelu(backend, dtype, x, bias, approximate, grad, name):
    leaves = [x.detach().requires_grad_(), None if bias is None else bias.detach().requires_grad_()]
    out = bias_gelu(leaves[0], leaves[1], approximate, backend=backend)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ref = reference.bias_gelu(ref_leaves[0], ref_leaves[1], approximate)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, f"{name} out")
    grads = _grads([out], leaves, [grad])
    ref_grads = _grads([ref], ref_leaves, [grad.double()])
    for n, g, rg in zip(["x", "bias"], grads, ref_grads):
        assert g.dtype == dtype
        factor = _sum_factor(ref_grads[0], rg) if n == "bias" else 1.0
        assert_close(g, rg, dtype, f"{name} grad {n}", factor=factor)


@st.composite
def gelu_problems(draw, small: bool):
    return {
        "rows": draw(st.sampled_from([1, 2, 7]) if small else st.integers(1, 70)),
        "lead": draw(st.integers(1, 3)),
        "n": draw(st.sampled_from([1, 3, 16, 17, 33]) if small else st.integers(1, 300)),
        "has_bias": draw(st.booleans()),
        "approximate": draw(st.sampled_from(["none", "tanh"])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "scale": draw(st.sampled_from([0.5, 3.0, 12.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_bias_gelu_matches_reference(backend, dtype):
    interpreted = backend == "triton" and not torch.cuda.is_available()

    @settings(max_examples=10 if interpreted else 25)
    @given(p=gelu_problems(small=interpreted))
    @example(p={"rows": 1, "lead": 1, "n": 1, "has_bias": True, "approximate": "none", "layout": "contiguous",
                "scale": 3.0, "seed": 0})  # fmt: skip
    @example(p={"rows": 7, "lead": 2, "n": 33, "has_bias": True, "approximate": "tanh", "layout": "strided",
                "scale": 12.0, "seed": 1})  # fmt: skip
    def run(p):
        gen = torch.Generator().manual_seed(p["seed"])
        shape = (p["lead"], p["rows"], p["n"])
        x = _rand(gen, shape, dtype, p["scale"])
        # Errors are measured relative to the largest result: keep one O(1) value in the tensor, so that a lone
        # tail value (GELU'(-9) ~ 1e-18, below fp16's range) does not make the scale itself vanish.
        x[..., 0, 0] = 1.0
        x = _layout(x, p["layout"])
        bias = _rand(gen, (p["n"],), dtype) if p["has_bias"] else None
        grad = _layout(_rand(gen, shape, dtype), "transposed")
        _check_gelu(backend, dtype, x, bias, p["approximate"], grad, str(p))

    run()


def _check_ln(backend, dtype, x, residual, weight, bias, eps, grad_sum, grad_out, name, slack=1.0):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, residual, weight, bias)]
    s, out = add_layer_norm(*leaves, eps, backend=backend)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ref_s, ref_out = reference.add_layer_norm(*ref_leaves, eps)
    if residual is not None:
        # The kernels normalise s as stored (rounded to the dtype), as the unfused x + r followed by a LayerNorm
        # does; so does the reference here: the rounded value, with the gradient of the unrounded sum.
        rounded = ref_s + (s.detach().double() - ref_s).detach()
        ref_out = F.layer_norm(rounded, (x.shape[-1],), ref_leaves[2], ref_leaves[3], eps)
    assert s.dtype == out.dtype == dtype and out.shape == x.shape
    if residual is None:
        assert s is leaves[0]
    assert_close(s, ref_s, dtype, f"{name} sum")
    # x̂ = (s - mean)·rstd carries an absolute error of ulp·(|x̂| + |s|·rstd), which with |mean| >> std (shift 5,
    # D = 2) exceeds the table's tolerance: the output and the x gradient may also be off by up to twice as much as
    # torch's own LayerNorm in the same dtype (on one such draw torch was off by 3.6e-5 of max|out|, mmkern 2.5e-5).
    torch_leaves = [None if t is None else t.detach().requires_grad_() for t in leaves]
    torch_s = torch_leaves[0] if residual is None else torch_leaves[0] + torch_leaves[1]
    torch_out = F.layer_norm(torch_s, (x.shape[-1],), torch_leaves[2], torch_leaves[3], eps)
    (torch_gx,) = torch.autograd.grad(torch_out, torch_leaves[0], grad_out)

    def torch_factor(torch_value, ref_value):
        return 2.0 * relative_error(torch_value, ref_value) / RTOL[dtype]

    assert_close(out, ref_out, dtype, f"{name} out", factor=max(1.0, torch_factor(torch_out, ref_out)))
    if residual is None:
        grad_sum = None  # s is x itself: its gradient is the caller's business
    grads = _grads([s, out], leaves, [grad_sum, grad_out])
    ref_grads = _grads([ref_s, ref_out], ref_leaves, [None if grad_sum is None else grad_sum.double(),
                                                     grad_out.double()])  # fmt: skip
    names = [n for n, t in zip(["x", "residual", "weight", "bias"], leaves) if t is not None]
    # So each grad_weight term grad_out·x̂ is accurate to ulp·(|x̂| + |s|·rstd)·|grad_out| (x̂ can be ~0 exactly, e.g.
    # for D = 1, where rstd = eps^-1/2), and each grad_bias term to ulp·|grad_out|.
    s64 = ref_s.detach()
    rstd = (s64.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    terms = {"weight": grad_out.double().abs() * (1 + s64.abs() * rstd), "bias": grad_out}
    # grad x = rstd·(g - mean(g) - x̂·mean(g·x̂)) + grad_sum cancels to ~0 for D <= 2 (the output is then
    # constant): measure its error against the size of the terms, rstd·|grad_out·weight|, each of which carries x̂'s
    # error, (1 + |s|·rstd) ulp (torch's fp32 was off by 1e-7 of that, 8e-5 of the terms alone, on a D = 2 row of
    # s = (-2.4662, -2.4719): rstd = 330).
    g = grad_out.double() * (1.0 if weight is None else weight.double())
    scale_x = (rstd * g.abs() * (1 + s64.abs() * rstd)).max()
    scale_x = scale_x + (0.0 if grad_sum is None else grad_sum.double().abs().max())
    for n, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == dtype
        if n in terms:
            factor = _sum_factor(terms[n], rg)
        else:
            factor = max(1.0, scale_x.item() / max(rg.double().abs().max().item(), 1e-30))
            if grad_sum is None:  # torch's x gradient (without a grad_sum, the same for x and residual)
                factor = max(factor, torch_factor(torch_gx, rg) / 2.0)
        assert_close(g, rg, dtype, f"{name} grad {n}", factor=2.0 * slack * factor)


@st.composite
def ln_problems(draw, small: bool):
    return {
        "rows": draw(st.sampled_from([1, 2, 7]) if small else st.integers(1, 70)),
        "lead": draw(st.integers(1, 3)),
        "d": draw(st.sampled_from([1, 3, 16, 17, 33]) if small else st.integers(1, 400)),
        "has_residual": draw(st.booleans()),
        "has_weight": draw(st.booleans()),
        "has_bias": draw(st.booleans()),
        "use_grad_sum": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-5, 1e-6, 0.1])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "shift": draw(st.sampled_from([0.0, 5.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_add_layer_norm_matches_reference(backend, dtype):
    interpreted = backend == "triton" and not torch.cuda.is_available()

    @settings(max_examples=10 if interpreted else 25)
    @given(p=ln_problems(small=interpreted))
    @example(p={"rows": 1, "lead": 1, "d": 1, "has_residual": True, "has_weight": True, "has_bias": True,
                "use_grad_sum": True, "eps": 1e-5, "layout": "contiguous", "shift": 0.0, "seed": 0})  # fmt: skip
    @example(p={"rows": 7, "lead": 3, "d": 33, "has_residual": True, "has_weight": True, "has_bias": False,
                "use_grad_sum": False, "eps": 1e-6, "layout": "strided", "shift": 5.0, "seed": 1})  # fmt: skip
    @example(p={"rows": 45, "lead": 2, "d": 2, "has_residual": True, "has_weight": False, "has_bias": True,
                "use_grad_sum": True, "eps": 1e-6, "layout": "contiguous", "shift": 0.0, "seed": 430})  # fmt: skip
    def run(p):
        # For D <= 2 the LayerNorm output is constant and its x-gradient cancels to ~0; torch's own fp16 / bf16
        # LayerNorm backward (the reference backend) leaves noise of several % of the terms there, and a few
        # times our kernels' error for small D (which compute in fp32 from the stored inputs).
        half_reference = backend == "reference" and dtype != torch.float32
        assume(not (half_reference and p["d"] <= 2))
        gen = torch.Generator().manual_seed(p["seed"])
        shape = (p["lead"], p["rows"], p["d"])
        x = _layout(_rand(gen, shape, dtype, shift=p["shift"]), p["layout"])
        r = _layout(_rand(gen, shape, dtype), "transposed") if p["has_residual"] else None
        w = _rand(gen, (p["d"],), dtype, 0.5, 1.0) if p["has_weight"] else None
        b = _rand(gen, (p["d"],), dtype) if p["has_bias"] else None
        grad_sum = _rand(gen, shape, dtype) if p["use_grad_sum"] else None
        grad_out = _layout(_rand(gen, shape, dtype), p["layout"])
        _check_ln(
            backend, dtype, x, r, w, b, p["eps"], grad_sum, grad_out, str(p), slack=4.0 if half_reference else 1.0
        )

    run()


@pytest.mark.parametrize("backend,device", [(b, dev) for dev in ("cpu", "cuda") for b in kernel_backends(dev)])
@pytest.mark.parametrize("d", [7, 256])
def test_layer_norm_mean_far_from_std(backend, device, d):
    """Rows with |mean| >> std (1000 vs 1): the kernels correct the first pass's mean in the variance pass, so x̂ is
    off by at most half an ulp of the mean times rstd (plus the output's rounding). With the first-pass mean alone
    (the Triton kernel before the CPU kernel's correction, f691760, was carried over) it was off by 1.4-3.1x that
    bound, torch's own LayerNorm by 1.5-3.4x."""
    x = (torch.randn(64, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1000.0).float()
    x = x.to(device)
    _, out = add_layer_norm(x, eps=1e-6, backend=backend)
    ref = F.layer_norm(x.double(), (d,), eps=1e-6)
    rstd = (x.double().var(-1, unbiased=False, keepdim=True) + 1e-6).rsqrt()
    eps32 = torch.finfo(torch.float32).eps
    bound = 0.5 * (512 * eps32) * rstd + 4 * eps32 * (1 + ref.abs())  # 512 eps32: the fp32 spacing in [512, 1024)
    assert ((out.double() - ref).abs() / bound).max().item() <= 1.05


@pytest.mark.parametrize(
    "backend,dtype", [(b, d) for b in kernel_backends("cpu") for d in dtypes_for(b) if d != torch.float32]
)
def test_sum_rounds_as_torch(backend, dtype):
    """s = x + r is stored exactly as torch's add rounds it (to nearest even; infinities kept, NaN kept), in full
    vectors and a row's tail: the tolerance of the other tests would not see a conversion that truncates. The rows
    of rms_norm are stored by the same conversions (cpu_rows.h)."""
    gen = torch.Generator().manual_seed(0)
    x, r = _rand(gen, (9, 133), dtype, 3.0), _rand(gen, (9, 133), dtype, 3.0)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)
    s, _ = add_layer_norm(x, r, backend=backend)
    expected = x + r
    finite = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(s), ~finite) and torch.equal(s[finite], expected[finite])
    s, _ = rms_norm(x, r, backend=backend)
    assert torch.equal(torch.isnan(s), ~finite) and torch.equal(s[finite], expected[finite])


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_only_needed_gradients(backend):
    """Frozen bias / LayerNorm parameters: only the input gradients are asked for."""
    gen = torch.Generator().manual_seed(3)
    x, b = _rand(gen, (5, 9), torch.float32, 2.0), _rand(gen, (9,), torch.float32)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(bias_gelu(xg, b, backend=backend).sum(), [xg])
    xd = x.double().requires_grad_()
    (rg,) = torch.autograd.grad(F.gelu(xd + b.double()).sum(), [xd])
    assert_close(g, rg, torch.float32, "grad x")
    r, w = _rand(gen, (5, 9), torch.float32), _rand(gen, (9,), torch.float32)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(add_layer_norm(xg, r, w, b, backend=backend)[1].square().sum(), [xg])
    xd = x.double().requires_grad_()
    ref = F.layer_norm(xd + r.double(), (9,), w.double(), b.double()).square().sum()
    (rg,) = torch.autograd.grad(ref, [xd])
    assert_close(g, rg, torch.float32, "grad x", factor=2.0)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_empty(backend):
    x = torch.randn(0, 7, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    out = bias_gelu(x, b, backend=backend)
    gx, gb = torch.autograd.grad(out.sum(), [x, b])
    assert out.shape == (0, 7) and gx.shape == (0, 7) and torch.equal(gb, torch.zeros(7))
    s, y = add_layer_norm(x, torch.randn(0, 7), b, b, backend=backend)
    assert s.shape == y.shape == (0, 7)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_inference_matches_training_forward(backend, monkeypatch):
    """Without autograd add_layer_norm runs an inference forward: on the CPU without mean / rstd, which only the
    backward reads (the kernel takes them absent). Its outputs are the recorded forward's, bit for bit."""
    calls = spy_launches(monkeypatch, fused)
    gen = torch.Generator().manual_seed(5)
    for dtype in dtypes_for(backend):
        for shape, kind in INFERENCE_CASES:
            x = _layout(_rand(gen, shape, dtype, shift=2.0), kind)
            r = _layout(_rand(gen, shape, dtype), "transposed")
            w, b = _rand(gen, shape[-1:], dtype), _rand(gen, shape[-1:], dtype)
            for residual in (r, None):
                calls.clear()
                with torch.no_grad():
                    s, out = add_layer_norm(x, residual, w, b, backend=backend)
                ((_, tensors),) = calls
                assert (tensors["mean"] is None and tensors["rstd"] is None) == (backend == "cpu")
                train_s, train_out = add_layer_norm(x, residual, w.clone().requires_grad_(), b, backend=backend)
                assert tensors is not calls[-1][1] and calls[-1][1]["mean"] is not None  # the recorded forward
                assert torch.equal(out, train_out.detach()), (dtype, shape, kind)
                assert s is x if residual is None else torch.equal(s, train_s.detach())


@pytest.mark.skipif("cpu" not in kernel_backends("cpu"), reason="needs the native module")
def test_native_layer_norm_statistics_absent_or_both():
    x = torch.randn(4, 9)
    out, mean, rstd = torch.empty_like(x), torch.empty(4), torch.empty(4)
    tensors = {"x": x, "residual": None, "weight": None, "bias": None, "sum_out": None, "out": out}
    _native.launch("add_layer_norm_fwd", x.device, {**tensors, "mean": mean, "rstd": rstd}, {"eps": 1e-5})
    expected = out.clone()
    torch.testing.assert_close(mean, x.mean(-1))
    out.fill_(float("nan"))
    _native.launch("add_layer_norm_fwd", x.device, {**tensors, "mean": None, "rstd": None}, {"eps": 1e-5})
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="mean, rstd: both given or both absent"):
        _native.launch("add_layer_norm_fwd", x.device, {**tensors, "mean": mean, "rstd": None}, {"eps": 1e-5})


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_non_finite_propagates(backend):
    """±inf and NaN give what torch's float64 GELU gives (GELU(-inf) is NaN: -inf · 0), and only in their own row
    for LayerNorm; far tails stay finite and keep their relative precision. (The reference backend is torch in
    the input's dtype, whose fp32 GELU differs from its fp64 one at -inf and in the tail.)"""
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -30.0, 30.0, -9.0, 0.0, 1e-30]])
    for approximate in ("none", "tanh"):
        xg = x.clone().requires_grad_()
        out = bias_gelu(xg, None, approximate, backend=backend)
        (grad,) = torch.autograd.grad(out, [xg], torch.ones_like(x))
        xd = x.double().requires_grad_()
        ref = F.gelu(xd, approximate=approximate)
        (ref_grad,) = torch.autograd.grad(ref, [xd], torch.ones_like(xd))
        for name, a, e in (("out", out, ref), ("grad", grad, ref_grad)):
            a, e = a.double(), e.detach()
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf()), f"{approximate} {name}"
            assert torch.equal(a[a.isinf()], e[e.isinf()]), f"{approximate} {name}: signs of inf"
            finite = e.isfinite()
            assert_close(a[finite], e[finite], torch.float32, f"{approximate} {name}")
    # x·Φ(x) from erfc: torch's own float64 GELU, 1 + erf(x/√2), cancels to 0 below x ≈ -8.
    t = torch.tensor([-3.0, -6.0, -9.0, -12.0], dtype=torch.float64)
    tail = bias_gelu(t.float(), backend=backend).double()
    expected = t * 0.5 * torch.special.erfc(-t / 2**0.5)
    assert ((tail - expected).abs() / expected.abs()).max() < 1e-5
    rows = torch.randn(3, 8)
    rows[1, 2] = float("nan")
    _, out = add_layer_norm(rows, torch.randn(3, 8), backend=backend)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()


def _bad_gelu(**overrides):
    kwargs = {"x": torch.randn(4, 6), "bias": torch.randn(6), "approximate": "none", "backend": None, **overrides}
    return lambda: bias_gelu(kwargs["x"], kwargs["bias"], kwargs["approximate"], backend=kwargs["backend"])


def _bad_ln(**overrides):
    kwargs = {"x": torch.randn(4, 6), "residual": torch.randn(4, 6), "weight": torch.randn(6), "bias": torch.randn(6),
              "eps": 1e-5, "backend": None, **overrides}  # fmt: skip
    return lambda: add_layer_norm(**kwargs)


@pytest.mark.parametrize(
    "call,name",
    [
        (_bad_gelu(x=torch.tensor(1.0)), "x"),  # a scalar
        (_bad_gelu(x=torch.randint(0, 3, (4, 6))), "x"),  # integers
        (_bad_gelu(bias=torch.randn(5)), "bias"),
        (_bad_gelu(bias=torch.randn(2, 3)), "bias"),
        (_bad_gelu(bias=torch.randn(6, dtype=torch.float16)), "bias"),  # mixed dtypes
        (_bad_gelu(bias=torch.randn(6, device="meta")), "bias"),  # mixed devices
        (_bad_gelu(approximate="sigmoid"), "approximate"),
        (_bad_gelu(backend="cuda"), "backend"),  # unavailable here (CPU tensors)
        (_bad_gelu(backend="tpu"), "backend"),
        (_bad_gelu(x=torch.randn(4, 6, dtype=torch.float64), bias=None, backend="cpu"), "x"),  # fp64: reference only
        (_bad_ln(x=torch.tensor(1.0)), "x"),
        (_bad_ln(residual=torch.randn(4, 5)), "residual"),
        (_bad_ln(residual=torch.randn(4, 6, dtype=torch.float16)), "residual"),
        (_bad_ln(weight=torch.randn(5)), "weight"),
        (_bad_ln(bias=torch.randn(6, 1)), "bias"),
        (_bad_ln(eps=-1.0), "eps"),
        (_bad_ln(backend="cuda"), "backend"),
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(7)
    x = _layout(_rand(gen, (3, 5, 6), torch.float32, 2.0), "transposed").requires_grad_()
    b = _rand(gen, (6,), torch.float32).requires_grad_()
    r = _rand(gen, (3, 5, 6), torch.float32).requires_grad_()
    g = _rand(gen, (3, 5, 6), torch.float32)
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.mmkern.bias_gelu.default, (x, b, approximate, backend))
        torch.library.opcheck(
            torch.ops.mmkern.bias_gelu_backward.default, (g, x.detach(), b.detach(), approximate, True, backend)
        )
    torch.library.opcheck(torch.ops.mmkern.bias_gelu.default, (x, None, "none", backend))
    torch.library.opcheck(torch.ops.mmkern.add_layer_norm.default, (x, r, b, b, 1e-5, backend))
    torch.library.opcheck(torch.ops.mmkern.add_layer_norm.default, (x, None, None, None, 1e-5, backend))
    s, _, mean, rstd = torch.ops.mmkern.add_layer_norm(x.detach(), r.detach(), b.detach(), None, 1e-5, backend)
    torch.library.opcheck(
        torch.ops.mmkern.add_layer_norm_backward.default, (g, g, s, b.detach(), mean, rstd, True, backend)
    )
    torch.library.opcheck(
        torch.ops.mmkern.add_layer_norm_backward.default, (g, None, s, None, mean, rstd, False, backend)
    )


class _Stack(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.fc = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)

    def forward(self, x, r):
        h = bias_gelu(x @ self.fc.weight.T, self.fc.bias, "tanh", backend=self.backend)
        s, y = add_layer_norm(h, r, self.norm.weight, self.norm.bias, backend=self.backend)
        return s.sum() + y.square().sum()


@pytest.mark.parametrize("backend", ["cpu"] if "cpu" in kernel_backends("cpu") else [])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    module = _Stack(backend)
    x, r = torch.randn(2, 3, 6, requires_grad=True), torch.randn(2, 3, 6, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, r)
    grads = torch.autograd.grad(out, [x, r, *module.parameters()])
    ref_out = module(x, r)
    ref_grads = torch.autograd.grad(ref_out, [x, r, *module.parameters()])
    assert_close(out, ref_out.double(), torch.float32, "compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg.double(), torch.float32, "compiled grad")


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_blocks_match_unfused(norm_first, act):
    """A stack of Blocks on the fused ops equals the same weights run with the plain PyTorch formulas."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(16, 2, act=act, norm_first=norm_first, eps=1e-5) for _ in range(2)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)

    def plain(blk, x):
        def mlp(h):
            return blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh" if act == "gelu_tanh" else "none"))

        if norm_first:
            x = x + blk.attn(blk.norm1(x))
            return x + mlp(blk.norm2(x))
        x = blk.norm1(x + blk.attn(x))
        return blk.norm2(x + mlp(x))

    expected = x
    with mmkern.use_backend("reference"):  # attention in float64
        for blk in blocks:
            expected = plain(blk, expected)
    # float64 runs the reference backend; the fp32 model the default (cpu kernels where built).
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, None)):
        got = x.to(dtype)
        with mmkern.use_backend(backend), fused_elementwise():
            for blk in blocks.to(dtype):
                got = blk(got)
        assert_close(got, expected, dtype, f"blocks {dtype}", factor=5.0)


def test_mlp_state_dict_and_unfused_act():
    mlp = Mlp(8, 32, act="quick_gelu")
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    x = torch.randn(3, 8)
    assert torch.allclose(mlp(x), mlp.fc2(mlp.act(mlp.fc1(x))))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_clip_on_fused_ops_matches_plain_twin(pre_norm, fused, monkeypatch):
    """The whole CLIP (fused blocks) against mmkern.train.baseline.PlainCLIP, the benchmarks' plain-PyTorch twin,
    with CLIP's pre-norm ViT and an argmax-pooled causal text tower without a padding mask: forward and gradients."""
    from mmkern.models import CLIP, CLIPConfig, TextConfig, ViTConfig
    from mmkern.train.baseline import PlainCLIP, naive_clip_loss

    torch.manual_seed(0)
    vision = ViTConfig(img_size=16, patch_size=4, width=32, depth=2, heads=2, pre_norm=pre_norm, eps=1e-5)
    text = TextConfig(vocab_size=50, context_length=9, width=32, depth=2, heads=2, act="gelu_tanh")
    model = CLIP(CLIPConfig(embed_dim=16, vision=vision, text=text))
    plain = PlainCLIP.from_clip(model)
    images, ids = torch.randn(4, 3, 16, 16), torch.randint(0, 50, (4, 9))
    calls = []
    for name in ("add_layer_norm", "bias_gelu"):
        op = getattr(mmkern.ops, name)
        monkeypatch.setattr(mmkern.ops, name, lambda *a, op=op, name=name, **k: calls.append(name) or op(*a, **k))
    with fused_elementwise(fused):
        loss = model.loss(images, ids)
    assert bool(calls) == fused and (not fused or {"add_layer_norm", "bias_gelu"} <= set(calls))
    plain_loss = naive_clip_loss(*plain(images, ids)[:3])
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    plain_loss.backward()
    plain_params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-3, atol=1e-5, msg=name)
