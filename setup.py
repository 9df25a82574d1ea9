"""Builds mmkern._C: a torch-free pybind11 module with OpenMP CPU kernels and, when nvcc is found, CUDA kernels.

Knobs (environment variables):
  MMKERN_CUDA=0|1          force the CUDA build off / on (default: on when nvcc is found)
  MMKERN_CUDA_ARCHS        e.g. "80;90a" (default); each entry becomes -gencode arch=compute_X,code=sm_X
  MMKERN_NATIVE_ARCH=0|1   compile the CPU kernels with -march=native (default 1)
  MMKERN_BUILD_JOBS=N      parallel compile jobs (default: number of CPUs)
"""

import os
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
NATIVE_ARCH = _flag("MMKERN_NATIVE_ARCH", True)

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
if NATIVE_ARCH:
    cxx_flags.append("-march=native")
define_macros = [("MMKERN_CUDA_ARCHS", f'"{";".join(CUDA_ARCHS) if WITH_CUDA else ""}"')]
if WITH_CUDA:
    define_macros.append(("MMKERN_WITH_CUDA", "1"))


class BuildWithCuda(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects that are linked into _C with a static CUDA runtime."""

    def build_extension(self, ext):
        if WITH_CUDA:
            ext.extra_objects = ext.extra_objects + self._compile_cuda()
            ext.library_dirs = ext.library_dirs + [str(CUDA_ROOT / "lib64")]
            ext.libraries = ext.libraries + ["cudart_static", "dl", "rt", "pthread"]
            ext.include_dirs = ext.include_dirs + [str(CUDA_ROOT / "include")]
        super().build_extension(ext)

    def _compile_cuda(self) -> list[str]:
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        headers = sorted(glob(str(ROOT / "csrc" / "include" / "mmkern" / "*")))
        newest_header = max((os.path.getmtime(h) for h in headers), default=0)
        jobs = []
        for src in sorted(glob(str(ROOT / "csrc" / "cuda" / "*.cu"))):
            obj = out_dir / (Path(src).stem + ".o")
            if obj.exists() and obj.stat().st_mtime > max(os.path.getmtime(src), newest_header):
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
    sources=sorted(["csrc/bindings.cpp", *glob("csrc/cpu/*.cpp")]),
    depends=sorted(glob("csrc/include/mmkern/*")),  # a changed header rebuilds the module (else it is skipped)
    include_dirs=["csrc/include"],
    define_macros=define_macros,
    extra_compile_args=cxx_flags,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildWithCuda})
