"""Registering an op from its kernels: the schema written once, the fake kernel, the autograd wiring and the plain
eager path derived from it.

An op's kernels are launched destination-passing (as in Dao-AILab/quack): `alloc(*args)` returns the new, unfilled
output tensors and `launch(*args, *outputs)` fills them. That pair is all torch needs:

    schema  alloc's signature and type hints (torch.library.infer_schema)
    kernel  launch(*args, *alloc(*args)), returning the outputs
    fake    alloc itself, run on fake tensors: the output shapes are written once, not restated

`kernel_op` registers one such pair as the custom op `mmkern::<name>`; `define_op` registers a forward and a
backward pair and the autograd formula joining them, and returns an `Op` whose call takes the custom op, or in plain
eager mode the same kernels and formula without the dispatcher (mmkern/ops/_eager.py), and without autograd an
inference forward where the op has one (e.g. one that leaves out the statistics only the backward reads).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from mmkern import _native
from mmkern.ops._eager import eager_function, needs_grad, plain_eager


class KernelOp:
    """The custom op `mmkern::<name>` running launch(*args, *alloc(*args)); `run` calls the same without the
    dispatcher. alloc returns one new tensor or a tuple of them (the outputs may not alias the inputs or each
    other)."""

    def __init__(self, name: str, alloc: Callable, launch: Callable):
        self.alloc, self.launch = alloc, launch
        schema = torch.library.infer_schema(alloc, mutates_args=())
        if schema.endswith("-> Tensor"):
            self.run = self._run_one
        self.op = torch.library.custom_op(f"mmkern::{name}", self.run, mutates_args=(), schema=schema)
        self.op.register_fake(alloc)

    def run(self, *args):
        outputs = self.alloc(*args)
        self.launch(*args, *outputs)
        return outputs

    def _run_one(self, *args):
        output = self.alloc(*args)
        self.launch(*args, output)
        return output


class Op:
    """A differentiable op made of a forward and a backward KernelOp. Calling it runs the custom op, or in plain
    eager mode the kernels directly (through an autograd.Function when autograd records the call)."""

    def __init__(
        self, fwd: KernelOp, bwd: KernelOp, save: Callable, grads: Callable, non_differentiable=(), inference=None
    ):
        self.fwd, self.bwd = fwd, bwd
        self.inference = inference or fwd.run
        # The positions of the tensor arguments (Tensor or Tensor?), from the schema: a call looks at those alone.
        schema = getattr(torch.ops.mmkern, fwd.op._name).default._schema
        tensor = torch._C.OptionalType.ofTensor()
        self.tensor_args = tuple(i for i, a in enumerate(schema.arguments) if a.type.isSubtypeOf(tensor))

        def setup_context(ctx, inputs, output, eager=False):
            ctx.eager = eager
            save(ctx, inputs, output)
            if non_differentiable:
                ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
            # An unused output then arrives as None instead of a zero-filled tensor.
            ctx.set_materialize_grads(False)

        def backward_fn(ctx, *grad_outputs):
            return grads(ctx, bwd.run if ctx.eager else bwd.op, *grad_outputs)

        fwd.op.register_autograd(backward_fn, setup_context=setup_context)
        self.eager = eager_function(f"_{fwd.op._name}", fwd.run, setup_context, backward_fn)

    def __call__(self, *args):
        tensors = [args[i] for i in self.tensor_args]
        if not plain_eager(*tensors):
            return self.fwd.op(*args)
        return self.eager.apply(*args) if needs_grad(*tensors) else self.inference(*args)


def define_op(
    name: str, forward: tuple[Callable, Callable], backward: tuple[Callable, Callable], save: Callable,
    grads: Callable, non_differentiable: tuple[int, ...] = (), inference: Callable | None = None,
) -> Op:  # fmt: skip
    """Registers `mmkern::<name>` from forward = (alloc, launch), `mmkern::<name>_backward` from backward = (alloc,
    launch), and the autograd formula: save(ctx, inputs, outputs) keeps what the backward needs
    (ctx.save_for_backward and attributes); grads(ctx, run_backward, *grad_outputs) returns one gradient (or None)
    per input, calling run_backward(...) for the backward kernel. Gradients of unused outputs arrive as None; the
    outputs at the indices `non_differentiable` get none. inference(*args), if given, runs instead of the forward in
    plain eager mode when autograd does not record the call; it may return None for outputs only the backward reads
    (the caller must not need them)."""
    fwd, bwd = KernelOp(name, *forward), KernelOp(f"{name}_backward", *backward)
    return Op(fwd, bwd, save, grads, non_differentiable, inference)


def rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., D) as (rows, D): t itself when 2-D, a view where the strides allow one, else a contiguous copy; None
    stays None."""
    if t is None or t.dim() == 2:  # a reshape to the same shape still costs a new view
        return t
    return t.reshape(-1, t.shape[-1])


def new_like(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of t's shape, dtype and device."""
    # Not empty_like(t) when t.is_contiguous() (~0.3 us cheaper): that keeps t's strides, and a contiguous t may have
    # any stride on a dim of size 1, which the kernels' unit-stride checks reject.
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def launch_kernel(backend: str, triton_module: str, name: str, device: torch.device, tensors: dict, scalars: dict):
    """Runs kernel `name` of `backend` with its parameters by name: the launcher `name` in
    mmkern.kernels.triton.<triton_module>, or the native entry point (mmkern._native.launch)."""
    if backend == "triton":
        module = importlib.import_module(f"mmkern.kernels.triton.{triton_module}")
        getattr(module, name)(**tensors, **scalars)
    else:
        _native.launch(name, device, tensors, scalars)
