"""Model architectures. Cognate is known to transformers' Auto classes after ``import agentforge``.

The modeling classes load on first use: agentforge registers ``CognateConfig`` while transformers
is still importing its Auto registry, and importing the modeling code at that moment would
re-enter transformers half-initialised.
"""

from agentforge.models.configuration_cognate import PRESETS, CognateConfig

__all__ = ["CognateConfig", "CognateForCausalLM", "CognateModel", "PRESETS"]

_MODELING = {"CognateForCausalLM", "CognateModel"}


def __getattr__(name: str):
    if name in _MODELING:
        from agentforge.models import modeling_cognate

        return getattr(modeling_cognate, name)
    raise AttributeError(f"module 'agentforge.models' has no attribute {name!r}")
