"""Builds mmkern._C: a torch-free pybind11 module with OpenMP CPU kernels and, when nvcc is found, CUDA kernels.

The CPU kernels (csrc/cpu/*.cpp) are compiled once per ISA level of the target architecture (X86_LEVELS or
OTHER_LEVELS, by the compiler's target, as bindings.cpp decides by __x86_64__) into the same module, which picks the
best level the CPU supports at import (see csrc/include/mmkern/cpu_kernels.h). No -march=native: one build runs on
every CPU of its architecture.

Knobs (environment variables):
  MMKERN_CUDA=0|1          force the CUDA build off / on (default: on when nvcc is found)
  MMKERN_CUDA_ARCHS        e.g. "80;90a" (default); each entry becomes -gencode arch=compute_X,code=sm_X
  MMKERN_BUILD_JOBS=N      parallel compile jobs (default: number of CPUs)
"""

import os
import platform
import shutil
import subprocess
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _find_cuda() -> tuple[str | None, Path | None]:
    """(nvcc, CUDA root with include/ and lib64/), or (None, None) without a CUDA toolkit."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.insert(2, str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        root = Path(root)
        if (root / "include" / "cuda_runtime_api.h").exists() and (root / "bin" / "nvcc").exists():
            return nvcc or str(root / "bin" / "nvcc"), root
    return None, None


NVCC, CUDA_ROOT = _find_cuda()
WITH_CUDA = _flag("MMKERN_CUDA", NVCC is not None)
if WITH_CUDA and NVCC is None:
    raise RuntimeError("MMKERN_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
CUDA_ARCHS = [
    a.strip() for a in os.environ.get("MMKERN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a.strip()
]

# (level, compiler flags), lowest first: the order in which they are linked (see cpu_kernels.h). A level's flags are
# the instructions bindings.cpp checks the CPU for before it runs that level.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
X86_LEVELS = [
    ("default", []),
    ("avx2", ["-mavx2", "-mfma", "-mf16c"]),
    ("avx512", _AVX512),
    ("avx512_bf16", [*_AVX512, "-mavx512bf16"]),
]
OTHER_LEVELS = [("default", [])]  # aarch64 (NEON is part of its baseline) and anything else: portable C++


def _target_arch(compiler_cmd: list[str]) -> str:
    """The architecture the compiler builds for: the first field of `-dumpmachine` (x86_64-linux-gnu ->
    x86_64, aarch64-linux-gnu -> aarch64). A cross build (CC=aarch64-linux-gnu-gcc with the target's sysconfig, as
    _PYTHON_HOST_PLATFORM builds do) runs setup.py on the host, so platform.machine() names the wrong one there;
    it is the fallback for a compiler without -dumpmachine."""
    try:
        out = subprocess.run([*compiler_cmd, "-dumpmachine"], capture_output=True, text=True, check=True).stdout
        return out.strip().split("-")[0].lower() or platform.machine().lower()
    except (OSError, subprocess.CalledProcessError):
        return platform.machine().lower()


CPU_SOURCES = sorted(glob("csrc/cpu/*.cpp"))
HEADERS = sorted(glob("csrc/include/mmkern/*"))

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
define_macros = [("MMKERN_CUDA_ARCHS", f'"{";".join(CUDA_ARCHS) if WITH_CUDA else ""}"')]
if WITH_CUDA:
    define_macros.append(("MMKERN_WITH_CUDA", "1"))


def _up_to_date(obj: Path, src: str) -> bool:
    """Whether `obj` is newer than `src` and every header."""
    newest = max([os.path.getmtime(src), *(os.path.getmtime(h) for h in HEADERS)])
    return obj.exists() and obj.stat().st_mtime > newest


class BuildWithCuda(build_ext):
    """Compiles csrc/cpu/*.cpp once per ISA level, and csrc/cuda/*.cu with nvcc, into objects that are linked into
    _C (with a static CUDA runtime) after bindings.cpp, lowest level first."""

    def build_extension(self, ext):
        ext.extra_objects = ext.extra_objects + self._compile_cpu_levels(ext)
        if WITH_CUDA:
            ext.extra_objects = ext.extra_objects + self._compile_cuda()
            ext.library_dirs = ext.library_dirs + [str(CUDA_ROOT / "lib64")]
            ext.libraries = ext.libraries + ["cudart_static", "dl", "rt", "pthread"]
            ext.include_dirs = ext.include_dirs + [str(CUDA_ROOT / "include")]
        super().build_extension(ext)

    def _compile_cpu_levels(self, ext) -> list[str]:
        x86 = _target_arch(self.compiler.compiler_so) in ("x86_64", "amd64")
        objects = []
        for level, flags in X86_LEVELS if x86 else OTHER_LEVELS:
            out_dir = Path(self.build_temp) / f"cpu_{level}"
            objs = [out_dir / Path(self.compiler.object_filenames([src])[0]) for src in CPU_SOURCES]
            stale = [src for src, obj in zip(CPU_SOURCES, objs) if not _up_to_date(obj, src)]
            if stale:
                self.compiler.compile(
                    stale,
                    output_dir=str(out_dir),
                    macros=[*ext.define_macros, ("MMKERN_CPU_NS", f"cpu_{level}"), ("MMKERN_CPU_LEVEL", level)],
                    include_dirs=ext.include_dirs,
                    extra_postargs=[*ext.extra_compile_args, *flags],
                )
            objects += [str(o) for o in objs]
        return objects

    def _compile_cuda(self) -> list[str]:
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        jobs = []
        for src in sorted(glob(str(ROOT / "csrc" / "cuda" / "*.cu"))):
            obj = out_dir / (Path(src).stem + ".o")
            if _up_to_date(obj, src):
                continue
            cmd = [
                NVCC,
                "-c",
                src,
                "-o",
                str(obj),
                "-O3",
                "-std=c++17",
                "--use_fast_math",
                "-Xcompiler",
                "-fPIC",
                "-I",
                str(ROOT / "csrc" / "include"),
                "--expt-relaxed-constexpr",
                *gencode,
            ]
            print(" ".join(cmd), flush=True)
            jobs.append((src, subprocess.Popen(cmd)))
        for src, job in jobs:
            if job.wait() != 0:
                raise RuntimeError(f"nvcc failed on {src}")
        return [str(out_dir / (Path(s).stem + ".o")) for s in sorted(glob(str(ROOT / "csrc" / "cuda" / "*.cu")))]


ParallelCompile("MMKERN_BUILD_JOBS", default=0).install()

ext = Pybind11Extension(
    "mmkern._C",
    sources=["csrc/bindings.cpp"],  # the CPU kernels are compiled per level by BuildWithCuda
    depends=[*CPU_SOURCES, *HEADERS],  # a changed kernel or header rebuilds the module (else it is skipped)
    include_dirs=["csrc/include"],
    define_macros=define_macros,
    extra_compile_args=cxx_flags,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildWithCuda})
