"""mmkern.ops.patch_embed against the float64 reference: forward and every gradient, on every backend
available here, for hypothesis-drawn shapes and layouts; bad input; opcheck; torch.compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmkern import reference
from mmkern.ops.patch_embed import patch_embed
from tests.checks import assert_close, backends_for, dtypes_for, kernel_backends

# The cpu backend's cases run at every ISA level this CPU supports (see conftest.py).
pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

CASES = [(b, d) for b in backends_for("cpu") for d in dtypes_for(b)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
POS_KINDS = [None, "2d", "3d"]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` stored contiguously, channels_last, or as a non-contiguous view."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _make(B, C, gh, gw, P, E, T, pos_kind, has_bias, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    N = gh * gw
    images = _layout(rand(B, C, gh * P, gw * P), layout)
    weight = _layout(rand(E, C, P, P, scale=(C * P * P) ** -0.5), layout)
    bias = rand(E) if has_bias else None
    pos = None
    if pos_kind == "2d":
        pos = rand(E, T + N).t()  # transposed: a non-contiguous (T + N, E)
    elif pos_kind == "3d":
        pos = rand(1, T + N, E)
    prefix = rand(T, E) if T else None
    grad_out = rand(B, E, T + N).transpose(1, 2)  # non-contiguous (B, T + N, E)
    return (images, weight, bias, pos, prefix), grad_out


def _check(backend, dtype, inputs, grad_out, name=""):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    images, weight, bias, pos, prefix = leaves
    out = patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend=backend)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out)

    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref_out = reference.patch_embed(*ref_leaves)
    ref_present = [t for t in ref_leaves if t is not None]
    ref_grads = torch.autograd.grad(ref_out, ref_present, grad_out.double())

    assert out.dtype == dtype
    # Rounding error of a dot product scales with Σ|a·b|, not with |Σ a·b|, which can cancel (E = 1, one patch):
    # the magnitude is the same embedding of the absolute values, and for the gradients, the same sums over patches
    # and batch of absolute values (the weight's of 9 terms summed to 0.064 of their 8.7).
    abs_leaves = [t.detach().double().abs().requires_grad_() if t is not None else None for t in inputs]
    abs_out = reference.patch_embed(*abs_leaves)
    abs_grads = torch.autograd.grad(abs_out, [t for t in abs_leaves if t is not None], grad_out.double().abs())
    assert_close(out, ref_out, dtype, f"{name} out", magnitude=abs_out)
    names = [n for n, t in zip(["images", "weight", "bias", "pos_embed", "prefix_tokens"], leaves) if t is not None]
    for n, g, rg, leaf, mag in zip(names, grads, ref_grads, present, abs_grads):
        assert g.dtype == dtype and g.shape == leaf.shape, n
        assert_close(g, rg, dtype, f"{name} grad {n}", magnitude=mag)


@st.composite
def problems(draw, small: bool):
    P = draw(st.integers(1, 8 if small else 16))
    return {
        "B": draw(st.integers(1, 2 if small else 3)),
        "C": draw(st.integers(1, 2 if small else 4)),
        "gh": draw(st.integers(1, 3 if small else 5)),
        "gw": draw(st.integers(1, 3 if small else 5)),
        "P": P,
        "E": draw(st.integers(1, 24 if small else 70)),
        "T": draw(st.integers(0, 2)),
        "pos_kind": draw(st.sampled_from(POS_KINDS)),
        "has_bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**16)),
    }


# Fixed awkward cases every run: the ViT patch sizes 14 and 16, odd patch sizes 3 and 7, 1x1 grids, B = C = 1, and a
# cancelling weight gradient.
KEYS = ("B", "C", "gh", "gw", "P", "E", "T", "pos_kind", "has_bias", "layout", "seed")
EXAMPLES = [
    dict(zip(KEYS, values))
    for values in [
        (1, 1, 1, 1, 1, 1, 0, None, False, "contiguous", 0),
        (2, 3, 3, 1, 7, 33, 1, "3d", True, "channels_last", 1),
        (1, 3, 1, 3, 3, 17, 2, "2d", True, "strided", 2),
        (2, 3, 2, 3, 14, 40, 1, "3d", True, "contiguous", 3),
        (1, 3, 3, 3, 16, 64, 0, "2d", False, "channels_last", 4),
        (3, 1, 1, 3, 1, 1, 1, "2d", False, "contiguous", 5349),  # weight gradient: 9 terms cancel to 0.7%
    ]
]


def _with_examples(test):
    for ex in EXAMPLES:
        test = example(problem=ex)(test)
    return test


@pytest.mark.parametrize("backend,dtype", CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
def test_matches_reference(backend, dtype):
    # The Triton interpreter executes every program in Python: smaller shapes and fewer examples there.
    interpreted = backend == "triton" and not torch.cuda.is_available()

    @settings(max_examples=15 if interpreted else 25)
    @given(problem=problems(small=interpreted))
    @_with_examples
    def run(problem):
        if interpreted and problem["P"] > 8:  # the fixed P = 14/16 examples, scaled down for the interpreter
            problem = dict(problem, B=1, C=1, gh=2, gw=1, E=16)
        inputs, grad_out = _make(**problem, dtype=dtype)
        _check(backend, dtype, inputs, grad_out, name=str(problem))

    run()


@pytest.mark.skipif("cpu" not in kernel_backends("cpu"), reason="mmkern._C is not built")
@pytest.mark.parametrize("bf16_dot", ["0", "1"])
def test_cpu_bf16_engines(bf16_dot, monkeypatch):
    """Both CPU bf16 GEMMs (AVX-512 BF16 dot products where compiled in, and bf16 -> fp32 conversion),
    whichever one this CPU measures faster, on a shape with K blocks and ragged edges."""
    monkeypatch.setenv("MMKERN_CPU_BF16_DOT", bf16_dot)
    for problem in EXAMPLES[1:] + [dict(EXAMPLES[3], B=3, C=3, gh=5, gw=7, E=70)]:
        inputs, grad_out = _make(**problem, dtype=torch.bfloat16)
        _check("cpu", torch.bfloat16, inputs, grad_out, name=str(problem))


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_only_needed_gradients(backend):
    """Frozen weights (the image gradient alone) and frozen images (the usual training case)."""
    (images, weight, bias, pos, prefix), grad_out = _make(
        2, 3, 2, 3, 4, 8, 1, "3d", True, torch.float32, "contiguous", 5
    )
    x = images.double().requires_grad_()
    w = weight.double().requires_grad_()
    ref_gi, ref_gw = torch.autograd.grad(
        reference.patch_embed(x, w, bias.double(), pos.double(), prefix.double()), [x, w], grad_out.double()
    )
    x = images.clone().requires_grad_()
    out = patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend=backend)
    (gi,) = torch.autograd.grad(out, [x], grad_out)
    assert_close(gi, ref_gi, torch.float32, "grad images")
    w = weight.clone().requires_grad_()
    out = patch_embed(images, w, bias, pos_embed=pos, prefix_tokens=prefix, backend=backend)
    (gw,) = torch.autograd.grad(out, [w], grad_out)
    assert_close(gw, ref_gw, torch.float32, "grad weight")


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_non_finite_propagates(backend):
    """A NaN pixel poisons its own token (forward) and its own weight column (grad_weight), nothing else."""
    (images, weight, bias, pos, prefix), grad_out = _make(
        2, 2, 2, 2, 3, 8, 1, "3d", True, torch.float32, "contiguous", 6
    )
    images[1, 1, 4, 2] = float("nan")
    _check(backend, torch.float32, (images, weight, bias, pos, prefix), grad_out, name="nan")
    out = patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend=backend)
    assert out[1, 1 + 2 * 1 + 0].isnan().all() and out.isnan().sum() == weight.shape[0]


def _bad(**overrides):
    images = torch.randn(2, 3, 8, 8)
    weight = torch.randn(5, 3, 4, 4)
    kwargs = {
        "images": images,
        "weight": weight,
        "bias": torch.randn(5),
        "pos_embed": torch.randn(5, 5),
        "prefix_tokens": torch.randn(1, 5),
        "backend": None,
    }
    kwargs.update(overrides)
    images, weight, bias = kwargs.pop("images"), kwargs.pop("weight"), kwargs.pop("bias")
    return lambda: patch_embed(images, weight, bias, **kwargs)


@pytest.mark.parametrize(
    "call,name",
    [
        (_bad(images=torch.randn(2, 3, 9, 8)), "images"),  # H not a multiple of P
        (_bad(images=torch.randn(2, 3, 8, 6)), "images"),  # W not a multiple of P
        (_bad(images=torch.randn(3, 8, 8)), "images"),  # not 4-D
        (_bad(images=torch.randn(2, 2, 8, 8)), "weight"),  # channel mismatch
        (_bad(weight=torch.randn(5, 3, 4, 2)), "weight"),  # non-square kernel
        (_bad(bias=torch.randn(4)), "bias"),
        (_bad(pos_embed=torch.randn(4, 5)), "pos_embed"),  # length != T + N
        (_bad(pos_embed=torch.randn(5, 6)), "pos_embed"),  # width != E
        (_bad(pos_embed=torch.randn(2, 5, 5)), "pos_embed"),  # batched position embeddings
        (_bad(prefix_tokens=torch.randn(1, 4)), "prefix_tokens"),
        (_bad(bias=torch.randn(5, dtype=torch.float64)), "bias"),  # mixed dtypes
        (_bad(weight=torch.randn(5, 3, 4, 4, dtype=torch.float16)), "weight"),
        (_bad(pos_embed=torch.randn(5, 5, device="meta")), "pos_embed"),  # mixed devices
        (_bad(images=torch.randint(0, 9, (2, 3, 8, 8))), "images"),  # integer images
        (_bad(backend="cuda"), "backend"),  # unavailable here (CPU tensors)
        (_bad(backend="tpu"), "backend"),  # unknown
        (
            _bad(
                images=torch.randn(2, 3, 8, 8, dtype=torch.float64),
                weight=torch.randn(5, 3, 4, 4, dtype=torch.float64),
                bias=None,
                pos_embed=None,
                prefix_tokens=None,
                backend="cpu",
            ),
            "images",
        ),  # float64 runs on the reference backend only
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    (images, weight, bias, pos, prefix), grad_out = _make(
        2, 3, 2, 1, 3, 6, 1, "3d", True, torch.float32, "channels_last", 7
    )
    images.requires_grad_()
    weight.requires_grad_()
    pos = pos.reshape(pos.shape[1:]).requires_grad_()
    torch.library.opcheck(torch.ops.mmkern.patch_embed.default, (images, weight, bias, pos, prefix, backend))
    torch.library.opcheck(torch.ops.mmkern.patch_embed.default, (images, weight, None, None, None, backend))
    torch.library.opcheck(
        torch.ops.mmkern.patch_embed_backward.default,
        (grad_out.detach(), images.detach(), weight.detach(), 1, True, True, backend),
    )
    torch.library.opcheck(
        torch.ops.mmkern.patch_embed_backward.default,
        (grad_out.detach(), images.detach(), weight.detach(), 1, False, True, backend),
    )


class _Embed(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.weight = torch.nn.Parameter(torch.randn(8, 3, 4, 4) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(8))
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + 4, 8))
        self.cls = torch.nn.Parameter(torch.randn(1, 8))

    def forward(self, x):
        return patch_embed(x, self.weight, self.bias, pos_embed=self.pos, prefix_tokens=self.cls, backend=self.backend)


@pytest.mark.parametrize("backend", ["cpu"] if "cpu" in kernel_backends("cpu") else [])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    module = _Embed(backend)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    ref_out = module(x)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [x, *module.parameters()])
    assert_close(out, ref_out.double(), torch.float32, "compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg.double(), torch.float32, "compiled grad")
