"""Benchmark: mmkern.ops.patch_embed against the two ways PyTorch models embed patches.

    conv2d  timm / open_clip: Conv2d(kernel=stride=P) -> flatten(2).transpose(1, 2) -> cat(cls) -> + pos_embed
    linear  conv-as-GEMM: reshape/permute to (B, N, C·P·P) -> F.linear -> cat(cls) -> + pos_embed
    mmkern  one fused op per available kernel backend (cpu on CPUs; cuda and triton on GPUs)

Shapes: ViT-B/16 at 224 and ViT-L/14 at 336, batch 32, one class token. Modes: `fwd` (inference, no
autograd) and `fwd+bwd` (training: gradients for weight, bias, pos_embed and the class token; the pixels
need none). Reported per record: median ms with p20/p80, GFLOP/s from 2·B·N·E·C·P·P per GEMM (one GEMM
forward, two forward+backward), GB/s from the minimal traffic (read images, weight, pos_embed once; write
the output; in backward also read grad_out and the images again and write grad_weight), peak extra memory,
the ratio to both PyTorch paths, and the machine's dense GEMM rate (torch.matmul of the same GEMM shape
and dtype) measured in the same run. Results append to bench_results/patch_embed.json and a PNG.

    python -m benchmarks.bench_patch_embed [--quick] [--device cpu|cuda] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern import backends
from mmkern.ops.patch_embed import patch_embed

# name: (image size, patch size, embed dim)
MODELS = {"vit_b16_224": (224, 16, 768), "vit_l14_336": (336, 14, 1024)}


def conv2d_path(images, weight, bias, pos_embed, cls_token):
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed


def linear_path(images, weight, bias, pos_embed, cls_token):
    B, C, H, W = images.shape
    P = weight.shape[-1]
    patches = images.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * P * P)
    x = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return torch.cat([cls_token.expand(B, -1, -1), x], dim=1) + pos_embed


def mmkern_path(backend):
    def run(images, weight, bias, pos_embed, cls_token):
        return patch_embed(images, weight, bias, pos_embed=pos_embed, prefix_tokens=cls_token[0], backend=backend)

    return run


def _problem(model, batch, dtype, device):
    size, P, E = MODELS[model]
    gen = torch.Generator(device="cpu").manual_seed(0)
    N = (size // P) ** 2

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    images = rand(batch, 3, size, size)
    params = [rand(E, 3, P, P, scale=(3 * P * P) ** -0.5), rand(E), rand(1, 1 + N, E), rand(1, 1, E)]
    grad_out = rand(batch, 1 + N, E)
    return images, [p.requires_grad_() for p in params], grad_out


def _gemm_rate(batch, model, dtype, device, repeats):
    """GFLOP/s of torch.matmul on the patch GEMM (B·N x C·P·P) @ (C·P·P x E): the machine's dense rate."""
    size, P, E = MODELS[model]
    a = torch.randn(batch * (size // P) ** 2, 3 * P * P, device=device).to(dtype)
    b = torch.randn(3 * P * P, E, device=device).to(dtype)
    t = harness.time_fn(lambda: a @ b, device=torch.device(device), repeats=repeats)
    return 2 * a.shape[0] * a.shape[1] * E / t["median_ms"] / 1e6


def run_config(model, batch, dtype, device, repeats):
    size, P, E = MODELS[model]
    N = (size // P) ** 2
    K = 3 * P * P
    elt = torch.finfo(dtype).bits // 8
    images, params, grad_out = _problem(model, batch, dtype, device)
    paths = {"conv2d": conv2d_path, "linear": linear_path}
    # The Triton interpreter is a test vehicle, not a CPU backend: triton is timed on GPUs only.
    for b in ("cpu", "cuda") if device == "cpu" else ("cuda", "triton"):
        if backends.unavailable_reason(b, device) is None:
            paths[f"mmkern-{b}"] = mmkern_path(b)
    if device == "cpu":  # mmkern's default: the native kernel or the conv2d path, as cpu_policy picks
        paths["mmkern-default"] = mmkern_path(None)
    flops = 2 * batch * N * E * K
    fwd_bytes = (images.numel() + E * K + (1 + N) * E + batch * (1 + N) * E) * elt
    bwd_bytes = (grad_out.numel() + images.numel()) * elt + E * K * 4
    gemm = _gemm_rate(batch, model, dtype, device, repeats)
    dev = torch.device(device)

    records = []
    for mode in ("fwd", "fwd+bwd"):
        for name, path in paths.items():
            if mode == "fwd":

                def fn(path=path):
                    with torch.no_grad():
                        path(images, *params)

            else:

                def fn(path=path):
                    torch.autograd.grad(path(images, *params), params, grad_out)

            t = harness.time_fn(fn, device=dev, warmup=2, repeats=repeats)
            mode_flops = flops * (1 if mode == "fwd" else 2)
            mode_bytes = fwd_bytes + (0 if mode == "fwd" else bwd_bytes)
            records.append(
                {
                    "model": model,
                    "batch": batch,
                    "dtype": str(dtype).removeprefix("torch."),
                    "device": device,
                    "mode": mode,
                    "path": name,
                    **t,
                    "gflops": mode_flops / t["median_ms"] / 1e6,
                    "gemm_gflops": gemm,
                    "gbps": mode_bytes / t["median_ms"] / 1e6,
                    "peak_mb": harness.peak_memory(fn, device=dev) / 2**20,
                    "group": f"{model} {str(dtype)[6:]} {mode}",
                }
            )
    for r in records:
        same = {x["path"]: x["median_ms"] for x in records if x["mode"] == r["mode"]}
        r["vs_conv2d"] = same["conv2d"] / r["median_ms"]
        r["vs_linear"] = same["linear"] / r["median_ms"]
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_patch_embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 at 224, batch 4, few repeats (mmkern demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out-dir", default=None)
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)

    models = ["vit_b16_224"] if args.quick else args.models
    batch = args.batch or (4 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 10)
    records = []
    for model in models:
        for dtype_name in args.dtypes:
            records += run_config(model, batch, getattr(torch, dtype_name), args.device, repeats)

    print(f"patch_embed on {args.device}, batch {batch}, {torch.get_num_threads()} CPU threads")
    columns = ["model", "dtype", "mode", "path", "median_ms", "p20_ms", "p80_ms", "gflops", "gemm_gflops", "gbps",
               "peak_mb", "vs_conv2d", "vs_linear"]  # fmt: skip
    name = "patch_embed_quick" if args.quick else "patch_embed"
    harness.report(name, records, columns, label_key="path", out_dir=args.out_dir)
    return records


if __name__ == "__main__":
    main()
