"""Test setup. Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before triton is
imported; on a machine with a GPU they run on the GPU instead."""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches key a graph by its ops and inputs, not by what a custom op's fake implementation
# returns: a cache filled by an older mmkern (attention's lse was (B, H, L) before it became (B, H, L, 2)) makes
# the compile tests fail with "mismatch in length of strides and shape". The suite compiles into its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmkern-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

from hypothesis import HealthCheck, settings

# Kernel tests do real work per example (and the Triton interpreter is slow): keep example counts modest
# and deadlines off. Locally each run draws new examples (and replays saved failures); under CI the
# draws are derandomized, so a CI result can be reproduced with MMKERN_HYPOTHESIS_PROFILE=ci.
_common = {"max_examples": 25, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("mmkern", **_common)
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.load_profile(os.environ.get("MMKERN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "mmkern"))

import pytest

import mmkern  # after TRITON_INTERPRET is set
from mmkern import _native


def _first_config_only() -> None:
    """Every autotuned Triton kernel of mmkern runs the first of its configs that its own pruning keeps for the device
    (the compile report's "first config"), instead of compiling and timing each candidate on every new shape: about
    30 compiles per attention shape, which took the GPU tests past benchmarks/gpu_check.sh's budget. Speed is the
    benchmarks' business; they autotune over every config."""
    import importlib
    import pkgutil

    from triton.runtime import autotuner

    import mmkern.kernels.triton as kernels

    def first(prune):
        return lambda configs, named_args, **meta: (prune(configs, named_args, **meta) if prune else configs)[:1]

    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for kernel in vars(module).values():
            if isinstance(kernel, autotuner.Autotuner):
                kernel.early_config_prune = first(kernel.early_config_prune)


if os.environ.get("MMKERN_TEST_FIRST_CONFIG") == "1":
    _first_config_only()


def cpu_levels() -> list[str]:
    """The ISA levels the CPU kernel tests run at, best first: every level compiled in that this CPU can run, or
    only the one MMKERN_CPU_CAPABILITY forces."""
    if _native.CPU_ERROR is not None:
        return []
    if os.environ.get("MMKERN_CPU_CAPABILITY"):
        return [mmkern.cpu_capability()]
    return mmkern.cpu_capabilities()


def pytest_generate_tests(metafunc):
    """Modules marked `cpu_levels` (and using the cpu_level fixture) run once per level of cpu_levels()."""
    if metafunc.definition.get_closest_marker("cpu_levels") and "cpu_level" in metafunc.fixturenames:
        metafunc.parametrize("cpu_level", cpu_levels(), indirect=True, scope="module", ids=lambda lv: f"cpu={lv}")


@pytest.fixture(scope="module")
def cpu_level(request):
    """Runs the CPU kernels at the level of this parametrization (module scope: one switch per level)."""
    with mmkern.use_cpu_capability(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    """Below the best level only the cpu backend's cases run again (the reference and Triton cases there would
    repeat the best level's, as would the tests of the other backends)."""
    best = (cpu_levels() or [None])[0]
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        lower = params.get("cpu_level", best) != best
        (drop if lower and params.get("backend", "cpu") != "cpu" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
