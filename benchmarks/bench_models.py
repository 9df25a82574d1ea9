"""End-to-end model benchmark: CLIP ViT-B/16 image-encoder inference and a small CLIP training step, mmkern ops
against the same model on plain PyTorch ops in the same run.

The baseline is the very same module tree and weights with mmkern's op entry points swapped for what a user would
otherwise write: Conv2d patch embedding (+ flatten, prefix concat, position add), F.scaled_dot_product_attention
and the naive B x B CLIP loss. Ratio = baseline time / mmkern time (> 1: mmkern is faster).

    python -m benchmarks.bench_models [--quick] [--profile] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern.models import CLIP, CLIPConfig, TextConfig, clip_config, vit_config
from mmkern.reference import attention_allowed

CPU = torch.device("cpu")


def _plain_patch_embed(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None, backend=None):
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if prefix_tokens is not None:
        x = torch.cat([prefix_tokens.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
    return x if pos_embed is None else x + pos_embed.reshape(x.shape[1], x.shape[2])


def _plain_sdpa(
    q,
    k,
    v,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    window=None,
    num_global=0,
    backend=None,
):
    if window is not None:  # a local layer: torch has no window argument, so give it the dense band mask
        band = attention_allowed(
            q.shape[-2], k.shape[-2], is_causal=is_causal, window=window, num_global=num_global, device=q.device
        )
        if attn_mask is None or attn_mask.dtype == torch.bool:
            attn_mask = band if attn_mask is None else band & attn_mask
        else:
            attn_mask = attn_mask.masked_fill(~band, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def _plain_clip_loss(image_features, text_features, logit_scale, *, backend=None):
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


PLAIN_OPS = SimpleNamespace(
    patch_embed=_plain_patch_embed, scaled_dot_product_attention=_plain_sdpa, clip_loss=_plain_clip_loss
)


@contextlib.contextmanager
def plain_ops():
    """Routes the model layer's op calls to plain PyTorch (the modules look ops up through their `ops` global)."""
    import mmkern.models.clip as clip_mod
    import mmkern.nn.attention as attn_mod
    import mmkern.nn.patch_embed as pe_mod

    saved = [(m, m.ops) for m in (clip_mod, attn_mod, pe_mod)]
    try:
        for m, _ in saved:
            m.ops = PLAIN_OPS
        yield
    finally:
        for m, ops in saved:
            m.ops = ops


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


def _compare(fn, repeats: int) -> dict:
    """{impl: (timing, peak memory)} for fn on plain PyTorch ops and on mmkern ops. The two alternate sample by
    sample, so a change in machine load during the run hits both alike."""
    impls = {"torch": plain_ops, "mmkern": contextlib.nullcontext}
    samples = {impl: [] for impl in impls}
    for impl, ctx in impls.items():  # warm-up
        with ctx():
            fn()
    for _ in range(repeats):
        for impl, ctx in impls.items():
            with ctx():
                samples[impl].append(harness.time_fn(fn, device=CPU, warmup=0, repeats=1)["median_ms"])
    out = {}
    for impl, ctx in impls.items():
        xs = sorted(samples[impl])
        q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
        timing = {"median_ms": statistics.median(xs), "p20_ms": q[0], "p80_ms": q[3], "samples": len(xs)}
        with ctx():
            out[impl] = (timing, harness.peak_memory(fn, device=CPU))
    return out


def bench_inference(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = CLIP(clip_config("ViT-B/16", act="gelu")).eval()
    images = torch.randn(batch, 3, 224, 224)

    def run():
        with torch.inference_mode():
            model.encode_image(images)

    return [
        _record(f"ViT-B/16 image encoder B={batch}", impl, t, m, batch)
        for impl, (t, m) in _compare(run, repeats).items()
    ]


def bench_train_step(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = CLIP(small_clip_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1, 49000, (batch, 77))
    ids[:, -1] = 49407  # EOT

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(images, ids).backward()
        opt.step()

    return [
        _record(f"small CLIP train step B={batch}", impl, t, m, batch)
        for impl, (t, m) in _compare(step, repeats).items()
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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    infer_batch, train_batch, repeats = (2, 4, 3) if args.quick else (8, 16, 5)
    records = bench_inference(infer_batch, repeats) + bench_train_step(train_batch, repeats)
    for case in dict.fromkeys(r["case"] for r in records):
        base, ours = (next(r for r in records if r["case"] == case and r["impl"] == i) for i in ("torch", "mmkern"))
        ours["speedup_vs_torch"] = base["median_ms"] / ours["median_ms"]
    cols = ["case", "impl", "median_ms", "p20_ms", "p80_ms", "items_per_s", "peak_mem_mb", "speedup_vs_torch"]
    print(harness.format_table(records, cols))
    harness.save("models", records)
    harness.plot_bars("models", records, label_key="impl", group_key="case")
    if args.profile:
        print(profile_train_step(train_batch))
    return records


if __name__ == "__main__":
    main()
