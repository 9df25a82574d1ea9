"""Benchmark: the fused element-wise ops against what the unfused model path runs, at the models' shapes.

    bias_gelu       unfused: F.gelu(h) on fc1's output (its bias already added inside addmm); backward gelu_backward
                    and the bias gradient as grad.sum over rows (what addmm's backward does)
    add_layer_norm  unfused: s = x + residual, F.layer_norm(s); backward through both (s is also used downstream,
                    so it receives its own gradient)

Shapes: the demo's CLIP (mmkern/train/demo.py, ContrastiveConfig defaults: 2176 image / 2048 text tokens, width 64,
MLP 256) and ViT-B/16 at batch 8 (1576 tokens x 768, MLP 3072). Modes `fwd` (no autograd) and `fwd+bwd`. The two
paths alternate sample by sample (load from other processes hits both alike). Reported: median ms, p20/p80, GB/s
from the minimal traffic of the fused op (read inputs once, write outputs once), peak extra memory, and the ratio
unfused / fused (> 1: fused is faster).

The fused side runs the native kernels (backend="cpu"), whatever the default policy would choose for the shape.
`--sweep` runs instead the sweep that sets mmkern/ops/cpu_policy.py's rows for bias_gelu, add_layer_norm and
rms_norm: each public op on backend="cpu" against backend="torch" (F.gelu(x + b); x + r, then F.layer_norm /
F.rms_norm), 2^12 .. 2^22 elements at two widths, inference and fwd+bwd, at --dtype, --threads, --cpu-capability.

`--models` adds the end-to-end A/B that decides mmkern.nn's fused_elementwise default: the demo's training step
and ViT-B/16 image-encoder inference (B=8), fused_elementwise on and off in alternating rounds, medians.

    python -m benchmarks.bench_fused [--quick] [--models] [--sweep] [--threads N] [--dtype bfloat16]
        [--cpu-capability avx2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern.ops import rms_norm
from mmkern.ops.fused import add_layer_norm, bias_gelu

CPU = torch.device("cpu")
# name: (rows, width)
GELU_SHAPES = {"demo mlp": (2176, 256), "vit-b/16 mlp": (1576, 3072)}
LN_SHAPES = {"demo vision": (2176, 64), "demo text": (2048, 64), "vit-b/16": (1576, 768)}


def _gelu_paths(rows, n, dtype):
    gen = torch.Generator().manual_seed(0)
    h, g = torch.randn(rows, n, generator=gen).to(dtype), torch.randn(rows, n, generator=gen).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    hl, bl = h.clone().requires_grad_(), b.clone().requires_grad_()

    def torch_fwd():
        with torch.no_grad():
            F.gelu(h)

    def fused_fwd():
        with torch.no_grad():
            bias_gelu(h, b, backend="cpu")

    def torch_fwd_bwd():
        (gh,) = torch.autograd.grad(F.gelu(hl), (hl,), g)
        gh.sum(0)

    def fused_fwd_bwd():
        torch.autograd.grad(bias_gelu(hl, bl, backend="cpu"), (hl, bl), g)

    elems = rows * n * h.element_size()
    traffic = {"fwd": 2 * elems, "fwd+bwd": 5 * elems}  # fwd: x in, out; bwd: grad_out, x in, grad_x out
    return {"fwd": (torch_fwd, fused_fwd), "fwd+bwd": (torch_fwd_bwd, fused_fwd_bwd)}, traffic


def _ln_paths(rows, d, dtype):
    gen = torch.Generator().manual_seed(0)
    x, r, gs, gy = (torch.randn(rows, d, generator=gen).to(dtype) for _ in range(4))
    w, b = torch.randn(d, generator=gen).to(dtype), torch.randn(d, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]

    def torch_fwd():
        with torch.no_grad():
            F.layer_norm(x + r, (d,), w, b, 1e-5)

    def fused_fwd():
        with torch.no_grad():
            add_layer_norm(x, r, w, b, 1e-5, backend="cpu")

    def torch_fwd_bwd():
        s = leaves[0] + leaves[1]
        torch.autograd.grad((s, F.layer_norm(s, (d,), leaves[2], leaves[3], 1e-5)), leaves, (gs, gy))

    def fused_fwd_bwd():
        torch.autograd.grad(add_layer_norm(*leaves, 1e-5, backend="cpu"), leaves, (gs, gy))

    elems = rows * d * x.element_size()
    traffic = {"fwd": 4 * elems, "fwd+bwd": 8 * elems}  # fwd: x, r in, s, out; bwd: grad_out, grad_s, s in, grad_x
    return {"fwd": (torch_fwd, fused_fwd), "fwd+bwd": (torch_fwd_bwd, fused_fwd_bwd)}, traffic


def _alternate(fns: dict, repeats: int, inner: int) -> dict:
    """Median / p20 / p80 ms per call of each fn, the fns alternating sample by sample. On one thread, the thread's
    CPU time (user + system, so the page faults of fresh outputs count): unlike the wall clock, it does not count the
    time other processes hold the core, which on the shared 2-core VM moved single samples by up to 5x."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for fn in fns.values():
        for _ in range(2):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            samples[k].append((clock() - t0) / inner * 1e3)
    out = {}
    for k, xs in samples.items():
        q = statistics.quantiles(sorted(xs), n=5) if len(xs) > 1 else [xs[0]] * 4
        out[k] = {"median_ms": statistics.median(xs), "p20_ms": q[0], "p80_ms": q[3], "samples": len(xs)}
    return out


def bench_ops(repeats: int, quick: bool, dtype: torch.dtype = torch.float32) -> list[dict]:
    cases = [("bias_gelu", name, shape, _gelu_paths) for name, shape in GELU_SHAPES.items()]
    cases += [("add_layer_norm", name, shape, _ln_paths) for name, shape in LN_SHAPES.items()]
    if quick:
        cases = [c for c in cases if c[1].startswith("demo")]
    records = []
    for op, name, (rows, n), make in cases:
        paths, traffic = make(rows, n, dtype)
        for mode, (unfused, fused) in paths.items():
            inner = max(1, int(2e6 // (rows * n)))
            timing = _alternate({"torch": unfused, "mmkern": fused}, repeats, inner)
            fields = {"op": op, "case": f"{name} {rows}x{n} {str(dtype)[6:]}", "mode": mode}
            extra = harness.traffic_and_memory(traffic[mode], {"torch": unfused, "mmkern": fused}, CPU)
            records += harness.pair_records(timing, fields, f"{op} {rows}x{n} {mode}", extra=extra)
    return records


# The policy sweep (--sweep): each row op's public call on backend="cpu" against backend="torch" (the PyTorch path
# the default would otherwise take), 2^12 .. 2^22 elements at two widths, whose ratios set mmkern/ops/cpu_policy.py.
SWEEP_WIDTHS = {"bias_gelu": (768, 3072), "add_layer_norm": (64, 768), "rms_norm": (64, 768)}


def _sweep_call(op: str, rows: int, d: int, dtype: torch.dtype, grad: bool, backend: str):
    gen = torch.Generator().manual_seed(0)
    x, r, gs, gy = (torch.randn(rows, d, generator=gen).to(dtype) for _ in range(4))
    w, b = (torch.rand(d, generator=gen) + 0.5).to(dtype), (torch.randn(d, generator=gen) * 0.1).to(dtype)
    args = {"bias_gelu": (x, b), "add_layer_norm": (x, r, w, b), "rms_norm": (x, r, w)}[op]
    fn = {"bias_gelu": bias_gelu, "add_layer_norm": add_layer_norm, "rms_norm": rms_norm}[op]
    if not grad:
        return lambda: fn(*args, backend=backend)
    leaves = [t.clone().requires_grad_() for t in args]
    grads = (gy,) if op == "bias_gelu" else (gs, gy)
    return lambda: torch.autograd.grad(fn(*leaves, backend=backend), leaves, grads)


def sweep(repeats: int, dtype: torch.dtype) -> list[dict]:
    records = []
    for op, widths in SWEEP_WIDTHS.items():
        for mode in ("fwd", "fwd+bwd"):
            for d in widths:
                for log2 in range(12, 23, 2):
                    rows = max(1, (1 << log2) // d)
                    fns = {impl: _sweep_call(op, rows, d, dtype, mode != "fwd", backend)
                           for impl, backend in (("torch", "torch"), ("mmkern", "cpu"))}  # fmt: skip
                    inner = max(1, int(2**21 // (rows * d)))
                    timing = _alternate(fns, repeats, inner)
                    fields = {"op": op, "case": f"{rows}x{d} {str(dtype)[6:]} 2^{log2}", "mode": mode}
                    records += harness.pair_records(timing, fields, f"{op} {mode} {d} 2^{log2}")
    return records


def _demo_step():
    from mmkern.data import ImageTextCollator, WordTokenizer, digits
    from mmkern.train.contrastive import ContrastiveConfig, contrastive_loss_fn, small_clip
    from mmkern.train.demo import _Stepper

    torch.manual_seed(0)
    c = ContrastiveConfig()
    data = digits(c.image_size)
    tok = WordTokenizer.from_texts(data.captions)
    clip = small_clip(tok, c)
    batch = ImageTextCollator(tok, c.context_length)([data[i] for i in range(c.batch_size)])
    return _Stepper(clip, contrastive_loss_fn("clip"), batch)


def _vit_b16_inference(batch: int):
    from mmkern.models import CLIP, clip_config

    torch.manual_seed(0)
    model = CLIP(clip_config("ViT-B/16", act="gelu")).eval()
    images = torch.randn(batch, 3, 224, 224)

    def run():
        with torch.inference_mode():
            model.encode_image(images)

    return run


def bench_models(rounds: int, quick: bool) -> list[dict]:
    """fused_elementwise off / on in alternating rounds; per-round times and their ratio's median."""
    from mmkern.nn import fused_elementwise

    cases = [("demo CLIP training step", _demo_step(), 10)]
    if not quick:
        cases.append(("ViT-B/16 encode_image B=8", _vit_b16_inference(8), 1))
    records = []
    for name, fn, steps in cases:
        for flag in (False, True, False, True):
            with fused_elementwise(flag):
                fn()
        samples = {False: [], True: []}
        for _ in range(rounds):
            for flag in (False, True):
                with fused_elementwise(flag):
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    samples[flag].append((time.perf_counter() - t0) / steps * 1e3)
        ratio = statistics.median(a / b for a, b in zip(samples[False], samples[True]))
        for flag in (False, True):
            xs = sorted(samples[flag])
            q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
            records.append({
                "op": "model", "case": name, "mode": "step", "impl": "mmkern" if flag else "torch",
                "median_ms": statistics.median(xs), "p20_ms": q[0], "p80_ms": q[3], "samples": len(xs),
                "vs_torch": ratio if flag else 1.0, "group": name,
            })  # fmt: skip
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_fused", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's shapes only, few repeats")
    parser.add_argument("--models", action="store_true", help="also the end-to-end fused_elementwise on/off A/B")
    parser.add_argument("--sweep", action="store_true", help="instead: the cpu_policy sweep of the row ops")
    parser.add_argument("--threads", type=int, default=None, help="torch / mmkern CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out-dir", default=None)
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    dtype = getattr(torch, args.dtype)
    records = sweep(repeats // 2 or 1, dtype) if args.sweep else bench_ops(repeats, args.quick, dtype)
    if args.models:
        records += bench_models(repeats, args.quick)
    level = harness.machine().get("mmkern_cpu_capability", "?")
    print(f"fused element-wise ops on cpu ({level}), {torch.get_num_threads()} threads (vs_torch > 1: fused is faster)")
    columns = ["op", "case", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mb", "vs_torch"]
    name = "fused_sweep" if args.sweep else "fused_quick" if args.quick else "fused"
    harness.report(name, records, columns, label_key="impl", out_dir=args.out_dir)
    return records


if __name__ == "__main__":
    main()
