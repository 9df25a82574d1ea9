"""Helpers every op test uses: which backends run here, and the one tolerance table."""

from __future__ import annotations

import torch

from mmkern import backends

# Max error against the float64 reference, relative to the largest magnitude of the reference output
# (so a tolerance means "digits of the result", whatever its scale). Rounding the output alone costs
# 2^-24, 2^-11 and 2^-8 in fp32, fp16 and bf16; the table leaves room for fp32 accumulation order.
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}

# Memory layouts the op tests draw inputs in (see layout()).
LAYOUTS = ["contiguous", "transposed", "strided"]


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values stored contiguously, with the two leading dims swapped in memory, or every other
    element of a wider tensor (a non-unit stride on the last dim)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def randn(gen, shape, dtype, scale=1.0, shift=0.0):
    """N(shift, scale²) drawn in float64 from `gen`, then rounded to dtype."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def backends_for(device: str = "cpu") -> list[str]:
    """Every backend that can run tensors on `device` here, but `torch`: PyTorch's own ops, which for patch
    embedding, the losses and the fused ops are the reference's code (tests/test_cpu_policy.py covers it)."""
    return [b for b in backends.BACKENDS if b != "torch" and backends.unavailable_reason(b, device) is None]


def kernel_backends(device: str = "cpu") -> list[str]:
    """Available backends other than the reference."""
    return [b for b in backends_for(device) if b != "reference"]


def dtypes_for(backend: str) -> list[torch.dtype]:
    """Storage dtypes a backend is tested in here. The Triton interpreter (triton 3.9) computes bf16
    arithmetic and bf16 tl.dot wrongly, so bf16 Triton paths are checked on a GPU only."""
    if backend == "triton" and not torch.cuda.is_available():
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor | None = None) -> float:
    expected = expected.double()
    magnitude = expected if magnitude is None else magnitude.double()
    scale = magnitude.abs().max().item() if magnitude.numel() else 0.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    return err / max(scale, 1e-30) if scale > 0 else err


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    factor: float = 1.0,
    magnitude: torch.Tensor | None = None,
):
    """max|actual - expected| ≤ factor · RTOL[dtype] · max|magnitude| (expected computed in float64). magnitude
    defaults to expected; a sum that can cancel passes the same sum of absolute values (its error model)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = torch.isnan(actual.double()) & torch.isnan(expected.double())
    assert torch.equal(torch.isnan(actual.double()), torch.isnan(expected.double())), f"{name}: NaN pattern differs"
    mag = None if magnitude is None else magnitude.double().nan_to_num(0.0, 0.0, 0.0)
    err = relative_error(actual.masked_fill(both_nan, 0), expected.masked_fill(both_nan, 0), mag)
    assert err <= factor * RTOL[dtype], f"{name}: relative error {err:.3g} > {factor * RTOL[dtype]:.3g} ({dtype})"


def assert_no_worse_than_torch(
    actual: torch.Tensor,
    torch_result: torch.Tensor,
    truth: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    factor: float = 1.0,
    slack: float = 2.0,
    magnitude: torch.Tensor | None = None,
    rounding: torch.Tensor | None = None,
):
    """flash-attention's rule against torch in the same dtype: where torch's result is finite, actual is finite too,
    and max|actual - truth| <= slack · max|torch_result - truth| + factor · RTOL[dtype] · max|magnitude| there (truth
    in float64; magnitude as in assert_close, default truth). Torch's own error sets the bar where the inputs alone
    decide the answer's accuracy (a score plus a -1e9 mask keeps no digit of the score in fp32, for torch and mmkern
    alike). `rounding` (float64, actual's shape) is the error that any implementation may make at each element by
    rounding its intermediate values (the caller's first-order error model, absolute), and is not counted: torch's
    error is one draw of it, which on a small tensor can sit by luck several times below what another order draws."""
    assert actual.shape == torch_result.shape == truth.shape, f"{name}: shapes differ"
    finite = torch.isfinite(torch_result)
    bad = finite & ~torch.isfinite(actual)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where torch's are finite"
    truth = truth.double().masked_fill(~finite, 0.0)
    diff = (actual.double().masked_fill(~finite, 0.0) - truth).abs()
    if rounding is not None:
        diff = (diff - rounding.double().masked_fill(~finite, 0.0)).clamp(min=0.0)
    err = diff.max().item() if truth.numel() else 0.0
    bar = (torch_result.double().masked_fill(~finite, 0.0) - truth).abs().max().item() if truth.numel() else 0.0
    magnitude = truth if magnitude is None else magnitude.double().masked_fill(~finite, 0.0)
    scale = magnitude.abs().max().item() if truth.numel() else 0.0
    limit = slack * bar + factor * RTOL[dtype] * scale
    assert err <= limit, f"{name}: error {err:.3g} > {limit:.3g} (torch's {bar:.3g}, magnitude {scale:.3g}, {dtype})"


def spy_launches(monkeypatch, module) -> list:
    """Records (kernel name, tensors by name) of every kernel launch of the op module `module`."""
    calls, launch = [], module.launch_kernel

    def spy(backend, triton_module, name, device, tensors, scalars):
        calls.append((name, tensors))
        launch(backend, triton_module, name, device, tensors, scalars)

    monkeypatch.setattr(module, "launch_kernel", spy)
    return calls


# (shape, layout of x): a single element (contiguous, and strided: a contiguous tensor with strides of 2 on its
# size-1 dims), odd widths and strided rows, a transposed ViT-S/16 token matrix, a ViT-B-wide row
INFERENCE_CASES = [
    ((1, 1), "contiguous"),
    ((1, 1), "strided"),
    ((3, 7, 33), "strided"),
    ((197, 64), "transposed"),
    ((2, 5, 768), "contiguous"),
]
