"""Whole-model conversion: swap ``nn.Linear`` layers for BitLinear, freeze them to packed state,
and record the result in a Hugging Face model's config so ``from_pretrained`` can rebuild it."""

import sys
from typing import Any

from torch import nn

from agentforge.nn.bitlinear import LAYOUTS, TRAINING, BitLinear, check_bits

DEFAULT_SKIP = ("lm_head", "embed")


def linear_names(model: nn.Module, skip=DEFAULT_SKIP) -> list[str]:
    """Qualified names of the plain ``nn.Linear`` layers whose name contains no ``skip`` pattern.

    Subclasses of ``nn.Linear`` (BitLinear included) are left out: they may override ``forward``."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(pattern in name for pattern in skip)
    ]


def convert_to_bitnet(model: nn.Module, skip=DEFAULT_SKIP, per_channel: bool = False) -> nn.Module:
    """Replace every plain ``nn.Linear`` of ``model`` whose qualified name contains none of the
    ``skip`` substrings by a training-state BitLinear carrying the same weight and bias Parameters.
    Converts in place and returns ``model``; raises ``ValueError`` when nothing is left to convert."""
    skip = tuple(skip)
    names = set(linear_names(model, skip))
    if not names:
        already = any(isinstance(m, BitLinear) for m in model.modules())
        raise ValueError(
            f"convert_to_bitnet: {type(model).__name__} has no nn.Linear layer to convert"
            + (" (it is already converted)" if already else f" outside the skip patterns {skip}")
        )
    # A Linear registered under several names (shared module) becomes one BitLinear everywhere.
    replacements: dict[int, BitLinear | None] = {id(model.get_submodule(name)): None for name in names}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replacements:
            replacement = replacements[id(module)]
            if replacement is None:
                replacement = replacements[id(module)] = BitLinear.from_linear(module, per_channel)
            model.set_submodule(name, replacement)
    record_in_config(model, skip=skip)
    return model


def pack_bitnet(model: nn.Module, bits=2) -> nn.Module:
    """Pack every training-state BitLinear of ``model`` (in place); returns ``model``.

    ``bits``: 2 (2-bit layout), 1.6 (base-3, 5 weights per byte) or ``"auto"``: when the
    model's packed ternary weights exceed the last-level cache, so that decoding streams them
    from memory, each layer gets the layout measured faster for its shape with cold caches
    (``ops.cold_layout``); a model that fits in cache keeps 2 bits, the faster layout there."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not layers:
        raise ValueError(
            f"pack_bitnet: {type(model).__name__} has no BitLinear layer; call convert_to_bitnet(model) first"
        )
    todo = [m for m in layers if m.state == TRAINING]
    if not todo:
        raise RuntimeError(f"pack_bitnet: every BitLinear layer of {type(model).__name__} is already packed")
    if bits == "auto":
        from agentforge import ops

        total = sum(m.out_features * -(-m.in_features // 4) for m in todo)
        cold = total > ops.last_level_cache_bytes()
        for layer in todo:
            layout = ops.cold_layout(layer.out_features, layer.in_features) if cold else "2bit"
            layer.pack(next(b for b, (name, _) in LAYOUTS.items() if name == layout))
    else:
        check_bits(bits, "pack_bitnet")
        for layer in todo:
            layer.pack(bits)
    record_in_config(model)
    return model


def record_in_config(model: nn.Module, skip=None) -> None:
    """Describe the model's BitLinear layers in ``model.config.quantization_config`` (Hugging Face
    models only), which ``save_pretrained`` writes to config.json. ``skip`` defaults to the one
    already recorded."""
    transformers = sys.modules.get("transformers")  # an HF model means transformers is loaded
    config = getattr(model, "config", None)
    if transformers is None or not isinstance(config, transformers.PretrainedConfig):
        return
    from agentforge.nn.hf_quantizer import AgentForgeBitNetConfig

    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    states = {m.state for m in layers.values()}
    if len(states) > 1:
        raise ValueError(
            f"{type(model).__name__} mixes BitLinear layers with states {sorted(states)}, "
            "which one config.json cannot describe"
        )
    flags = {m.per_channel for m in layers.values()}
    # one flag when every layer agrees, else the names of the per-channel layers
    per_channel = flags.pop() if len(flags) == 1 else sorted(n for n, m in layers.items() if m.per_channel)
    widths = {m.bits for m in layers.values()}
    # one width when every layer agrees, else the names of the 1.6-bit layers
    bits = widths.pop() if len(widths) == 1 else sorted(n for n, m in layers.items() if m.bits == 1.6)
    old = getattr(config, "quantization_config", None)
    old = old if isinstance(old, AgentForgeBitNetConfig) else None
    state = states.pop() if states else TRAINING
    fields: dict[str, Any] = dict(
        state=state,
        modules=sorted(layers),
        skip=list(skip) if skip is not None else (old.skip if old else list(DEFAULT_SKIP)),
        per_channel=per_channel if layers else False,
        bits=bits if layers and state != TRAINING else 2,
    )
    if old is not None:  # update in place: a loaded model's hf_quantizer holds this same object
        old.update(**fields)
    else:
        config.quantization_config = AgentForgeBitNetConfig(**fields)
