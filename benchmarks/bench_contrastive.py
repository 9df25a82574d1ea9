"""Contrastive loss forward+backward: mmkern against the naive B×B PyTorch loss (open_clip's formulas) and, for
CLIP on a GPU when installed, open_clip's ClipLoss and Inf-CL. Reports median / p20 / p80 time, GFLOP/s by the
explicit formula 6·B²·D (the matmul work of the naive loss: one forward and two backward GEMMs), peak extra
memory and the speed ratio to naive in the same run. Naive is skipped where its B×B buffers would not fit.

    python -m benchmarks.bench_contrastive --quick
    python -m benchmarks.bench_contrastive --sizes 16384 65536 --dims 512 --repeats 1 --warmup 0
    python -m benchmarks.bench_contrastive --losses clip siglip infonce --sizes 128 512 1024 --dims 64 --repeats 200
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks import harness
from mmkern import backends as mmkern_backends
from mmkern import ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def naive_clip_loss(image_features, text_features, logit_scale):
    """open_clip ClipLoss on one device: the full B×B logits and their transpose."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """open_clip SigLipLoss on one device: −Σ log σ(±(s·I·Tᵀ + b)) / B over the full B×B logits."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(image_features.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def naive_infonce(query, keys, logit_scale):
    """One-direction InfoNCE: cross-entropy of the B×K logits against arange(B)."""
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logit_scale * query @ keys.T, labels)


# loss name -> (naive baseline, mmkern op); siglip takes a logit bias as a fourth argument.
LOSSES = {
    "clip": (naive_clip_loss, ops.clip_loss),
    "siglip": (naive_siglip_loss, ops.siglip_loss),
    "infonce": (naive_infonce, ops.infonce),
}


def _open_clip():
    try:
        from open_clip.loss import ClipLoss
    except ImportError:
        return None
    loss = ClipLoss()
    return lambda x, y, s: loss(x, y, s)


def _inf_cl():
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None

    def loss(x, y, s):
        labels = torch.arange(x.shape[0], device=x.device)
        return 0.5 * (cal_inf_loss(x, y, labels, scale=s) + cal_inf_loss(y, x, labels, scale=s)).mean()

    return loss


def implementations(device: torch.device, backends: list[str], loss: str = "clip") -> dict:
    naive, op = LOSSES[loss]
    impls = {"naive": naive}
    for b in backends:
        # A kernel backend this machine lacks (no native build, no triton) is left out, not a crash of the run.
        reason = b and mmkern_backends.unavailable_reason(b, device.type)
        if reason:
            print(f"mmkern-{b}: left out ({reason})")
            continue
        impls[f"mmkern-{b or 'default'}"] = lambda *args, b=b: op(*args, backend=b)
    if device.type == "cuda" and loss == "clip":
        for name, make in (("open_clip", _open_clip), ("inf_cl", _inf_cl)):
            fn = make()
            if fn is not None:
                impls[name] = fn
    return impls


def _naive_bytes(B: int, dtype: torch.dtype) -> int:
    # logits, their transpose's softmax and the gradients: about four B×B buffers live at the peak.
    return 4 * B * B * max(torch.finfo(dtype).bits // 8, 4)


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    import os

    return int(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def run(
    B: int, D: int, dtype: torch.dtype, device: torch.device, impls: dict, warmup: int, repeats: int, loss: str = "clip"
) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = F.normalize(torch.randn(B, D, generator=gen), dim=1).to(device, dtype).requires_grad_()
    y = F.normalize(torch.randn(B, D, generator=gen), dim=1).to(device, dtype).requires_grad_()
    args = (x, y, torch.tensor(100.0, device=device, requires_grad=True))
    if loss == "siglip":
        args += (torch.tensor(-10.0, device=device, requires_grad=True),)
    records = []
    for name, fn in impls.items():
        rec = {
            "loss": loss,
            "impl": name,
            "B": B,
            "D": D,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "case": f"B={B} D={D}" if loss == "clip" else f"{loss} B={B} D={D}",
        }
        if name == "naive" and _naive_bytes(B, dtype) > _memory_budget(device):
            rec["skipped"] = f"needs ~{_naive_bytes(B, dtype) / 2**30:.0f} GiB"
            records.append(rec)
            continue

        def step(fn=fn):
            torch.autograd.grad(fn(*args), args)

        rec.update(harness.time_fn(step, device=device, warmup=warmup, repeats=repeats))
        rec["peak_mb"] = harness.peak_memory(step, device=device) / 2**20  # after timing: one-time setup excluded
        rec["gflops"] = 6 * B * B * D / (rec["median_ms"] * 1e-3) / 1e9
        records.append(rec)
    naive = next((r for r in records if r["impl"] == "naive" and "median_ms" in r), None)
    for r in records:
        if naive and "median_ms" in r:
            r["speedup_vs_naive"] = naive["median_ms"] / r["median_ms"]
            r["memory_vs_naive"] = r["peak_mb"] / max(naive["peak_mb"], 1e-9)
    return records


def _exact_cpu_peaks() -> None:
    """Makes glibc return every buffer of 1 MiB or more to the OS on free (a fixed mmap threshold), so the
    resident-set high-water mark of one call counts that call's buffers, not heap left over by earlier calls."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    p.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=["clip"], help="losses to time")
    p.add_argument("--sizes", type=int, nargs="+", help="batch sizes B (default: 4096 8192 on CPU, 4k..256k on GPU)")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768], help="feature widths D")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=None, help="mmkern backends (default: cpu, or triton cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default=None, help="results folder (default: bench_results/ or $MMKERN_BENCH_DIR)")
    harness.add_cpu_capability_arg(p)
    args = p.parse_args(argv)
    harness.apply_cpu_capability(args.cpu_capability)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    if not gpu:
        _exact_cpu_peaks()
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    # On CPUs also mmkern's default (None): the native loss or the naive one, as mmkern/ops/cpu_policy.py picks.
    backends = args.backends or (["triton", "cuda"] if gpu else ["cpu", None])
    sizes = args.sizes or ([4096, 16384, 65536, 262144] if gpu else [4096, 8192])
    dims, warmup, repeats = args.dims, args.warmup, args.repeats
    if args.quick:
        sizes, dims, warmup, repeats = [s // 4 for s in sizes[:2]], dims[:1], 1, 2

    records = []
    for loss in args.losses:
        impls = implementations(device, backends, loss)
        for D in dims:
            for B in sizes:
                records += run(B, D, dtype, device, impls, warmup, repeats, loss)
                print(
                    harness.format_table(
                        records[-len(impls) :],
                        [
                            "loss",
                            "impl",
                            "B",
                            "D",
                            "median_ms",
                            "p20_ms",
                            "p80_ms",
                            "gflops",
                            "peak_mb",
                            "speedup_vs_naive",
                        ],
                    ),
                    flush=True,
                )
    path = harness.save("contrastive", records, args.out_dir)
    timed = [r for r in records if "median_ms" in r]
    if timed:
        harness.plot_bars("contrastive", timed, label_key="impl", group_key="case", out_dir=args.out_dir)
    print(f"results: {path}")
    return records


if __name__ == "__main__":
    main()
