"""LoRA adapters (``peft``) for baking, merged back into the weights afterwards.

On ``nn.Linear`` layers (Cognate, Llama-family models) this is peft's own LoRA. On a BitLinear
in training state the adapter must not sit beside the ternary layer as a full-precision side
branch, because merging it would then change the model: ``quant(W) x + BAx`` is not
``quant(W + BA) x``. :class:`BitLinearLora` therefore puts the low-rank update *inside* the
quantizer, ``y = BitLinear_{W + s·BA}(x)``, trained through the straight-through estimator, and
merging writes ``W + s·BA`` into the latent weight: the merged model computes exactly what the
adapted one did, and the model stays ternary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from agentforge.nn import BitLinear
from agentforge.nn.bitlinear import PACKED

# The reference code adapts the attention projections; Cognate and Llama share these names.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class BitLinearLora(PeftLoraLinear):
    """peft's LoRA layer for a training-state BitLinear, with the update inside the quantizer
    (see the module docstring). Merging and unmerging are peft's (``W += s·BA`` on the latent
    weight), which is what this forward computes."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        delta = cast(torch.Tensor, sum(self.get_delta_weight(name) for name in active))
        weight = cast(torch.Tensor, base.weight) + delta
        return torch.func.functional_call(base, {"weight": weight}, (x,))


def check_bakeable(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` can be trained: BitLinear layers must hold their latent
    weights (training state); packed ternary layers have none to bake into."""
    packed = [name for name, m in model.named_modules() if isinstance(m, BitLinear) and m.state == PACKED]
    if packed:
        raise ValueError(
            f"baking needs latent BitLinear weights, but {len(packed)} layer(s) are packed "
            f"(e.g. {packed[0]!r}); bake the BitNet phase's latent checkpoint instead"
        )


def add_lora(
    model: nn.Module, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (``B = 0``, so nothing changes yet) on the layers
    whose names end in one of ``targets``; every other weight is frozen."""
    check_bakeable(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_lora: rank must be a positive int, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"add_lora: alpha must be > 0, got {alpha!r}")
    names = [name for name, _ in model.named_modules() if any(name.endswith(t) for t in targets)]
    if not names:
        raise ValueError(f"add_lora: {type(model).__name__} has no layer named like {list(targets)}")
    # peft types lora_alpha as int; it only divides by r, and a float scale works
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")  # type: ignore[arg-type]
    config._register_custom_module({BitLinear: BitLinearLora})  # peft's documented hook for custom layers
    # a plain attribute (nn.Module's typed __setattr__ knows only tensors and modules)
    model._baking_trainable = {name: p.requires_grad for name, p in model.named_parameters()}  # type: ignore[assignment]
    return get_peft_model(model, config)


def merge_lora(model: PeftModel) -> nn.Module:
    """Fold the adapters into the weights (the latent weights of BitLinear layers) and return the
    plain model, with each parameter's ``requires_grad`` as it was before ``add_lora``."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_lora: expected a peft model from add_lora, got {type(model).__name__}")
    merged = model.merge_and_unload()
    trainable = merged.__dict__.pop("_baking_trainable", {})
    for name, param in merged.named_parameters():
        param.requires_grad_(trainable.get(name, True))
    return merged
