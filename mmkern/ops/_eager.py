"""When an op may skip the custom-op dispatcher.

Every op is a torch.library custom op (what torch.compile, fake tensors, opcheck and functorch see), but in plain
eager mode the dispatch costs ~50-150 µs per call and as much again in backward (measured at the demo's shapes),
more than the kernels of a small model's layer. There the ops run the same kernels through a
torch.autograd.Function instead."""

from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # any other tensor subclass (FakeTensor, DTensor, ...) takes the op


def plain_eager(*tensors) -> bool:
    """True when plain tensors run eagerly: nothing traces, compiles, fakes or transforms the call."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)
