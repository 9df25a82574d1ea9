"""nn.Modules built on the mmkern ops."""

from mmkern.nn.loss import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
