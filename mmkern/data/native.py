"""Images at their own sizes (NaViT): a dataset of differently sized images, the sampler that fills token-budget
packs, the collator that keeps the images as a list, and the digits rendered at several sizes and aspect ratios."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmkern.data.datasets import ImageTextDataset


@dataclass
class MixedSizeDataset(torch.utils.data.Dataset):
    """images: N tensors (C, H_i, W_i) of any sizes; captions, labels, classnames as ImageTextDataset. Items are dicts
    with image, caption, index (and label)."""

    images: list[torch.Tensor]
    captions: list[str]
    labels: torch.Tensor | None = None
    classnames: list[str] | None = None

    def __post_init__(self):
        if len(self.captions) != len(self.images):
            raise ValueError(f"captions: {len(self.captions)} captions for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "caption": self.captions[i], "index": i}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def tokens(self, patch: int, num_prefix: int = 1) -> list[int]:
        """Each image's sequence length in a ViT with that patch size and prefix-token count."""
        return [num_prefix + (im.shape[1] // patch) * (im.shape[2] // patch) for im in self.images]


def render_digits(data: ImageTextDataset, sizes: list[tuple[int, int]], seed: int = 0) -> MixedSizeDataset:
    """Each digit drawn on a black canvas of a size taken in turn from `sizes` (H, W): scaled, aspect kept, to the
    canvas's shorter side and put at a random place along the longer one, as a word sits in a line of text. A
    resize of the canvas to a square squeezes the digit; the canvas at its own size keeps it whole."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i, image in enumerate(data.images):
        H, W = sizes[i % len(sizes)]
        side = min(H, W)
        digit = F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
        canvas = image.new_full((image.shape[0], H, W), -1.0)  # [-1, 1] images: black
        y = int(torch.randint(0, H - side + 1, (1,), generator=gen))
        x = int(torch.randint(0, W - side + 1, (1,), generator=gen))
        canvas[:, y : y + side, x : x + side] = digit
        images.append(canvas)
    return MixedSizeDataset(images, list(data.captions), data.labels, data.classnames)


class TokenBudgetSampler:
    """Packs of dataset indices whose sequence lengths sum to at most `max_tokens` (NaViT's packing): each epoch a
    seeded permutation is cut into packs greedily, each pack taking, in permutation order, every remaining image that
    still fits. The state (epoch, position) is the data position a checkpoint stores; with several processes each
    takes every world-th pack. Same interface as the trainer's BatchSampler."""

    def __init__(self, lengths: list[int], max_tokens: int, seed: int = 0, rank: int = 0, world: int = 1):
        if not lengths:
            raise ValueError("lengths: the dataset is empty")
        if max(lengths) > max_tokens:
            raise ValueError(f"max_tokens: {max_tokens} is below the longest sequence ({max(lengths)} tokens)")
        self.lengths, self.max_tokens, self.seed, self.rank, self.world = list(lengths), max_tokens, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._packs: list[list[int]] | None = None

    def packs(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        packs = []
        while perm:
            pack, room, rest = [], self.max_tokens, []
            for i in perm:
                if self.lengths[i] <= room:
                    pack.append(i)
                    room -= self.lengths[i]
                else:
                    rest.append(i)
            packs.append(pack)
            perm = rest
        return packs

    def next(self) -> list[int]:
        if self._packs is None:
            self._packs = self.packs(self.epoch)
        if (self.pos + 1) * self.world > len(self._packs):  # drop the ragged tail: every process gets a pack
            self.epoch, self.pos = self.epoch + 1, 0
            self._packs = self.packs(self.epoch)
        pack = self._packs[self.pos * self.world + self.rank]
        self.pos += 1
        return pack

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._packs = state["epoch"], state["pos"], None


class MixedSizeCollator:
    """list of items -> {"images": list of (C, H_i, W_i), "input_ids", "attention_mask", "index" (and "labels")}; with
    `resize` (H, W) the images are resized to it and stacked instead (the fixed-size baseline)."""

    def __init__(self, tokenizer, context_length: int = 32, resize: tuple[int, int] | None = None):
        self.tokenizer, self.context_length, self.resize = tokenizer, context_length, resize

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = self.tokenizer([it["caption"] for it in items], self.context_length)
        images = [it["image"] for it in items]
        if self.resize is not None:
            images = resize_all(images, self.resize)
        batch = {"images": images, "input_ids": ids, "attention_mask": mask}
        batch["index"] = torch.tensor([it["index"] for it in items])
        if "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items])
        return batch


def resize_all(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Every image resized (bilinear, antialiased) to `size` and stacked: (N, C, H, W)."""
    return torch.cat(
        [F.interpolate(im[None], size=size, mode="bilinear", antialias=True, align_corners=False) for im in images]
    )
