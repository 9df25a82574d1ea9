"""Test setup. Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before triton is
imported; on a machine with a GPU they run on the GPU instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Kernel tests do real work per example (and the Triton interpreter is slow): keep example counts modest
# and deadlines off; CI=1 uses the same profile so a failure reproduces locally.
settings.register_profile(
    "mmkern", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.load_profile(os.environ.get("MMKERN_HYPOTHESIS_PROFILE", "mmkern"))
