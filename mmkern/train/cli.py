"""Command line of the trainer: `mmkern train <task> [--flags | --config file.json]` and `mmkern demo`.

Every field of a task's config dataclass is a flag (`--batch-size 64`, `--precision bf16`, `--no-progress`);
`--config` reads a JSON object of the same fields, and flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    """(clip, tokenizer, train, test) from a checkpoint written by `mmkern train contrastive`, or pretrained now."""
    from mmkern.data import WordTokenizer, digits
    from mmkern.models.checkpoint import load_checkpoint
    from mmkern.train.contrastive import ContrastiveConfig, train_contrastive

    if path:
        clip = load_checkpoint(path)
        tok = WordTokenizer.load(Path(path).with_name("clip_tokenizer.json"))
        train, test = digits(clip.config.vision.img_size).split(0.2, seed=seed)
        return clip, tok, train, test
    r = train_contrastive(ContrastiveConfig(steps=150, batch_size=128, lr=2e-3, seed=seed, progress=progress))
    return r["model"], r["tokenizer"], r["train"], r["test"]


def train_main(argv: list[str] | None = None) -> int:
    from mmkern.train.cloze import ClozeConfig
    from mmkern.train.contrastive import ContrastiveConfig
    from mmkern.train.instruct import InstructConfig
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
    }
    parser = argparse.ArgumentParser(
        prog="mmkern train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="task", required=True)
    for name, cls in tasks.items():
        p = sub.add_parser(name, help=cls.__module__.rsplit(".", 1)[-1])
        p.add_argument("--config", help="JSON file with config fields")
        if name in ("prompt", "instruct", "transfer", "cloze"):
            p.add_argument("--clip", help="clip.safetensors from `mmkern train contrastive` (default: pretrain one)")
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
    clip, tok, train, test = _pretrained_clip(args.clip, config.seed, config.progress)
    if args.task == "prompt":
        from mmkern.train.contrastive import HANDWRITTEN_TEMPLATES
        from mmkern.train.prompt import train_prompts

        r = train_prompts(clip, tok, train, test, HANDWRITTEN_TEMPLATES, config)
        return {k: v for k, v in r.items() if k.endswith("top1")}
    if args.task == "cloze":
        from mmkern.train.cloze import train_cloze

        r = train_cloze(clip, tok, train, test, config)
        if config.out_dir:
            save_checkpoint(r["encoder"], Path(config.out_dir) / "cloze_encoder.safetensors")
        return {k: v for k, v in r.items() if k.endswith(("top1", "mlm_acc"))}
    vis = {k[len("visual.") :]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    if args.task == "instruct":
        from mmkern.train.instruct import train_instruct

        r = train_instruct(train, test, config, vis, clip.visual.config)
        if config.out_dir:
            save_checkpoint(r["model"], Path(config.out_dir) / "decoder.safetensors")
        return r["metrics"]
    from mmkern.train.transfer import train_transfer

    r = train_transfer(vis, clip.visual.config, train, test, config)
    return {k: v for k, v in r.items() if k.endswith("top1")}


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
