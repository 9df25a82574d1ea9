"""mmkern.ops.rms_norm against the float64 reference: forward and the x / residual / weight gradients on every backend
available here (and the `torch` path), for hypothesis-drawn shapes and layouts; bad input; opcheck; torch.compile;
and the text tower's RMSNorm option."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mmkern
from mmkern import backends, reference
from mmkern.nn import fused_elementwise
from mmkern.ops import cpu_policy, rms_norm
from tests.checks import (
    INFERENCE_CASES,
    LAYOUTS,
    assert_close,
    backends_for,
    dtypes_for,
    kernel_backends,
    layout,
    randn,
    spy_launches,
)

# The cpu backend's cases run at every ISA level this CPU supports (see conftest.py).
pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

CASES = [(b, d) for b in [*backends_for("cpu"), "torch"] for d in dtypes_for(b)]
IDS = [f"{b}-{str(d)[6:]}" for b, d in CASES]


def _grads(outs, leaves, grad_outs):
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad([o for o, _ in pairs], present, [g for _, g in pairs])


def _check(backend, dtype, x, residual, weight, eps, grad_sum, grad_out, name):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, residual, weight)]
    s, out = rms_norm(*leaves, eps, backend=backend)
    assert s.dtype == out.dtype == dtype and out.shape == x.shape
    if residual is None:
        assert s is leaves[0]
        grad_sum = None  # s is x itself: its gradient is the caller's business
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ref_s, _ = reference.rms_norm(*ref_leaves, eps)
    # The kernels normalise s as stored (rounded to the dtype), as the unfused x + r followed by RMSNorm does; so
    # does the reference here: the rounded value, with the gradient of the unrounded sum.
    rounded = ref_s + (s.detach().double() - ref_s).detach()
    ref_out = reference.rms_norm(rounded, None, ref_leaves[2], eps)[1]
    assert_close(s, ref_s, dtype, f"{name} sum")
    assert_close(out, ref_out, dtype, f"{name} out")
    grads = _grads([s, out], leaves, [grad_sum, grad_out])
    ref_grads = _grads(
        [ref_s, ref_out], ref_leaves, [None if grad_sum is None else grad_sum.double(), grad_out.double()]
    )
    # Error models: grad_x = rstd·(g - x̂·mean(g·x̂)) + grad_sum cancels (to ~0 for D = 1, where x̂ = ±1): measured
    # against its terms, rstd·|g| + |grad_sum|; grad_weight = Σ_rows grad_out·x̂ against Σ_rows |grad_out·x̂|.
    s64 = rounded.detach()
    rstd = (s64.square().mean(-1, keepdim=True) + eps).rsqrt()
    g = grad_out.double() * (1.0 if weight is None else weight.double())
    x_terms = rstd * g.abs() + (0.0 if grad_sum is None else grad_sum.double().abs())
    w_terms = (grad_out.double() * s64 * rstd).abs().reshape(-1, x.shape[-1]).sum(0)
    names = [n for n, t in zip(["x", "residual", "weight"], leaves) if t is not None]
    for n, got, expected in zip(names, grads, ref_grads):
        assert got.dtype == dtype
        magnitude = w_terms if n == "weight" else x_terms
        assert_close(got, expected, dtype, f"{name} grad {n}", factor=2.0, magnitude=magnitude.expand_as(expected))


@st.composite
def problems(draw, small: bool):
    return {
        "rows": draw(st.sampled_from([1, 2, 7]) if small else st.integers(1, 70)),
        "lead": draw(st.integers(1, 3)),
        "d": draw(st.sampled_from([1, 3, 16, 17, 33]) if small else st.integers(1, 400)),
        "has_residual": draw(st.booleans()),
        "has_weight": draw(st.booleans()),
        "use_grad_sum": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "scale": draw(st.sampled_from([1.0, 0.01, 30.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_rms_norm_matches_reference(backend, dtype):
    interpreted = backend == "triton" and not torch.cuda.is_available()

    @settings(max_examples=10 if interpreted else 25)
    @given(p=problems(small=interpreted))
    @example(p={"rows": 1, "lead": 1, "d": 1, "has_residual": True, "has_weight": True, "use_grad_sum": True,
                "eps": 1e-6, "layout": "contiguous", "scale": 1.0, "seed": 0})  # fmt: skip
    @example(p={"rows": 7, "lead": 3, "d": 33, "has_residual": True, "has_weight": True, "use_grad_sum": False,
                "eps": 1e-5, "layout": "strided", "scale": 30.0, "seed": 1})  # fmt: skip
    @example(p={"rows": 2, "lead": 2, "d": 17, "has_residual": False, "has_weight": False, "use_grad_sum": False,
                "eps": 0.1, "layout": "transposed", "scale": 0.01, "seed": 2})  # fmt: skip
    def run(p):
        gen = torch.Generator().manual_seed(p["seed"])
        shape = (p["lead"], p["rows"], p["d"])
        x = layout(randn(gen, shape, dtype, p["scale"]), p["layout"])
        r = layout(randn(gen, shape, dtype, p["scale"]), "transposed") if p["has_residual"] else None
        w = randn(gen, (p["d"],), dtype, 0.5, 1.0) if p["has_weight"] else None
        grad_sum = randn(gen, shape, dtype) if p["use_grad_sum"] else None
        grad_out = layout(randn(gen, shape, dtype), p["layout"])
        _check(backend, dtype, x, r, w, p["eps"], grad_sum, grad_out, str(p))

    run()


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_only_needed_gradients_and_empty(backend):
    """A frozen weight: only the input gradient is asked for; and empty inputs."""
    gen = torch.Generator().manual_seed(3)
    x, r, w = randn(gen, (5, 9), torch.float32), randn(gen, (5, 9), torch.float32), randn(gen, (9,), torch.float32)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(rms_norm(xg, r, w, backend=backend)[1].square().sum(), [xg])
    xd = x.double().requires_grad_()
    (rg,) = torch.autograd.grad(reference.rms_norm(xd, r.double(), w.double())[1].square().sum(), [xd])
    assert_close(g, rg, torch.float32, "grad x", factor=2.0)
    x = torch.randn(0, 7, requires_grad=True)
    w = torch.randn(7, requires_grad=True)
    s, y = rms_norm(x, torch.randn(0, 7), w, backend=backend)
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    assert s.shape == y.shape == gx.shape == (0, 7) and torch.equal(gw, torch.zeros(7))


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_inference_matches_training_forward(backend, monkeypatch):
    """Without autograd rms_norm runs an inference forward: on the CPU without rstd, which only the backward reads
    (the kernel takes it absent). Its outputs are the recorded forward's, bit for bit."""
    calls = spy_launches(monkeypatch, importlib.import_module("mmkern.ops.rms_norm"))
    gen = torch.Generator().manual_seed(5)
    for dtype in dtypes_for(backend):
        for shape, kind in INFERENCE_CASES:
            x = layout(randn(gen, shape, dtype, shift=2.0), kind)
            r, w = layout(randn(gen, shape, dtype), "transposed"), randn(gen, shape[-1:], dtype)
            for residual in (r, None):
                calls.clear()
                with torch.no_grad():
                    s, out = rms_norm(x, residual, w, backend=backend)
                ((_, tensors),) = calls
                assert (tensors["rstd"] is None) == (backend == "cpu")
                train_s, train_out = rms_norm(x, residual, w.clone().requires_grad_(), backend=backend)
                assert calls[-1][1]["rstd"] is not None  # the recorded forward
                assert torch.equal(out, train_out.detach()), (dtype, shape, kind)
                assert s is x if residual is None else torch.equal(s, train_s.detach())


def _bad(**overrides):
    kwargs = {"x": torch.randn(4, 6), "residual": torch.randn(4, 6), "weight": torch.randn(6), "eps": 1e-6,
              "backend": None, **overrides}  # fmt: skip
    return lambda: rms_norm(**kwargs)


@pytest.mark.parametrize(
    "call,name",
    [
        (_bad(x=torch.tensor(1.0)), "x"),  # a scalar
        (_bad(x=torch.randint(0, 3, (4, 6))), "x"),  # integers
        (_bad(x=[[1.0]]), "x"),  # not a tensor
        (_bad(residual=torch.randn(4, 5)), "residual"),
        (_bad(residual=torch.randn(4, 6, dtype=torch.float16)), "residual"),  # mixed dtypes
        (_bad(weight=torch.randn(5)), "weight"),
        (_bad(weight=torch.randn(6, 1)), "weight"),
        (_bad(weight=torch.randn(6, device="meta")), "weight"),  # mixed devices
        (_bad(eps=-1.0), "eps"),
        (_bad(eps="small"), "eps"),
        (_bad(backend="cuda"), "backend"),  # unavailable here (CPU tensors)
        (_bad(backend="tpu"), "backend"),
        (_bad(x=torch.randn(4, 6, dtype=torch.float64), residual=None, weight=None, backend="cpu"), "x"),
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(7)
    x = layout(randn(gen, (3, 5, 6), torch.float32, 2.0), "transposed").requires_grad_()
    r = randn(gen, (3, 5, 6), torch.float32).requires_grad_()
    w = randn(gen, (6,), torch.float32).requires_grad_()
    g = randn(gen, (3, 5, 6), torch.float32)
    torch.library.opcheck(torch.ops.mmkern.rms_norm.default, (x, r, w, 1e-6, backend))
    torch.library.opcheck(torch.ops.mmkern.rms_norm.default, (x, None, None, 1e-6, backend))
    s, _, rstd = torch.ops.mmkern.rms_norm(x.detach(), r.detach(), w.detach(), 1e-6, backend)
    torch.library.opcheck(torch.ops.mmkern.rms_norm_backward.default, (g, g, s, w.detach(), rstd, True, backend))
    torch.library.opcheck(torch.ops.mmkern.rms_norm_backward.default, (g, None, s, None, rstd, False, backend))


@pytest.mark.parametrize(
    ("shape", "grad"), [((16, 64), False), ((2048, 64), False), ((16, 64), True), ((64, 768), True)]
)
def test_default_follows_the_policy(shape, grad, monkeypatch):
    """The default on CPU tensors: the native kernel where cpu_policy.rms_norm says it measured faster (at the
    level this module runs at), else the PyTorch path (F.rms_norm); backend="cpu" always runs the kernel."""
    if "cpu" not in kernel_backends():
        pytest.skip("the cpu backend is unavailable here")
    monkeypatch.setattr(backends, "_forced", None)  # the default path, whatever MMKERN_BACKEND was at import
    seen = []
    original = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: seen.append(1) or original(*a, **k))
    x = torch.randn(*shape, requires_grad=grad)
    rms_norm(x, x.detach())
    assert len(seen) == (0 if cpu_policy.rms_norm(x.numel(), grad, x.dtype) else 1)
    seen.clear()
    rms_norm(x, x.detach(), backend="cpu")
    assert not seen


class _Stack(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.fc = torch.nn.Linear(6, 6)
        self.weight = torch.nn.Parameter(torch.randn(6))

    def forward(self, x, r):
        s, y = rms_norm(x, r, self.weight, backend=self.backend)
        s2, y2 = rms_norm(self.fc(y), s, self.weight, backend=self.backend)
        return s2.sum() + y2.square().sum()


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
def test_text_tower_rms_option(norm_first, monkeypatch):
    """TextConfig(norm="rms"): RMSNorm modules (weight only) in place of every LayerNorm; the fused ops give the
    plain modules' results, forward and gradients."""
    from mmkern.models.text import TextConfig, TextTransformer

    torch.manual_seed(0)
    config = TextConfig(vocab_size=40, context_length=7, width=16, depth=2, heads=2, norm="rms", embed_norm=True,
                        norm_first=norm_first, eps=1e-6)  # fmt: skip
    model = TextTransformer(config)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 2 and not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert not any("norm" in k and k.endswith("bias") for k in model.state_dict())
    ids, probe = torch.randint(0, 40, (3, 7)), torch.randn(3, 16)
    calls = []
    op = mmkern.ops.rms_norm
    monkeypatch.setattr(mmkern.ops, "rms_norm", lambda *a, **k: calls.append(1) or op(*a, **k))
    outs = []
    for fused in (False, True):
        model.zero_grad()
        with fused_elementwise(fused), mmkern.use_backend("cpu" if fused and "cpu" in kernel_backends() else None):
            out = model(ids)
        (out * probe).sum().backward()  # (a norm's output has a constant square sum, whose gradient cancels)
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) >= 2 * 2  # only under fused_elementwise(): the blocks' two norms each
    assert_close(outs[1][0], outs[0][0].double(), torch.float32, "out", factor=5.0)
    for (name, _), g1, g0 in zip(model.named_parameters(), outs[1][1], outs[0][1]):
        assert_close(g1, g0.double(), torch.float32, f"grad {name}", factor=5.0)
    with pytest.raises(ValueError, match="norm"):
        TextTransformer(TextConfig(vocab_size=40, context_length=7, width=16, depth=1, heads=2, norm="batch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in backends_for("cuda")] or ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,kind",
    [((1, 1), "contiguous"), ((7, 33), "strided"), ((5, 64), "contiguous"), ((300, 768), "contiguous"),
     ((4, 9, 4096), "transposed"), ((2049, 256), "contiguous")],
)  # fmt: skip
def test_rms_norm_gpu(backend, dtype, shape, kind):
    """CUDA tensors on the cuda and triton backends (the vectorised CUDA path where D and the layout allow 16-byte
    accesses, the element path elsewhere), forward and the three gradients, against the float64 reference."""
    gen = torch.Generator().manual_seed(5)
    x = layout(randn(gen, shape, dtype).cuda(), kind)
    r = randn(gen, shape, dtype).cuda()
    w = randn(gen, shape[-1:], dtype, 0.5, 1.0).cuda()
    grad_sum, grad_out = randn(gen, shape, dtype).cuda(), randn(gen, shape, dtype).cuda()
    _check(backend, dtype, x, r, w, 1e-6, grad_sum, grad_out, f"{shape} {kind}")
