"""mmkern: kernel-accelerated ops and models for multimodal (vision-language) learning."""

__version__ = "0.1.0"

from mmkern import ops  # noqa: E402  (registers the torch custom ops)
from mmkern.backends import BACKENDS, use_backend  # noqa: E402

__all__ = ["BACKENDS", "ops", "use_backend", "__version__"]
