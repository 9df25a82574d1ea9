"""Generated instruction data over the embedded images: templates of questions whose answers follow from an
image's attributes (digit, parity, colour, shape, count, position)."""

from __future__ import annotations

import random

import torch

from mmkern.data.collate import instruction_example, pack_examples, pad_examples
from mmkern.data.datasets import ImageTextDataset
from mmkern.data.tokenizer import WordTokenizer

# attribute -> (instruction templates, response template); {} is the attribute's value.
TASKS = {
    "digit": (["what digit is this?", "which number is written here?", "name the digit."], "{}"),
    "parity": (["is the digit even or odd?", "odd or even?"], "{}"),
    "describe": (["describe the image.", "what is in the picture?"], "{}"),
    "shape": (["what shape is shown?", "which shape do you see?"], "{}"),
    "color": (["what colour are the shapes?", "which colour is it?"], "{}"),
    "count": (["how many shapes are there?", "count the shapes."], "{}"),
    "position": (["where is the first shape?", "on which side is the first shape?"], "{}"),
}


def instruction_data(dataset: ImageTextDataset, per_image: int = 2, seed: int = 0) -> list[dict]:
    """-> list of {"image_index", "task", "instruction", "response"}: `per_image` tasks per image, each with a
    randomly chosen template (deterministic in seed)."""
    rng = random.Random(seed)
    rows = []
    for i, meta in enumerate(dataset.meta):
        tasks = [t for t in TASKS if t in meta]
        for task in rng.sample(tasks, min(per_image, len(tasks))):
            prompts, response = TASKS[task]
            rows.append(
                {
                    "image_index": i,
                    "task": task,
                    "instruction": rng.choice(prompts),
                    "response": response.format(meta[task]),
                }
            )
    return rows


class InstructionDataset(torch.utils.data.Dataset):
    """Rows of instruction_data over an ImageTextDataset -> items {"image", "instruction", "response", "task",
    "index"}."""

    def __init__(self, images: ImageTextDataset, rows: list[dict]):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return {"image": self.images.images[r["image_index"]], **r, "index": i}


class InstructionCollator:
    """Items -> a training batch: "images" (B, 3, H, W) and either one packed row (pack=True: input_ids and
    labels (1, total), cu_seqlens, max_seqlen; run through varlen_attention) or right-padded rows."""

    def __init__(self, tokenizer: WordTokenizer, image_tokens: int, pack: bool = True):
        self.tokenizer, self.image_tokens, self.pack = tokenizer, image_tokens, pack

    def __call__(self, items: list[dict]) -> dict:
        examples = [
            instruction_example(self.tokenizer, self.image_tokens, it["instruction"], it["response"]) for it in items
        ]
        batch = pack_examples(examples) if self.pack else pad_examples(examples, self.tokenizer.pad_id)
        batch["images"] = torch.stack([it["image"] for it in items])
        return batch
