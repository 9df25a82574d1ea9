"""Benchmark: the per-call cost of mmkern's default path against the PyTorch expression a user would write instead,
for every public op and the nn modules that wrap them, at small and demo sizes, where a call's Python costs as
much as its arithmetic.

The standard it checks: swapping in an mmkern op never costs speed. Each case calls the op as a user does (no
backend argument: the default picks the native kernel or the PyTorch path by mmkern/ops/cpu_policy.py) and the
plain PyTorch expression (F.gelu(x + b), F.layer_norm(x + r, ...), F.scaled_dot_product_attention, conv2d + cat +
add, the naive B x B losses) on the same inputs, the two alternating call batch by call batch; modes `fwd` (no
autograd) and `fwd+bwd` (gradients of every float input). Reported: median µs per call, p20/p80, and the ratio
torch / mmkern (>= 1: the default path is at least as fast). `--cpu-capability` holds both libraries to a lower
ISA level, `--threads` lists the thread counts to run.

    python -m benchmarks.bench_overhead [--quick] [--threads 1 2] [--cpu-capability avx2] [--ops bias_gelu ...]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern import nn as mnn
from mmkern import ops

CPU = torch.device("cpu")


def _randn(gen, *shape, grad=False):
    t = torch.randn(*shape, generator=gen)
    return t.requires_grad_() if grad else t


# Each case: (op, size label, builder). A builder(grad) returns (mmkern_fn, torch_fn) over the same inputs, each
# returning the output tensors; fwd+bwd back-propagates ones from every output.


def _bias_gelu(rows, n):
    def build(gen, grad):
        x, b = _randn(gen, rows, n, grad=grad), _randn(gen, n, grad=grad)
        return (lambda: ops.bias_gelu(x, b)), (lambda: F.gelu(x + b))

    return build


def _add_layer_norm(rows, d):
    def build(gen, grad):
        x, r = _randn(gen, rows, d, grad=grad), _randn(gen, rows, d, grad=grad)
        w, b = _randn(gen, d, grad=grad), _randn(gen, d, grad=grad)

        def torch_fn():
            s = x + r
            return s, F.layer_norm(s, (d,), w, b, 1e-5)

        return (lambda: ops.add_layer_norm(x, r, w, b)), torch_fn

    return build


def _rms_norm(rows, d):
    def build(gen, grad):
        x, r, w = _randn(gen, rows, d, grad=grad), _randn(gen, rows, d, grad=grad), _randn(gen, d, grad=grad)

        def torch_fn():
            s = x + r
            return s, F.rms_norm(s, (d,), w, 1e-6)

        return (lambda: ops.rms_norm(x, r, w)), torch_fn

    return build


def _attention(B, H, L, D, causal):
    def build(gen, grad):
        q, k, v = (_randn(gen, B, H, L, D, grad=grad) for _ in range(3))
        mm = lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return mm, (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    return build


def _patch_embed(B, img, P, E):
    def build(gen, grad):
        images = _randn(gen, B, 3, img, img, grad=grad)
        w, b = _randn(gen, E, 3, P, P, grad=grad), _randn(gen, E, grad=grad)
        N = (img // P) ** 2
        cls, pos = _randn(gen, 1, E, grad=grad), _randn(gen, N + 1, E, grad=grad)

        def torch_fn():
            x = F.conv2d(images, w, b, stride=P).flatten(2).transpose(1, 2)
            return torch.cat([cls.expand(B, -1, -1), x], dim=1) + pos

        return (lambda: ops.patch_embed(images, w, b, pos_embed=pos, prefix_tokens=cls)), torch_fn

    return build


def _labels(n):
    return torch.arange(n)


def _clip(B, D, loss=ops.clip_loss):
    def build(gen, grad):
        x, y = _randn(gen, B, D, grad=grad), _randn(gen, B, D, grad=grad)
        s = torch.tensor(14.0, requires_grad=grad)

        def torch_fn():
            logits = s * (x @ y.T)
            labels = _labels(B)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        return (lambda: loss(x, y, s)), torch_fn

    return build


def _siglip(B, D):
    def build(gen, grad):
        x, y = _randn(gen, B, D, grad=grad), _randn(gen, B, D, grad=grad)
        s, bias = torch.tensor(10.0, requires_grad=grad), torch.tensor(-10.0, requires_grad=grad)

        def torch_fn():
            logits = s * (x @ y.T) + bias
            signs = 2 * torch.eye(B, dtype=logits.dtype) - 1
            return -F.logsigmoid(signs * logits).sum() / B

        return (lambda: ops.siglip_loss(x, y, s, bias)), torch_fn

    return build


def _infonce(B, K, D):
    def build(gen, grad):
        x, y = _randn(gen, B, D, grad=grad), _randn(gen, K, D, grad=grad)
        s = torch.tensor(14.0, requires_grad=grad)
        return (lambda: ops.infonce(x, y, s)), (lambda: F.cross_entropy(s * (x @ y.T), _labels(B)))

    return build


def _attention_module(B, L, dim, heads, causal):
    def build(gen, grad):
        module = mnn.Attention(dim, heads)
        module.requires_grad_(grad)
        x = _randn(gen, B, L, dim, grad=grad)
        hd = dim // heads

        def torch_fn():  # timm's Attention with F.scaled_dot_product_attention, the same weights
            q, k, v = module.qkv(x).view(B, L, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return module.proj(o.transpose(1, 2).reshape(B, L, dim))

        return (lambda: module(x, is_causal=causal)), torch_fn

    return build


def _patch_embed_module(B, img, P, E):
    def build(gen, grad):
        module = mnn.PatchEmbed(img, P, 3, E)
        module.requires_grad_(grad)
        images = _randn(gen, B, 3, img, img, grad=grad)
        return (lambda: module(images)), (lambda: module.proj(images).flatten(2).transpose(1, 2))

    return build


CASES = [
    ("attention", "tiny 1x1x8x16", _attention(1, 1, 8, 16, False)),
    ("attention", "vit-tiny 4x3x197x64", _attention(4, 3, 197, 64, False)),
    ("attention", "text causal 16x2x17x32", _attention(16, 2, 17, 32, True)),
    ("bias_gelu", "2x8", _bias_gelu(2, 8)),
    ("bias_gelu", "260x128", _bias_gelu(260, 128)),
    ("bias_gelu", "260x512", _bias_gelu(260, 512)),
    ("add_layer_norm", "8x64", _add_layer_norm(8, 64)),
    ("add_layer_norm", "260x128", _add_layer_norm(260, 128)),
    ("rms_norm", "8x64", _rms_norm(8, 64)),
    ("rms_norm", "260x128", _rms_norm(260, 128)),
    ("patch_embed", "2x3x32x32 P8 E64", _patch_embed(2, 32, 8, 64)),
    ("patch_embed", "vit-tiny 2x3x224x224 P16 E192", _patch_embed(2, 224, 16, 192)),
    ("clip_loss", "B8 D32", _clip(8, 32)),
    ("clip_loss", "B256 D128", _clip(256, 128)),
    ("siglip_loss", "B8 D32", _siglip(8, 32)),
    ("siglip_loss", "B256 D128", _siglip(256, 128)),
    ("infonce", "B8 K32 D32", _infonce(8, 32, 32)),
    ("infonce", "B256 K1024 D128", _infonce(256, 1024, 128)),
    ("nn.Attention", "text causal 16x17 dim64 h2", _attention_module(16, 17, 64, 2, True)),
    ("nn.Attention", "vit-tiny 4x197 dim192 h3", _attention_module(4, 197, 192, 3, False)),
    ("nn.PatchEmbed", "2x3x32x32 P8 E64", _patch_embed_module(2, 32, 8, 64)),
    ("nn.ClipLoss", "B8 D32", _clip(8, 32, mnn.ClipLoss())),
]


def _step(fn, grad):
    if not grad:
        with torch.no_grad():
            return lambda: fn()

    def run():
        out = fn()
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def _calls_per_sample(fn, target_ms: float = 2.0) -> int:
    """How many calls make a sample of about target_ms, from a short trial."""
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.02:
        fn()
        n += 1
    return max(1, int(target_ms * 1e-3 * n / (time.perf_counter() - t0)))


def bench(repeats: int, selected: set[str] | None, threads: list[int]) -> list[dict]:
    records = []
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        for op, size, build in CASES:
            if selected and op not in selected:
                continue
            for mode, grad in (("fwd", False), ("fwd+bwd", True)):
                mm, tt = build(torch.Generator().manual_seed(0), grad)
                fns = {"mmkern": _step(mm, grad), "torch": _step(tt, grad)}
                inner = _calls_per_sample(fns["torch"])

                def batch(fn, inner=inner):
                    def run():
                        for _ in range(inner):
                            fn()

                    return run

                timing = harness.time_alternating(
                    {k: batch(f) for k, f in fns.items()}, device=CPU, warmup=3, repeats=repeats
                )
                fields = {"op": op, "case": size, "mode": mode, "threads": nthreads}
                records += harness.pair_records(
                    timing, fields, f"{op} {size} {mode} t{nthreads}", per_call=inner, unit="us",
                    extra=lambda impl, t, inner=inner: {"calls_per_sample": inner},
                )  # fmt: skip
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to run (default 1 2)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating samples per case (default 41)")
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops (names as in the table)")
    parser.add_argument("--out-dir", default=None)
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)
    repeats = args.repeats or (9 if args.quick else 41)
    records = bench(repeats, set(args.ops) if args.ops else None, args.threads)
    level = harness.machine().get("mmkern_cpu_capability", "?")
    print(f"default path vs the PyTorch expression on cpu ({level}) (vs_torch >= 1: mmkern is at least as fast)")
    mm = [r for r in records if r["impl"] == "mmkern"]
    torch_us = {r["group"]: r["median_us"] for r in records if r["impl"] == "torch"}
    for r in mm:
        r["torch_us"] = torch_us[r["group"]]
    columns = ["op", "case", "mode", "threads", "torch_us", "median_us", "p20_us", "p80_us", "vs_torch"]
    print(harness.format_table(mm, columns))
    worst = min(mm, key=lambda r: r["vs_torch"])
    print(f"lowest ratio {worst['vs_torch']:.3f}: {worst['group']}")
    name = "overhead_quick" if args.quick else "overhead"
    path = harness.save(name, records, args.out_dir)
    png = harness.plot_bars(
        name, mm, label_key="threads", group_key="group", value_key="vs_torch", ylabel="torch / mmkern",
        out_dir=args.out_dir,
    )  # fmt: skip
    print(f"wrote {path} and {png}")
    return records


if __name__ == "__main__":
    main()
