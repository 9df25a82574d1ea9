"""Task 1: contrastive image-text pretraining (CLIP or SigLIP loss, learnable scale), with GradCache-style
gradient accumulation that keeps the negatives of the whole step, and zero-shot / retrieval evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkern.data import ImageTextCollator, ImageTextDataset, WordTokenizer, load_dataset
from mmkern.models import CLIP, CLIPConfig, TextConfig, ViTConfig
from mmkern.nn import ClipLoss, SigLipLoss
from mmkern.train.loop import TrainConfig, Trainer, seed_everything

HANDWRITTEN_TEMPLATES = ["a photo of the digit {}.", "a handwritten {}."]


@dataclass
class ContrastiveConfig(TrainConfig):
    dataset: str = "digits"  # digits | shapes | a folder with images + captions.jsonl / .csv
    image_size: int = 16
    patch_size: int = 4
    width: int = 64
    depth: int = 2
    heads: int = 4
    text_width: int = 64
    text_depth: int = 2
    embed_dim: int = 64
    context_length: int = 16
    loss: str = "clip"  # clip | siglip
    held_out: float = 0.2
    grad_cache: bool = True  # with accum_steps > 1: one loss over the whole step's negatives


def small_clip(tokenizer: WordTokenizer, c: ContrastiveConfig) -> CLIP:
    """A CLIP sized by the config, with the tokenizer's vocabulary; the text tower pools on [EOS]."""
    vision = ViTConfig(img_size=c.image_size, patch_size=c.patch_size, width=c.width, depth=c.depth, heads=c.heads)
    text = TextConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=c.context_length,
        width=c.text_width,
        depth=c.text_depth,
        heads=c.heads,
        eot_token_id=tokenizer.eos_id,
    )
    bias = -10.0 if c.loss == "siglip" else None
    init_scale = 2.3 if c.loss == "siglip" else None  # SigLIP's log(10)
    cfg = CLIPConfig(embed_dim=c.embed_dim, vision=vision, text=text, init_logit_bias=bias)
    if init_scale is not None:
        cfg.init_logit_scale = init_scale
    return CLIP(cfg)


def contrastive_loss_fn(kind: str):
    """loss_fn(model, batch) for the trainer; ClipLoss / SigLipLoss span all processes under torch.distributed."""
    if kind not in ("clip", "siglip"):
        raise ValueError(f"loss: expected clip or siglip, got {kind!r}")
    module = ClipLoss() if kind == "clip" else SigLipLoss()

    def features(model, batch):
        return model(batch["images"], batch["input_ids"], batch["attention_mask"])

    def pool_loss(img, txt, scale, bias):
        img, txt, scale = img.float(), txt.float(), scale.float()
        return module(img, txt, scale) if bias is None else module(img, txt, scale, bias.float())

    def loss_fn(model, batch):
        img, txt, scale, bias = features(model, batch)
        return pool_loss(img, txt, scale, bias), {"logit_scale": float(scale.detach())}

    loss_fn.features, loss_fn.pool_loss = features, pool_loss
    return loss_fn


def grad_cache_step(loss_fn):
    """step_fn for the trainer (GradCache, arXiv 2101.06983; open_clip --accum-freq): 1. embed every micro-batch
    without a graph; 2. one loss over all features, backward to the features (and scale / bias) only;
    3. re-embed each micro-batch with a graph and backpropagate the cached feature gradients. Gradients equal
    those of one big batch, at the activation memory of one micro-batch. RNG states are replayed so that
    stochastic layers draw the same masks in both passes."""

    def step(trainer: Trainer, micro: list[dict]) -> dict:
        states, cached = [], []
        with torch.no_grad():
            for mb in micro:
                states.append(torch.get_rng_state())
                cached.append(trainer.forward(loss_fn.features, mb))
        after = torch.get_rng_state()
        img_all = torch.cat([c[0] for c in cached]).float().requires_grad_()
        txt_all = torch.cat([c[1] for c in cached]).float().requires_grad_()
        # detached copies: the model returns logit_bias itself, whose .grad must not collect this backward
        scale_leaf = cached[0][2].detach().float().clone().requires_grad_()
        bias_leaf = None if cached[0][3] is None else cached[0][3].detach().float().clone().requires_grad_()
        loss = loss_fn.pool_loss(img_all, txt_all, scale_leaf, bias_leaf)
        trainer.backward(loss)
        sizes = [c[0].shape[0] for c in cached]
        g_img, g_txt = img_all.grad.split(sizes), txt_all.grad.split(sizes)
        g_scale = scale_leaf.grad
        g_bias = None if bias_leaf is None else bias_leaf.grad
        k = len(micro)
        for i, mb in enumerate(micro):
            torch.set_rng_state(states[i])
            with trainer.no_sync(i == k - 1):
                img, txt, scale, b = trainer.forward(loss_fn.features, mb)
                # scale / bias enter every re-forward with 1/k of their gradient, so DDP sees them used.
                surrogate = (img.float() * g_img[i]).sum() + (txt.float() * g_txt[i]).sum()
                surrogate = surrogate + (scale.float() * g_scale).sum() / k
                if b is not None:
                    surrogate = surrogate + (b.float() * g_bias).sum() / k
                surrogate.backward()  # the cached gradients already carry the GradScaler factor
        torch.set_rng_state(after)
        return {"loss": float(loss.detach()), "logit_scale": float(scale_leaf.detach())}

    return step


@torch.no_grad()
def evaluate_clip(
    model: CLIP, tokenizer: WordTokenizer, data: ImageTextDataset, templates: list[str], context_length: int
) -> dict:
    """zero_shot_top1: argmax over the classes of the template-averaged text classifier, on `data`.
    retrieval_r1: image->text R@1 over the distinct captions of `data`; a caption counts as a hit when it is a
    caption of that image's class (every digit image shares its class's captions, as COCO images have 5)."""
    model.eval()
    device = model.logit_scale.device
    out = {}
    images = data.images.to(device)
    feats = torch.cat(
        [model.encode_image(images[i : i + 512], normalize=True).float() for i in range(0, len(images), 512)]
    )
    if data.labels is not None and data.classnames:
        clf = model.zero_shot_classifier(lambda t: tokenizer(t, context_length), data.classnames, templates)
        out["zero_shot_top1"] = float(((feats @ clf.to(device)).argmax(1).cpu() == data.labels).float().mean())
    gallery = sorted(set(data.captions))
    ids, mask = tokenizer(gallery, context_length)
    txt = model.encode_text(ids.to(device), mask.to(device), normalize=True).float()
    top = (feats @ txt.T).argmax(1).cpu()
    if data.labels is not None:
        cls_of = {c: int(y) for c, y in zip(data.captions, data.labels)}
        hits = [cls_of[gallery[t]] == int(y) for t, y in zip(top.tolist(), data.labels)]
    else:
        hits = [gallery[t] == c for t, c in zip(top.tolist(), data.captions)]
    out["retrieval_r1"] = sum(hits) / len(hits)
    return out


def train_contrastive(config: ContrastiveConfig, dataset: ImageTextDataset | None = None) -> dict:
    """Pretrains a small CLIP / SigLIP on the configured dataset -> {"model", "tokenizer", "train", "test",
    "history", "metrics"} (metrics: held-out zero_shot_top1 and retrieval_r1)."""
    seed_everything(config.seed)
    data = dataset or load_dataset(config.dataset, config.image_size)
    train, test = data.split(config.held_out, seed=config.seed)
    tokenizer = WordTokenizer.from_texts(
        data.captions + [t.format(c) for t in HANDWRITTEN_TEMPLATES for c in (data.classnames or [])]
    )
    model = small_clip(tokenizer, config)
    loss_fn = contrastive_loss_fn(config.loss)
    if config.accum_steps > 1 and config.grad_cache:
        trainer = Trainer(model, config, step_fn=grad_cache_step(loss_fn))
    else:
        trainer = Trainer(model, config, loss_fn)
    templates = HANDWRITTEN_TEMPLATES if data.classnames == _digit_names() else ["{}."]

    def eval_fn(m):
        return evaluate_clip(m, tokenizer, test, templates, config.context_length)

    history = trainer.fit(train, ImageTextCollator(tokenizer, config.context_length), eval_fn)
    metrics = {k: v for k, v in history[-1].items() if k in ("zero_shot_top1", "retrieval_r1")}
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train": train,
        "test": test,
        "history": history,
        "metrics": metrics,
        "trainer": trainer,
    }


def _digit_names():
    from mmkern.data.datasets import DIGIT_NAMES

    return DIGIT_NAMES
