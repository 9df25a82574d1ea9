"""Fused attention against torch SDPA (every backend torch has on the device) and flash-attn / xformers when
installed: ViT-B/16, CLIP text (causal), long sequences, local (sliding-window) attention, and the tiny heads
of the demo model (`mmkern demo`).

    python -m benchmarks.bench_attention [--quick] [--device cpu|cuda] [--cases demo,vit_b16]

TFLOP/s counts 4·B·H·L·S·D per forward (halved for causal; for a window, the visible pairs only) and 2.5×
that for the backward. The local-attention cases compare mmkern's window (cost ∝ L·window) with torch SDPA
given the equivalent dense bool mask (cost ∝ L²). The demo cases call attention as the demo's layers do:
q, k, v are strided views of one qkv projection (B, L, 3, H, D), and the text case passes a (B, 1, L, L)
bool mask (causal and key padding), so per-call overhead and strided loads count. Every case sends the output
gradient back in (B, L, H, D) memory, as a Transformer block's output projection does. On CUDA the bf16 matmul
rate is measured in the same run so that the forward can be stated as a fraction of it. The contenders of a case take
turns sample by sample, so that the machine's drift during a run does not land on one of them.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern import reference
from mmkern.ops import scaled_dot_product_attention, varlen_attention


def _cases(quick: bool):
    """(name, B, H, L, D, causal, window)."""
    scale = 4 if quick else 1
    cases = [
        ("demo_vision", 128, 4, 17, 16, False, None),
        ("demo_text", 128, 4, 16, 16, False, "padding"),
        ("vit_b16", 32 // scale, 12, 197, 64, False, None),
        ("clip_text", 32 // scale, 8, 77, 64, True, None),
        ("long", 1, 12 // scale, 4096, 128, False, None),
        ("long_causal", 1, 12 // scale, 4096, 128, True, None),
    ]
    for L in (4096, 16384):
        cases.append((f"window256_L{L}", 1, 4 // scale if scale > 1 else 4, L, 64, False, (256, 256)))
    cases.append(("varlen_causal", 1, 12 // scale, sum(VARLEN_LENGTHS), 64, True, "varlen"))
    return cases


def _demo_inputs(B, H, L, D, padding, device, dtype, gen):
    """A leaf qkv (B, L, 3, H, D) and its strided q, k, v views (B, H, L, D), as the demo's Attention makes
    them; with padding a (B, 1, L, L) bool mask of causal attention over the unpadded tokens."""
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(device, dtype).requires_grad_()
    mask = None
    if padding:
        lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
        keys = torch.arange(L)[None, :] < lengths[:, None]
        mask = (keys[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()).to(device)
    return qkv, mask


def _flops(B, H, L, D, causal, window) -> float:
    """4·B·H·D per visible (query, key) pair: L², L(L+1)/2 causal, or the pairs inside the window."""
    if window == "padding":  # the demo text mask: causal over the tokens (padding ignored in the count)
        causal, window = True, None
    if window is not None:
        i = torch.arange(L)
        pairs = ((i + window[1]).clamp(max=L - 1) - (i - window[0]).clamp(min=0) + 1).sum().item()
    else:
        pairs = L * (L + 1) / 2 if causal else L * L
    return 4.0 * B * H * pairs * D


# Packed causal sequences (a varlen batch of a decoder or a native-resolution ViT): lengths in tokens.
VARLEN_LENGTHS = [2048, 1024, 1024, 512, 512, 512, 256, 256, 128, 128, 77, 33]


def _varlen_contenders(device, H, D):
    """(cu_seqlens, flops, contenders) for the packed case: mmkern's varlen_attention against what a user has
    without it, torch SDPA run sequence by sequence (each torch backend)."""
    lengths = VARLEN_LENGTHS
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    flops = sum(4.0 * H * D * n * (n + 1) / 2 for n in lengths)
    most = max(lengths)
    contenders = [
        (
            f"mmkern_{b}",
            lambda q, k, v, b=b: varlen_attention(q, k, v, cu, cu, most, most, causal=True, backend=b),
            contextlib.nullcontext,
        )
        for b in _mmkern_backends(device)
        if b is not None
    ]

    def per_sequence(q, k, v):
        one = lambda t, s, e: t[s:e].transpose(0, 1)[None]  # token rows -> (1, H, n, D)
        outs = [
            F.scaled_dot_product_attention(one(q, s, e), one(k, s, e), one(v, s, e), is_causal=True) for s, e in spans
        ]
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    contenders += [(label, per_sequence, ctx) for label, ctx in _torch_variants(device)]
    return cu, flops, contenders


def _torch_variants(device: torch.device):
    """(label, context manager factory) for torch SDPA on this device."""
    if device.type != "cuda":
        return [("torch_sdpa", contextlib.nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return [(f"torch_{n}", lambda b=b: sdpa_kernel(b)) for n, b in names.items()]


def _external(device: torch.device):
    """flash-attn / xformers callables on (B, H, L, D) tensors, when installed."""
    out = []
    if device.type != "cuda":
        return out
    try:
        from flash_attn import flash_attn_func

        out.append(
            (
                "flash_attn",
                lambda q, k, v, causal: flash_attn_func(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
                ).transpose(1, 2),
            )
        )
    except ImportError:
        pass
    try:
        import xformers.ops as xops

        def xf(q, k, v, causal):
            bias = xops.LowerTriangularMask() if causal else None
            return xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
            ).transpose(1, 2)

        out.append(("xformers", xf))
    except ImportError:
        pass
    return out


def _mmkern_backends(device: torch.device) -> list[str | None]:
    """The kernels of the device, and on CPUs also mmkern's default (None: the native kernel or torch's SDPA,
    whichever mmkern/ops/cpu_policy.py picks for the case at the running level)."""
    from mmkern import backends

    wanted = ["cpu", None] if device.type == "cpu" else ["triton", "cuda"]
    return [b for b in wanted if b is None or backends.unavailable_reason(b, device.type) is None]


def _measure(case, contenders, grad, make_inputs, leaves, device, repeats) -> dict:
    """{label: {"fwd": timing, "fwd_bwd": timing, "fwd_peak_mb", "fwd_bwd_peak_mb"}} for each (label, fn, context)
    of `contenders` that runs this case; the contenders take turns sample by sample (harness.time_alternating)."""
    runs = {}
    for label, fn, ctx in contenders:

        def fwd(fn=fn, ctx=ctx):
            with ctx(), torch.no_grad():
                fn(*make_inputs())

        def fwd_bwd(fn=fn, ctx=ctx):
            with ctx():
                fn(*make_inputs()).backward(grad)
            for t in leaves:
                t.grad = None

        try:  # one call of each mode: a backend that refuses the shape is left out before the timed rounds
            fwd()
            fwd_bwd()
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as exc:  # backend refuses this shape
            print(f"{case:>18} {label:>16}: skipped ({str(exc).splitlines()[0][:80]})")
            continue
        runs[label] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    recs = {label: {} for label in runs}
    for mode in ("fwd", "fwd_bwd"):
        fns = {label: run[mode] for label, run in runs.items()}
        for label, timing in harness.time_alternating(fns, device=device, repeats=repeats).items():
            recs[label][mode] = timing
            recs[label][f"{mode}_peak_mb"] = harness.peak_memory(fns[label], device=device) / 2**20
    return recs


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = harness.time_fn(lambda: a @ a, device=device, warmup=2, repeats=5)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="", help="comma-separated case-name prefixes to run (default: all)")
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 3 if args.quick else 10
    records = []
    mm_rate = matmul_tflops(device, dtype)
    print(f"{dtype} matmul rate on {device}: {mm_rate:.2f} TFLOP/s")
    for name, B, H, L, D, causal, window in _cases(args.quick):
        if (args.quick and L > 8192) or (args.cases and not name.startswith(tuple(args.cases.split(",")))):
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        demo_mask = None
        if window == "varlen":
            leaves = [torch.randn(L, H, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
            grad = torch.randn(L, H, D, generator=gen).to(device, dtype)
            _, flops, contenders = _varlen_contenders(device, H, D)
            window = None
            make_inputs = lambda leaves=leaves: leaves
        elif name.startswith("demo"):
            qkv, demo_mask = _demo_inputs(B, H, L, D, window == "padding", device, dtype, gen)
            leaves = [qkv]

            def make_inputs(qkv=qkv):
                return qkv.permute(2, 0, 3, 1, 4).unbind(0)

            window = None
        else:
            leaves = [torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]

            def make_inputs(leaves=leaves):
                return leaves

        if not name.startswith("varlen"):
            # The output gradient in the layout a Transformer block sends back through o.transpose(1, 2).reshape(B,
            # L, -1): (B, L, H, D) memory. torch's SDPA copies a (B, H, L, D)-contiguous one first, which would flatter
            # mmkern.
            grad = torch.randn(B, L, H, D, generator=gen).to(device, dtype).transpose(1, 2)
            flops = _flops(B, H, L, D, causal or demo_mask is not None, window)
            contenders = []
        for backend in _mmkern_backends(device) if not name.startswith("varlen") else []:
            contenders.append(
                (
                    f"mmkern_{backend or 'default'}",
                    lambda q, k, v, b=backend, c=causal, w=window, m=demo_mask: scaled_dot_product_attention(
                        q, k, v, m, is_causal=c, window=w, backend=b
                    ),
                    contextlib.nullcontext,
                )
            )
        dense_mask = demo_mask
        if window is not None:
            dense_mask = reference.attention_allowed(L, L, window=window, device=device)
        if not name.startswith("varlen") and (window is None or L <= 4096 or device.type == "cuda"):
            for label, ctx in _torch_variants(device):
                contenders.append(
                    (
                        label,
                        lambda q, k, v, m=dense_mask, c=causal: F.scaled_dot_product_attention(
                            q, k, v, attn_mask=m, is_causal=c
                        ),
                        ctx,
                    )
                )
        if window is None and demo_mask is None and not name.startswith("varlen"):
            for label, fn in _external(device):
                contenders.append((label, lambda q, k, v, fn=fn, c=causal: fn(q, k, v, c), contextlib.nullcontext))
        case_repeats = 10 * repeats if name.startswith("demo") else repeats
        for label, rec in _measure(name, contenders, grad, make_inputs, leaves, device, case_repeats).items():
            fwd_ms, fb_ms = rec["fwd"]["median_ms"], rec["fwd_bwd"]["median_ms"]
            records.append(
                {
                    "case": name,
                    "impl": label,
                    "B": B,
                    "H": H,
                    "L": L,
                    "D": D,
                    "causal": causal,
                    "window": None if window is None else list(window),
                    "mask": "causal+padding" if demo_mask is not None else None,
                    "dtype": str(dtype).removeprefix("torch."),
                    "fwd_ms": fwd_ms,
                    "fwd_p20_ms": rec["fwd"]["p20_ms"],
                    "fwd_p80_ms": rec["fwd"]["p80_ms"],
                    "fwd_bwd_ms": fb_ms,
                    "fwd_bwd_p20_ms": rec["fwd_bwd"]["p20_ms"],
                    "fwd_bwd_p80_ms": rec["fwd_bwd"]["p80_ms"],
                    "fwd_tflops": flops / (fwd_ms * 1e-3) / 1e12,
                    "fwd_bwd_tflops": 3.5 * flops / (fb_ms * 1e-3) / 1e12,
                    "fwd_pct_matmul": 100 * flops / (fwd_ms * 1e-3) / 1e12 / mm_rate,
                    "fwd_peak_mb": rec["fwd_peak_mb"],
                    "fwd_bwd_peak_mb": rec["fwd_bwd_peak_mb"],
                }
            )
            # Each case as it finishes: a run cut short (gpu_check's step timeout) keeps the cases it finished.
            r = records[-1]
            print(f"{name:>18} {label:>16}: fwd {fwd_ms:.3f} ms ({r['fwd_tflops']:.3g} TFLOP/s), "
                  f"fwd+bwd {fb_ms:.3f} ms ({r['fwd_bwd_tflops']:.3g} TFLOP/s)", flush=True)  # fmt: skip
    # Ratios against the fastest torch SDPA variant of the same case (>1: mmkern faster).
    for r in records:
        base = [x for x in records if x["case"] == r["case"] and x["impl"].startswith("torch_")]
        if base:
            r["fwd_speedup"] = min(x["fwd_ms"] for x in base) / r["fwd_ms"]
            r["fwd_bwd_speedup"] = min(x["fwd_bwd_ms"] for x in base) / r["fwd_bwd_ms"]
    print(
        harness.format_table(
            records,
            [
                "case",
                "impl",
                "fwd_ms",
                "fwd_bwd_ms",
                "fwd_tflops",
                "fwd_bwd_tflops",
                "fwd_speedup",
                "fwd_bwd_speedup",
                "fwd_bwd_peak_mb",
            ],
        )
    )
    path = harness.save("attention", records)
    try:
        harness.plot_bars(
            "attention",
            records,
            label_key="impl",
            group_key="case",
            value_key="fwd_bwd_ms",
            ylabel="forward + backward median (ms)",
        )
    except ImportError:
        pass
    print(f"results appended to {path}")
    return records


if __name__ == "__main__":
    main()
