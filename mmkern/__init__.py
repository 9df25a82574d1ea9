"""mmkern: kernel-accelerated ops and models for multimodal (vision-language) learning."""

__version__ = "0.1.0"

from mmkern import ops  # registers the torch custom ops
from mmkern.backends import BACKENDS, cpu_capabilities, cpu_capability, use_backend, use_cpu_capability

__all__ = ["BACKENDS", "__version__", "cpu_capabilities", "cpu_capability", "ops", "use_backend", "use_cpu_capability"]
