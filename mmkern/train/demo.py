"""`mmkern demo`: the whole story on the embedded digits in a few minutes of CPU.

1. pretrain a small CLIP (mmkern kernels) -> held-out zero-shot top-1 and image->text R@1;
2. prompt learning: hand-written templates vs CoOp context (KgCoOp-regularised) trained on 16 shots per class
   that pretraining never saw;
3. cloze prompts: a fusion encoder on the CLIP image tower, MLM-pretrained on the captions, fills
   "a photo of the digit [MASK]." zero-shot and after few-shot tuning of soft prompt vectors (or the whole model),
   DIR/cloze_encoder.safetensors;
4. few-shot transfer to a task the CLIP never saw, faint digits (strokes at 40% intensity), where zero-shot is
   weak: held-out top-1 against k = 1..16 shots per class over 3 seeds for hand-written prompts, CoOp, cloze soft
   prompts, a linear probe and fine-tuning (mmkern.train.fewshot) -> DIR/fewshot.png, the figure of CoOp;
5. instruction-tune a small vision-language decoder on the CLIP image tower -> held-out exact match;
6. training throughput of the mmkern CLIP vs the same model on plain PyTorch ops, measured in this run.
Writes DIR/metrics.json, DIR/clip.safetensors, DIR/decoder.safetensors, DIR/*/metrics.jsonl and DIR/*.png.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmkern._extras import pyplot
from mmkern.data import ImageTextCollator, faded
from mmkern.models.checkpoint import save_checkpoint
from mmkern.train.baseline import PlainCLIP, every_row_copy, plain_loss_fn
from mmkern.train.cloze import ClozeConfig, train_cloze
from mmkern.train.contrastive import HANDWRITTEN_TEMPLATES, ContrastiveConfig, contrastive_loss_fn, train_contrastive
from mmkern.train.fewshot import curve_table, few_shot_curve, method_configs, plot_curve, rises
from mmkern.train.instruct import InstructConfig, train_instruct
from mmkern.train.loop import adamw, plot_metrics
from mmkern.train.native import NativeConfig, native_table, train_native
from mmkern.train.prompt import PromptConfig, train_prompts

TARGETS = {"zero_shot_top1": 0.90, "instruction_exact_match": 0.80, "throughput_ratio_vs_pytorch": 1.3}
HELD_PER_CLASS = 24  # images per class kept out of pretraining: the pool every few-shot stage draws its shots from
FEWSHOT_CONTRAST = 0.4  # the downstream task: the digits with their pixel intensities scaled by this toward black


def demo_configs(size: str, out: Path, seed: int = 0, progress: bool = True):
    """(contrastive, prompt, instruct, throughput steps) for size "tiny" (tests), "quick", "full" or "gpu"."""
    common = {"seed": seed, "progress": progress, "log_every": 10}
    clip = ContrastiveConfig(
        steps=300, batch_size=128, lr=2e-3, warmup_steps=10, out_dir=str(out / "pretrain"), **common
    )
    prompt = PromptConfig(steps=80, lr=1e-2, out_dir=str(out / "prompt"), **common)
    instruct = InstructConfig(steps=150, stage1_steps=30, out_dir=str(out / "instruct"), **common)
    bench = 6  # steps per round of the throughput comparison (5 rounds, alternating)
    if size == "tiny":
        clip = replace(clip, steps=3, batch_size=32, width=32, text_width=32, embed_dim=32, depth=1, text_depth=1)
        prompt, bench = replace(prompt, steps=2, shots=2), 1
        instruct = replace(instruct, steps=2, stage1_steps=1, width=32, depth=1, batch_size=16)
    elif size == "quick":
        clip = replace(clip, steps=100)
        prompt, bench = replace(prompt, steps=40), 4
        instruct = replace(instruct, steps=60, stage1_steps=10)
    elif size == "gpu":
        clip = replace(
            clip,
            steps=600,
            batch_size=256,
            width=128,
            text_width=128,
            embed_dim=128,
            depth=4,
            text_depth=4,
            precision="bf16",
        )
        instruct = replace(instruct, steps=600, width=128, depth=4, precision="bf16")
        bench = 30
    elif size != "full":
        raise ValueError(f"size: expected tiny, quick, full or gpu, got {size!r}")
    return clip, prompt, instruct, bench


def cloze_config(size: str, out: Path, seed: int = 0, progress: bool = True) -> ClozeConfig:
    """The cloze stage's config for the demo sizes (see demo_configs)."""
    c = ClozeConfig(tune="both", seed=seed, progress=progress, log_every=10, out_dir=str(out / "cloze"))
    if size == "tiny":
        return replace(c, pretrain_steps=2, pretrain_batch_size=16, steps=2, shots=2)
    if size == "quick":
        return replace(c, pretrain_steps=120, steps=20)
    if size == "gpu":
        return replace(c, pretrain_steps=300, pretrain_batch_size=256, precision="bf16")
    return c


def native_config(size: str, seed: int = 0, progress: bool = True) -> NativeConfig:
    """The native-resolution stage's config for the demo sizes (see demo_configs)."""
    config = NativeConfig(seed=seed, progress=progress, log_every=10)
    if size == "tiny":
        return replace(config, steps=2, warmup_steps=1, test_sizes="16x32,12x36")
    if size == "quick":
        return replace(config, steps=60)
    return config


def fewshot_settings(size: str, seed: int = 0) -> dict:
    """Stage 4's shots, seeds and method configs (mmkern.train.fewshot.method_configs, shrunk for the test size)."""
    seeds = [seed + i for i in range(3)]
    prompt, cloze, transfer = method_configs()
    shots = [1, 2, 4, 8, 16]
    if size == "tiny":
        shots, seeds = [1, 2], seeds[:1]
        prompt, cloze = replace(prompt, steps=2), replace(cloze, steps=2)
        transfer = replace(transfer, steps=2, probe_steps=2)
    elif size == "quick":
        shots, seeds = [1, 4, 16], seeds[:1]  # one seed: --quick stays about a minute
    elif size not in ("full", "gpu"):
        raise ValueError(f"size: expected tiny, quick, full or gpu, got {size!r}")
    return {"shots": shots, "seeds": seeds, "prompt": prompt, "cloze": cloze, "transfer": transfer}


@contextlib.contextmanager
def torch_threads(n: int):
    """torch, and with it mmkern's CPU kernels, on at most n threads inside the block. Stages 2-4 tune tiny models
    (width 64, batches of <= 128 sequences of <= 17 tokens), whose ops are too small to split; on a shared 2-core
    machine two threads mostly waited on each other (same results either way; figures in the README)."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stepper:
    """One AdamW training step of `model` on a fixed batch per call."""

    def __init__(self, model, loss_fn, batch):
        self.model, self.loss_fn, self.batch = model.train(), loss_fn, batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw(params, 1e-4, params[0].device)  # the trainer's optimizer, for both models

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        out = self.loss_fn(self.model, self.batch)
        (out[0] if isinstance(out, tuple) else out).backward()
        self.opt.step()


def _rate(step, n_steps: int, batch_size: int) -> float:
    t = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * batch_size / (time.perf_counter() - t)


def throughput_comparison(clip_model, tokenizer, data, config: ContrastiveConfig, steps: int, rounds: int = 5) -> dict:
    """Copies of the trained CLIP and of its plain-PyTorch twin (same weights) trained on the same batch. Rounds
    of `steps` steps alternate between them, and each ratio is the median of the per-round ratios, so that load
    from other processes on a shared machine hits all alike. A third copy runs with pooled_rows_only off (its
    last blocks over every token, as the twin's): `throughput_ratio_every_row` is what the kernels alone give."""
    import copy

    device = clip_model.logit_scale.device
    ours = copy.deepcopy(clip_model).requires_grad_(True)
    every_row = every_row_copy(ours)
    plain = PlainCLIP.from_clip(clip_model)
    batch = ImageTextCollator(tokenizer, config.context_length)([data[i] for i in range(config.batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}
    loss_fn = contrastive_loss_fn("clip")
    runs = {"ours": _Stepper(ours, loss_fn, batch), "every_row": _Stepper(every_row, loss_fn, batch)}
    runs["plain"] = _Stepper(plain, plain_loss_fn, batch)
    rates = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: allocations, first-call dispatch
    for _ in range(rounds):
        for name, run in runs.items():
            rates[name].append(_rate(run, steps, config.batch_size))

    def ratio(name):
        return statistics.median(a / b for a, b in zip(rates[name], rates["plain"]))

    return {
        "throughput_mmkern_samples_per_s": statistics.median(rates["ours"]),
        "throughput_pytorch_samples_per_s": statistics.median(rates["plain"]),
        "throughput_ratio_vs_pytorch": ratio("ours"),
        "throughput_ratio_every_row": ratio("every_row"),
    }


def run_demo(out_dir: str = "mmkern_demo", size: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Runs the four parts and writes DIR/metrics.json; -> the metrics dict. size defaults to "gpu" when CUDA is
    available, else "full" (about 5 minutes on 2 CPU cores)."""
    from mmkern.data import digits

    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = size or ("gpu" if torch.cuda.is_available() else "full")
    c_clip, c_prompt, c_inst, bench_steps = demo_configs(size, out, seed, progress)
    c_native = native_config(size, seed, progress)
    # The few-shot images of prompt learning are kept out of pretraining: shots the CLIP was trained on are
    # already fitted, and tuning on them shows nothing. Stages 2-4 draw their shots from `held`.
    held, data = digits(c_clip.image_size).take_few_shot(HELD_PER_CLASS, seed)
    metrics: dict = {
        "size": size,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    timings = {}

    def say(msg):
        print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    say("1/7 contrastive pretraining of a small CLIP on the digits")
    t = time.perf_counter()
    pre = train_contrastive(c_clip, data)
    clip, tok, train, test = pre["model"], pre["tokenizer"], pre["train"], pre["test"]
    metrics.update(pre["metrics"])
    save_checkpoint(clip, out / "clip.safetensors")
    tok.save(out / "clip_tokenizer.json")
    timings["pretrain"] = time.perf_counter() - t
    say(f"zero-shot top-1 {metrics['zero_shot_top1']:.3f}, image->text R@1 {metrics['retrieval_r1']:.3f}")

    say("2/7 prompt learning: hand-written templates vs learned context (16 unseen shots per class, towers frozen)")
    t = time.perf_counter()
    with torch_threads(1):
        pr = train_prompts(clip, tok, held, test, HANDWRITTEN_TEMPLATES, c_prompt)
    metrics["prompt_handwritten_top1"] = pr["prompt_handwritten_top1"]
    metrics["prompt_learned_top1"] = pr["prompt_learned_top1"]
    metrics["prompt_best_step"] = pr["best_step"]  # 0: validation kept the hand-written prompts
    timings["prompt"] = time.perf_counter() - t
    say(f"hand-written {metrics['prompt_handwritten_top1']:.3f}, learned {metrics['prompt_learned_top1']:.3f}")

    say("3/7 cloze prompts: fusion encoder MLM-pretrained on the captions fills 'a photo of the digit [MASK].'")
    t = time.perf_counter()
    with torch_threads(1):
        cz = train_cloze(clip, tok, train, test, cloze_config(size, out, seed, progress), shots=held)
    metrics["prompt_cloze_zero_shot_top1"] = cz["cloze_zero_shot_top1"]
    metrics["prompt_cloze_top1"] = cz["cloze_soft_top1"]  # few-shot soft prompt vectors, encoder frozen
    metrics["prompt_cloze_whole_top1"] = cz["cloze_whole_top1"]  # few-shot tuning of the whole encoder
    save_checkpoint(cz["encoder"], out / "cloze_encoder.safetensors")
    timings["cloze"] = time.perf_counter() - t
    say(
        f"cloze zero-shot {metrics['prompt_cloze_zero_shot_top1']:.3f}, soft prompts "
        f"{metrics['prompt_cloze_top1']:.3f}, whole model {metrics['prompt_cloze_whole_top1']:.3f}"
    )

    fs = fewshot_settings(size, seed)
    say(
        f"4/7 few-shot transfer to faint digits (intensity x{FEWSHOT_CONTRAST}, never seen in pretraining): "
        f"k = {fs['shots']} shots per class, {len(fs['seeds'])} seeds, 5 methods"
    )
    t = time.perf_counter()
    with torch_threads(1):
        curve = few_shot_curve(
            clip,
            tok,
            faded(held, FEWSHOT_CONTRAST),  # the shots: images kept out of pretraining
            faded(test, FEWSHOT_CONTRAST),  # held out of pretraining and of every tuning; only scored
            HANDWRITTEN_TEMPLATES,
            fs["shots"],
            fs["seeds"],
            fs["prompt"],
            fs["transfer"],
            fs["cloze"],
            cz["encoder"],
            progress,
        )
    for method, mean in curve["mean"].items():
        metrics[f"transfer_{method}_top1"] = mean[-1]  # at the most shots (16 but in the tiny test size)
    metrics["transfer_shots"], metrics["transfer_contrast"] = curve["shots"][-1], FEWSHOT_CONTRAST
    metrics["transfer_curve"] = {k: curve[k] for k in ("labels", "shots", "seeds", "mean", "std", "top1")}
    plot_curve(curve, out / "fewshot.png", f"faint digits (intensity x{FEWSHOT_CONTRAST}): few-shot transfer")
    timings["fewshot"] = time.perf_counter() - t
    print(curve_table(curve), flush=True)
    say(
        f"{curve['shots'][-1]} shots: zero-shot {metrics['transfer_zero_shot_top1']:.3f}, CoOp "
        f"{metrics['transfer_coop_top1']:.3f}, cloze {metrics['transfer_cloze_zero_shot_top1']:.3f} -> "
        f"{metrics['transfer_cloze_top1']:.3f}, linear probe {metrics['transfer_linear_probe_top1']:.3f}, "
        f"fine-tuning {metrics['transfer_finetune_top1']:.3f}"
    )

    say("5/7 instruction tuning of a vision-language decoder (stage 1 projector, stage 2 + LM)")
    t = time.perf_counter()
    vis_state = {k[len("visual.") :]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    inst = train_instruct(train, test, c_inst, vis_state, clip.visual.config)
    metrics.update(inst["metrics"])
    save_checkpoint(inst["model"], out / "decoder.safetensors")
    timings["instruct"] = time.perf_counter() - t
    say(f"held-out exact match {metrics['instruction_exact_match']:.3f}")

    say("6/7 native resolution: digits on canvases of 8x8 to 32x32 and 1:3 to 3:1, fine-tuned packed vs resized")
    t = time.perf_counter()
    with torch_threads(1):
        nat = train_native(clip, tok, train, test, HANDWRITTEN_TEMPLATES, c_native)
    for key in ("native_resolution_top1", "native_resolution_resized_top1", "native_resolution_unseen"):
        metrics[key] = nat[key]
    timings["native"] = time.perf_counter() - t
    say(native_table(nat))

    say("7/7 training throughput: mmkern CLIP vs the same model on plain PyTorch ops")
    t = time.perf_counter()
    metrics.update(throughput_comparison(clip, tok, train, c_clip, bench_steps))
    timings["throughput"] = time.perf_counter() - t
    say(
        f"{metrics['throughput_mmkern_samples_per_s']:.0f} vs {metrics['throughput_pytorch_samples_per_s']:.0f} "
        f"samples/s: {metrics['throughput_ratio_vs_pytorch']:.2f}x (last blocks over every token, kernels alone: "
        f"{metrics['throughput_ratio_every_row']:.2f}x)"
    )

    metrics["seconds"] = time.perf_counter() - t0
    metrics["cpu_seconds"] = time.process_time() - c0  # with wall time, shows how much a shared machine slowed it
    metrics["seconds_per_part"] = timings
    checks = [  # (metric, target shown, passed)
        ("zero_shot_top1", ">= 0.90", metrics["zero_shot_top1"] >= TARGETS["zero_shot_top1"]),
        (
            "prompt_learned_top1",
            f">= hand-written {metrics['prompt_handwritten_top1']:.3f}",
            metrics["prompt_learned_top1"] >= metrics["prompt_handwritten_top1"],
        ),
        (
            "instruction_exact_match",
            ">= 0.80",
            metrics["instruction_exact_match"] >= TARGETS["instruction_exact_match"],
        ),
        (
            "throughput_ratio_vs_pytorch",
            ">= 1.3",
            metrics["throughput_ratio_vs_pytorch"] >= TARGETS["throughput_ratio_vs_pytorch"],
        ),
        ("seconds", "<= 300", metrics["seconds"] <= 300),
        (
            "transfer_coop_top1",
            f">= zero-shot {metrics['transfer_zero_shot_top1']:.3f} + 0.10",
            metrics["transfer_coop_top1"] >= metrics["transfer_zero_shot_top1"] + 0.10,
        ),
        (
            "transfer_cloze_top1",
            f">= cloze zero-shot {metrics['transfer_cloze_zero_shot_top1']:.3f} + 0.05",
            metrics["transfer_cloze_top1"] >= metrics["transfer_cloze_zero_shot_top1"] + 0.05,
        ),
    ]
    means = metrics["transfer_curve"]["mean"]
    rising = {m: rises(means[m]) for m in ("coop", "cloze")}
    metrics["targets"] = {
        "zero_shot_top1 >= 0.90": checks[0][2],
        "prompt_learned_top1 >= prompt_handwritten_top1": checks[1][2],
        "instruction_exact_match >= 0.80": checks[2][2],
        "throughput_ratio_vs_pytorch >= 1.3": checks[3][2],
        "seconds <= 300": checks[4][2],
        "transfer_coop_top1 >= transfer_zero_shot_top1 + 0.10": checks[5][2],
        "transfer_cloze_top1 >= transfer_cloze_zero_shot_top1 + 0.05": checks[6][2],
        "transfer curves of coop and cloze rise with k": all(rising.values()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plots(out, metrics)
    say(
        f"done in {metrics['seconds']:.0f}s; wrote {out / 'metrics.json'}, {out / 'demo.png'}, checkpoints "
        f"{out / 'clip.safetensors'} and {out / 'decoder.safetensors'}"
    )
    print(summary_table(metrics, checks, rising), flush=True)
    return metrics


def summary_table(metrics: dict, checks: list[tuple[str, str, bool]], rising: dict[str, bool]) -> str:
    """The metrics with their targets and PASS / MISS, one row each (a missed target is reported, not raised).
    rising: method -> whether its few-shot curve rises with k (see rises)."""
    rows = [(name, f"{metrics[name]:.3f}", target, "PASS" if ok else "MISS") for name, target, ok in checks]
    for m, ok in rising.items():
        curve = " ".join(f"{v:.2f}" for v in metrics["transfer_curve"]["mean"][m])
        rows.append((f"transfer_{m} curve", curve, "rises with k", "PASS" if ok else "MISS"))
    rows.append(("retrieval_r1", f"{metrics['retrieval_r1']:.3f}", "-", ""))
    rows.append(("prompt_handwritten_top1", f"{metrics['prompt_handwritten_top1']:.3f}", "-", ""))
    names = (
        "prompt_cloze_zero_shot_top1",
        "prompt_cloze_top1",
        "prompt_cloze_whole_top1",
        "transfer_linear_probe_top1",
        "transfer_finetune_top1",
        "throughput_ratio_every_row",
    )
    for name in names:
        rows.append((name, f"{metrics[name]:.3f}", "-", ""))
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "target", "")]) for i in range(3)]
    lines = [f"{'metric':<{widths[0]}}  {'value':>{widths[1]}}  {'target':<{widths[2]}}  result"]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    passed = sum(ok for _, _, ok in checks) + sum(rising.values())
    return "\n".join(lines + [f"{passed}/{len(checks) + len(rising)} targets met"])


def _plots(out: Path, metrics: dict) -> None:
    plt = pyplot()

    def series(path, key):
        if not path.exists():
            return [], []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    fig, ax = plt.subplots(1, 4, figsize=(18, 3.6))
    ax[0].plot(*series(out / "pretrain" / "metrics.jsonl", "loss"))
    ax[0].set_title("CLIP pretraining loss")
    for stage in ("stage1", "stage2"):
        ax[1].plot(*series(out / "instruct" / stage / "metrics.jsonl", "loss"), label=stage)
    ax[1].set_title("instruction tuning loss (response tokens)")
    ax[1].legend()
    names = [
        "zero_shot_top1",
        "retrieval_r1",
        "prompt_handwritten_top1",
        "prompt_learned_top1",
        "prompt_cloze_zero_shot_top1",
        "prompt_cloze_top1",
        "transfer_zero_shot_top1",
        "transfer_coop_top1",
        "transfer_cloze_zero_shot_top1",
        "transfer_cloze_top1",
        "instruction_exact_match",
    ]
    ax[2].barh(names, [metrics[n] for n in names], color="tab:blue")
    ax[2].set_xlim(0, 1)
    ax[2].set_title("held-out accuracy")
    rates = [metrics["throughput_pytorch_samples_per_s"], metrics["throughput_mmkern_samples_per_s"]]
    ax[3].bar(["plain PyTorch", "mmkern"], rates, color=["tab:gray", "tab:orange"])
    ax[3].set_title(f"training samples/s ({metrics['throughput_ratio_vs_pytorch']:.2f}x)")
    for a in ax[:2]:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=90)
    plt.close(fig)
    if (out / "pretrain" / "metrics.jsonl").exists():
        plot_metrics(out / "pretrain" / "metrics.jsonl", out / "pretrain_curves.png")
