"""Cloze prompts through the fusion encoder (issue 7, part 1; PET-style prompting of a masked LM): the image and
"a photo of the digit [MASK]." go through the fusion encoder together, the MLM head scores the slot, and the
class is the one whose label word (verbalizer) scores highest. Zero-shot with the pretrained encoder, or
few-shot tuning of the whole model on the same objective. Not done yet: soft prompt vectors around the slot."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkern.data import ImageTextDataset, WordTokenizer
from mmkern.models import FusionEncoder
from mmkern.train.loop import TrainConfig, Trainer


def cloze_inputs(tokenizer: WordTokenizer, template: str, context_length: int = 16):
    """template with "{}" for the slot -> (input_ids (1, L), attention_mask (1, L), slot position)."""
    before, after = template.split("{}")
    row = (tokenizer.encode(before, eos=False) + [tokenizer.mask_id] + tokenizer.encode(after, bos=False))[
        :context_length
    ]
    ids = torch.full((1, context_length), tokenizer.pad_id, dtype=torch.long)
    ids[0, : len(row)] = torch.tensor(row)
    return ids, ids != tokenizer.pad_id, row.index(tokenizer.mask_id)


def verbalizer_ids(tokenizer: WordTokenizer, classnames: list[str]) -> torch.Tensor:
    """Each class's label word ids (C, W) - classes of several words use all of them (scores are averaged)."""
    words = [tokenizer.encode(c, bos=False, eos=False) for c in classnames]
    if any(tokenizer.unk_id in w for w in words):
        raise ValueError("classnames: a label word is not in the tokenizer's vocabulary")
    width = max(len(w) for w in words)
    return torch.tensor([w + [w[-1]] * (width - len(w)) for w in words])


def cloze_logits(
    model: FusionEncoder,
    tokenizer: WordTokenizer,
    images: torch.Tensor,
    classnames: list[str],
    template: str = "a photo of the digit {}.",
    context_length: int = 16,
) -> torch.Tensor:
    """(B, C) class scores: mean MLM log-probability of each class's label words at the slot."""
    ids, mask, slot = cloze_inputs(tokenizer, template, context_length)
    B, device = images.shape[0], images.device
    ids, mask = ids.to(device).expand(B, -1), mask.to(device).expand(B, -1)
    fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(images))
    logp = F.log_softmax(model.mlm_logits(fused[:, slot]).float(), dim=-1)
    return logp[:, verbalizer_ids(tokenizer, classnames).to(device)].mean(-1)


@torch.no_grad()
def cloze_accuracy(
    model, tokenizer, data: ImageTextDataset, template: str = "a photo of the digit {}.", context_length: int = 16
) -> float:
    model.eval()
    device = next(model.parameters()).device
    preds = [
        cloze_logits(model, tokenizer, data.images[i : i + 256].to(device), data.classnames, template, context_length)
        .argmax(1)
        .cpu()
        for i in range(0, len(data), 256)
    ]
    return float((torch.cat(preds) == data.labels).float().mean())


def tune_cloze(
    model: FusionEncoder,
    tokenizer: WordTokenizer,
    shots: ImageTextDataset,
    config: TrainConfig,
    template: str = "a photo of the digit {}.",
    context_length: int = 16,
) -> list[dict]:
    """Few-shot tuning of the whole fusion encoder: cross-entropy over the verbalizer scores at the slot."""

    def loss_fn(m, batch):
        logits = cloze_logits(m, tokenizer, batch["images"], shots.classnames, template, context_length)
        return F.cross_entropy(logits, batch["labels"])

    def collate(items):
        return {
            "images": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items]),
        }

    return Trainer(model, config, loss_fn).fit(shots, collate)
