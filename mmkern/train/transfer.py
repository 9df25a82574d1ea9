"""Task 5: transfer of a pretrained image tower to classification: a linear probe on frozen features, and full
fine-tuning of tower + head (LP-FT: the head starts from the probe). Both report held-out top-1, from every training
image or from `shots` per class (mmkern.train.fewshot runs them against the prompt methods over k shots)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.data import ImageTextDataset, TaskData
from mmkern.models import VisionTransformer, ViTConfig
from mmkern.train.loop import TrainConfig, Trainer, seed_everything


@dataclass
class TransferConfig(TrainConfig, TaskData):  # TaskData: the images `mmkern train` uses
    steps: int = 100  # full fine-tuning steps
    probe_steps: int = 100
    probe_lr: float = 1e-2
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    shots: int = 0  # labelled training images per class (drawn with `seed`); 0: every training image
    # `mmkern train transfer --curve 1,2,4,8,16`: every few-shot method (mmkern.train.fewshot) at each k, `seeds`
    # draws each; the probe and fine-tuning use the settings above, CoOp and the cloze prompt these steps
    curve: str = ""
    seeds: int = 3
    prompt_steps: int = 50
    cloze_steps: int = 60


def _features(tower: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Pooled (pre-head) features of the frozen tower, in batches."""
    tower.eval()
    device = next(tower.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [
                tower.pool(tower.forward_features(images[i : i + 512].to(device))).float()
                for i in range(0, len(images), 512)
            ]
        )


def _classify_loss(model, batch):
    logits = model(batch["images"])
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return loss, {"acc": float((logits.argmax(1) == batch["labels"]).float().mean())}


def _collate(items):
    return {"images": torch.stack([it["image"] for it in items]), "labels": torch.tensor([it["label"] for it in items])}


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    device = next(model.parameters()).device
    pred = torch.cat([model(images[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(images), 512)])
    return float((pred == labels).float().mean())


def train_transfer(
    tower_state: dict, tower_config: ViTConfig, train: ImageTextDataset, test: ImageTextDataset, config: TransferConfig
) -> dict:
    """tower_state: a VisionTransformer state dict (e.g. a CLIP's `visual.*`; its head is replaced).
    -> {"linear_probe_top1", "finetune_top1", "probe", "model", "history"}."""
    if config.shots < 0:
        raise ValueError(f"shots: expected 0 (every image) or a count per class, got {config.shots}")
    seed_everything(config.seed)
    if config.shots:
        train = train.few_shot(config.shots, config.seed)
    config = replace(config, batch_size=min(config.batch_size, len(train)))  # 1 shot of 10 classes: 10 images
    num_classes = len(train.classnames)
    cfg = ViTConfig(**{**tower_config.to_dict(), "num_classes": 0})
    tower = VisionTransformer(cfg)
    tower.load_state_dict({k: v for k, v in tower_state.items() if not k.startswith("head.")})
    # Linear probe: features computed once, a Linear layer trained on them.
    probe = nn.Linear(tower.output_dim, num_classes)
    feats = ImageTextDataset(
        _features(tower, train.images)[:, :, None, None], train.captions, train.labels, train.classnames
    )
    probe_model = nn.Sequential(nn.Flatten(), probe)
    c_probe = replace(
        config,
        steps=config.probe_steps,
        lr=config.probe_lr,
        out_dir=None if config.out_dir is None else f"{config.out_dir}/probe",
    )
    hist = Trainer(probe_model, c_probe, _classify_loss).fit(feats, _collate)
    test_feats = _features(tower, test.images)
    probe_top1 = accuracy(probe_model, test_feats[:, :, None, None], test.labels)
    # Full fine-tuning: the tower with the probe as its initial head.
    model = VisionTransformer(ViTConfig(**{**cfg.to_dict(), "num_classes": num_classes, "head_bias": True}))
    model.load_state_dict({**tower.state_dict(), **{f"head.{k}": v for k, v in probe.state_dict().items()}})
    c_ft = replace(config, out_dir=None if config.out_dir is None else f"{config.out_dir}/finetune")
    hist += Trainer(model, c_ft, _classify_loss).fit(train, _collate)
    return {
        "linear_probe_top1": probe_top1,
        "finetune_top1": accuracy(model, test.images, test.labels),
        "probe": probe_model,
        "model": model,
        "history": hist,
        "tower": copy.deepcopy(tower),
    }
