"""SASS report of the CUDA C++ kernels (csrc/cuda/*.cu), for a machine without a GPU: each file is compiled to a
cubin per target with nvcc (the build's flags), ptxas' resource usage is read from `-Xptxas -v`, and the SASS from
`cuobjdump -sass` (nvcc's, else the one in triton's wheel) is counted per kernel:

    python -m benchmarks.cuda_sass [--arch 80 90a] [--file fused.cu ...] [--kernel SUBSTRING] [--out FILE.json]

Columns: registers, spill (spill stores + loads, bytes per thread), ldg (global loads), ldg128 (16-byte global
loads), ldgsts (cp.async global->shared copies), atom (global atomics and reductions: ATOM*/RED), imad_hi
(IMAD.HI/IMAD.WIDE.HI, the multiply-high of a division by a constant or a 32-bit fast division), lds / sts (shared
memory loads / stores), div_call (calls of the out-of-line 64-bit integer division / remainder routines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc" / "include")]
COUNTS = {
    "ldg": re.compile(r"\bLDG\."),
    "ldg128": re.compile(r"\bLDG\.[\w.]*128\b"),
    "ldgsts": re.compile(r"\bLDGSTS\b"),
    "atom": re.compile(r"\b(ATOMG?|RED)\.|\bREDG\b"),
    "imad_hi": re.compile(r"\bIMAD\.(WIDE\.)?(U32\.)?HI\b|\bIMAD\.HI\b"),
    "lds": re.compile(r"\bLDS\b|\bLDS\."),
    "sts": re.compile(r"\bSTS\b|\bSTS\."),
}
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_CALL_TARGET = re.compile(r"\bCALL\.\S+\s+(0x[0-9a-f]+)")


def _division_calls(body: str) -> int:
    """Calls of out-of-line integer or float division routines: the called code up to its RET converts or takes a
    reciprocal (I2F / MUFU.RCP), unlike sm_80's loop-exit calls and the diverged-shuffle fallbacks."""
    code = {int(addr, 16): text for addr, text in _INSTR.findall(body)}
    calls = 0
    for call_addr, text in code.items():
        if not (m := _CALL_TARGET.search(text)):
            continue
        addr = int(m.group(1), 16)
        if 0 < addr - call_addr <= 32:  # sm_80's loop exit: a call just past the next branch, no routine
            continue
        while addr in code and not code[addr].lstrip().startswith(("RET", "BRA", "EXIT")):
            if re.search(r"\b(MUFU\.RCP|I2F)", code[addr]):
                calls += 1
                break
            addr += 16
    return calls


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parent / name).exists():
        return str(Path(nvcc).resolve().parent / name)
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.exists():
        return str(path)
    sys.exit(f"{name} not found (install the CUDA toolkit or triton)")


def _demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(
        ["c++filt"], check=False, input="\n".join(names), capture_output=True, text=True
    ).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    """mmkern::(anonymous namespace)::add_ln_bwd_kernel<float>(float const*, ...) -> add_ln_bwd_kernel<float>"""
    name = name.replace("(anonymous namespace)::", "").replace("mmkern::", "").replace("cuda::", "")
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # drop the parameter list: the parenthesis matching the last one
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            return name[:i].removeprefix("void ")
    return name


def compile_file(src: Path, arch: str, tmp: str) -> list[dict]:
    cubin = Path(tmp) / f"{src.stem}.sm_{arch}.cubin"
    cmd = [_tool("nvcc"), "-cubin", f"-arch=sm_{arch}", *FLAGS, "-Xptxas", "-v", str(src), "-o", str(cubin)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"nvcc failed on {src.name} (sm_{arch}):\n{res.stderr}")
    usage: dict[str, dict] = {}
    current = None
    for line in res.stderr.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            current = usage.setdefault(m.group(1), {})
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current["spill"] = int(m.group(1)) + int(m.group(2))
        elif m := re.search(r"Compiling entry function '(\S+)'", line):
            current = usage.setdefault(m.group(1), {})
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    records = []
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled, body = block.split("\n", 1)
        mangled = mangled.strip()
        rec = {"file": src.name, "arch": arch, "mangled": mangled, **usage.get(mangled, {})}
        rec.update({k: len(p.findall(body)) for k, p in COUNTS.items()})
        rec["div_call"] = _division_calls(body)
        records.append(rec)
    for rec, name in zip(records, _demangle([r["mangled"] for r in records])):
        rec["kernel"] = _short(name)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80", "90a"])
    ap.add_argument("--file", nargs="+", help="file names in csrc/cuda (default: all)")
    ap.add_argument("--kernel", help="only kernels whose name contains this")
    ap.add_argument("--out", help="write the records as JSON")
    args = ap.parse_args(argv)
    files = (
        [ROOT / "csrc" / "cuda" / f for f in args.file] if args.file else sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    )
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            for src in files:
                records += compile_file(src, arch, tmp)
    if args.kernel:
        records = [r for r in records if args.kernel in r["kernel"]]
    cols = ["registers", "spill", *COUNTS, "div_call"]
    print(f"{'arch':5} {'kernel':70} " + " ".join(f"{c:>8}" for c in cols))
    for r in records:
        print(f"{r['arch']:5} {r['kernel'][:70]:70} " + " ".join(f"{r.get(c, '-'):>8}" for c in cols))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.exit(main())
