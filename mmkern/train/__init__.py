"""Training toolkit: the loop, checkpoints, and the tasks (contrastive, VLP, prompt learning, instruction
tuning, transfer)."""

from mmkern.train.loop import BatchSampler, TrainConfig, Trainer, adamw, lr_factor, plot_metrics, seed_everything

__all__ = ["BatchSampler", "TrainConfig", "Trainer", "adamw", "lr_factor", "plot_metrics", "seed_everything"]
