"""Command line of the trainer: `mmkern train <task> [--flags | --config file.json]` and `mmkern demo`.

Every field of a task's config dataclass is a flag (`--batch-size 64`, `--precision bf16`, `--no-progress`);
`--config` reads a JSON object of the same fields, and flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def _add_fields(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), None)
            kind = kind or (f.type if f.type in (int, float) else str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default {f.default!r}")


def _config(cls, args: argparse.Namespace):
    try:
        values = json.loads(Path(args.config).read_text()) if args.config else {}
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise SystemExit(f"--config: {args.config} is not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {args.config} holds a JSON {type(values).__name__}, not an object of fields")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise SystemExit(f"--config: unknown fields {sorted(unknown)} for {cls.__name__}")
    values.update({k: v for k, v in vars(args).items() if k in known and v is not None})
    return cls(**values)


def _pretrained_clip(path: str | None, seed: int, progress: bool):
    """(clip, tokenizer) from a checkpoint written by `mmkern train contrastive`, or pretrained now on the training
    part of the digits' 0.2 split with `seed`: the split TaskData.load draws by default, so its held-out images stay
    unseen (its training images, the shots' pool, were seen at full contrast)."""
    from mmkern.data import WordTokenizer
    from mmkern.models.checkpoint import load_checkpoint
    from mmkern.train.contrastive import ContrastiveConfig, train_contrastive

    if path:
        return load_checkpoint(path), WordTokenizer.load(Path(path).with_name("clip_tokenizer.json"))
    r = train_contrastive(ContrastiveConfig(steps=150, batch_size=128, lr=2e-3, seed=seed, progress=progress))
    return r["model"], r["tokenizer"]


def _templates(classnames: list[str]) -> list[str]:
    """The hand-written zero-shot templates: the digit ones for the digits, else the bare class name."""
    from mmkern.data.datasets import DIGIT_NAMES
    from mmkern.train.contrastive import HANDWRITTEN_TEMPLATES

    return HANDWRITTEN_TEMPLATES if classnames == DIGIT_NAMES else ["{}."]


def train_main(argv: list[str] | None = None) -> int:
    from mmkern.train.cloze import ClozeConfig
    from mmkern.train.contrastive import ContrastiveConfig
    from mmkern.train.instruct import InstructConfig
    from mmkern.train.native import NativeConfig
    from mmkern.train.prompt import PromptConfig
    from mmkern.train.transfer import TransferConfig
    from mmkern.train.vlp import VLPConfig

    tasks = {
        "contrastive": ContrastiveConfig,
        "vlp": VLPConfig,
        "prompt": PromptConfig,
        "instruct": InstructConfig,
        "transfer": TransferConfig,
        "cloze": ClozeConfig,
        "native": NativeConfig,
    }
    parser = argparse.ArgumentParser(
        prog="mmkern train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="task", required=True)
    for name, cls in tasks.items():
        p = sub.add_parser(name, help=cls.__module__.rsplit(".", 1)[-1])
        p.add_argument("--config", help="JSON file with config fields")
        if name in ("prompt", "instruct", "transfer", "cloze", "native"):
            p.add_argument("--clip", help="clip.safetensors from `mmkern train contrastive` (default: pretrain one)")
        if name in ("transfer", "cloze"):
            p.add_argument(
                "--cloze-encoder",
                help="cloze_encoder.safetensors from `mmkern demo` / `mmkern train cloze` (default: MLM-pretrain one "
                "on the training split's captions at full contrast)",
            )
        _add_fields(p, cls)
    args = parser.parse_args(argv)
    config = _config(tasks[args.task], args)
    result = _run(args, config)
    print(json.dumps(result, indent=2))
    if config.out_dir:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.out_dir) / "results.json").write_text(json.dumps(result, indent=2))
    return 0


def _run(args, config) -> dict:
    from mmkern.models.checkpoint import save_checkpoint

    if args.task == "contrastive":
        from mmkern.train.contrastive import train_contrastive

        r = train_contrastive(config)
        if config.out_dir:
            save_checkpoint(r["model"], Path(config.out_dir) / "clip.safetensors")
            r["tokenizer"].save(Path(config.out_dir) / "clip_tokenizer.json")
        return r["metrics"]
    if args.task == "vlp":
        from mmkern.train.vlp import train_vlp

        return train_vlp(config)["metrics"]
    clip, tok = _pretrained_clip(args.clip, config.seed, config.progress)
    vis = {k[len("visual.") :]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    if args.task == "instruct":
        from mmkern.data import digits
        from mmkern.train.instruct import train_instruct

        train, test = digits(clip.config.vision.img_size).split(0.2, seed=config.seed)
        r = train_instruct(train, test, config, vis, clip.visual.config)
        if config.out_dir:
            save_checkpoint(r["model"], Path(config.out_dir) / "decoder.safetensors")
        return r["metrics"]
    if args.task == "native":
        from mmkern.data import digits
        from mmkern.train.native import train_native

        train, test = digits(clip.config.vision.img_size).split(0.2, seed=config.seed)
        r = train_native(clip, tok, train, test, _templates(test.classnames), config)
        return {k: v for k, v in r.items() if k != "models"}
    # prompt, cloze, transfer: shots from the training split of config.dataset, top-1 on its held-out split, both
    # faded when config.contrast < 1 (the cloze encoder's MLM pretraining reads the full-contrast training split)
    train, test = config.load(clip.config.vision.img_size, config.seed)
    pool, held_out = config.shift(train), config.shift(test)  # the shots are drawn from pool
    if args.task == "prompt":
        from mmkern.train.prompt import train_prompts

        r = train_prompts(clip, tok, pool, held_out, _templates(train.classnames), config)
        return {k: v for k, v in r.items() if k.endswith("top1")}
    if args.task == "cloze":
        from mmkern.train.cloze import train_cloze

        r = train_cloze(clip, tok, train, held_out, config, shots=pool, encoder=_cloze_encoder(args))
        if config.out_dir:
            save_checkpoint(r["encoder"], Path(config.out_dir) / "cloze_encoder.safetensors")
        return {k: v for k, v in r.items() if k.endswith(("top1", "mlm_acc"))}
    if config.curve:
        return _curve(args, config, clip, tok, train, pool, held_out)
    from mmkern.train.transfer import train_transfer

    r = train_transfer(vis, clip.visual.config, pool, held_out, config)
    return {k: v for k, v in r.items() if k.endswith("top1")}


def _cloze_encoder(args):
    from mmkern.models.checkpoint import load_checkpoint

    return load_checkpoint(args.cloze_encoder).eval() if args.cloze_encoder else None


def _curve(args, config, clip, tok, train, pool, test) -> dict:
    """`mmkern train transfer --curve 1,2,4,8,16`: every few-shot method at each k over config.seeds seeds, the
    probe and fine-tuning with the command's settings; writes OUT_DIR/fewshot.png."""
    from dataclasses import replace

    from mmkern.train.cloze import pretrain_cloze_encoder
    from mmkern.train.fewshot import curve_table, few_shot_curve, method_configs, parse_shots, plot_curve

    prompt, cloze, _ = method_configs()
    shots = parse_shots(config.curve)
    if config.seeds < 1:
        raise ValueError(f"seeds: expected at least 1, got {config.seeds}")
    prompt = replace(prompt, steps=config.prompt_steps, context_length=clip.config.text.context_length)
    cloze = replace(cloze, steps=config.cloze_steps)
    encoder = _cloze_encoder(args)
    if encoder is None:
        cloze = replace(cloze, context_length=clip.config.text.context_length)
        encoder, _ = pretrain_cloze_encoder(
            clip, tok, train, replace(cloze, seed=config.seed, progress=config.progress)
        )
    cloze = replace(cloze, context_length=encoder.config.text.context_length)
    seeds = [config.seed + i for i in range(config.seeds)]
    curve = few_shot_curve(
        clip,
        tok,
        pool,
        test,
        _templates(pool.classnames),
        shots,
        seeds,
        prompt,
        config,
        cloze,
        encoder,
        config.progress,
    )
    print(curve_table(curve), file=sys.stderr, flush=True)  # stdout carries the JSON result
    if config.out_dir:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        plot_curve(curve, Path(config.out_dir) / "fewshot.png", f"{config.dataset}: few-shot transfer")
    top = {f"transfer_{m}_top1": mean[-1] for m, mean in curve["mean"].items()}
    return {**top, "curve": {k: curve[k] for k in ("labels", "shots", "seeds", "mean", "std")}}


def demo_main(argv: list[str] | None = None) -> int:
    from mmkern.train.demo import run_demo

    parser = argparse.ArgumentParser(prog="mmkern demo", description="End-to-end demo on the embedded digits.")
    parser.add_argument("--out", default="mmkern_demo", help="output folder (metrics.json, checkpoints, plots)")
    parser.add_argument("--quick", action="store_true", help="the <= 1 minute version")
    parser.add_argument("--size", choices=["tiny", "quick", "full", "gpu"], help="override the automatic size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ("quick" if args.quick else None)
    run_demo(args.out, size=size, seed=args.seed, progress=not args.no_progress)
    return 0  # a showcase: missed targets are in the printed summary and metrics.json["targets"], not the exit code
