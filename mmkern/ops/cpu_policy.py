"""Which path an op takes on CPU tensors by default: mmkern's native kernel where it measured faster than the PyTorch
path a user would otherwise write (torch's own SDPA, conv2d + add, the naive loss, F.gelu / F.layer_norm) for that
kind of call at the ISA level the kernels run at (mmkern.cpu_capability()), and that PyTorch path (the `torch`
backend) everywhere else. So swapping in an mmkern op never costs speed on any CPU.

The regions were measured on x86-64; on other architectures (aarch64) the default takes the PyTorch path until one
is measured there (MEASURED_ARCH below).

Only the default changes: backend="cpu" (or use_backend / MMKERN_BACKEND) always runs the native kernel, and
calls that PyTorch has no path for (windowed or global-token attention, varlen, dropout that must match the other
backends' mask, causal combined with a mask) always run it.

The regions come from sweeps of each op against its PyTorch path on a quiet 2-core AMD EPYC (Zen 4) VM, two threads,
with both libraries held to each level (`--cpu-capability`; ATen, oneDNN and MKL limited alike), ratios torch time /
mmkern time (the sweeps and their figures: the docstrings below), then checked with the benchmarks (README, "Measured
so far"). A case within ~5% of 1.0 counts as not faster. An earlier single-thread sweep on the same machine under heavy
load from other processes had sent long attention and mid-size losses to torch; on the quiet machine the native kernels
win there at one thread and at two.
"""

from __future__ import annotations

import platform

import torch

from mmkern import _native

AVX512 = ("avx512", "avx512_bf16")

# Above this many logits (B·K) the naive loss needs ≥ 0.5 GiB for its logits and their gradient, the memory the
# native loss exists to save: the native kernel runs there whatever the speed.
CONTRASTIVE_MEMORY_LOGITS = 1 << 26


# Every region below was measured on x86-64. Elsewhere (aarch64's NEON build of the `default` level, ...) nothing
# says the native kernels beat PyTorch's own, so the default takes the PyTorch path for speed decisions until a
# machine of that architecture measures them; the memory bound of the losses still holds.
MEASURED_ARCH: bool = platform.machine().lower() in ("x86_64", "amd64")


def level() -> str:
    return _native.cpu_level


def patch_embed(dtype_is_bf16: bool) -> bool:
    """Native everywhere but fp32 / fp16 at the default level (ViT-B/16: 0.88x conv2d, whose oneDNN kernels use SSE4.1
    where the portable C++ has SSE2 and no FMA); bf16 7.5-14x at default and avx2, where torch's bf16 conv2d is slow."""
    return MEASURED_ARCH and (dtype_is_bf16 or level() != "default")


def patch_embed_packed(dtype_is_bf16: bool) -> bool:
    """Against conv2d + F.interpolate per image, fwd+bwd, 12 images of 64-304 px sides, ViT-B/16, one thread, ATen
    at its own best level: avx512 2.0-2.1x (fp32, bf16), avx512_bf16 1.6-2.0x, avx2 1.5x fp32 / 2.1x bf16;
    default 0.60x fp32 / 0.64x bf16 (ATen's oneDNN convolutions against the portable C++)."""
    return MEASURED_ARCH and level() != "default"


# log2 of the fewest logits (B·K) at which the native loss measured faster, by loss and feature width (D ≤ 128,
# D > 128); None: only past CONTRASTIVE_MEMORY_LOGITS.
_CONTRASTIVE_FROM = {
    "avx512": {"clip": (18, 18), "siglip": (18, 18), "infonce": (20, 20)},
    "avx2": {"clip": (18, 20), "siglip": (20, None), "infonce": (22, 24)},
    "default": {"clip": (18, None), "siglip": (None, None), "infonce": (24, None)},
}


def contrastive(loss: str, B: int, K: int, D: int) -> bool:
    """loss: "clip", "siglip" or "infonce" over B x K logits of width D. The native loss wins where the logits' exp
    and memory traffic outweigh its four B·K·D products (the naive loss makes three): large batches, narrow features.
    Measured fwd+bwd, torch / native, at logits 2^12 .. 2^22 (infonce K = 4B: 2^14 .. 2^24), D = 64 / 512:
    avx512: clip 0.86-6.1x / 0.70-2.4x (>= 1.5x from 2^18), siglip 0.91-4.5x / 0.68-2.0x (>= 1.6x from 2^18),
    infonce 0.64-6.6x / 0.68-2.5x (>= 1.5x from 2^20). avx2: clip D=64 1.38x at 2^18, D=512 0.89x at 2^18, 1.20-1.27x
    from 2^20; siglip D=64 1.03x at 2^18, 1.29-1.61x from 2^20, D=512 0.65-0.99x throughout; infonce D=64 1.00x at
    2^20, 1.69-3.9x from 2^22, D=512 1.04x at 2^22, 1.20x at 2^24. default: clip D=64 1.31-1.77x from 2^18, D=512
    0.35-0.49x; siglip 0.30-0.89x; infonce D=64 0.53-0.79x up to 2^22, 1.53x at 2^24, D=512 0.31-0.52x."""
    logits = B * K
    if logits >= CONTRASTIVE_MEMORY_LOGITS:
        return True
    if not MEASURED_ARCH:
        return False
    lv = level()
    start = _CONTRASTIVE_FROM["avx512" if lv in AVX512 else lv][loss][0 if D <= 128 else 1]
    return start is not None and logits >= 1 << start


# The row ops (bias_gelu, add_layer_norm, rms_norm): log2 of the fewest elements from which the native kernel
# measured >= 1.05x the torch path, by level, storage dtype and (inference, with a gradient); None: never. Swept with
# the public ops (backend="cpu" against backend="torch", alternating, medians of thread CPU time), one thread, both
# libraries held to each level, 2^12 .. 2^22 elements at two widths each (add_layer_norm and rms_norm 64 / 768,
# bias_gelu 768 / 3072): `python -m benchmarks.bench_fused --sweep --threads 1 --dtype D --cpu-capability L`. A
# threshold is taken where both widths stay faster from there up. The figures: the docstrings. Re-swept (twice per
# level and dtype, the machine loaded by other jobs) once the native call's fixed cost had dropped (the binding's
# tensor tuples read with the C API, inference without the LayerNorm / RMSNorm statistics, no OpenMP region for one
# thread: add_layer_norm 8x64 fp32 inference 16.5 -> 10.2 us per call against torch's 3.3, one thread, the quietest
# of five before / after pairs): the thresholds moved only where both runs agreed.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
_ROWS_FROM = {
    "add_layer_norm": {
        "avx512": {F32: (16, 22), BF16: (16, 18), F16: (16, 18)},  # fp32 fwd+bwd to 2^20: 0.74-1.18x at 2 threads
        "avx2": {F32: (18, 20), BF16: (None, 18), F16: (18, 18)},
        "default": {F32: (14, 16), BF16: (14, 14), F16: (None, 18)},
    },
    "bias_gelu": {
        "avx512": {F32: (12, 12), BF16: (12, 12), F16: (16, 16)},
        "avx2": {F32: (16, 16), BF16: (16, 16), F16: (16, 16)},
        "default": {F32: (None, None), BF16: (12, 14), F16: (16, 18)},
    },
    "rms_norm": {
        "avx512": {F32: (14, 12), BF16: (12, 12), F16: (12, 12)},
        "avx2": {F32: (16, 12), BF16: (20, 12), F16: (12, 12)},
        "default": {F32: (12, 12), BF16: (12, 12), F16: (None, None)},
    },
}


def _rows(op: str, numel: int, grad: bool, dtype: torch.dtype) -> bool:
    if not MEASURED_ARCH:
        return False
    lv = level()
    start = _ROWS_FROM[op]["avx512" if lv in AVX512 else lv].get(dtype, (None, None))[1 if grad else 0]
    return start is not None and numel >= 1 << start


def bias_gelu(numel: int, grad: bool, dtype: torch.dtype) -> bool:
    """Against F.gelu(x + bias) (inference: the sum, then GELU in place), numel elements of dtype. Measured torch /
    native, 2^12 .. 2^22 elements: avx512 fp32 1.05-2.3x fwd, 1.06-2.8x fwd+bwd; bf16 1.13-1.42x / 1.01-1.72x; fp16
    0.45-0.91x below 2^16, then 1.26-2.0x / 1.07-2.3x. avx2 fp32 1.06-1.36x / 1.05-1.41x; bf16 0.63-1.02x below 2^16,
    then 1.16-1.31x / 1.14-1.65x; fp16 alike (1.26-1.78x from 2^16). default (SSE2, no FMA, against oneDNN's SSE4.1
    GELU): fp32 0.83-0.95x / 0.85-1.08x; bf16 1.24-2.8x / 1.50-2.4x from 2^14; fp16 1.13-1.21x from 2^16, 1.09-1.11x
    with a gradient from 2^20 (fp16 conversions element by element without F16C). Re-swept with the cheaper native
    call (two runs, both widths): default fp16 with a gradient 1.04-1.09x at 2^16, 1.10-1.22x from 2^18 (threshold
    2^20 -> 2^18); the rest as before, but avx512 bf16 at 2^12 measured 0.92x (fwd, width 768) and 0.85x (fwd+bwd,
    3072) in one of the two runs (1.15-1.19x in the other; threshold kept) and avx2 fp32 fwd+bwd 1.01-1.17x there.
    Two threads on a Zen 5 (family 26), every level and dtype, two runs: avx2 fp32 at 2^14 0.94-0.98x inference and
    0.95-1.10x fwd+bwd at both widths (1.11-1.24x at 2^12, 1.05-1.26x from 2^16): avx2 fp32 from 2^16 (was 2^12). The
    other regions held (single dips in one run only)."""
    return _rows("bias_gelu", numel, grad, dtype)


def add_layer_norm(numel: int, grad: bool, dtype: torch.dtype) -> bool:
    """Against x + residual, then F.layer_norm. Re-swept with the cheaper native call (two runs; ranges over both
    widths), torch / native, inference / fwd+bwd: the fixed cost still loses at 2^12 (0.43-0.86x at AVX-512 and avx2)
    and mostly at 2^14 (0.59-1.40x). avx512 fp32 1.17-1.43x at 2^16 (threshold 2^18 -> 2^16), 1.21-1.72x at 2^18,
    1.01-1.88x above (width 768 at 2^20-2^22: 1.01-1.27x, the page faults below), fwd+bwd 0.76-1.11x at 2^16 and
    0.99-1.45x at 2^18-2^20 (torch: two threads below); bf16 1.61-1.85x / 1.01-1.16x at 2^16, 1.51-2.37x / 1.40-2.32x
    above; fp16 1.37-1.85x from 2^16 (threshold 2^18 -> 2^16), fwd+bwd 0.96-1.17x at 2^16, 1.52-2.22x from 2^18. avx2
    fp32 1.00-1.47x at 2^16, 1.17-1.81x from 2^18; fwd+bwd 0.99x at width 768 and 2^18 in both runs (1.04x before the
    cheaper call), 1.14-2.78x from 2^20 (threshold 2^18 -> 2^20); bf16 inference 0.96-1.23x (torch), fwd+bwd 1.03-1.49x
    from 2^18; fp16 1.18-1.74x from 2^16 (threshold 2^18 -> 2^16), fwd+bwd 0.96-1.10x at 2^16, 1.31-1.92x from 2^18.
    default fp32 0.88-1.12x at 2^12, 1.48-3.28x from 2^14, fwd+bwd 0.99-1.17x at 2^14, 1.71-3.78x from 2^16; bf16
    1.00-1.38x / 0.86-1.07x at 2^12, 1.23-2.66x from 2^14; fp16 inference 0.52-0.68x (torch), fwd+bwd 1.01-1.29x at
    2^14-2^16, 1.08-1.22x from 2^18 (threshold 2^20 -> 2^18).
    The first sweep (the ~10 us larger fixed cost): 0.37-0.96x below 2^16 everywhere (default from 2^14); avx512 fp32
    from 2^18: inference 1.0-1.8x, but 0.93-1.25x from run to run at width 768 and 2^20-2^22, where both paths spend
    most of their time page-faulting fresh outputs (glibc returns the freed megabytes to the OS after each call;
    1.1-1.7x with it kept from doing so), fwd+bwd 1.02-2.5x; bf16 1.17-2.35x / 1.13-2.52x from 2^16; fp16 1.48-1.85x /
    1.18-1.78x from 2^18. avx2 fp32 1.03-1.26x / 1.23-2.55x from 2^18; bf16 inference 0.79-1.16x (torch), fwd+bwd
    1.28-1.50x from 2^18; fp16 1.17-1.75x / 1.37-1.80x from 2^18. default fp32 1.14-3.1x from 2^14 / 1.66-3.0x from
    2^16; bf16 1.13-1.47x / 1.48-2.51x from 2^14; fp16 inference 0.55-0.64x (torch), fwd+bwd 1.05-1.21x from 2^20. Two
    threads (the default), quiet machine, avx512_bf16: fp32 fwd+bwd 0.74-0.90x at 2^17-2^20 (torch there), inference
    1.10-1.23x, bf16 fwd+bwd 1.12-1.27x.
    Checked on a 2-core AMD EPYC Zen 5 (family 26), every level and dtype, one thread, two runs: every native region
    held (>= 1.0x in at least one run, >= 0.97x in both) but width 768 at 2^22 inference at the forced avx512 level
    (0.89-0.99x, page faults: 2.9-18.6 ms for the same call); fp32 fwd+bwd at AVX-512 1.05-2.84x from 2^18. Two
    threads, avx512_bf16, two runs: fp32 fwd+bwd 0.59-0.96x up to 2^16, 0.95-1.07x at 2^18, 0.98-1.18x at 2^20,
    1.31-1.67x at 2^22: native from 2^22 (was torch throughout). Every level and dtype at two threads, two runs
    (Zen 5): bf16 fwd+bwd at 2^16 0.86-1.10x at AVX-512 (0.92-0.93x at width 768 in all four): from 2^18 (1.08-2.13x);
    avx2 fp16 inference at 2^16 0.92-1.00x at width 768: from 2^18. The other regions held."""
    return _rows("add_layer_norm", numel, grad, dtype)


def attention(heads: int, L: int, S: int, D: int, causal: bool, grad: bool) -> bool:
    """Dense attention (no window, no dropout) over `heads` = B·H heads of L queries and S keys of width D: native
    where the work, heads·L·S·D, amortises the native path's fixed cost (~25 µs forward in Python: validation,
    allocation, marshalling eight tensors, the autograd node), against torch's SDPA (a few µs at small sizes).
    Measured, one thread, torch / native, B x H x L x D from 1x1x8x16 to 8x4x77x64 causal or not (/tmp sweep,
    benchmarks/bench_overhead.py for the public calls): avx512 fwd 0.23x at 2^10, 0.49x at 2^16, 0.83-0.99x at 2^18,
    1.08x at 2^20, 1.7-2.1x from 2^21; fwd+bwd 0.48x at 2^10, 0.73x at 2^16, 0.97-1.18x at 2^18, 1.34x at 2^20,
    1.5-2.0x from 2^21. avx2 fwd 0.73-0.91x up to 2^20, 1.13-1.48x from 2^21; fwd+bwd 0.69-1.05x up to 2^20,
    0.93-1.49x from 2^21. default (the portable C++): 0.23-0.88x up to 2^20 either way (the demo's tiny heads
    included, which an earlier two-thread sweep had at 1.16-1.30x), 0.56-1.32x from 2^21: torch's SDPA there.
    Larger calls, two threads (README, bench_attention): avx512 1.5-3.8x (ViT-B/16 2.2x fwd+bwd), avx2 1.03-2.4x."""
    lv = level()
    if lv == "default" or not MEASURED_ARCH:
        return False
    work = heads * L * S * D
    if lv in AVX512:
        return work >= (1 << 19 if grad else 1 << 20)
    return work >= 1 << 21


def rms_norm(numel: int, grad: bool, dtype: torch.dtype) -> bool:
    """Against x + residual then F.rms_norm (torch 2.13 on the CPU: a composite of ~6 ops, more in its backward).
    Measured torch / native, 2^12 .. 2^22 elements: fwd+bwd 1.05-1.44x at 2^12, 1.27-15x above, at every level and
    dtype but fp16 at default (0.51-0.90x: conversions element by element without F16C). Inference: avx512 fp32
    0.74-0.88x below 2^16, 1.23-2.2x from there; bf16 1.10-5.3x from 2^14; fp16 1.26-13x from 2^16. avx2 fp32
    1.39-2.5x from 2^16; bf16 0.94-0.97x at width 64 up to 2^18, 1.38-2.9x from 2^20; fp16 1.27-17x from 2^16.
    default fp32 1.44-3.7x from 2^14, bf16 1.13-1.52x from 2^12, fp16 0.38-0.55x. Re-swept with the cheaper native
    call (two runs, both widths), inference: avx512 fp32 1.05-1.10x at 2^12, 1.15-1.26x at 2^14, 1.51-2.22x above
    (threshold 2^16 -> 2^14); bf16 1.39-1.50x at 2^12 (2^14 -> 2^12); fp16 1.26-1.39x at 2^12 (2^16 -> 2^12). avx2
    fp32 1.06-1.31x below 2^16 (kept: 1.06-1.07x in one run); bf16 0.97-1.00x at width 64 and 2^16-2^18 in one run
    (kept at 2^20); fp16 1.25-1.41x at 2^12 (2^16 -> 2^12). default fp32 1.34-1.49x at 2^12 (2^14 -> 2^12);
    fp16 0.35-0.88x inference, 0.47-1.13x fwd+bwd (torch)."""
    return _rows("rms_norm", numel, grad, dtype)
