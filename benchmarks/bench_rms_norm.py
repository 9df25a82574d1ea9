"""Benchmark: mmkern.ops.rms_norm (residual add + RMSNorm, native CPU kernels) against the PyTorch path a user
would write: s = x + residual; F.rms_norm(s, (D,), weight, eps); backward through both (s is also used downstream,
so it receives its own gradient).

Shapes: widths 64 (the demo's text tower), 768 (ViT-B / BERT-base) and 2048, at 16, 256 and 2048 rows; modes `fwd`
(no autograd) and `fwd+bwd` (x, residual and weight gradients). The two paths alternate sample by sample (load from
other processes hits both alike). Reported: median ms, p20/p80, GB/s from the minimal traffic of the fused op, peak
extra memory, and the ratio torch / mmkern (> 1: mmkern is faster). These ratios set mmkern/ops/cpu_policy.py's
rms_norm; `--cpu-capability` measures both libraries held to a lower ISA level.

    python -m benchmarks.bench_rms_norm [--quick] [--threads N] [--cpu-capability avx2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern.ops import rms_norm

CPU = torch.device("cpu")
WIDTHS = (64, 768, 2048)
ROWS = (16, 256, 2048)


def _paths(rows: int, d: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x, r, gs, gy = (torch.randn(rows, d, generator=gen).to(dtype) for _ in range(4))
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]

    def torch_fwd():
        with torch.no_grad():
            F.rms_norm(x + r, (d,), w, 1e-6)

    def mmkern_fwd():
        with torch.no_grad():
            rms_norm(x, r, w, 1e-6, backend="cpu")

    def torch_fwd_bwd():
        s = leaves[0] + leaves[1]
        torch.autograd.grad((s, F.rms_norm(s, (d,), leaves[2], 1e-6)), leaves, (gs, gy))

    def mmkern_fwd_bwd():
        torch.autograd.grad(rms_norm(*leaves, 1e-6, backend="cpu"), leaves, (gs, gy))

    elems = rows * d * x.element_size()
    traffic = {"fwd": 4 * elems, "fwd+bwd": 8 * elems}  # fwd: x, r in, s, out; bwd: grad_out, grad_s, s in, grad_x
    return {"fwd": (torch_fwd, mmkern_fwd), "fwd+bwd": (torch_fwd_bwd, mmkern_fwd_bwd)}, traffic


def bench(repeats: int, quick: bool, dtype: torch.dtype) -> list[dict]:
    shapes = [(rows, d) for d in WIDTHS for rows in ROWS]
    if quick:
        shapes = [(256, 64), (2048, 768)]
    records = []
    for rows, d in shapes:
        paths, traffic = _paths(rows, d, dtype)
        for mode, (torch_fn, mmkern_fn) in paths.items():
            # Enough calls per sample that a sample is >= ~1 ms: single calls of the small cases are µs long.
            inner = max(1, int(2**21 // (rows * d)))

            def batch(fn, inner=inner):
                return lambda: [fn() for _ in range(inner)]

            timing = harness.time_alternating(
                {"torch": batch(torch_fn), "mmkern": batch(mmkern_fn)}, device=CPU, warmup=2, repeats=repeats
            )
            fields = {"op": "rms_norm", "case": f"{rows}x{d} {str(dtype)[6:]}", "numel": rows * d, "mode": mode}
            extra = harness.traffic_and_memory(traffic[mode], {"torch": torch_fn, "mmkern": mmkern_fn}, CPU)
            records += harness.pair_records(timing, fields, f"{rows}x{d} {mode}", per_call=inner, extra=extra)
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_rms_norm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch / mmkern CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out-dir", default=None)
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    records = bench(repeats, args.quick, getattr(torch, args.dtype))
    level = harness.machine().get("mmkern_cpu_capability", "?")
    print(f"rms_norm on cpu ({level}), {torch.get_num_threads()} threads (vs_torch > 1: mmkern is faster)")
    columns = ["case", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mb", "vs_torch"]
    name = "rms_norm_quick" if args.quick else "rms_norm"
    harness.report(name, records, columns, label_key="impl", out_dir=args.out_dir)
    return records


if __name__ == "__main__":
    main()
