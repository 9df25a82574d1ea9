"""Native resolution (NaViT packing) against padding: one ViT tower, fwd+bwd, over a batch of images of mixed sizes.

packed: VisionTransformer.forward_packed — mmkern.ops.patch_embed_packed (position grid resampled per image in the
    GEMM epilogue) and varlen attention, no padding token anywhere; mmkern's default backends.
padded: the same tower and weights as a user runs it with timm-style dynamic_img_size: each image embedded at its
    own size (conv2d, bicubic position resampling), the token sequences padded to the batch's longest and a key-padding
    mask through torch's F.scaled_dot_product_attention (every mmkern op on its `torch` backend). Padding to the
    longest sequence is the cheaper padding: a 2-d pad to the largest height and width would process more tokens.

Ratio = padded time / packed time (> 1: packing is faster). Memory: the CUDA allocator's peak on GPUs; on the CPU the
bytes of the tensors autograd saves for backward (the activations; the RSS high-water mark is too coarse for this).
Defaults are the issue's target: 64 images with sides drawn from 64-512 px and aspect ratios 1:3-3:1 (seed 0),
ViT-B/16; on a CPU pass e.g. --size s --depth 1. Both towers run their last block over every token (the packed
tower's class-token-only last block would add its own gain).

    python -m benchmarks.bench_native_resolution [--images 64] [--size b] [--depth N] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math

import torch

import mmkern
from benchmarks import harness
from mmkern.models import VisionTransformer, vit_config


def image_sizes(n: int, lo: int, hi: int, patch: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (H, W): H uniform in [lo, hi], aspect W/H log-uniform in [1/3, 3], W clamped to [lo, hi]; multiples of
    the patch size."""
    gen = torch.Generator().manual_seed(seed)
    sizes = []
    for _ in range(n):
        h = lo + float(torch.rand((), generator=gen)) * (hi - lo)
        aspect = math.exp((float(torch.rand((), generator=gen)) * 2 - 1) * math.log(3))
        w = min(max(h * aspect, lo), hi)
        sizes.append((max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)))
    return sizes


def padded_forward(model: VisionTransformer, images: list[torch.Tensor]) -> torch.Tensor:
    """The padding baseline (see the module docstring) -> pooled features (N, width or num_classes)."""
    prefix = model._prefix_tokens()
    with mmkern.use_backend("torch"):
        seqs = [model.patch_embed(image[None], model.pos_embed, prefix)[0] for image in images]
        lengths = torch.tensor([len(s) for s in seqs])
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = (torch.arange(x.shape[1]) < lengths[:, None]).to(x.device)[:, None, None, :]
        x = model.norm_pre(x)
        for blk in model.blocks:
            x = blk(x, attn_mask=mask)
        return model.head(model.pool(model.norm(x)))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves during fn() (its activations for backward)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = vit_config(args.size, 16, 224, dynamic_img_size=True, **({"depth": args.depth} if args.depth else {}))
    model = VisionTransformer(config).to(device, dtype).train()
    model.pooled_rows_only = False  # the packing alone: both last blocks over every token
    sizes = image_sizes(args.images, args.min_side, args.max_side, 16, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images = [torch.randn(3, h, w, generator=gen).to(device, dtype) for h, w in sizes]
    T = model.num_prefix_tokens
    real = sum(T + (h // 16) * (w // 16) for h, w in sizes)
    padded_tokens = len(sizes) * max(T + (h // 16) * (w // 16) for h, w in sizes)

    def step(forward):
        def fn():
            model.zero_grad(set_to_none=True)
            forward().float().square().mean().backward()

        return fn

    fns = {"packed": step(lambda: model.forward_packed(images)), "padded": step(lambda: padded_forward(model, images))}
    timings = harness.time_alternating(fns, device=device, warmup=1, repeats=args.repeats)
    records = []
    for impl, fn in fns.items():
        if device.type == "cuda":
            memory = harness.peak_memory(fn, device=device)
        else:
            forward = (
                (lambda: model.forward_packed(images)) if impl == "packed" else lambda: padded_forward(model, images)
            )
            memory = saved_bytes(forward)
        processed = real if impl == "packed" else padded_tokens
        t = timings[impl]
        records.append(
            {
                "case": f"{args.size}/16 depth {config.depth}, {len(images)} images {args.min_side}-{args.max_side}px",
                "impl": impl,
                **t,
                "images_per_s": len(images) / (t["median_ms"] / 1e3),
                "real_tokens": real,
                "processed_tokens": processed,
                "memory_mb": memory / 2**20,
                "memory_kind": "cuda peak" if device.type == "cuda" else "saved activations",
                "dtype": str(dtype).removeprefix("torch."),
            }
        )
    packed, padded = records
    packed["throughput_vs_padded"] = padded["median_ms"] / packed["median_ms"]
    packed["memory_vs_padded"] = packed["memory_mb"] / padded["memory_mb"]
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--size", default="b", help="ViT size: ti, s, b, l")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the size's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch / mmkern CPU threads")
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run(args)
    cols = ["impl", "median_ms", "p20_ms", "p80_ms", "images_per_s", "real_tokens", "processed_tokens", "memory_mb"]
    print(records[0]["case"])
    print(harness.format_table(records, cols))
    p = records[0]
    print(f"packed vs padded: {p['throughput_vs_padded']:.2f}x throughput, {p['memory_vs_padded']:.2f}x memory")
    harness.save("native_resolution", records)
    harness.plot_bars("native_resolution", records, label_key="impl", group_key="case")
    return records


if __name__ == "__main__":
    main()
