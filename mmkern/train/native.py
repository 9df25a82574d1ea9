"""Native-resolution training (NaViT): a pretrained CLIP fine-tuned on images at their own sizes and aspect ratios,
packed without padding into token-budget packs, against the same fine-tuning on the images resized to the size the
CLIP was pretrained at. Zero-shot top-1 is reported per image size, sizes never seen in training included."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mmkern.data import ImageTextDataset, WordTokenizer
from mmkern.data.native import MixedSizeCollator, TokenBudgetSampler, render_digits, resize_all
from mmkern.models import CLIP
from mmkern.train.contrastive import contrastive_loss_fn
from mmkern.train.loop import TrainConfig, Trainer, seed_everything


@dataclass
class NativeConfig(TrainConfig):
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 5
    max_tokens: int = 2048  # tokens per pack: one pack per optimizer step
    train_sizes: str = "8x8,16x16,24x24,32x32,16x32,32x16,8x24,24x8"  # H x W of the rendered canvases
    test_sizes: str = "16x16,16x32,8x24,32x32,20x20,12x36,40x12,24x44"  # the last four never seen in training
    context_length: int = 16
    loss: str = "clip"  # clip | siglip: the pretrained model's loss


def parse_sizes(text: str, name: str) -> list[tuple[int, int]]:
    """ "16x32,8x8" -> [(16, 32), (8, 8)]."""
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"{name}: expected sizes like '16x32,8x8', got {text!r}")
    return sizes


@torch.no_grad()
def zero_shot_by_size(model: CLIP, classifier: torch.Tensor, data: ImageTextDataset, sizes, resize, seed=0) -> dict:
    """{"HxW": top-1} of `data` rendered at each size, fed at that size (resize None) or resized to `resize`."""
    model.eval()
    out = {}
    for h, w in sizes:
        rendered = render_digits(data, [(h, w)], seed)
        feats = []
        for i in range(0, len(rendered), 256):
            chunk = rendered.images[i : i + 256]
            feats.append(model.encode_image(chunk if resize is None else resize_all(chunk, resize), normalize=True))
        pred = (torch.cat(feats).float() @ classifier).argmax(1).cpu()
        out[f"{h}x{w}"] = float((pred == data.labels).float().mean())
    return out


def train_native(
    clip: CLIP,
    tokenizer: WordTokenizer,
    train: ImageTextDataset,
    test: ImageTextDataset,
    templates: list[str],
    config: NativeConfig,
) -> dict:
    """Fine-tunes two copies of `clip` on `train` rendered at config.train_sizes (render_digits), one packed at the
    native sizes (VisionTransformer.forward_packed), one on the images resized to the CLIP's img_size, with the
    same packs of images per step -> {"native_resolution_top1", "native_resolution_resized_top1" ({"HxW": top-1}
    on `test` at config.test_sizes), "native_resolution_unseen" (test sizes not trained on), "models"}."""
    train_sizes = parse_sizes(config.train_sizes, "train_sizes")
    test_sizes = parse_sizes(config.test_sizes, "test_sizes")
    v = clip.visual.config
    side = v.img_size if isinstance(v.img_size, int) else v.img_size[0]
    for h, w in train_sizes + test_sizes:
        if h % v.patch_size or w % v.patch_size:
            raise ValueError(f"train_sizes / test_sizes: {h}x{w} is not a multiple of the patch size {v.patch_size}")
    rendered = render_digits(train, train_sizes, config.seed)
    lengths = rendered.tokens(v.patch_size, clip.visual.num_prefix_tokens)
    device = clip.logit_scale.device
    result = {"models": {}}
    for name, resize in (("native_resolution_top1", None), ("native_resolution_resized_top1", (side, side))):
        seed_everything(config.seed)
        model = copy.deepcopy(clip)
        trainer = Trainer(model, config, contrastive_loss_fn(config.loss))
        sampler = TokenBudgetSampler(lengths, config.max_tokens, config.seed, trainer.rank, trainer.world)
        trainer.fit(rendered, MixedSizeCollator(tokenizer, config.context_length, resize), sampler=sampler)
        # the classifier comes from the fine-tuned text tower
        classifier = model.zero_shot_classifier(
            lambda t: tokenizer(t, config.context_length), test.classnames, templates
        ).to(device)
        result[name] = zero_shot_by_size(model, classifier, test, test_sizes, resize, config.seed)
        result["models"][name] = model
    result["native_resolution_unseen"] = [f"{h}x{w}" for h, w in test_sizes if (h, w) not in train_sizes]
    result["native_resolution_tokens_per_step"] = config.max_tokens
    return result


def native_table(result: dict) -> str:
    """Per test size: zero-shot top-1 fine-tuned packed at native size vs on resized images."""
    rows = [f"{'size':>8} {'native':>7} {'resized':>7}"]
    for size, top1 in result["native_resolution_top1"].items():
        unseen = "  (unseen in training)" if size in result["native_resolution_unseen"] else ""
        rows.append(f"{size:>8} {top1:7.3f} {result['native_resolution_resized_top1'][size]:7.3f}{unseen}")
    return "\n".join(rows)
