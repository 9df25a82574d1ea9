"""Training toolkit: the loop, checkpoints, and the tasks (contrastive, VLP, prompt learning, instruction
tuning, transfer)."""

from mmkern.train.loop import BatchSampler, Trainer, TrainConfig, lr_factor, plot_metrics

__all__ = ["BatchSampler", "TrainConfig", "Trainer", "lr_factor", "plot_metrics"]
