"""clip_loss / infonce / siglip_loss on every backend against the float64 reference: loss and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mmkern import ops, reference
from mmkern.ops import contrastive
from tests.checks import RTOL, assert_close, dtypes_for, kernel_backends, relative_error

# The cpu backend's cases run at every ISA level this CPU supports (see conftest.py).
pytestmark = [pytest.mark.cpu_levels, pytest.mark.usefixtures("cpu_level")]

BACKENDS = kernel_backends("cpu")
GPU_BACKENDS = kernel_backends("cuda") if torch.cuda.is_available() else []
LOSSES = ("clip", "infonce", "siglip")

# Batch sizes: 1, odd, and past one CPU tile (256); the Triton interpreter is slow, so it gets its own
# (its tiles are 16 wide there).
SIZES = {"cpu": [1, 2, 7, 33, 257, 300], "triton": [1, 3, 17, 40], "gpu": [1, 7, 65, 129, 300]}


def _features(n: int, d: int, gen: torch.Generator, orthogonal: bool, half: int) -> torch.Tensor:
    """Unit rows; `orthogonal` puts them in one half of the dimensions (the other side uses the other half)
    plus a little noise, so every cosine is near 0: at s = 100 a fixed-max LSE would underflow there."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    # Below 8 dimensions one half would hold 1-3 dimensions: rows would collapse onto each other, every
    # gradient would be a difference of equal terms, and the test would measure that conditioning.
    if orthogonal and d >= 8:
        mask = torch.zeros(d, dtype=torch.float64)
        mask[: d // 2] = 1.0
        mask = mask if half == 0 else 1.0 - mask
        x = x * mask + 1e-3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return F.normalize(x, dim=1)


def _run(fn, tensors: list[torch.Tensor], **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    return loss, grads


def _loss_fns(kind: str, labels):
    if kind == "clip":
        return ops.clip_loss, reference.clip_loss, {}
    if kind == "siglip":
        return ops.siglip_loss, reference.siglip_loss, {}
    return ops.infonce, (lambda q, k, s: reference.infonce(q, k, s, labels)), {"labels": labels}


def _factor(plain: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Tolerance factor: at least the table, and 4x the relative error of fp32 PyTorch."""
    return max(1.0, 4.0 * relative_error(plain, expected) / RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LOSSES)
@given(data=st.data())
def test_matches_float64_reference(backend, kind, data):
    _check_against_reference("cpu", backend, kind, data)


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda"])
@pytest.mark.parametrize("kind", LOSSES)
@given(data=st.data())
def test_gpu_matches_float64_reference(backend, kind, data):
    _check_against_reference("cuda", backend, kind, data)


def _check_against_reference(device, backend, kind, data):
    B = data.draw(st.sampled_from(SIZES["gpu" if device == "cuda" else backend]), label="B")
    D = data.draw(st.sampled_from([1, 3, 16, 64, 97]), label="D")
    extra = data.draw(st.sampled_from([0, 5, 40]), label="extra") if kind == "infonce" else 0
    scale = data.draw(st.sampled_from([1.0, 14.3, 50.0, 100.0]), label="scale")
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    orthogonal = data.draw(st.booleans(), label="orthogonal")
    use_labels = kind == "infonce" and data.draw(st.booleans(), label="labels")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    x = _features(B, D, gen, orthogonal, 0).to(dtype)
    y = _features(B + extra, D, gen, orthogonal, 1).to(dtype)
    labels = torch.randint(0, B + extra, (B,), generator=gen) if use_labels else None
    args = [x, y, torch.tensor(scale)]
    if kind == "siglip":
        args.append(torch.tensor(data.draw(st.sampled_from([-10.0, -2.0, 0.0, 3.0]), label="bias")))
    fn, ref_fn, kwargs = _loss_fns(kind, labels)

    expected, expected_grads = _run(ref_fn, [t.double() for t in args])
    # Plain PyTorch in fp32 on the same inputs: its error is the conditioning of the problem (near-equal
    # rows make gradients differences of like terms), which the kernel may not beat either.
    plain, plain_grads = _run(ref_fn, [t.float() for t in args])
    on_device = [t.to(device) for t in args]
    if labels is not None:
        kwargs["labels"] = labels.to(device)
    loss, grads = _run(fn, on_device, backend=backend, **kwargs)
    loss, grads = loss.cpu(), [g.cpu() for g in grads]
    assert loss.dtype == dtype and loss.shape == ()
    names = ["loss", "grad_x", "grad_y", "grad_scale", "grad_bias"]
    # Size of the terms each output sums (unit-norm features): an fp32 kernel is accurate to RTOL times
    # that, also where the result itself is much smaller (a confident batch has a loss near 0).
    terms = {"loss": scale, "grad_x": scale / B, "grad_y": scale / B, "grad_scale": 1.0, "grad_bias": 1.0}
    for name, g, e, p in zip(names, (loss, *grads), (expected, *expected_grads), (plain, *plain_grads)):
        assert g.dtype == (dtype if name in ("loss", "grad_x", "grad_y") else torch.float32)
        factor = max(_factor(p, e, dtype), terms[name] / max(e.abs().max().item(), 1e-30))
        assert_close(g, e, dtype, name, factor=factor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_underflow_safe_at_scale_100(backend):
    """Rows whose best cosine is small at s = 100: every exp(z - 100) underflows fp32, the LSE must not."""
    B, D = 20, 16
    x = torch.zeros(B, D)
    x[:, 0] = 1.0
    y = torch.zeros(B, D)
    y[:, 1] = 1.0
    y[:, 0] = torch.linspace(-0.05, 0.05, B)
    y = F.normalize(y, dim=1)
    s = torch.tensor(100.0)
    expected = reference.clip_loss(x.double(), y.double(), s.double())
    assert_close(ops.clip_loss(x, y, s, backend=backend), expected, torch.float32, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["clip", "infonce"])
def test_positive_term_at_scale_100(backend, kind):
    """Issue 15: subtracting the positive logit from the LSE, two fp32 numbers near s, cost ~1e-7·s absolute: one
    pair gave 1.9e-5 where the loss is 0, aligned pairs a negative loss, saturated pairs gradients 1e-2 off. Each
    row's loss is now softplus(LSE over the negatives - z_ii)."""
    fn, ref_fn, _ = _loss_fns(kind, None)
    s = torch.tensor(100.0)
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(1, 64, generator=gen), dim=1)
    loss, grads = _run(fn, [x, F.normalize(x + 0.1 * torch.randn(1, 64, generator=gen), dim=1), s], backend=backend)
    assert loss.item() == 0.0, "one pair: the loss is 0"
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    for B in (2, 8, 64):  # aligned pairs, the others far off
        x = F.normalize(torch.randn(B, 64, generator=gen), dim=1)
        assert fn(x, x.clone(), s, backend=backend).item() >= 0.0
    names = ["loss", "grad_x", "grad_y", "grad_scale"]
    for B, spread in ((4, 0.3), (8, 0.5), (40, 0.5)):  # clustered pairs: losses ~1e-4 .. 1e-6
        centre = torch.randn(64, generator=gen)
        x = F.normalize(centre + spread * torch.randn(B, 64, generator=gen), dim=1)
        y = F.normalize(x + 0.02 * torch.randn(B, 64, generator=gen), dim=1)
        expected, expected_grads = _run(ref_fn, [x.double(), y.double(), s.double()])
        plain, plain_grads = _run(ref_fn, [x, y, s])  # open_clip's fp32 arithmetic
        loss, grads = _run(fn, [x, y, s], backend=backend)
        assert loss.item() >= 0.0
        for name, g, e, p in zip(names, (loss, *grads), (expected, *expected_grads), (plain, *plain_grads)):
            factor = max(2.0, 2.0 * relative_error(p, e) / RTOL[torch.float32])
            assert_close(g, e, torch.float32, f"{name} (B={B})", factor=factor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(0)
    x, y = _features(37, 24, gen, False, 0).float(), _features(37, 24, gen, False, 1).float()
    s, b = torch.tensor(20.0), torch.tensor(-5.0)
    labels = torch.randperm(37, generator=gen)

    def losses(x, y, s, b):  # _Loss returns in three ways: torch 2.11 once zeroed the gradient of all three
        clip, siglip = ops.clip_loss(x, y, s, backend=backend), ops.siglip_loss(x, y, s, b, backend=backend)
        return clip + siglip + ops.infonce(x, y, s, labels=labels, backend=backend)

    eager, eager_grads = _run(losses, [x, y, s, b])
    compiled, compiled_grads = _run(torch.compile(losses, fullgraph=True), [x, y, s, b])
    assert_close(compiled, eager.double(), torch.float32, "loss")
    for g, e in zip(compiled_grads, eager_grads):
        assert_close(g, e.double(), torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [contrastive.ROWS, contrastive.ROWS_COLS, contrastive.SIGMOID])
def test_opcheck(backend, mode):
    gen = torch.Generator().manual_seed(1)
    x = _features(9, 8, gen, False, 0).float().requires_grad_()
    y = _features(9 + (mode == contrastive.ROWS) * 3, 8, gen, False, 1).float().requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkern.contrastive_stats, (x, y, s, b, mode, mode == contrastive.SIGMOID, backend))


def _bad_cases():
    x, y, s = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0)
    return [
        ("text_features", lambda: ops.clip_loss(x, torch.randn(5, 8), s)),
        ("text_features", lambda: ops.clip_loss(x, torch.randn(4, 7), s)),
        ("image_features", lambda: ops.clip_loss(torch.randn(8), y, s)),
        ("logit_scale", lambda: ops.clip_loss(x, y, torch.tensor([10.0, 1.0]))),
        ("logit_scale", lambda: ops.clip_loss(x, y, torch.ones(1, 1))),
        ("text_features", lambda: ops.clip_loss(x, y.half(), s)),
        ("keys", lambda: ops.infonce(x, torch.randn(3, 8), s)),
        ("labels", lambda: ops.infonce(x, y, s, labels=torch.tensor([0, 1, 2, 9]))),
        ("labels", lambda: ops.infonce(x, y, s, labels=torch.zeros(3, dtype=torch.long))),
        ("logit_bias", lambda: ops.siglip_loss(x, y, s, torch.zeros(2))),
        ("image_features", lambda: ops.clip_loss(torch.randn(0, 8), torch.randn(0, 8), s)),
        ("image_features", lambda: ops.clip_loss(x.double(), y.double(), s, backend="cpu")),
        ("backend", lambda: ops.clip_loss(x, y, s, backend="nope")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_value_error_naming_argument(case):
    name, call = _bad_cases()[case]
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices():
    x, y = torch.randn(4, 8), torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="text_features"):
        ops.clip_loss(x, y, torch.tensor(10.0))
    with pytest.raises(ValueError, match="logit_scale"):
        ops.clip_loss(x.cuda(), y, torch.tensor(10.0))


POISONS = [(k, p) for k in LOSSES for p in ("nan_x", "inf_y", "nan_scale", "inf_scale")] + [("infonce", "extra_nan")]
# A -inf in x_i whose positive logit z_ii becomes +inf and every other logit of row i -inf: torch's loss is NaN
# (LSE - z_ii = inf - inf); the softmax losses' softplus(LSE_neg - z_ii) gave its limit 0 and a finite loss. (SigLIP's
# loss is finite there in torch too: softplus(-inf) and softplus(-inf) are 0.)
POISONS += [(k, "inf_positive") for k in ("clip", "infonce")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,poison", POISONS)
def test_non_finite_inputs_give_non_finite_loss(backend, kind, poison):
    B = 300 if backend == "cpu" else 20
    x, y = torch.randn(B, 8), torch.randn(B + 4, 8)
    s = torch.tensor(10.0)
    if poison == "nan_x":
        x[B // 2, 3] = math.nan
    elif poison == "inf_y":
        y[1, 0] = math.inf
    elif poison == "nan_scale":
        s = torch.tensor(math.nan)
    elif poison == "inf_scale":
        s = torch.tensor(math.inf)
    elif poison == "inf_positive":
        y[:, 3] = y[:, 3].abs() + 0.1
        y[B // 2, 3] = -1.0
        x[B // 2, 3] = -math.inf
    else:  # a NaN in an extra negative: no positive term sees it, only the kernel's LSE
        y[B + 2, 5] = math.nan
    if kind == "clip":
        loss = ops.clip_loss(x, y[:B], s, backend=backend)
    elif kind == "siglip":
        loss = ops.siglip_loss(x, y[:B], s, torch.tensor(-1.0), backend=backend)
    else:
        loss = ops.infonce(x, y, s, backend=backend)
    assert not torch.isfinite(loss)


def test_reference_backend_and_float64():
    gen = torch.Generator().manual_seed(2)
    x, y = _features(5, 4, gen, False, 0), _features(5, 4, gen, False, 1)
    s = torch.tensor(10.0, dtype=torch.float64)
    assert torch.equal(ops.clip_loss(x, y, s, backend="reference"), reference.clip_loss(x, y, s))


def test_strided_features_cpu():
    gen = torch.Generator().manual_seed(3)
    x = _features(40, 64, gen, False, 0).float()[:, ::2]
    y = _features(32, 40, gen, False, 1).float().T  # non-contiguous (40, 32)
    s = torch.tensor(30.0)
    expected = reference.clip_loss(x.double(), y.double(), s.double())
    assert_close(ops.clip_loss(x, y, s, backend="cpu"), expected, torch.float32, "loss", factor=30)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the native module is not built")
def test_cpu_shared_and_separate_exp_shifts():
    """CLIP tiles whose logits (forward) and log-sum-exps (backward) lie close together take one exp per logit
    with a shared shift; row 5, shrunk 100x, and column 5 lie far below the rest at s = 100, so the tiles
    holding them take separate row and column shifts. Both paths in one call, against float64."""
    gen = torch.Generator().manual_seed(5)
    x = _features(300, 64, gen, False, 0)
    y = F.normalize(x + 0.1 * torch.randn(300, 64, generator=gen, dtype=torch.float64), dim=1)
    x[5] *= 0.01
    s = torch.tensor(100.0, dtype=torch.float64)
    expected, expected_grads = _run(reference.clip_loss, [x, y, s])
    plain, plain_grads = _run(reference.clip_loss, [x.float(), y.float(), s.float()])
    loss, grads = _run(ops.clip_loss, [x.float(), y.float(), s.float()], backend="cpu")
    terms = {"loss": 100.0, "grad_x": 100.0 / 300, "grad_y": 100.0 / 300, "grad_scale": 1.0}  # as in the test above
    for name, g, e, p in zip(terms, (loss, *grads), (expected, *expected_grads), (plain, *plain_grads)):
        factor = max(_factor(p, e, torch.float32), terms[name] / e.abs().max().item())
        assert_close(g, e, torch.float32, name, factor=factor)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the native module is not built")
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads):
    """The Latin-square schedule with uneven chunks (3 threads over 3 x 4 tiles) and with one thread."""
    gen = torch.Generator().manual_seed(4)
    x, y = _features(600, 40, gen, False, 0).float(), _features(900, 40, gen, False, 1).float()
    s = torch.tensor(50.0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn, ref_fn, keys in ((ops.infonce, reference.infonce, y), (ops.clip_loss, reference.clip_loss, y[:600])):
            expected, expected_grads = _run(ref_fn, [x.double(), keys.double(), s.double()])
            plain, plain_grads = _run(ref_fn, [x, keys, s])
            loss, grads = _run(fn, [x, keys, s], backend="cpu")
            for g, e, p in zip((loss, *grads), (expected, *expected_grads), (plain, *plain_grads)):
                assert_close(g, e, torch.float32, fn.__name__, factor=_factor(p, e, torch.float32))
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the native module is not built")
@pytest.mark.parametrize("kind", LOSSES)
# D = 300: more than one k-block of the packed GEMMs (kKC: 240 or 256 floats by level), as CLIP's D = 512 is.
@pytest.mark.parametrize("B,D,extra", [(1, 5, 0), (37, 24, 3), (300, 16, 40), (70, 300, 5)])
def test_cpu_fused_and_split_paths(kind, B, D, extra, monkeypatch):
    """Small batches take the fused kernel (statistics and gradients in one call, backward only scales); larger
    ones the forward and backward kernels. Both against float64, and against each other; no_grad (no fused call)
    gives the same loss; a retained graph gives the same gradients twice (the fused path's saved ones unchanged)."""
    gen = torch.Generator().manual_seed(B)
    extra = extra if kind == "infonce" else 0
    x, y = _features(B, D, gen, False, 0), _features(B + extra, D, gen, False, 1)
    labels = torch.randint(0, B + extra, (B,), generator=gen) if kind == "infonce" else None
    args = [x, y, torch.tensor(30.0, dtype=torch.float64)] + ([torch.tensor(-3.0)] if kind == "siglip" else [])
    fn, ref_fn, kwargs = _loss_fns(kind, labels)
    expected, expected_grads = _run(ref_fn, args)
    plain, plain_grads = _run(ref_fn, [t.float() for t in args])
    assert B * (B + extra) <= contrastive.FUSED_MAX_LOGITS
    fused, fused_grads = _run(fn, [t.float() for t in args], backend="cpu", **kwargs)
    monkeypatch.setattr(contrastive, "FUSED_MAX_LOGITS", 0)
    split, split_grads = _run(fn, [t.float() for t in args], backend="cpu", **kwargs)
    for g, s, e, p in zip(
        (fused, *fused_grads), (split, *split_grads), (expected, *expected_grads), (plain, *plain_grads)
    ):
        factor = max(_factor(p, e, torch.float32), 30.0 / B / max(e.abs().max().item(), 1e-30))
        assert_close(g, e, torch.float32, "fused", factor=factor)
        assert_close(s, e, torch.float32, "split", factor=factor)
        assert_close(g, s.double(), torch.float32, "fused vs split", factor=factor)
    monkeypatch.undo()
    leaves = [t.float().requires_grad_() for t in args]
    loss = fn(*leaves, backend="cpu", **kwargs)
    with torch.no_grad():
        assert_close(fn(*leaves, backend="cpu", **kwargs), loss.detach().double(), torch.float32, "no_grad loss")
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
