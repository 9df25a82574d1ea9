"""Task 4: visual instruction tuning of a vision-language decoder (LLaVA recipe, arXiv 2304.08485 / 2310.03744):
generated instructions over the embedded images, loss on the response tokens only, packed sequences through
varlen_attention; stage 1 trains the projector alone, stage 2 the projector and the language model. The
vision tower (optionally taken from a pretrained CLIP) stays frozen."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mmkern.data import (
    ImageTextDataset,
    InstructionCollator,
    InstructionDataset,
    WordTokenizer,
    instruction_data,
    instruction_example,
    pad_examples,
)
from mmkern.data.instruct import TASKS
from mmkern.models import VisionLanguageDecoder, VLDecoderConfig, causal_lm_loss
from mmkern.models.text import TextConfig
from mmkern.models.vit import ViTConfig
from mmkern.train.loop import TrainConfig, Trainer, seed_everything


@dataclass
class InstructConfig(TrainConfig):
    steps: int = 150  # stage 2 steps
    stage1_steps: int = 40
    stage1_lr: float = 3e-3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    width: int = 64
    depth: int = 2
    heads: int = 4
    context_length: int = 64
    per_image: int = 3  # instructions generated per training image
    pack: bool = True
    max_new_tokens: int = 8


def build_decoder(vision: ViTConfig, tokenizer: WordTokenizer, c: InstructConfig) -> VisionLanguageDecoder:
    lm = TextConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=c.context_length,
        width=c.width,
        depth=c.depth,
        heads=c.heads,
        pool="none",
    )
    cfg = VLDecoderConfig(
        vision=vision,
        lm=lm,
        projector="mlp2x_gelu",
        image_token_id=tokenizer.img_id,
        vision_layer=-1,
        drop_prefix=False,
    )
    return VisionLanguageDecoder(cfg)


def instruction_loss(model: VisionLanguageDecoder, batch: dict):
    cu = batch.get("cu_seqlens")
    logits = model(batch["input_ids"], batch["images"], batch.get("attention_mask"), cu, batch.get("max_seqlen"))
    return causal_lm_loss(logits, batch["labels"], cu)


@torch.no_grad()
def answer(
    model: VisionLanguageDecoder,
    tokenizer: WordTokenizer,
    images: torch.Tensor,
    instructions: list[str],
    max_new_tokens: int = 8,
    batch_size: int = 128,
) -> list[str]:
    """Greedy answers to one instruction per image."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(instructions), batch_size):
        ex = [instruction_example(tokenizer, model.tokens_per_image, t, None) for t in instructions[i : i + batch_size]]
        b = pad_examples(ex, tokenizer.pad_id, left=True)
        ids = model.generate(
            b["input_ids"].to(device),
            images[i : i + batch_size].to(device),
            b["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_id,
        )
        out += [tokenizer.decode(row[b["input_ids"].shape[1] :]) for row in ids.cpu()]
    return out


def exact_match(model, tokenizer, data: ImageTextDataset, rows: list[dict], max_new_tokens: int = 8) -> dict:
    """Share of rows whose greedy answer equals the response word for word; also per task."""
    images = data.images[torch.tensor([r["image_index"] for r in rows])]
    preds = answer(model, tokenizer, images, [r["instruction"] for r in rows], max_new_tokens)
    hits = [tokenizer.decode(tokenizer.encode(r["response"])) == p for r, p in zip(rows, preds)]
    out = {"instruction_exact_match": sum(hits) / len(hits)}
    for task in sorted({r["task"] for r in rows}):
        h = [x for x, r in zip(hits, rows) if r["task"] == task]
        out[f"em_{task}"] = sum(h) / len(h)
    return out


def train_instruct(
    train: ImageTextDataset,
    test: ImageTextDataset,
    config: InstructConfig,
    vision_state: dict | None = None,
    vision_config: ViTConfig | None = None,
) -> dict:
    """Two-stage instruction tuning; `vision_state` (a VisionTransformer state dict, e.g. a CLIP image tower's)
    initialises the frozen vision tower. -> {"model", "tokenizer", "metrics" (held-out exact match), "history"}."""
    seed_everything(config.seed)
    train_rows = instruction_data(train, config.per_image, seed=config.seed)
    test_rows = instruction_data(test, 1, seed=config.seed + 1)
    texts = [r["instruction"] + " " + r["response"] for r in train_rows + test_rows]
    texts += [p for prompts, _ in TASKS.values() for p in prompts]
    tok = WordTokenizer.from_texts(texts)
    size = train.images.shape[-1]
    vision = vision_config or ViTConfig(
        img_size=size, patch_size=4, width=config.width, depth=config.depth, heads=config.heads
    )
    model = build_decoder(vision, tok, config)
    if vision_state is not None:
        state = {k: v for k, v in vision_state.items() if not k.startswith("head.")}
        model.visual.load_state_dict(state, strict=False)
    for p in model.visual.parameters():
        p.requires_grad_(False)
    data = InstructionDataset(train, train_rows)
    collate = InstructionCollator(tok, model.tokens_per_image, pack=config.pack)
    history = []
    stages = [
        (
            "stage1",
            replace(config, steps=config.stage1_steps, lr=config.stage1_lr, out_dir=_sub(config, "stage1")),
            list(model.projector.parameters()),
        ),
        (
            "stage2",
            replace(config, out_dir=_sub(config, "stage2")),
            list(model.projector.parameters()) + list(model.lm.parameters()) + list(model.lm_head.parameters()),
        ),
    ]
    for name, cfg, params in stages:
        if cfg.steps <= 0:
            continue
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        trainer = Trainer(model, cfg, instruction_loss, parameters=params)
        history += [{"stage": name, **h} for h in trainer.fit(data, collate)]
    metrics = exact_match(model, tok, test, test_rows, config.max_new_tokens)
    return {"model": model, "tokenizer": tok, "metrics": metrics, "history": history, "test_rows": test_rows}


def _sub(config: TrainConfig, name: str) -> str | None:
    return None if config.out_dir is None else f"{config.out_dir}/{name}"
