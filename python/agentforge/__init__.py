"""agentforge: ternary (BitNet b1.58) kernels and a pipeline for small reasoning models."""

import torch  # noqa: F401  (must precede the extension: _C links against libtorch)

from agentforge import nn  # noqa: F401  (BitLinear; registers the agentforge_bitnet HF quantizer lazily)
from agentforge._import_hooks import after_import
from agentforge.ops import cpu_info, extension_loaded

__version__ = "0.1.0"
__all__ = ["cpu_info", "extension_loaded", "load", "__version__"]


def load(path, **kwargs):
    """Any artifact of a run (a ``model.afz``, a model directory, a phase directory) ready to
    answer, with its experts and thinking head attached: see ``agentforge.loading``."""
    from agentforge.loading import load as load_artifact

    return load_artifact(path, **kwargs)


# AutoConfig / AutoModelForCausalLM learn the Cognate model type as soon as transformers' Auto
# registries are imported; importing transformers here would cost seconds on every import.
def _register_cognate_config(auto) -> None:
    from agentforge.models.configuration_cognate import CognateConfig

    auto.AutoConfig.register(CognateConfig.model_type, CognateConfig, exist_ok=True)


def _register_cognate_model(auto) -> None:
    from agentforge.models.configuration_cognate import CognateConfig
    from agentforge.models.modeling_cognate import CognateForCausalLM

    auto.AutoModelForCausalLM.register(CognateConfig, CognateForCausalLM, exist_ok=True)


after_import("transformers.models.auto.configuration_auto", _register_cognate_config)
after_import("transformers.models.auto.modeling_auto", _register_cognate_model)
