"""Batching: image-text batches, BERT-style token masking, instruction examples and sequence packing."""

from __future__ import annotations

import torch

from mmkern.data.tokenizer import WordTokenizer

IGNORE_INDEX = -100


class ImageTextCollator:
    """list of dataset items -> {"images" (B, 3, H, W), "input_ids" (B, L), "attention_mask" (B, L) bool,
    "labels" (B,) when the items have labels, "index" (B,)}."""

    def __init__(self, tokenizer: WordTokenizer, context_length: int = 32):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = self.tokenizer([it["caption"] for it in items], self.context_length)
        batch = {
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": ids,
            "attention_mask": mask,
            "index": torch.tensor([it["index"] for it in items]),
        }
        if "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items])
        return batch


def mask_tokens(
    input_ids: torch.Tensor,
    tokenizer: WordTokenizer,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each non-special token is chosen with `prob` (at least one per row); chosen tokens become
    [MASK] 80%, a random word 10%, stay 10%. -> (masked_ids, labels with -100 where not chosen)."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for s in tokenizer.special_ids:
        special |= input_ids == s
    r = torch.rand(input_ids.shape, generator=generator)
    chosen = (r < prob) & ~special
    # Rows where nothing was drawn get their most likely candidate, so every row carries an MLM signal.
    fallback = r.masked_fill(special, 2.0).argmin(dim=1)
    none = ~chosen.any(dim=1) & (~special).any(dim=1)
    chosen[none, fallback[none]] = True
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    how = torch.rand(input_ids.shape, generator=generator)
    first_word = len(tokenizer.special_ids)
    random_words = torch.randint(first_word, tokenizer.vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (how < 0.8), torch.full_like(input_ids, tokenizer.mask_id), input_ids)
    masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_words, masked)
    return masked, labels


def instruction_example(
    tokenizer: WordTokenizer, image_tokens: int, instruction: str, response: str | None
) -> tuple[list[int], list[int]]:
    """[BOS] [IMG]*image_tokens instruction [SEP] response [EOS] -> (ids, labels); labels are -100 everywhere but
    the response and its [EOS] (the loss covers the answer only, as in LLaVA). response=None gives the prompt
    alone (for generation), ending in [SEP]."""
    prompt = [tokenizer.bos_id] + [tokenizer.img_id] * image_tokens
    prompt += tokenizer.encode(instruction, bos=False, eos=False) + [tokenizer.sep_id]
    if response is None:
        return prompt, [IGNORE_INDEX] * len(prompt)
    answer = tokenizer.encode(response, bos=False, eos=True)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int, left: bool = False) -> dict:
    """Right- (training) or left-padded (generation) batch: input_ids, labels, attention_mask, each (B, L)."""
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        sl = slice(L - len(x), L) if left else slice(0, len(x))
        ids[i, sl], labels[i, sl] = torch.tensor(x), torch.tensor(y)
    return {"input_ids": ids, "labels": labels, "attention_mask": ids != pad_id}


def pack_examples(examples: list[tuple[list[int], list[int]]]) -> dict:
    """Concatenates examples into one row without padding: input_ids (1, total), labels (1, total),
    cu_seqlens (num_seqs + 1,) int32 (the offsets varlen_attention takes) and max_seqlen."""
    lengths = torch.tensor([len(ids) for ids, _ in examples])
    cu = torch.zeros(len(examples) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return {
        "input_ids": torch.tensor([t for ids, _ in examples for t in ids]).unsqueeze(0),
        "labels": torch.tensor([t for _, lab in examples for t in lab]).unsqueeze(0),
        "cu_seqlens": cu,
        "max_seqlen": int(lengths.max()),
    }
