"""Backend selection: `cpu` (C++), `cuda` (CUDA C++), `triton`, `reference` (plain PyTorch, the float64 test
oracle), `torch` (PyTorch's own ops as a user would call them: F.scaled_dot_product_attention, conv2d, the naive
losses).

Choice, first match wins: an explicit `backend=` argument; `mmkern.use_backend(...)` (also a context
manager); the `MMKERN_BACKEND` environment variable, read once when mmkern is imported (as MMKERN_CPU_CAPABILITY
is: reading the environment cost 0.6 µs of every op call; set it before starting Python, or use use_backend at run
time); else the op's default for the tensors' device. On CPU tensors
that default is the native kernel where it measured faster than PyTorch for that kind of call at the ISA level the
kernels run at, and `torch` elsewhere (mmkern/ops/cpu_policy.py). Asking for a backend that cannot run the given
tensors is a ValueError that says why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable

import torch

from mmkern import _native

BACKENDS = ("cpu", "cuda", "triton", "reference", "torch")

_selected: str | None = None
# MMKERN_BACKEND as read at import ("" or unset: None); an unknown name is an error at the first op call.
_environment: str | None = os.environ.get("MMKERN_BACKEND") or None
# The backend every op call is held to: use_backend's choice, else _environment; None: the per-device default.
# Kept in one variable because the ops' default path reads it on every call.
_forced: str | None = _environment


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401  (the import is the check)
    except Exception as exc:  # noqa: BLE001  (a broken triton install raises anything; report it, don't crash)
        return f"triton is not importable ({exc})"
    return None


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run tensors on `device_type` here, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend in ("reference", "torch"):
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, got {device_type} tensors"
        return _native.CPU_ERROR
    if backend == "cuda":
        if _native.IMPORT_ERROR:
            return _native.IMPORT_ERROR
        if not _native._C.with_cuda():
            return "mmkern._C was built without CUDA (no nvcc at build time, or MMKERN_CUDA=0)"
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, got {device_type} tensors"
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        return None
    # triton
    if _triton_import_error():
        return _triton_import_error()
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available to torch"
    if device_type == "cpu":
        return None if _triton_interpret() else "triton runs CPU tensors only under TRITON_INTERPRET=1"
    return f"triton does not run {device_type} tensors"


def use_backend(backend: str | None):
    """Selects the backend for every op until changed; usable as a context manager that restores it.

    `None` returns to the default choice.
    """
    global _selected, _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    previous, _selected = _selected, backend
    _forced = backend if backend is not None else _environment

    @contextlib.contextmanager
    def restore():
        global _selected, _forced
        try:
            yield
        finally:
            _selected = previous
            _forced = previous if previous is not None else _environment

    return restore()


def selected_backend() -> str | None:
    """The backend chosen by use_backend or MMKERN_BACKEND, or None for the per-device default."""
    if _forced is not None and _forced not in BACKENDS:
        raise ValueError(f"MMKERN_BACKEND: unknown backend {_forced!r}; choose one of {', '.join(BACKENDS)}")
    return _forced


def cpu_default(backend: str | None, t: torch.Tensor) -> bool:
    """Whether a call on `t` with this `backend=` argument takes the CPU default (no backend named, none chosen by
    use_backend or MMKERN_BACKEND, CPU tensors, the native module loaded): then the op picks "cpu" or "torch" by
    its cpu_policy verdict, as resolve would, without resolve's cost on every small call."""
    return backend is None and _forced is None and t.is_cpu and _native.CPU_ERROR is None


def resolve(
    backend: str | None,
    device: torch.device,
    cuda_default: str = "triton",
    native_faster: Callable[[], bool] | None = None,
) -> str:
    """The backend to run an op on tensors on `device`.

    `cuda_default` is the op's own choice on CUDA devices (the faster of its triton and cuda kernels
    where measured; where it cannot run, PyTorch's path with a RuntimeWarning that says so); on CPU tensors the default is `cpu` where `native_faster()` (the op's verdict from
    mmkern/ops/cpu_policy.py for this call; None: always) and `torch` otherwise or when the native module is
    missing; elsewhere `torch`.
    """
    if backend is None and _forced is None and device.type == "cpu" and _native.CPU_ERROR is None:
        # The common case, first: this runs on every op call.
        return "cpu" if native_faster is None or native_faster() else "torch"
    chosen = backend if backend is not None else selected_backend()
    if chosen is None:
        if device.type == "cuda":
            chosen = cuda_default
            missing = unavailable_reason(cuda_default, "cuda")
            if missing is not None:
                chosen = "torch"
                warnings.warn(
                    f"mmkern: CUDA tensors run PyTorch's own ops instead of the {cuda_default} kernels ({missing}); "
                    "for the contrastive losses that is the naive loss with its full B x B logit matrix. Install "
                    "triton, or choose backend='cuda' (mmkern's CUDA C++ kernels).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        elif device.type == "cpu" and _native.IMPORT_ERROR is None:
            chosen = "cpu"  # a bad MMKERN_CPU_CAPABILITY: the error below, not a silent fallback
        else:
            chosen = "torch"
    reason = unavailable_reason(chosen, device.type)
    if reason is not None:
        raise ValueError(f"backend: {chosen!r} is not available: {reason}")
    return chosen


def cpu_capability() -> str:
    """The ISA level the CPU kernels run at: 'default' (portable C++), 'avx2' (AVX2 + FMA), 'avx512' or
    'avx512_bf16'."""
    _native.native()
    return _native.cpu_level


def cpu_capabilities() -> list[str]:
    """The levels compiled in that this CPU can run, best first."""
    return _native.native().supported_cpu_capabilities()


def use_cpu_capability(level: str):
    """Runs the CPU kernels at `level` until changed; usable as a context manager that restores the previous one.

    A level above what the CPU supports, or one not compiled in, is a ValueError.
    """
    previous = cpu_capability()
    _native.set_cpu_level(level)

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            _native.set_cpu_level(previous)

    return restore()


def availability() -> dict[str, str | None]:
    """For each backend: None if it can run here, else why not (used by `mmkern info`). Each backend is
    judged on its natural device: cpu on CPU tensors, cuda on CUDA tensors, triton on CUDA tensors where a
    GPU is visible (else on CPU tensors, i.e. under the interpreter)."""
    gpu = torch.cuda.is_available()
    natural = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if gpu else "cpu", "reference": "cpu", "torch": "cpu"}
    return {b: unavailable_reason(b, natural[b]) for b in BACKENDS}
