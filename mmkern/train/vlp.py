"""Task 2: vision-language pretraining objectives on the fusion encoder (ALBEF arXiv 2107.07651, BLIP
arXiv 2201.12086), alone or as a weighted sum: image-text contrastive (ITC), image-text matching with hard
negatives (ITM), masked language modelling through the fusion layers (MLM), masked-patch prediction (MVM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmkern import ops
from mmkern.data import ImageTextCollator, WordTokenizer, load_dataset, mask_tokens
from mmkern.models import FusionConfig, FusionEncoder, TextConfig, ViTConfig
from mmkern.train.loop import TrainConfig, Trainer, seed_everything


@dataclass
class VLPConfig(TrainConfig):
    dataset: str = "digits"
    image_size: int = 16
    patch_size: int = 4
    width: int = 64
    depth: int = 2  # vision tower
    text_depth: int = 2
    fusion_layer: int = 1  # text layers below are text-only, the rest cross-attend to the image
    heads: int = 4
    context_length: int = 16
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    mvm_weight: float = 0.0
    mask_prob: float = 0.15  # MLM token masking rate
    patch_mask_prob: float = 0.4  # MVM share of patches masked
    held_out: float = 0.2


class VLPModel(nn.Module):
    """FusionEncoder + a learnable ITC temperature + a linear pixel head for masked-patch prediction (SimMIM-style:
    masked patches are zeroed in the input and their pixels regressed from the output tokens)."""

    def __init__(self, encoder: FusionEncoder):
        super().__init__()
        self.encoder = encoder
        v = encoder.config.vision
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07)
        self.pixel_head = nn.Linear(v.width, v.patch_size * v.patch_size * v.in_chans)


def bert_text_config(tokenizer: WordTokenizer, context_length: int, width: int, depth: int, heads: int):
    """The fusion encoder's text side: a BERT-style (post-norm, bidirectional, CLS-pooled) TextConfig."""
    return TextConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=context_length,
        width=width,
        depth=depth,
        heads=heads,
        causal=False,
        norm_first=False,
        embed_norm=True,
        final_norm=False,
        pool="cls",
        eps=1e-12,
    )


def build_vlp_model(tokenizer: WordTokenizer, c: VLPConfig) -> VLPModel:
    vision = ViTConfig(img_size=c.image_size, patch_size=c.patch_size, width=c.width, depth=c.depth, heads=c.heads)
    text = bert_text_config(tokenizer, c.context_length, c.width, c.text_depth, c.heads)
    return VLPModel(
        FusionEncoder(
            FusionConfig(vision=vision, text=text, fusion="cross", fusion_layer=c.fusion_layer, itc_dim=c.width)
        )
    )


def _patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) in row-major patch order, (C, ph, pw) inside a patch."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(sim) among the columns that are not positives
    (`same` marks positives: the diagonal and duplicate captions). Rows without any negative pick themselves."""
    w = torch.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
    empty = w.sum(1) == 0
    w[empty] = 1.0
    return torch.multinomial(w, 1).squeeze(1)


def vlp_loss_fn(tokenizer: WordTokenizer, c: VLPConfig):
    def loss_fn(model: VLPModel, batch: dict):
        enc, ids, mask, images = model.encoder, batch["input_ids"], batch["attention_mask"], batch["images"]
        B = ids.shape[0]
        losses, logs = {}, {}
        # a frozen image tower's tokens may come precomputed with the batch (cloze pretraining caches them)
        image_embeds = batch["image_embeds"] if "image_embeds" in batch else enc.encode_image(images)
        if c.itc_weight or c.itm_weight:  # MLM / MVM alone need neither the unmasked text nor the ITC features
            text_tokens = enc.encode_text(ids, mask)
            img_f, txt_f = enc.image_features(image_embeds), enc.text_features(text_tokens)
            scale = model.logit_scale.exp().clamp(max=100.0)
        if c.itc_weight:
            losses["itc"] = ops.clip_loss(img_f.float(), txt_f.float(), scale.float())
        if c.itm_weight:
            with torch.no_grad():
                same = (ids[:, None, :] == ids[None, :, :]).all(-1)  # identical captions are not negatives
                sim = scale * img_f.float() @ txt_f.float().T
                neg_txt = hard_negatives(sim, same)
                neg_img = hard_negatives(sim.T, same.T)
            text_all = torch.cat([text_tokens, text_tokens[neg_txt], text_tokens])
            mask_all = torch.cat([mask, mask[neg_txt], mask])
            img_all = torch.cat([image_embeds, image_embeds, image_embeds[neg_img]])
            logits = enc.itm_logits(enc.fuse(text_all, mask_all, img_all), img_all)
            labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
            losses["itm"] = F.cross_entropy(logits.float(), labels)
            logs["itm_acc"] = float((logits.argmax(1) == labels).float().mean())
        if c.mlm_weight:
            masked, labels = mask_tokens(ids.cpu(), tokenizer, c.mask_prob)
            masked, labels = masked.to(ids.device), labels.to(ids.device)
            fused = enc.fuse(enc.encode_text(masked, mask), mask, image_embeds)
            logits = enc.mlm_logits(fused)
            losses["mlm"] = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            sel = labels != -100
            logs["mlm_acc"] = float((logits.argmax(-1)[sel] == labels[sel]).float().mean())
        if c.mvm_weight:
            p = enc.config.vision.patch_size
            target = _patchify(images, p)
            hidden = torch.rand(target.shape[:2], device=images.device) < c.patch_mask_prob
            g = images.shape[-1] // p
            pix = hidden.view(B, 1, g, 1, g, 1).expand(-1, images.shape[1], -1, p, -1, p).reshape(images.shape)
            tokens = enc.encode_image(images.masked_fill(pix, 0.0))[:, enc.visual.num_prefix_tokens :]
            err = (model.pixel_head(tokens).float() - target).pow(2).mean(-1)
            losses["mvm"] = (err * hidden).sum() / hidden.sum().clamp(min=1)
        weights = {"itc": c.itc_weight, "itm": c.itm_weight, "mlm": c.mlm_weight, "mvm": c.mvm_weight}
        total = sum(weights[k] * v for k, v in losses.items())
        return total, {**{f"loss_{k}": float(v.detach()) for k, v in losses.items()}, **logs}

    return loss_fn


def train_vlp(config: VLPConfig) -> dict:
    """-> {"model", "tokenizer", "history", "metrics"}; metrics: held-out ITM accuracy on positives vs shuffled."""
    seed_everything(config.seed)
    if not any((config.itc_weight, config.itm_weight, config.mlm_weight, config.mvm_weight)):
        raise ValueError("itc_weight: at least one objective needs a non-zero weight")
    data = load_dataset(config.dataset, config.image_size)
    train, test = data.split(config.held_out, seed=config.seed)
    tokenizer = WordTokenizer.from_texts(data.captions)
    model = build_vlp_model(tokenizer, config)
    trainer = Trainer(model, config, vlp_loss_fn(tokenizer, config))
    history = trainer.fit(train, ImageTextCollator(tokenizer, config.context_length))
    return {
        "model": model,
        "tokenizer": tokenizer,
        "history": history,
        "train": train,
        "test": test,
        "metrics": {k: v for k, v in history[-1].items() if k.startswith(("loss", "itm_acc", "mlm_acc"))},
    }
