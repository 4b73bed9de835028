"""agentforge: ternary (BitNet b1.58) kernels and a pipeline for small reasoning models."""
import torch  # noqa: F401  (must precede the extension: _C links against libtorch)

from agentforge.ops import cpu_info, extension_loaded
from agentforge import nn  # noqa: F401  (BitLinear; registers the agentforge_bitnet HF quantizer lazily)

__version__ = "0.1.0"
__all__ = ["cpu_info", "extension_loaded", "__version__"]
