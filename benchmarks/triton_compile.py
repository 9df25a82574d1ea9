"""Compile report: every Triton kernel variant the ops can launch, compiled ahead of time for real GPU targets
on a machine without a GPU (`triton.compile` with a `GPUTarget`), with the facts a GPU run would otherwise be
needed for: shared memory, registers, spills, cp.async loads and the tensor-core instructions used.

    python -m benchmarks.triton_compile [--arch 90 80] [--first-config] [--jobs N] [--out FILE.json]

The launchers themselves choose what is compiled: each variant calls the real launcher (mmkern.kernels.triton)
on meta tensors while kernel launches are intercepted, so the report sees exactly the arguments, flags and
autotune configs (after the launcher's own pruning for that target's shared memory) that a GPU run would
compile. One JSON record per (kernel, variant, arch, config):
    kernel, variant, arch, config, ok, error, shared_bytes, registers, spill_bytes, cp_async, tensor_core_ops
spill_bytes is the stack frame per thread (spilled registers); cp_async counts the cp.async (and bulk) copies in the PTX;
tensor_core_ops is "wgmma", "mma" or "none". The targets (`check`) are printed, and the exit status is 1 when
one is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from mmkern.kernels.triton import attention, contrastive, fused, patch_embed

# Usable shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DROPOUT_SPILL_LIMIT = 256  # bytes per thread the dropout variants may spill (its Philox rounds)
_TL_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
    torch.uint8: "u8",
}


# ---- launches: run the launchers on meta tensors, record each kernel launch instead of running it ---------


@contextlib.contextmanager
def _intercepted(launches: list):
    """Kernel launches (autotuned or not) append (kernel, args, kwargs) to launches instead of running."""
    saved = Autotuner.run, JITFunction.run
    Autotuner.run = lambda self, *args, **kwargs: launches.append((self, args, kwargs))
    JITFunction.run = lambda self, *args, **kwargs: launches.append((self, args, kwargs))
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


def _t(*shape, dtype, device="meta"):
    return torch.empty(shape, dtype=dtype, device=device)


ATTENTION_FEATURES = ("plain", "causal", "window", "bool_mask", "float_mask", "dropout", "varlen",
                      "causal_float_mask_dropout")  # fmt: skip


def _attention_calls(dtype, d: int, feature: str):
    """Launch attention forward and backward for one variant (B=2, H=4, L=S=1024 dense; 2 sequences varlen)."""
    B, H, L = 2, 4, 1024
    varlen = feature == "varlen"
    causal = "causal" in feature
    windowed = feature == "window"
    if varlen:
        q, k, v = (_t(B * L, H, d, dtype=dtype) for _ in range(3))
        cu = torch.tensor([0, L, 2 * L], dtype=torch.int32, device="meta")
        out = _t(B * L, H, d, dtype=dtype)
        lse = _t(H, B * L, 2, dtype=torch.float32)
    else:
        q, k, v = (_t(B, H, L, d, dtype=dtype) for _ in range(3))
        cu = None
        out = _t(B, L, H, d, dtype=dtype).transpose(1, 2)
        lse = _t(B, H, L, 2, dtype=torch.float32)
    mask = None
    if feature == "bool_mask":
        mask = _t(B, 1, 1, L, dtype=torch.bool).expand(B, H, L, L)
    elif "float_mask" in feature:
        mask = _t(B, H, L, L, dtype=dtype)
    dropout = 0.1 if "dropout" in feature else 0.0
    left, right, ng = (128, 128, 4) if windowed else (0, 0, 0)
    scalars = (L, L, d**-0.5, causal, windowed, left, right, ng, dropout, 12345)
    attention.attention_fwd(q, k, v, mask, cu, cu, out, lse, *scalars)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    dmask = _t(B, H, L, L, dtype=torch.float32) if mask is not None and mask.dtype != torch.bool else None
    attention.attention_bwd(out.contiguous(), q, k, v, out, lse, mask, cu, cu, dq, dk, dv, dmask, *scalars)


def _fused_calls(dtype, feature: str):
    M, N, D = 4096, 3072, 768
    if feature.startswith("gelu"):
        x, bias = _t(M, N, dtype=dtype), _t(N, dtype=dtype)
        kind = 1 if feature == "gelu_tanh" else 0
        fused.bias_gelu_fwd(x, bias, torch.empty_like(x), kind)
        fused.bias_gelu_bwd(torch.empty_like(x), x, bias, torch.empty_like(x), _t(N, dtype=torch.float32), kind)
    else:
        x, w = _t(M, D, dtype=dtype), _t(D, dtype=dtype)
        stats = (_t(M, dtype=torch.float32), _t(M, dtype=torch.float32))
        fused.add_layer_norm_fwd(x, x, w, w, torch.empty_like(x), torch.empty_like(x), *stats, 1e-5)
        g = (_t(D, dtype=torch.float32), _t(D, dtype=torch.float32))
        fused.add_layer_norm_bwd(x, x, x, w, *stats, torch.empty_like(x), *g)


def _contrastive_calls(dtype, feature: str):
    B, D = 4096, 512
    mode = {"infonce": 0, "clip": 1, "siglip": 2}[feature]
    x, y = _t(B, D, dtype=dtype), _t(B, D, dtype=dtype)
    s, b = _t(dtype=torch.float32), _t(dtype=torch.float32)
    rows, cols = _t(3, B, dtype=torch.float32), _t(2, B, dtype=torch.float32)
    contrastive.contrastive_fwd(x, y, s, b, mode, True, rows, cols)
    lse = _t(B, dtype=torch.float32)
    dx, dy = _t(B, D, dtype=torch.float32), _t(B, D, dtype=torch.float32)
    contrastive.contrastive_bwd(x, y, s, b, mode, True, lse, lse, lse, lse, dx, dy)


def _patch_embed_calls(dtype, feature: str):
    B, C, HW, P, E = 8, 3, 224, 16, 768
    images, weight = _t(B, C, HW, HW, dtype=dtype), _t(E, C, P, P, dtype=dtype)
    N = (HW // P) ** 2
    out = _t(B, N + 1, E, dtype=dtype)
    patch_embed.patch_embed_fwd(
        images, weight, _t(E, dtype=dtype), _t(N + 1, E, dtype=dtype), _t(1, E, dtype=dtype), out
    )
    patch_embed.patch_embed_bwd(out, images, weight, 1, torch.empty_like(images), _t(E, C, P, P, dtype=torch.float32))


def _patch_embed_packed_calls(dtype):
    """Packed native-resolution patches: 3 images of 12x14, 16x16 and 9x20 patches of 16x16x3, 256 of the base
    grid's position rows resampled with up to 16 taps per row (mmkern.ops.patch_embed_packed)."""
    M, K, E, G, taps = 12 * 14 + 16 * 16 + 9 * 20, 3 * 16 * 16, 768, 256, 16
    out = _t(M + 3, E, dtype=dtype)
    patch_embed.patch_embed_packed_fwd(
        _t(M, K, dtype=dtype), _t(E, K, dtype=dtype), _t(E, dtype=dtype), _t(G, E, dtype=dtype),
        _t(M + 1, dtype=torch.int64), _t(M * taps, dtype=torch.int32), _t(M * taps, dtype=torch.float32),
        _t(M, dtype=torch.int64), out, taps,
    )  # fmt: skip


def variants(head_dims=(64, 128, 256)):
    """(op, variant name, call) for every variant the report covers."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dt = _TL_TYPES[dtype]
        for d in head_dims:
            for f in ATTENTION_FEATURES:
                yield "attention", f"{dt}-d{d}-{f}", lambda dtype=dtype, d=d, f=f: _attention_calls(dtype, d, f)
        for f in ("gelu", "gelu_tanh", "add_layer_norm"):
            yield "fused", f"{dt}-{f}", lambda dtype=dtype, f=f: _fused_calls(dtype, f)
        for f in ("infonce", "clip", "siglip"):
            yield "contrastive", f"{dt}-{f}", lambda dtype=dtype, f=f: _contrastive_calls(dtype, f)
        yield "patch_embed", f"{dt}-vit_b16", lambda dtype=dtype: _patch_embed_calls(dtype, "")
        yield "patch_embed", f"{dt}-packed", lambda dtype=dtype: _patch_embed_packed_calls(dtype)


# ---- compiling one launch -----------------------------------------------------------------------------------


def _configs(kernel, kwargs, arch: int) -> list[triton.Config]:
    """The configs this launch may run with on `arch`: the autotuner's after the launcher's pruning, or the
    launch's own num_warps / num_stages."""
    if not isinstance(kernel, Autotuner):
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        return [triton.Config({}, **opts)]
    configs = kernel.configs
    if kernel.fn.__name__.startswith("_attention"):
        elem = torch.empty((), dtype=kwargs["_dtype"]).element_size()
        kind = kernel.fn.__name__.split("_")[-2]  # _attention_{fwd,bwd_dkdv,bwd_dq}_kernel
        configs = attention.fitting_configs(configs, elem, kwargs, SHARED_LIMIT[arch], kind, arch)
    return configs


def _signature(fn: JITFunction, values: dict):
    """Signature, constexprs and divisibility attributes the way Triton's launcher specialises these values:
    ints equal to 1 become constants, ints and pointers divisible by 16 get the divisibility hint (tensors from
    torch's allocator are 16-byte aligned)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TL_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return signature, constexprs, attrs


def _bound_values(fn: JITFunction, args, kwargs, config: triton.Config) -> dict:
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    values.update(config.kwargs)
    for p in fn.params:
        if p.name not in values:
            values[p.name] = p.default
    return values


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack-frame bytes) per thread from `cuobjdump -res-usage` (Triton's wheel ships it). A
    Triton kernel has no local arrays, so its stack frame is where ptxas puts spilled registers. The CUDA toolkit's
    cuobjdump serves where the wheel has none."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(found.group(1)), int(found.group(2))


def compile_launch(kernel, args, kwargs, config: triton.Config, arch: int) -> dict:
    """Compile one launch with one config for sm_<arch>; the record (see the module docstring)."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    rec = {"kernel": fn.__name__, "arch": arch, "config": {**config.kwargs, "num_warps": config.num_warps,
           "num_stages": config.num_stages}, "ok": False, "error": None}  # fmt: skip
    try:
        signature, constexprs, attrs = _signature(fn, _bound_values(fn, args, kwargs, config))
        target = GPUTarget("cuda", arch, 32)
        backend = triton.compiler.make_backend(target)
        options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        shared = compiled.metadata.shared
        regs, spill = _resource_usage(compiled.asm["cubin"])
        rec.update(
            shared_bytes=shared,
            registers=regs,
            spill_bytes=spill,
            cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)\b", ptx)),
            tensor_core_ops="wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "none"),
        )
        if shared > SHARED_LIMIT[arch]:
            rec["error"] = f"shared memory {shared} B exceeds sm_{arch}'s {SHARED_LIMIT[arch]} B"
        else:
            rec["ok"] = True
    except Exception as exc:  # noqa: BLE001  (a compiler error is a result to record, not a crash)
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return rec


# ---- the whole report -----------------------------------------------------------------------------------------

_TASKS: list = []  # (op, variant, kernel, args, kwargs, config, arch), built before the workers fork


def tasks(archs, first_config: bool, head_dims=(64, 128, 256), only: str | None = None) -> list:
    out = []
    for op, name, call in variants(head_dims):
        if only is not None and not re.search(only, f"{op}/{name}"):
            continue
        launches: list = []
        with _intercepted(launches):
            call()
        dtype = {v: k for k, v in _TL_TYPES.items()}[name.split("-")[0]]
        for kernel, args, kwargs in launches:
            kwargs = {**kwargs, "_dtype": dtype}
            for arch in archs:
                configs = _configs(kernel, kwargs, arch)
                for config in configs[:1] if first_config else configs:
                    out.append((op, name, kernel, args, kwargs, config, arch))
    return out


def _run_task(i: int) -> dict:
    op, name, kernel, args, kwargs, config, arch = _TASKS[i]
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in kwargs.items() if k != "_dtype"}
    rec = compile_launch(kernel, args, kwargs, config, arch)
    return {"op": op, "variant": name, **rec, "seconds": round(time.perf_counter() - t0, 2)}


def report(archs=(90, 80), first_config=False, jobs=1, head_dims=(64, 128, 256), only=None) -> list[dict]:
    _TASKS[:] = tasks(archs, first_config, head_dims, only)
    if jobs <= 1:
        return [_run_task(i) for i in range(len(_TASKS))]  # in this process: no fork
    records = []
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for rec in pool.imap(_run_task, range(len(_TASKS))):
            records.append(rec)
            if len(records) % 50 == 0:
                print(f"{len(records)}/{len(_TASKS)} compiled", file=sys.stderr, flush=True)
    return records


def check(records: list[dict]) -> list[str]:
    """The report's targets; each miss as one line."""
    misses = []
    plain_cp = {}
    for r in records:
        if not r["ok"]:
            misses.append(f"{r['kernel']} {r['variant']} sm_{r['arch']} {r['config']}: {r['error']}")
            continue
        dropout = "dropout" in r["variant"]
        low_precision = not r["variant"].startswith("fp32")
        if low_precision and r["spill_bytes"] > (DROPOUT_SPILL_LIMIT if dropout else 0):
            misses.append(f"{r['kernel']} {r['variant']} sm_{r['arch']} {r['config']}: spills {r['spill_bytes']} B")
        if r["op"] == "attention" and r["variant"].endswith("-plain"):
            plain_cp[(r["kernel"], r["variant"][: -len("plain")], r["arch"], str(r["config"]))] = r["cp_async"]
    for r in records:
        if r["ok"] and r["op"] == "attention" and r["variant"].rsplit("-", 1)[1] in ("causal", "window"):
            prefix, _ = r["variant"].rsplit("-", 1)
            plain = plain_cp.get((r["kernel"], prefix + "-", r["arch"], str(r["config"])))
            if plain is not None and r["cp_async"] < plain:
                misses.append(f"{r['kernel']} {r['variant']} sm_{r['arch']}: {r['cp_async']} cp.async, plain {plain}")
    return misses


def summary(records: list[dict]) -> str:
    lines = []
    for arch in sorted({r["arch"] for r in records}, reverse=True):
        rs = [r for r in records if r["arch"] == arch]
        ok = [r for r in rs if r["ok"]]
        lines.append(
            f"sm_{arch}: {len(ok)}/{len(rs)} compiled within limits; max spill {max((r['spill_bytes'] for r in ok), default=0)}"
            f" B/thread; max shared {max((r['shared_bytes'] for r in ok), default=0)} B"
        )
        for kernel in sorted({r["kernel"] for r in ok}):
            ks = [r for r in ok if r["kernel"] == kernel]
            by_feature = {}
            for r in ks:
                by_feature.setdefault(r["variant"].split("-", 2 if r["op"] == "attention" else 1)[-1], []).append(r)
            parts = ", ".join(
                f"{f} cp.async {min(r['cp_async'] for r in v)}-{max(r['cp_async'] for r in v)}"
                f" spill<={max(r['spill_bytes'] for r in v)}"
                for f, v in by_feature.items()
            )
            lines.append(f"  {kernel} [{ks[0]['tensor_core_ops']}]: {parts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--first-config", action="store_true", help="only the first (pruned) config of each variant")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--only", help="regex on 'op/variant', e.g. 'attention/fp16-d64'")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="JSON file for the records")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("TRITON_INTERPRET is set: the kernels were made for the interpreter; unset it to compile them")
    for arch in a.arch:
        if arch not in SHARED_LIMIT:
            ap.error(f"--arch: no shared-memory limit known for {arch}; known: {sorted(SHARED_LIMIT)}")
    t0 = time.perf_counter()
    records = report(a.arch, a.first_config, a.jobs, tuple(a.head_dims), a.only)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "records": records}, f, indent=1)
    print(summary(records))
    misses = check(records)
    print(f"{len(records)} compiles in {time.perf_counter() - t0:.0f} s; {len(misses)} targets missed")
    for m in misses:
        print("  MISSED", m)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
