"""The bridge to the native module `mmkern._C`.

`launch` runs a native entry point with its parameters by name; `tensor_args`, which it calls, is the one place
that turns torch tensors into the arguments native code takes: a data pointer, a dtype code, sizes, strides (in
elements) and a device index. The native side never sees torch.

The CPU kernels are compiled once per ISA level and run at the best level the CPU supports;
`MMKERN_CPU_CAPABILITY=default|avx2|avx512|avx512_bf16` (read at import) runs them at a lower one.
"""

from __future__ import annotations

import os

import torch

try:
    from mmkern import _C
except ImportError as exc:  # a source checkout that was never built
    _C = None
    IMPORT_ERROR: str | None = f"mmkern._C could not be imported ({exc}); build it with `pip install -e .`"
else:
    IMPORT_ERROR = None

# Why the cpu backend cannot run, or None: the native module is missing, or MMKERN_CPU_CAPABILITY names a level
# that is not compiled in or that this CPU cannot run (an error at first use, so that `mmkern info` still reports).
CPU_ERROR: str | None = IMPORT_ERROR
if _C is not None and os.environ.get("MMKERN_CPU_CAPABILITY"):
    try:
        _C.set_cpu_capability(os.environ["MMKERN_CPU_CAPABILITY"])
    except ValueError as exc:
        CPU_ERROR = f"MMKERN_CPU_CAPABILITY={os.environ['MMKERN_CPU_CAPABILITY']}: {exc}"

# The level the CPU kernels run at, mirrored in Python: the ops' default choice reads it on every call, and
# torch.compile traces a module global where it cannot trace a call into the native module.
cpu_level: str = _C.cpu_capability() if _C is not None else "default"


def set_cpu_level(level: str) -> None:
    """Runs the CPU kernels at `level` (ValueError if it is not compiled in or the CPU lacks it)."""
    global cpu_level
    native().set_cpu_capability(level)
    cpu_level = level


# Must match csrc/include/mmkern/common.h DType.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.bool: 6,
    torch.uint8: 7,
}


def tensor_args(tensors: dict) -> dict:
    """{name: (data_ptr, dtype_code, sizes, strides, device_index)} for a dict of tensors by name, None for None."""
    # ~0.8 us a tensor, eight tensors or more a call: one comprehension of the cheapest accessors, no call per tensor
    # (torch.Size is a tuple already; get_device() is -1 on the CPU).
    return {
        key: None if t is None else (t.data_ptr(), DTYPE_CODES[t.dtype], t.shape, t.stride(), t.get_device())
        for key, t in tensors.items()
    }


_CPU = torch.device("cpu")
_cpu_entries: dict = {}  # name -> the native function `<name>_cpu`, looked up once (getattr of a built name: 0.2 us)
_cuda_entries: dict = {}  # name -> `<name>_cuda`


def _entry(entries: dict, name: str, suffix: str):
    entries[name] = getattr(native(), name + suffix)
    return entries[name]


def launch(name: str, device: torch.device, tensors: dict, scalars: dict) -> None:
    """Runs the native entry point `name` (`<name>_cpu` with torch's thread count on the CPU, so that one knob
    controls torch and mmkern alike; `<name>_cuda` on `device`'s current stream) with every field of its parameter
    struct by name (see csrc/bindings.cpp): tensors (or None) and scalars. A missing, unknown or mistyped field
    raises TypeError naming it."""
    if device == _CPU:  # cheaper than comparing device.type
        entry = _cpu_entries.get(name) or _entry(_cpu_entries, name, "_cpu")
        entry(tensor_args(tensors), scalars, torch.get_num_threads())
    else:
        entry = _cuda_entries.get(name) or _entry(_cuda_entries, name, "_cuda")
        entry(tensor_args(tensors), scalars, cuda_stream(device))


def cuda_stream(device: torch.device) -> int:
    """Handle of the current CUDA stream on `device`, on which CUDA kernels are launched."""
    return torch.cuda.current_stream(device).cuda_stream


def native():
    """The native module, or a RuntimeError that says how to build it."""
    if _C is None:
        raise RuntimeError(IMPORT_ERROR)
    return _C
