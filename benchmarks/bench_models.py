"""End-to-end model benchmark: CLIP ViT-B/16 image-encoder inference and a small CLIP training step, mmkern against
the same model on plain PyTorch ops in the same run.

The baseline is mmkern.train.baseline.PlainCLIP (the one the demo measures too) loaded with the same weights: Conv2d
patch embedding (+ flatten, class-token concat, position add), F.scaled_dot_product_attention, nn.Linear + GELU,
nn.LayerNorm + residual adds and the naive B x B CLIP loss. Ratio = baseline time / mmkern time (> 1: mmkern is
faster). "mmkern every row" is mmkern with pooled_rows_only off: its last blocks run over every token as the
baseline's do, so it shows what the kernels alone give, and "mmkern" adds the pooled-row last block. Both training
steps use the trainer's optimizer (mmkern.train.loop.adamw: torch's fused AdamW).

    python -m benchmarks.bench_models [--quick] [--profile] [--threads N]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import harness
from mmkern.models import CLIP, CLIPConfig, TextConfig, clip_config, vit_config
from mmkern.train.baseline import PlainCLIP, every_row_copy, naive_clip_loss
from mmkern.train.loop import adamw

CPU = torch.device("cpu")


def _models(config: CLIPConfig) -> tuple[CLIP, CLIP, PlainCLIP]:
    """An mmkern CLIP, a copy that runs its last blocks over every token, and the plain-PyTorch twin; same weights."""
    torch.manual_seed(0)
    model = CLIP(config)
    every_row = every_row_copy(model)
    return model, every_row, PlainCLIP.from_clip(model)


def small_clip_config() -> CLIPConfig:
    """The training-step model: ViT-S/16 at 224 and a 6-layer, 384-wide text tower (77 tokens), embed 256."""
    vision = vit_config("s", 16, 224, pre_norm=True, patch_bias=False, act="gelu", eps=1e-5)
    text = TextConfig(width=384, depth=6, heads=6, act="gelu")
    return CLIPConfig(embed_dim=256, vision=vision, text=text)


def _record(name, impl, timing, memory, items):
    return {
        "case": name,
        "impl": impl,
        **timing,
        "items_per_s": items / (timing["median_ms"] / 1e3),
        "peak_mem_mb": memory / 2**20,
    }


def _compare(fns: dict, repeats: int) -> dict:
    """{impl: (timing, peak memory)} for each {impl: fn}, the implementations taking turns sample by sample."""
    timings = harness.time_alternating(fns, device=CPU, repeats=repeats)
    return {impl: (timings[impl], harness.peak_memory(fn, device=CPU)) for impl, fn in fns.items()}


def bench_inference(batch: int, repeats: int) -> list[dict]:
    model, every_row, plain = (m.eval() for m in _models(clip_config("ViT-B/16", act="gelu")))
    images = torch.randn(batch, 3, 224, 224)

    def encoder(m):
        def run():
            with torch.inference_mode():
                m.encode_image(images)

        return run

    fns = {"torch": encoder(plain), "mmkern every row": encoder(every_row), "mmkern": encoder(model)}
    return [
        _record(f"ViT-B/16 image encoder B={batch}", impl, t, m, batch)
        for impl, (t, m) in _compare(fns, repeats).items()
    ]


def bench_train_step(batch: int, repeats: int) -> list[dict]:
    model, every_row, plain = _models(small_clip_config())
    images = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1, 49000, (batch, 77))
    ids[:, -1] = 49407  # EOT

    def stepper(m, loss):
        opt = adamw(list(m.parameters()), 1e-4, CPU)

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        return step

    fns = {
        "torch": stepper(plain, lambda: naive_clip_loss(*plain(images, ids)[:3])),
        "mmkern every row": stepper(every_row, lambda: every_row.loss(images, ids)),
        "mmkern": stepper(model, lambda: model.loss(images, ids)),
    }
    return [
        _record(f"small CLIP train step B={batch}", impl, t, m, batch)
        for impl, (t, m) in _compare(fns, repeats).items()
    ]


def profile_train_step(batch: int) -> str:
    """Top ops of one mmkern training step by self CPU time."""
    torch.manual_seed(0)
    model = CLIP(small_clip_config())
    images, ids = torch.randn(batch, 3, 224, 224), torch.randint(1, 49000, (batch, 77))
    model.loss(images, ids).backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.loss(images, ids).backward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats")
    parser.add_argument("--profile", action="store_true", help="also print a profile of the mmkern training step")
    parser.add_argument("--threads", type=int, default=None, help="torch / mmkern CPU threads")
    harness.add_cpu_capability_arg(parser)
    args = parser.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)
    if args.threads:
        torch.set_num_threads(args.threads)
    infer_batch, train_batch, repeats = (2, 4, 3) if args.quick else (8, 16, 11)
    records = bench_inference(infer_batch, repeats) + bench_train_step(train_batch, repeats)
    for r in records:
        base = next(b for b in records if b["case"] == r["case"] and b["impl"] == "torch")
        r["speedup_vs_torch"] = base["median_ms"] / r["median_ms"]
    cols = ["case", "impl", "median_ms", "p20_ms", "p80_ms", "items_per_s", "peak_mem_mb", "speedup_vs_torch"]
    print(harness.format_table(records, cols))
    harness.save("models", records)
    harness.plot_bars("models", records, label_key="impl", group_key="case")
    if args.profile:
        print(profile_train_step(train_batch))
    return records


if __name__ == "__main__":
    main()
