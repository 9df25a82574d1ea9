"""The CPU kernels' ISA levels: choosing one, forcing a lower one, what each level's machine code may contain, and a
module built here running on CPUs with fewer features (under QEMU's user-mode emulation, where it is installed)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import mmkern
from mmkern import _native, backends

pytestmark = pytest.mark.skipif(_native.CPU_ERROR is not None, reason="the cpu backend is unavailable here")
X86 = platform.machine().lower() in ("x86_64", "amd64")
ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_levels_compiled_and_chosen():
    compiled = _native._C.cpu_capabilities()
    assert compiled == (["avx512_bf16", "avx512", "avx2", "default"] if X86 else ["default"])
    supported = mmkern.cpu_capabilities()
    assert supported == [level for level in compiled if level in supported] and supported[-1] == "default"
    if not os.environ.get("MMKERN_CPU_CAPABILITY"):
        assert mmkern.cpu_capability() == supported[0]  # the best one by default


def test_use_cpu_capability_switches_and_restores():
    before = mmkern.cpu_capability()
    with mmkern.use_cpu_capability("default"):
        assert mmkern.cpu_capability() == "default"
    assert mmkern.cpu_capability() == before
    with pytest.raises(ValueError, match="unknown level 'avx9'.*compiled in: "):
        mmkern.use_cpu_capability("avx9")
    for level in set(_native._C.cpu_capabilities()) - set(mmkern.cpu_capabilities()):
        with pytest.raises(ValueError, match=f"cpu capability {level} needs instructions this CPU lacks"):
            mmkern.use_cpu_capability(level)
    assert mmkern.cpu_capability() == before


def test_environment_variable_forces_a_level_or_says_why_not():
    probe = "import mmkern; print(mmkern.cpu_capability())"
    assert _run(probe, {"MMKERN_CPU_CAPABILITY": "default"}).stdout.strip() == "default"
    bad = _run(
        "import torch, mmkern\nfrom mmkern import backends\nprint(backends.unavailable_reason('cpu', 'cpu'))\n"
        "mmkern.ops.bias_gelu(torch.ones(2, 3))",
        {"MMKERN_CPU_CAPABILITY": "avx9"},
    )
    assert "MMKERN_CPU_CAPABILITY=avx9: cpu capability: unknown level 'avx9'" in bad.stdout
    assert "ValueError: backend: 'cpu' is not available: MMKERN_CPU_CAPABILITY=avx9" in bad.stderr  # at first use


def test_info_names_the_level():
    out = _run("from mmkern.cli import info; print(info())").stdout
    assert f"CPU kernels: running at {mmkern.cpu_capability()}; compiled in: " in out


def _linkable(function: str) -> bool:
    """Whether the linker may have kept this function's copy from another object than its callers' (the symbols are
    hidden in the module, so its symbol table cannot tell): not a clone (`.constprop.0`, an OpenMP region), which is
    local to the object that made it, nor in an anonymous namespace."""
    return "[clone ." not in function and "(anonymous namespace)" not in function


def _functions_by_level() -> dict[str, dict[str, set[str]]]:
    """{level or 'shared': {function: the kinds of instructions in it}} from the module's disassembly."""
    level_of = re.compile(r"mmkern::cpu_(default|avx2|avx512_bf16|avx512)::")
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    func = level = None
    disassembly = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", _native._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    for line in disassembly.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func = head.group(1)
            match = level_of.search(func)
            level = match.group(1) if match else "shared"
            continue
        fields = line.split("\t")
        if func is None or len(fields) < 2 or not fields[1].strip():
            continue
        insn = fields[1].strip()
        kinds = found[level][func]
        kinds.add("vex" if insn.startswith("v") else "legacy")
        kinds.update(reg for reg in ("ymm", "zmm") if reg in insn)
    return found


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with binutils' objdump")
def test_machine_code_of_each_level():
    """Code that every level may call (bindings, the C++ library's templates, the shared headers' inline functions)
    is baseline x86-64: the linker keeps one copy of such a function for the whole module, and setup.py links the
    lowest level first so that it is that one. A VEX/EVEX instruction there would crash CPUs without AVX. Each
    level's own namespace holds the instructions of its level (which also checks that the parse finds them)."""
    found = _functions_by_level()
    leaks = sorted(f for f, kinds in found["shared"].items() if _linkable(f) and kinds & {"vex", "ymm", "zmm"})
    assert not leaks, f"shared functions with AVX instructions: {leaks[:10]}"
    kinds = {level: set().union(*found[level].values()) for level in ("default", "avx2", "avx512", "avx512_bf16")}
    assert not kinds["default"] & {"vex", "ymm", "zmm"}
    assert "ymm" in kinds["avx2"] and "zmm" not in kinds["avx2"]
    assert "zmm" in kinds["avx512"] and "zmm" in kinds["avx512_bf16"]


# Under QEMU: a CPU without AVX-512 (Haswell: AVX2, FMA, F16C) and one without AVX (Nehalem). The module must pick
# the best level the emulated CPU has and run every op's forward and backward there, matching the reference.
EMULATED = {"Haswell": "avx2", "Nehalem": "default"}
SMOKE = """
import torch, mmkern
from mmkern import ops, reference
torch.manual_seed(0)
print(mmkern.cpu_capability())
def check(name, got, want):
    err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    assert err < 1e-4, (name, err)
q, k, v = (torch.randn(2, 3, 37, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = ops.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), is_causal=True)
check("attention", out, reference.scaled_dot_product_attention(q, k, v, is_causal=True))
out.sum().backward()
img = torch.randn(2, 3, 32, 48, dtype=torch.float64, requires_grad=True)
w = torch.randn(24, 3, 16, 16, dtype=torch.float64, requires_grad=True)
check("patch_embed", ops.patch_embed(img.float(), w.float()), reference.patch_embed(img, w))
x, y = torch.randn(70, 24, dtype=torch.float64), torch.randn(70, 24, dtype=torch.float64)
check("clip_loss", ops.clip_loss(x.float(), y.float(), 10.0), reference.clip_loss(x, y, 10.0))
check("bias_gelu", ops.bias_gelu(x.float()), torch.nn.functional.gelu(x))
print("ok")
"""


@pytest.mark.skipif(not X86 or shutil.which("qemu-x86_64") is None, reason="x86-64 with qemu-user (apt qemu-user)")
@pytest.mark.parametrize("cpu", EMULATED)
def test_runs_on_cpus_with_fewer_features(cpu, tmp_path):
    # numpy's wheels (2.3.5, 2.4.6) die with SIGILL on a CPU without AVX, at import, before torch or mmkern runs;
    # the smoke needs no numpy, and torch imports without it when it is missing, so the emulated run does not see it.
    hidden = tmp_path / "numpy"
    hidden.mkdir()
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("numpy is hidden here", name="numpy")\n')
    env = {
        "MMKERN_CPU_CAPABILITY": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    result = _run(SMOKE, env, prefix=("qemu-x86_64", "-cpu", cpu))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [EMULATED[cpu], "ok"]


def test_reference_backend_needs_no_level():
    """The level is the cpu backend's business only: the other backends ignore it."""
    assert backends.unavailable_reason("reference", "cpu") is None
