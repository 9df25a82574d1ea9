"""Task 3: prompt learning on a pretrained CLIP. Zero-shot classification with hand-written templates, and
CoOp (arXiv 2109.01134): M context vectors shared by all classes, "[V]1 ... [V]M <class> ." in place of the
words of a template, trained few-shot with both encoders frozen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.data import ImageTextDataset, WordTokenizer
from mmkern.models import CLIP
from mmkern.train.loop import TrainConfig, Trainer


@dataclass
class PromptConfig(TrainConfig):
    steps: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    shots: int = 16  # labelled images per class
    init: str = "a photo of the digit"  # context initialised from these words (their count is M); "" = random
    n_ctx: int = 4  # M when init is ""
    class_specific: bool = False  # CoOp's CSC: one context per class instead of one shared by all
    context_length: int = 16


class PromptLearner(nn.Module):
    """Learnable context (M, D), or (C, M, D) class-specific, before each class name: forward() -> normalised class text features (C, E).
    The CLIP inside is frozen (requires_grad False); only `ctx` trains."""

    def __init__(self, clip: CLIP, tokenizer: WordTokenizer, classnames: list[str], init: str = "", n_ctx: int = 4,
                 context_length: int = 16, class_specific: bool = False):
        super().__init__()
        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        words = tokenizer.encode(init, bos=False, eos=False) if init else []
        M = len(words) or n_ctx
        emb = clip.text.token_embedding.weight
        ctx = emb[words].detach().clone() if words else torch.randn(M, emb.shape[1]) * 0.02
        self.ctx = nn.Parameter(ctx.expand(len(classnames), -1, -1).clone() if class_specific else ctx)
        ids, mask = tokenizer([" ".join(["x"] * M + [c]) + "." for c in classnames], context_length)
        ids[:, 1 : 1 + M] = tokenizer.unk_id  # placeholders; their embeddings are replaced by ctx
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self) -> torch.Tensor:
        text, M = self.clip.text, self.ctx.shape[-2]
        x = text.embed(self.ids)
        ctx = (self.ctx + text.pos_embed[1 : 1 + M]).to(x.dtype).expand(x.shape[0], -1, -1)  # (C, M, D)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + M :]], dim=1)
        tokens = text.norm(text.run_blocks(x, self.mask))
        return F.normalize(text.proj(text.pool(tokens, self.ids, self.mask)), dim=-1)


@torch.no_grad()
def image_features(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    device = clip.logit_scale.device
    return torch.cat([clip.encode_image(images[i : i + 512].to(device), normalize=True).float()
                      for i in range(0, len(images), 512)])


@torch.no_grad()
def zero_shot_accuracy(clip: CLIP, tokenizer, data: ImageTextDataset, templates: list[str], context_length=16):
    clf = clip.zero_shot_classifier(lambda t: tokenizer(t, context_length), data.classnames, templates)
    pred = (image_features(clip, data.images) @ clf).argmax(1).cpu()
    return float((pred == data.labels).float().mean())


def train_prompts(clip: CLIP, tokenizer: WordTokenizer, train: ImageTextDataset, test: ImageTextDataset,
                  templates: list[str], config: PromptConfig) -> dict:
    """-> {"prompt_handwritten_top1", "prompt_learned_top1", "learner", "history"} on `test`. Image features
    are computed once (the image tower is frozen), so a step costs one text forward over the C class prompts."""
    was_training, grad_flags = clip.training, [p.requires_grad for p in clip.parameters()]
    clip.eval()
    handwritten = zero_shot_accuracy(clip, tokenizer, test, templates, config.context_length)
    shots = train.few_shot(config.shots, seed=config.seed)
    learner = PromptLearner(clip, tokenizer, train.classnames, config.init, config.n_ctx, config.context_length,
                            config.class_specific)
    feats = image_features(clip, shots.images)
    cached = ImageTextDataset(feats[:, :, None, None], shots.captions, shots.labels, shots.classnames)

    def loss_fn(model, batch):
        logits = model.clip.scale().float() * batch["images"].flatten(1) @ model().float().T
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"acc": float((logits.argmax(1) == batch["labels"]).float().mean())}

    def collate(items):
        return {"images": torch.stack([it["image"] for it in items]), "labels": torch.tensor([it["label"] for it in items])}

    config.batch_size = min(config.batch_size, len(cached))
    trainer = Trainer(learner, config, loss_fn, parameters=[learner.ctx])
    learner.clip.eval()  # frozen towers stay in eval mode (no dropout) while the context trains
    history = trainer.fit(cached, collate)
    with torch.no_grad():
        pred = (image_features(clip, test.images) @ learner().float().T).argmax(1).cpu()
    learned = float((pred == test.labels).float().mean())
    clip.train(was_training)
    for p, flag in zip(clip.parameters(), grad_flags):
        p.requires_grad_(flag)
    return {"prompt_handwritten_top1": handwritten, "prompt_learned_top1": learned, "learner": learner,
            "history": history}
