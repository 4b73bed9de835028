"""Which inner optimizer owns which parameter.

Muon is built for the 2-D weight matrices of hidden layers. Embeddings and the LM head are 2-D
too, but they are lookup tables over tokens rather than linear maps between hidden states, and
Muon's authors (and Moonshot) keep them on AdamW; so do we, together with every 1-D parameter
(norm gains, biases) and any parameter of other rank.
"""

from __future__ import annotations

from torch import nn

NamedParameters = list[tuple[str, nn.Parameter]]


def split_parameters(model: nn.Module) -> tuple[NamedParameters, NamedParameters]:
    """Split `model`'s trainable parameters into `(muon, adamw)` lists of `(name, parameter)`.

    Muon gets every 2-D parameter except those of embedding layers: every `nn.Embedding` /
    `nn.EmbeddingBag`, and the modules returned by `model.get_input_embeddings()` and
    `model.get_output_embeddings()` (Hugging Face models; the LM head is an `nn.Linear`).
    AdamW gets everything else. Frozen parameters (`requires_grad=False`) are left out. A tied
    embedding / LM-head weight is one parameter and appears once, under its first name, in AdamW.

    Raises ValueError if the model has no trainable parameter.
    """
    embedding_params = _embedding_parameter_ids(model)
    muon: NamedParameters = []
    adamw: NamedParameters = []
    # named_parameters() yields a shared (tied) parameter only once.
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_hidden_matrix = param.ndim == 2 and id(param) not in embedding_params
        (muon if is_hidden_matrix else adamw).append((name, param))
    if not muon and not adamw:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)")
    return muon, adamw


def _embedding_parameter_ids(model: nn.Module) -> set[int]:
    """ids of all parameters that belong to an input or output embedding layer."""
    return {id(param) for module in _embedding_modules(model) for param in module.parameters()}


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    modules: list[nn.Module] = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    for getter_name in ("get_input_embeddings", "get_output_embeddings"):
        getter = getattr(model, getter_name, None)
        if not callable(getter):
            continue
        try:
            module = getter()
        except NotImplementedError:  # some HF classes raise instead of returning None
            continue
        if isinstance(module, nn.Module):
            modules.append(module)
    return modules
