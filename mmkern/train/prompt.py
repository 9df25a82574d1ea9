"""Task 3: prompt learning on a pretrained CLIP. Zero-shot classification with hand-written templates, and
CoOp (arXiv 2109.01134): M context vectors shared by all classes, "[V]1 ... [V]M <class> ." in place of the
words of a template, trained few-shot with both encoders frozen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.data import ImageTextDataset, TaskData, WordTokenizer
from mmkern.models import CLIP
from mmkern.train.loop import KeepBest, TrainConfig, Trainer, seed_everything


@dataclass
class PromptConfig(TrainConfig, TaskData):  # TaskData: the images `mmkern train` uses
    steps: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    shots: int = 16  # labelled images per class, split into a training and a validation part
    init: str = "templates"  # "templates": one context per hand-written template, from its words; "random"
    n_ctx: int = 4  # M when init is "random"
    class_specific: bool = False  # CoOp's CSC: one context per class instead of one shared by all
    context_length: int = 16
    val_fraction: float = 0.25  # of the shots per class, held out to pick the best context (step 0 included)
    eval_every: int = 5
    # KgCoOp (arXiv 2303.13283): + kg_weight · mean squared distance between the learned and the hand-written
    # class text features, which keeps a context trained on few shots from drifting off what generalises.
    kg_weight: float = 8.0  # the paper's λ; 0 is plain CoOp


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{}") != 1:
        raise ValueError(f"templates: expected one '{{}}' per template, got {template!r}")
    prefix, suffix = template.split("{}")
    return prefix.strip(), suffix


class PromptLearner(nn.Module):
    """One learnable context (M_t, D), or (C, M_t, D) class-specific, per template t: "[V]1 ... [V]M <class><suffix>".
    With init="templates" each context starts as the token embeddings of its template's words before "{}", so at
    step 0 forward() equals the hand-written zero-shot classifier (the same template average, renormalised).
    forward() -> normalised class text features (C, E). The CLIP inside is frozen and stays in eval mode."""

    def __init__(
        self,
        clip: CLIP,
        tokenizer: WordTokenizer,
        classnames: list[str],
        templates: list[str],
        init: str = "templates",
        n_ctx: int = 4,
        context_length: int = 16,
        class_specific: bool = False,
    ):
        super().__init__()
        if init not in ("templates", "random"):
            raise ValueError(f"init: expected 'templates' or 'random', got {init!r}")
        self.clip = clip.eval()
        for p in clip.parameters():
            p.requires_grad_(False)
        emb = clip.text.token_embedding.weight
        self.ctx = nn.ParameterList()
        for i, template in enumerate(templates):
            prefix, suffix = _split_template(template)
            words = tokenizer.encode(prefix, bos=False, eos=False) if init == "templates" and prefix else []
            M = len(words) or n_ctx
            ctx = emb[words].detach().clone() if words else torch.randn(M, emb.shape[1]) * 0.02
            self.ctx.append(nn.Parameter(ctx.expand(len(classnames), -1, -1).clone() if class_specific else ctx))
            ids, mask = tokenizer([" ".join(["x"] * M + [c]) + suffix for c in classnames], context_length)
            ids[:, 1 : 1 + M] = tokenizer.unk_id  # placeholders; their embeddings are replaced by ctx
            self.register_buffer(f"ids{i}", ids, persistent=False)
            self.register_buffer(f"mask{i}", mask, persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen towers: no dropout while the context trains
        return self

    def forward(self) -> torch.Tensor:
        text, feats = self.clip.text, []
        for i, ctx in enumerate(self.ctx):
            ids, mask, M = getattr(self, f"ids{i}"), getattr(self, f"mask{i}"), ctx.shape[-2]
            x = text.embed(ids)
            c = (ctx + text.pos_embed[1 : 1 + M]).to(x.dtype).expand(x.shape[0], -1, -1)  # (C, M, D)
            x = torch.cat([x[:, :1], c, x[:, 1 + M :]], dim=1)
            tokens = text.norm(text.run_blocks(x, mask))
            feats.append(F.normalize(text.proj(text.pool(tokens, ids, mask)).float(), dim=-1))
        return F.normalize(torch.stack(feats).mean(0), dim=-1)


@torch.no_grad()
def image_features(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    device = clip.logit_scale.device
    return torch.cat(
        [clip.encode_image(images[i : i + 512].to(device), normalize=True).float() for i in range(0, len(images), 512)]
    )


@torch.no_grad()
def zero_shot_accuracy(clip: CLIP, tokenizer, data: ImageTextDataset, templates: list[str], context_length=16):
    clf = clip.zero_shot_classifier(lambda t: tokenizer(t, context_length), data.classnames, templates)
    pred = (image_features(clip, data.images) @ clf).argmax(1).cpu()
    return float((pred == data.labels).float().mean())


def train_prompts(
    clip: CLIP,
    tokenizer: WordTokenizer,
    train: ImageTextDataset,
    test: ImageTextDataset,
    templates: list[str],
    config: PromptConfig,
) -> dict:
    """-> {"prompt_handwritten_top1", "prompt_learned_top1", "best_step", "val_top1", "learner", "history"}.
    The shots come from `train`; a val_fraction of them per class is held out, and the context with the best
    validation accuracy (then loss) over steps 0, eval_every, ... is kept, so a run that does not beat the
    hand-written prompts on validation falls back to them. `test` is used only for the two reported accuracies.
    Image features are computed once (the image tower is frozen), so a step costs one text forward per template."""
    seed_everything(config.seed)
    was_training, grad_flags = clip.training, [p.requires_grad for p in clip.parameters()]
    clip.eval()
    handwritten = zero_shot_accuracy(clip, tokenizer, test, templates, config.context_length)
    fit_set, val = train.split_shots(config.shots, config.val_fraction, config.seed)
    learner = PromptLearner(
        clip,
        tokenizer,
        train.classnames,
        templates,
        config.init,
        config.n_ctx,
        config.context_length,
        config.class_specific,
    )
    feats = image_features(clip, fit_set.images)
    cached = ImageTextDataset(feats[:, :, None, None], fit_set.captions, fit_set.labels, fit_set.classnames)
    val_feats = image_features(clip, val.images) if val is not None else None

    def logits_of(model, images):
        return model.clip.scale().float() * images @ model().T

    with torch.no_grad():
        handwritten_feats = clip.zero_shot_classifier(
            lambda t: tokenizer(t, config.context_length), train.classnames, templates
        ).T.float()  # (C, E)

    def loss_fn(model, batch):
        feats = model()
        logits = model.clip.scale().float() * batch["images"].flatten(1) @ feats.T
        loss = F.cross_entropy(logits, batch["labels"])
        if config.kg_weight:
            loss = loss + config.kg_weight * (feats - handwritten_feats).pow(2).sum(-1).mean()
        return loss, {"acc": float((logits.argmax(1) == batch["labels"]).float().mean())}

    def collate(items):
        return {
            "images": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items]),
        }

    best = KeepBest(learner.ctx)

    @torch.no_grad()
    def validate(model):
        if val_feats is None:
            return {}
        logits = logits_of(model, val_feats)
        acc = float((logits.argmax(1).cpu() == val.labels).float().mean())
        loss = float(F.cross_entropy(logits.cpu(), val.labels))
        best.update(trainer.step, acc, loss)
        return {"val_top1": acc, "val_loss": loss}

    config.batch_size = min(config.batch_size, len(cached))
    trainer = Trainer(learner, config, loss_fn, parameters=list(learner.ctx))
    validate(learner)  # step 0: the hand-written prompts
    history = trainer.fit(cached, collate, validate, config.eval_every)
    best.restore()
    with torch.no_grad():
        pred = (image_features(clip, test.images) @ learner().T).argmax(1).cpu()
    learned = float((pred == test.labels).float().mean())
    clip.train(was_training)
    for p, flag in zip(clip.parameters(), grad_flags):
        p.requires_grad_(flag)
    return {
        "prompt_handwritten_top1": handwritten,
        "prompt_learned_top1": learned,
        "best_step": best.step,
        "val_top1": best.val_top1,
        "learner": learner,
        "history": history,
    }
