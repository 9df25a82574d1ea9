"""When an op may skip the custom-op dispatcher.

Every op is a torch.library custom op (what torch.compile, fake tensors, opcheck and functorch see), but in plain
eager mode the dispatch, forward and backward, costs more than the kernels of a small model's layer (figures in the
README). There the ops run the same kernels through a torch.autograd.Function instead."""

from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # any other tensor subclass (FakeTensor, DTensor, ...) takes the op


def eager_function(name: str, forward_impl, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function running an op's kernels (forward_impl(*inputs)) with the op's own autograd formula
    (setup_context(ctx, inputs, output, eager=True), backward(ctx, *grads)), without the custom-op dispatch."""

    def forward(ctx, *inputs):
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output, eager=True)
        return output

    attrs = {"forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": eager_function.__doc__}
    return type(name, (torch.autograd.Function,), attrs)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this call: grad mode on and some given tensor requires a gradient."""
    if torch.is_grad_enabled():  # a loop, not any() over a generator: this runs on every call of every op
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def plain_eager(*tensors) -> bool:
    """True when plain tensors run eagerly: nothing traces, compiles, fakes or transforms the call."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True
