"""Image-text datasets that ship with the package (no downloads), and the same API over a user's folder.

Every dataset is an `ImageTextDataset`: images (N, 3, H, W) float32 normalised to [-1, 1], one caption per
image, optional integer labels with class names, and per-image attributes (`meta`) for generating questions.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmkern._extras import train_module

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_CAPTIONS = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {} written by hand.",
    "a small image of a {}.",
    "a scan of the digit {}.",
]
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ["circle", "square", "triangle"]
COUNT_NAMES = ["zero", "one", "two", "three", "four"]


@dataclass
class ImageTextDataset(torch.utils.data.Dataset):
    """images (N, 3, H, W) float32 in [-1, 1]; captions: N strings; labels (N,) int64 or None; classnames;
    meta: N dicts of attributes (digit, colour, shape, count ...). Items are dicts with those fields + index."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None = None
    classnames: list[str] | None = None
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.captions) != len(self.images):
            raise ValueError(f"captions: {len(self.captions)} captions for {len(self.images)} images")
        if not self.meta:
            self.meta = [{} for _ in self.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "caption": self.captions[i], "meta": self.meta[i], "index": i}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def subset(self, indices) -> ImageTextDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTextDataset(
            self.images[idx],
            [self.captions[i] for i in idx.tolist()],
            None if self.labels is None else self.labels[idx],
            self.classnames,
            [self.meta[i] for i in idx.tolist()],
        )

    def split(self, held_out: float = 0.2, seed: int = 0) -> tuple[ImageTextDataset, ImageTextDataset]:
        """Deterministic (train, held-out) split; stratified by label when there are labels."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        if self.labels is None:
            n = round(len(self) * held_out)
            return self.subset(perm[n:].sort().values), self.subset(perm[:n].sort().values)
        test = []
        for c in self.labels.unique().tolist():
            members = perm[self.labels[perm] == c]
            test.append(members[: round(len(members) * held_out)])
        test_idx = torch.cat(test).sort().values
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[test_idx] = False
        return self.subset(keep.nonzero().squeeze(1)), self.subset(test_idx)

    def few_shot(self, shots: int, seed: int = 0) -> ImageTextDataset:
        """`shots` images per class, drawn deterministically."""
        return self.take_few_shot(shots, seed)[0]

    def take_few_shot(self, shots: int, seed: int = 0) -> tuple[ImageTextDataset, ImageTextDataset]:
        """(`shots` images per class drawn deterministically, the rest): so that few-shot examples can be kept
        out of pretraining."""
        if self.labels is None:
            raise ValueError("few_shot: the dataset has no labels")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        idx = torch.cat([perm[self.labels[perm] == c][:shots] for c in self.labels.unique().tolist()]).sort().values
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[idx] = False
        return self.subset(idx), self.subset(keep.nonzero().squeeze(1))

    def split_shots(self, shots: int, val_fraction: float, seed: int = 0):
        """`shots` labelled images per class -> (fit set, validation set or None): val_fraction of each class's
        shots is held out, for picking the best step of few-shot tuning."""
        picked = self.few_shot(shots, seed=seed)
        n_val = round(shots * val_fraction) if shots > 1 else 0
        if not n_val:
            return picked, None
        is_val = torch.zeros(len(picked), dtype=torch.bool)
        for c in picked.labels.unique().tolist():
            is_val[(picked.labels == c).nonzero().flatten()[:n_val]] = True  # few_shot drew them at random
        return picked.subset((~is_val).nonzero().flatten()), picked.subset(is_val.nonzero().flatten())


def _normalise(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> (N, 3, image_size, image_size) in [-1, 1]."""
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def digits(image_size: int = 16) -> ImageTextDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled bilinearly to image_size, with
    captions from DIGIT_CAPTIONS (the template cycles with the index) and labels 0..9."""
    d = train_module("sklearn.datasets").load_digits()
    images = _normalise(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, image_size)
    labels = torch.tensor(d.target, dtype=torch.long)
    captions = [DIGIT_CAPTIONS[i % len(DIGIT_CAPTIONS)].format(DIGIT_NAMES[y]) for i, y in enumerate(d.target)]
    meta = [
        {
            "digit": DIGIT_NAMES[y],
            "parity": "even" if y % 2 == 0 else "odd",
            "describe": f"a handwritten {DIGIT_NAMES[y]}.",
        }
        for y in d.target
    ]
    return ImageTextDataset(images, captions, labels, list(DIGIT_NAMES), meta)


def faded(data: ImageTextDataset, contrast: float) -> ImageTextDataset:
    """The same images, captions and labels with every pixel's intensity (in [0, 1]) scaled by `contrast` toward
    black: on the digits, faint strokes on the dark background. A CLIP pretrained on the full-contrast images has
    never seen such input, which makes it the few-shot demo's downstream task (contrast 0.4: zero-shot top-1
    falls from ~0.95 to ~0.45 while the frozen image features still separate the classes)."""
    if not 0 < contrast <= 1:
        raise ValueError(f"contrast: expected a value in (0, 1], got {contrast}")
    # images are stored in [-1, 1]: v01 -> contrast * v01 is x -> contrast * (x + 1) - 1
    images = (data.images + 1) * contrast - 1
    return ImageTextDataset(images, list(data.captions), data.labels, data.classnames, list(data.meta))


@dataclass
class TaskData:
    """Where a few-shot task's labelled images come from (the fields `mmkern train prompt / cloze / transfer` read).
    dataset: "digits" or a folder of images whose captions.jsonl / .csv rows have a `label`; held_out: the share of
    each class kept out of tuning for the reported top-1; contrast < 1 fades every image (see faded): 0.4 is the
    demo's shifted task."""

    dataset: str = "digits"
    held_out: float = 0.2
    contrast: float = 1.0

    def load(self, image_size: int, seed: int = 0) -> tuple[ImageTextDataset, ImageTextDataset]:
        """-> (train, test) split per class with `seed`, at full contrast (shift() applies the contrast)."""
        data = load_dataset(self.dataset, image_size)
        if data.labels is None:
            raise ValueError(f"dataset: {self.dataset} has no labels (give each captions row a 'label' field)")
        return data.split(self.held_out, seed=seed)

    def shift(self, data: ImageTextDataset) -> ImageTextDataset:
        return data if self.contrast == 1 else faded(data, self.contrast)


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, color) -> None:
    size = canvas.shape[0]
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
    else:  # upward triangle: below the apex lines, above the base
        inside = (y <= cy + r * 0.8) & ((y - (cy - r)) >= 1.1 * np.abs(x - cx))
    canvas[inside] = color


def shapes(num_images: int = 1000, image_size: int = 32, max_count: int = 3, seed: int = 0) -> ImageTextDataset:
    """Procedural images: 1..max_count copies of one coloured shape on a dark background, on a jittered grid.
    Caption "two red circles."; label = shape index; meta has shape, color, count and position (for one shape:
    left/right/top/bottom half it sits in)."""
    rng = np.random.default_rng(seed)
    cells = 3 if max_count > 1 else 1
    cell = image_size / cells
    images = np.zeros((num_images, image_size, image_size, 3), dtype=np.float32)
    captions, labels, meta = [], [], []
    for n in range(num_images):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        count = int(rng.integers(1, max_count + 1))
        images[n] = 0.08
        slots = rng.choice(cells * cells, size=count, replace=False)
        for s in slots:
            cx = (s % cells + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            cy = (s // cells + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            _draw(images[n], shape, cx, cy, cell * rng.uniform(0.32, 0.42), COLORS[color])
        cx = (slots[0] % cells + 0.5) * cell
        position = "left" if cx < image_size / 2 - 1 else "right" if cx > image_size / 2 + 1 else "middle"
        word = shape + ("s" if count > 1 else "")
        count_word = "a" if count == 1 else COUNT_NAMES[count]
        captions.append(f"{count_word} {color} {word}.")
        labels.append(SHAPES.index(shape))
        meta.append(
            {
                "shape": shape,
                "color": color,
                "count": COUNT_NAMES[count],
                "position": position,
                "describe": captions[-1],
            }
        )
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    return ImageTextDataset(_normalise(tensor, image_size), captions, torch.tensor(labels), list(SHAPES), meta)


def from_folder(root: str | os.PathLike, captions_file: str | None = None, image_size: int = 32) -> ImageTextDataset:
    """A user's image-text pairs: `root` holds the images and a captions file (default: the one
    captions.jsonl or captions.csv in root). JSONL lines / CSV rows have `image` (a path relative to root),
    `caption` and optionally `label` (a class name). Images are resized to image_size x image_size."""
    from PIL import Image

    root = Path(root)
    if captions_file is None:
        found = [p for p in (root / "captions.jsonl", root / "captions.csv") if p.exists()]
        if not found:
            raise ValueError(f"root: no captions.jsonl or captions.csv in {root}")
        path = found[0]
    else:
        path = root / captions_file
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"captions_file: expected .jsonl or .csv, got {path.name}")
    if not rows or not {"image", "caption"} <= set(rows[0]):
        raise ValueError(f"captions_file: {path} needs 'image' and 'caption' fields")
    images = []
    for row in rows:
        with Image.open(root / row["image"]) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    labels = classnames = None
    if all(row.get("label") not in (None, "") for row in rows):
        classnames = sorted({str(row["label"]) for row in rows})
        labels = torch.tensor([classnames.index(str(row["label"])) for row in rows])
    meta = [{k: v for k, v in row.items() if k not in ("image", "caption")} for row in rows]
    return ImageTextDataset(
        _normalise(torch.stack(images), image_size), [r["caption"] for r in rows], labels, classnames, meta
    )


def load_dataset(name: str, image_size: int, **kwargs) -> ImageTextDataset:
    """ "digits", "shapes", or a folder path (see from_folder)."""
    if name == "digits":
        return digits(image_size)
    if name == "shapes":
        return shapes(image_size=image_size, **kwargs)
    if os.path.isdir(name):
        return from_folder(name, image_size=image_size)
    raise ValueError(f"dataset: expected 'digits', 'shapes' or a folder of images + captions, got {name!r}")
