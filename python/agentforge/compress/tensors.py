"""The tensors of a model as the compressor sees them: each distinct tensor once (tied weights
share one slot), which modules use it, and its group for the report (ternary layers,
embeddings, LM head, the rest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from agentforge.nn import BitLinear


@dataclass
class TensorSlot:
    """One stored tensor: ``names`` are its state-dict names, ``owners`` the (module name,
    attribute) pairs that hold it, ``per_channel`` the scale layout of a ternary layer."""

    names: list[str]
    group: str
    tensor: torch.Tensor
    owners: list[tuple[str, str]] = field(default_factory=list)
    per_channel: bool = False

    @property
    def name(self) -> str:
        return self.names[0]


def _group(model: Any, module: nn.Module, attr: str) -> str:  # model: a transformers model
    if isinstance(module, BitLinear) and attr == "weight":
        return "ternary"
    if module is model.get_input_embeddings() and attr == "weight":
        return "embedding"
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if module is output and attr == "weight":
        return "lm_head"
    return "rest"


def _key(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def model_tensors(model: nn.Module) -> list[TensorSlot]:
    """Every tensor of ``model.state_dict()`` once, in state-dict order. A BitLinear must be in
    training state (its latent weight is what gets quantised); a tensor tied to the input
    embeddings belongs to the embedding group."""
    packed = [name for name, m in model.named_modules() if isinstance(m, BitLinear) and m.state != "training"]
    if packed:
        raise ValueError(
            f"compress: BitLinear layer {packed[0]} is packed; compress the latent (training-state) "
            "model, whose weights the ternary codes are quantised from"
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    slots: dict[tuple, TensorSlot] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"compress: tensor {name} has dtype {tensor.dtype}; only floating-point tensors are stored"
            )
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        slot = slots.setdefault(_key(tensor), TensorSlot([], _group(model, module, attr), tensor.detach()))
        slot.names.append(name)
        slot.owners.append((owner, attr))
        group = _group(model, module, attr)
        if group == "embedding" or slot.group == "rest":
            slot.group = group  # a tied LM head stays with its embedding
        if isinstance(module, BitLinear):
            slot.per_channel = module.per_channel
    return list(slots.values())
