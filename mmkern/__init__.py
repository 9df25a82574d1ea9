"""mmkern: kernel-accelerated ops and models for multimodal (vision-language) learning."""

__version__ = "0.1.0"

from mmkern import ops  # registers the torch custom ops
from mmkern.backends import BACKENDS, use_backend

__all__ = ["BACKENDS", "__version__", "ops", "use_backend"]
