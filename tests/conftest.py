"""Test setup. Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before triton is
imported; on a machine with a GPU they run on the GPU instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

# Kernel tests do real work per example (and the Triton interpreter is slow): keep example counts modest
# and deadlines off. Locally each run draws new examples (and replays saved failures); under CI the
# draws are derandomized, so a CI result can be reproduced with MMKERN_HYPOTHESIS_PROFILE=ci.
_common = {"max_examples": 25, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("mmkern", **_common)
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.load_profile(os.environ.get("MMKERN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "mmkern"))
