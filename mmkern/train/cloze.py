"""Cloze prompts through the fusion encoder (issue 7, part 1; PET arXiv 2001.07676, P-tuning arXiv 2103.10385):
the image and "a photo of the digit [MASK]." go through the fusion encoder together, the MLM head scores the
slot, and the class is the one whose label words (the verbalizer) score highest.

1. pretrain_cloze_encoder: a fusion encoder whose image tower is the pretrained CLIP's, trained with masked
   language modelling on the image captions (mmkern.train.vlp's MLM objective), so the MLM head learns to fill a
   caption's class word from the image;
2. zero-shot: cloze_accuracy with a hand-written template;
3. few-shot: tune_cloze with tune="soft" trains only a few prompt vectors around the slot (encoder frozen), with
   tune="whole" every weight of the encoder, both on cross-entropy over the verbalizer scores. verbalizer="learned"
   also tunes one output vector per class (WARP, arXiv 2101.00121): a few prompt vectors shared by every class can
   undo a shift only as a whole (on faint digits they fit 10 shots no better than 100), the class vectors add what
   grows with the shots.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.data import ImageTextCollator, ImageTextDataset, TaskData, WordTokenizer
from mmkern.models import CLIP, FusionConfig, FusionEncoder
from mmkern.train.loop import KeepBest, TrainConfig, Trainer, seed_everything
from mmkern.train.vlp import VLPConfig, VLPModel, bert_text_config, vlp_loss_fn


@dataclass
class ClozeConfig(TrainConfig, TaskData):  # TaskData: the images `mmkern train` uses
    """steps / lr / batch_size / ... are those of the few-shot tuning; pretrain_* those of the MLM pretraining."""

    steps: int = 60
    batch_size: int = 32
    lr: float = 3e-2  # soft prompt vectors
    whole_lr: float = 1e-4  # tune="whole"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    template: str = "a photo of the digit {}."
    context_length: int = 16
    tune: str = "soft"  # soft: prompt vectors around the slot, encoder frozen | whole: every encoder weight | both
    shots: int = 16  # labelled images per class
    n_before: int = 2  # soft prompt vectors right before the slot
    n_after: int = 1  # and right after it
    prompt_init: str = "words"  # words: the template's words next to the slot become the vectors | random
    verbalizer: str = "words"  # words: the label words' MLM scores | learned: + a tuned output vector per class
    val_fraction: float = 0.25  # of the shots per class, held out to pick the best step (step 0 included)
    eval_every: int = 5
    pretrain_steps: int = 150
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    text_depth: int = 2
    fusion_layer: int = 1  # text layers below are text-only, the rest cross-attend to the image tokens
    mask_prob: float = 0.3  # MLM masking rate of the pretraining
    freeze_vision: bool = True  # keep the CLIP image tower fixed (its tokens are then computed once)


# ---- templates and verbalizer -----------------------------------------------------------------------------------
def split_template(template: str) -> tuple[str, str]:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template: expected one '{{}}' for the [MASK] slot, got {template!r}")
    before, after = template.split("{}")
    return before, after


def _encode_known(tokenizer: WordTokenizer, text: str, name: str, **kwargs) -> list[int]:
    ids = tokenizer.encode(text, **kwargs)
    if tokenizer.unk_id in ids:
        raise ValueError(f"{name}: {text!r} has words that are not in the tokenizer's vocabulary")
    return ids


def template_parts(tokenizer: WordTokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids before the slot ([BOS] first) and after it ([EOS] last)."""
    before, after = split_template(template)
    return (
        _encode_known(tokenizer, before, "template", eos=False),
        _encode_known(tokenizer, after, "template", bos=False),
    )


def cloze_inputs(tokenizer: WordTokenizer, template: str, context_length: int = 16):
    """template with "{}" for the slot -> (input_ids (1, L) int64, attention_mask (1, L) bool, slot position)."""
    before, after = template_parts(tokenizer, template)
    row = before + [tokenizer.mask_id] + after
    if len(row) > context_length:
        raise ValueError(f"context_length: the template needs {len(row)} tokens, got {context_length}")
    ids = torch.full((1, context_length), tokenizer.pad_id, dtype=torch.long)
    ids[0, : len(row)] = torch.tensor(row)
    return ids, ids != tokenizer.pad_id, len(before)


def verbalizer_ids(tokenizer: WordTokenizer, classnames: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's label words -> (ids (C, W) int64, weights (C, W) float32): a class of k words has weight 1/k on
    each of them and 0 on the padding, so its score is the mean over its own words."""
    words = [_encode_known(tokenizer, c, "classnames", bos=False, eos=False) for c in classnames]
    if any(not w for w in words):
        raise ValueError("classnames: every class needs at least one label word")
    width = max(len(w) for w in words)
    ids = torch.tensor([w + [w[0]] * (width - len(w)) for w in words])
    weights = torch.tensor([[1 / len(w)] * len(w) + [0.0] * (width - len(w)) for w in words])
    return ids, weights


def slot_scores(encoder: FusionEncoder, fused_slot: torch.Tensor, verbalizer: tuple[torch.Tensor, torch.Tensor]):
    """fused_slot (B, D): the fused [MASK] token -> (B, C) mean MLM log-probability of each class's label words."""
    ids, weights = (t.to(fused_slot.device) for t in verbalizer)
    logp = F.log_softmax(encoder.mlm_logits(fused_slot).float(), dim=-1)
    return (logp[:, ids] * weights).sum(-1)


def cloze_logits(
    model: FusionEncoder,
    tokenizer: WordTokenizer,
    images: torch.Tensor,
    classnames: list[str],
    template: str = "a photo of the digit {}.",
    context_length: int = 16,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """images (B, 3, H, W) (or their image tokens `image_embeds` (B, 1 + N, Dv)) -> (B, C) class scores."""
    ids, mask, slot = cloze_inputs(tokenizer, template, context_length)
    embeds = model.encode_image(images) if image_embeds is None else image_embeds
    B, device = embeds.shape[0], embeds.device
    ids, mask = ids.to(device).expand(B, -1), mask.to(device).expand(B, -1)
    fused = model.fuse(model.encode_text(ids, mask), mask, embeds)
    return slot_scores(model, fused[:, slot], verbalizer_ids(tokenizer, classnames))


# ---- soft prompts ------------------------------------------------------------------------------------------------
class ClozePrompt(nn.Module):
    """Learnable vectors around the slot; with the defaults "[BOS] a photo of P1 P2 [MASK] Q1 [EOS]".

    init="words": the template's n_before words before the slot and n_after words after it are replaced by
    vectors initialised to their token embeddings, so at step 0 the scores equal those of the hand-written
    template. init="random": n_before + n_after new vectors (N(0, 0.02^2)) are inserted next to the slot.
    The vectors stand in for token embeddings: position embeddings and the embedding LayerNorm still apply.
    verbalizer="learned": the class scores come from `label_weight` (C, D) and `label_bias` (C,), which start as the
    mean of each class's label-word rows of the MLM decoder, so they first differ from the "words" scores by the
    same log-normaliser in every class (same ranking, same loss); then they are tuned with the prompt vectors.
    The encoder inside is frozen (requires_grad False) and stays in eval mode.
    forward(image_embeds (B, 1 + N, Dv)) -> (B, C) class scores.
    """

    def __init__(
        self,
        encoder: FusionEncoder,
        tokenizer: WordTokenizer,
        classnames: list[str],
        template: str = "a photo of the digit {}.",
        n_before: int = 2,
        n_after: int = 1,
        init: str = "words",
        verbalizer: str = "words",
    ):
        super().__init__()
        if init not in ("words", "random"):
            raise ValueError(f"init: expected 'words' or 'random', got {init!r}")
        if verbalizer not in ("words", "learned"):
            raise ValueError(f"verbalizer: expected 'words' or 'learned', got {verbalizer!r}")
        if n_before < 0 or n_after < 0 or n_before + n_after == 0:
            raise ValueError(f"n_before: expected n_before, n_after >= 0 with a sum >= 1, got {n_before}, {n_after}")
        self.encoder = encoder.eval().requires_grad_(False)
        before, after = template_parts(tokenizer, template)
        emb = encoder.text.token_embedding.weight.detach()
        if init == "words":
            if n_before > len(before) - 1:  # [BOS] stays a token
                raise ValueError(f"n_before: the template has {len(before) - 1} words before the slot, got {n_before}")
            if n_after > len(after) - 1:  # and so does [EOS]
                raise ValueError(f"n_after: the template has {len(after) - 1} words after the slot, got {n_after}")
            vb, va = emb[before[len(before) - n_before :]].clone(), emb[after[:n_after]].clone()
            before, after = before[: len(before) - n_before], after[n_after:]
        else:
            vb, va = (torch.randn(n, emb.shape[1], device=emb.device) * 0.02 for n in (n_before, n_after))
        self.before, self.after = nn.Parameter(vb), nn.Parameter(va)
        row = before + [tokenizer.unk_id] * n_before + [tokenizer.mask_id] + [tokenizer.unk_id] * n_after + after
        if len(row) > encoder.config.text.context_length:
            raise ValueError(
                f"n_before: the prompt needs {len(row)} tokens, the encoder takes at most "
                f"{encoder.config.text.context_length}"
            )
        self.start, self.slot = len(before), len(before) + n_before  # first soft vector; the [MASK]
        self.register_buffer("ids", torch.tensor([row], device=emb.device), persistent=False)
        self.verbalizer = verbalizer_ids(tokenizer, classnames)
        self.label_weight = self.label_bias = None
        if verbalizer == "learned":
            ids, weights = (t.to(emb.device) for t in self.verbalizer)
            dec = encoder.mlm_head.decoder
            self.label_weight = nn.Parameter((dec.weight.detach()[ids] * weights[..., None]).sum(1))
            self.label_bias = nn.Parameter((dec.bias.detach()[ids] * weights).sum(1))

    def prompt_parameters(self) -> list[nn.Parameter]:
        """What few-shot tuning trains: the prompt vectors, and the class vectors when learned."""
        extra = [self.label_weight, self.label_bias] if self.label_weight is not None else []
        return [self.before, self.after, *extra]

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def embed(self) -> torch.Tensor:
        """(1, L, D) input embeddings, soft vectors (placeholders' rows) included; as TextTransformer.embed."""
        text, ids, s, m = self.encoder.text, self.ids, self.start, self.slot
        tok = text.token_embedding(ids)
        tok = torch.cat(
            [tok[:, :s], self.before[None], tok[:, m : m + 1], self.after[None], tok[:, m + 1 + len(self.after) :]], 1
        )
        x = tok + text.pos_embed[: ids.shape[1]]
        if text.type_embedding is not None:
            x = x + text.type_embedding(torch.zeros_like(ids))
        return text.embed_norm(x)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        enc, B = self.encoder, image_embeds.shape[0]
        x = self.embed().to(image_embeds.dtype).expand(B, -1, -1)
        text = enc.text.run_blocks(x, None, enc.text.blocks[: enc.config.fusion_layer])
        fused = enc.fuse(text, None, image_embeds)[:, self.slot]
        if self.label_weight is None:
            return slot_scores(enc, fused, self.verbalizer)
        head = enc.mlm_head  # MLMHead.forward up to its decoder, whose label rows label_weight / label_bias replace
        hidden = head.norm(F.gelu(head.dense(fused))).float()
        return hidden @ self.label_weight.float().T + self.label_bias.float()


# ---- pretraining, evaluation, tuning -----------------------------------------------------------------------------
class _WithEmbeds(torch.utils.data.Dataset):
    """Dataset items plus their precomputed image tokens."""

    def __init__(self, data: ImageTextDataset, image_embeds: torch.Tensor):
        self.data, self.image_embeds = data, image_embeds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "image_embeds": self.image_embeds[i]}


@torch.no_grad()
def image_tokens(encoder: FusionEncoder, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(N, 3, H, W) -> image tokens (N, 1 + P, Dv) on the encoder's device, in eval mode."""
    was, device = encoder.training, next(encoder.parameters()).device
    encoder.eval()
    out = torch.cat([encoder.encode_image(images[i : i + chunk].to(device)) for i in range(0, len(images), chunk)])
    encoder.train(was)
    return out


def build_cloze_encoder(clip: CLIP, tokenizer: WordTokenizer, config: ClozeConfig) -> FusionEncoder:
    """A BERT-style fusion encoder over the tokenizer's vocabulary whose image tower is a copy of clip.visual."""
    v = clip.visual.config
    t = clip.config.text
    text = bert_text_config(tokenizer, config.context_length, t.width, config.text_depth, t.heads)
    enc = FusionEncoder(FusionConfig(vision=v, text=text, fusion="cross", fusion_layer=config.fusion_layer, itc_dim=0))
    enc.visual.load_state_dict({k: v for k, v in clip.visual.state_dict().items() if not k.startswith("head.")})
    return enc


def pretrain_cloze_encoder(
    clip: CLIP, tokenizer: WordTokenizer, train: ImageTextDataset, config: ClozeConfig
) -> tuple[FusionEncoder, list[dict]]:
    """MLM on train's captions through a new fusion encoder on the CLIP's image tower -> (encoder, history)."""
    seed_everything(config.seed)
    enc = build_cloze_encoder(clip, tokenizer, config)
    base = {f.name: getattr(config, f.name) for f in fields(TrainConfig)}
    base.update(  # the tuning's steps / batch / lr / weight decay are not the pretraining's
        steps=config.pretrain_steps,
        batch_size=config.pretrain_batch_size,
        lr=config.pretrain_lr,
        weight_decay=0.05,
        warmup_steps=10,
        out_dir=f"{config.out_dir}/pretrain" if config.out_dir else None,
    )
    vlp = VLPConfig(
        **base,
        itc_weight=0.0,
        itm_weight=0.0,  # digit captions of another image of the same class are not true negatives
        mlm_weight=1.0,
        mask_prob=config.mask_prob,
        context_length=config.context_length,
    )
    model, data, collate = VLPModel(enc), train, ImageTextCollator(tokenizer, config.context_length)
    if config.freeze_vision:
        enc.visual.requires_grad_(False)
        data = _WithEmbeds(train, image_tokens(enc, train.images))
        collate = _collate_with_embeds(collate)
    history = Trainer(model, vlp, vlp_loss_fn(tokenizer, vlp)).fit(data, collate)
    enc.visual.requires_grad_(True)
    return enc.eval(), history


def _collate_with_embeds(collate):
    def run(items):
        return {**collate(items), "image_embeds": torch.stack([it["image_embeds"] for it in items])}

    return run


@torch.no_grad()
def cloze_accuracy(
    model: FusionEncoder | ClozePrompt,
    tokenizer: WordTokenizer,
    data: ImageTextDataset,
    template: str = "a photo of the digit {}.",
    context_length: int = 16,
) -> float:
    """Top-1 of the cloze classifier on data (labels, classnames); a ClozePrompt brings its own prompt."""
    model.eval()
    enc = model.encoder if isinstance(model, ClozePrompt) else model
    embeds = image_tokens(enc, data.images)
    preds = []
    for i in range(0, len(data), 256):
        e = embeds[i : i + 256]
        s = (
            model(e)
            if isinstance(model, ClozePrompt)
            else cloze_logits(model, tokenizer, None, data.classnames, template, context_length, image_embeds=e)
        )
        preds.append(s.argmax(1).cpu())
    return float((torch.cat(preds) == data.labels).float().mean())


def tune_cloze(
    encoder: FusionEncoder,
    tokenizer: WordTokenizer,
    shots: ImageTextDataset,
    config: ClozeConfig,
    val: ImageTextDataset | None = None,
    tune: str | None = None,
) -> dict:
    """Few-shot tuning on cross-entropy over the verbalizer scores at the slot; `tune` defaults to config.tune.

    "soft": a ClozePrompt's vectors only, at config.lr (the encoder is frozen during the tuning and unchanged;
    image tokens are computed once); "whole": every weight of `encoder` (requires_grad set), in place, at
    config.whole_lr, with config.template. With `val`, the state with the best validation accuracy (then loss)
    over steps 0, eval_every, ... is kept, so tuning that does not help on validation falls back to the starting
    prompt / weights. -> {"model": the ClozePrompt or the encoder, "best_step", "val_top1", "history"}."""
    seed_everything(config.seed)
    tune = tune or config.tune
    if tune not in ("soft", "whole"):
        raise ValueError(f"tune: expected 'soft' or 'whole', got {tune!r}")
    soft = tune == "soft"
    grad_flags = [p.requires_grad for p in encoder.parameters()]
    if soft:
        model = ClozePrompt(
            encoder,
            tokenizer,
            shots.classnames,
            config.template,
            config.n_before,
            config.n_after,
            config.prompt_init,
            config.verbalizer,
        )
        params = trainable = model.prompt_parameters()
        data = _WithEmbeds(shots, image_tokens(encoder, shots.images))
        val_embeds = image_tokens(encoder, val.images) if val is not None else None
    else:
        model, params, data = encoder.requires_grad_(True), None, shots
        trainable = list(encoder.parameters())

    def scores(m, batch):
        if soft:
            return m(batch["image_embeds"])
        return cloze_logits(m, tokenizer, batch["images"], shots.classnames, config.template, config.context_length)

    def loss_fn(m, batch):
        logits = scores(m, batch)
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"acc": float((logits.argmax(1) == batch["labels"]).float().mean())}

    def collate(items):
        batch = {
            "images": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items]),
        }
        if soft:
            batch["image_embeds"] = torch.stack([it["image_embeds"] for it in items])
        return batch

    best = KeepBest(trainable)
    trainer = None

    @torch.no_grad()
    def validate(m):
        device = trainable[0].device
        batch = {"images": val.images.to(device), "labels": val.labels.to(device)}
        if soft:
            batch["image_embeds"] = val_embeds.to(device)
        logits = scores(m, batch).float().cpu()
        acc = float((logits.argmax(1) == val.labels).float().mean())
        loss = float(F.cross_entropy(logits, val.labels))
        best.update(trainer.step if trainer is not None else 0, acc, loss)
        return {"val_top1": acc, "val_loss": loss}

    cfg = copy.copy(config)
    cfg.batch_size = min(config.batch_size, len(shots))
    cfg.lr = config.lr if soft else config.whole_lr
    if val is not None:
        validate(model.eval())  # step 0: the hand-written template / the starting weights
    trainer = Trainer(model, cfg, loss_fn, parameters=params)
    history = trainer.fit(data, collate, validate if val is not None else None, config.eval_every)
    best.restore()
    if soft:  # ClozePrompt froze the encoder for the tuning only
        for p, flag in zip(encoder.parameters(), grad_flags):
            p.requires_grad_(flag)
    model.eval()
    return {"model": model, "best_step": best.step, "val_top1": best.val_top1, "history": history}


def train_cloze(
    clip: CLIP,
    tokenizer: WordTokenizer,
    train: ImageTextDataset,
    test: ImageTextDataset,
    config: ClozeConfig,
    shots: ImageTextDataset | None = None,
    encoder: FusionEncoder | None = None,
) -> dict:
    """Pretrains the fusion encoder (MLM on train's captions; or takes `encoder`, pretrained before), scores `test`
    zero-shot with config.template, tunes few-shot on config.shots per class from `shots` (default: `train`; pass
    images kept out of pretraining to see what tuning adds) (config.tune: soft, whole or both; whole tunes a copy)
    and scores `test` again. -> {"cloze_zero_shot_top1", "cloze_soft_top1" and / or "cloze_whole_top1",
    "cloze_top1" (soft when run), "mlm_acc" (nan for a given encoder), "encoder" (the pretrained one),
    "tuned": {mode: tune_cloze result}}."""
    if config.tune not in ("soft", "whole", "both"):
        raise ValueError(f"tune: expected 'soft', 'whole' or 'both', got {config.tune!r}")
    pre_history = []
    if encoder is None:
        encoder, pre_history = pretrain_cloze_encoder(clip, tokenizer, train, config)
    out = {
        "cloze_zero_shot_top1": cloze_accuracy(encoder, tokenizer, test, config.template, config.context_length),
        "mlm_acc": pre_history[-1]["mlm_acc"] if pre_history else float("nan"),
    }
    fit_set, val = (shots or train).split_shots(config.shots, config.val_fraction, config.seed)
    tuned = {}
    for mode in ("soft", "whole") if config.tune == "both" else (config.tune,):
        cfg = copy.copy(config)
        cfg.out_dir = f"{config.out_dir}/{mode}" if config.out_dir else None
        target = encoder if mode == "soft" else copy.deepcopy(encoder)
        tuned[mode] = tune_cloze(target, tokenizer, fit_set, cfg, val, tune=mode)
        acc = cloze_accuracy(tuned[mode]["model"], tokenizer, test, config.template, config.context_length)
        out[f"cloze_{mode}_top1"] = acc
    out["cloze_top1"] = out.get("cloze_soft_top1", out.get("cloze_whole_top1"))
    return {**out, "encoder": encoder, "tuned": tuned}
