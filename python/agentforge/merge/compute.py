"""The compute cost of a model, counted from its structure: deterministic, unlike a timing.

    flops_per_token(model) = 2 · Σ_W numel(W) · passes(W)

W runs over the weight matrices a token's forward pass multiplies by: every parameter of two
or more dimensions (``nn.Linear`` weights, Cognate's neural-memory MLP), each module's once,
except embedding tables (a lookup, not a product); a tied LM head counts (it is a product). A
matrix multiplied by a vector costs 2 FLOPs per weight (a multiply and an add).

passes(W) is how often W's layer stack runs per token as the config declares it: once, or for
a recurrent stack the config's maximum (Cognate's weight-shared core runs up to
``max_recursion`` times; ACT may halt a token sooner, but that depends on the data, and the
declared maximum keeps the count a property of the model). Repeated layers of a DFS path are
separate blocks of the merged model, so they count once each.

Left out, as they do not scale with the weights: attention scores (they grow with the context),
norms, activations, biases and the neural memory's test-time writes.
"""

from __future__ import annotations

from torch import nn

from agentforge.merge.layers import layer_stacks

# Per model type: the layer stacks that run more than once per token, and the config field
# that declares how often (at most).
RECURRENT_STACKS: dict[str, dict[str, str]] = {"cognate": {"model.core": "max_recursion"}}


def stack_passes(model: nn.Module) -> dict[str, int]:
    """How often each layer stack of ``model`` runs per token, as its config declares."""
    recurrent = RECURRENT_STACKS.get(getattr(getattr(model, "config", None), "model_type", ""), {})
    return {
        stack: int(getattr(model.config, recurrent[stack])) if stack in recurrent else 1
        for stack in layer_stacks(model)
    }


def flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token of ``model``'s weight matrices (the module docstring's formula)."""
    passes = stack_passes(model)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        matrices = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
        if matrices:
            stack = next((s for s in passes if name.startswith(f"{s}.")), None)
            total += 2 * matrices * (passes[stack] if stack else 1)
    return total
