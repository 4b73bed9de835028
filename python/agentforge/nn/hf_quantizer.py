"""The ``agentforge_bitnet`` quantization method for Hugging Face transformers.

A converted model's config.json carries::

    "quantization_config": {"quant_method": "agentforge_bitnet", "state": "training" | "packed",
                            "modules": ["model.layers.0.self_attn.q_proj", ...],
                            "skip": ["lm_head", "embed"], "per_channel": false, "bits": 2}

``per_channel`` is true or false for every layer, or the list of the layers that have per-channel
scales (the others per-tensor), when a calibration chose per layer. ``bits`` (packed state) is
2 or 1.6 for every layer, or the list of the 1.6-bit (base-3) layers; a config without it (saved
before 1.6 bits existed) is 2 bits throughout.

and ``from_pretrained`` (after ``import agentforge``, which registers this module lazily; see
``agentforge._import_hooks``) swaps the listed ``nn.Linear`` layers for BitLinear before the weights load:

* training state: a BitLinear with a latent ``weight``, loaded like any ``nn.Linear``.
* packed state: transformers' loader sets tensors by state-dict name, so each layer is first a
  ``_PackedSlot`` holding the canonical ``weight_packed``/``weight_scale`` buffers; after loading,
  each slot becomes a packed BitLinear (kernel layout), validated on the way.

Before anything loads, the safetensors headers are checked against the config, so a checkpoint
that does not match its config.json fails with one clear error instead of random weights.
"""

from typing import cast

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from agentforge.nn.bitlinear import LAYOUTS, PACKED, TRAINING, BitLinear, _ceil_div
from agentforge.nn.convert import DEFAULT_SKIP, linear_names

QUANT_METHOD = "agentforge_bitnet"


class AgentForgeBitNetConfig(QuantizationConfigMixin):
    """Which layers are BitLinear (``modules``, qualified names; ``None`` means every ``nn.Linear``
    outside ``skip``), their ``state`` and whether scales are ``per_channel``: a bool for every
    layer, or the list of the layers with per-channel scales."""

    def __init__(
        self,
        state: str = TRAINING,
        modules: list[str] | None = None,
        skip=DEFAULT_SKIP,
        per_channel: bool | list[str] = False,
        quant_method: str = QUANT_METHOD,
        bits: float | list[str] = 2,
    ):
        if state not in (TRAINING, PACKED):
            raise ValueError(f"{QUANT_METHOD}: state must be '{TRAINING}' or '{PACKED}', got {state!r}")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"AgentForgeBitNetConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(per_channel, (list, tuple)):
            unknown = sorted(set(per_channel) - set(modules)) if modules is not None else []
            if not all(isinstance(name, str) for name in per_channel) or unknown:
                raise ValueError(
                    f"{QUANT_METHOD}: per_channel must be a bool or a list of layer names from "
                    f"'modules'; got {unknown or per_channel}"
                )
            per_channel = sorted(per_channel)
        else:
            per_channel = bool(per_channel)
        if isinstance(bits, (list, tuple)):
            unknown = sorted(set(bits) - set(modules)) if modules is not None else []
            if not all(isinstance(name, str) for name in bits) or unknown:
                raise ValueError(
                    f"{QUANT_METHOD}: bits must be 2, 1.6 or a list of layer names from 'modules'; "
                    f"got {unknown or bits}"
                )
            bits = sorted(bits)
        elif bits not in LAYOUTS:
            raise ValueError(f"{QUANT_METHOD}: bits must be 2, 1.6 or a list of the 1.6-bit layers, got {bits!r}")
        # transformers types quant_method as its own QuantizationMethod enum, which has no member for ours
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.state = state
        self.modules = list(modules) if modules is not None else None
        self.skip = list(skip)
        self.per_channel = per_channel
        self.bits = bits

    def per_channel_of(self, name: str) -> bool:
        """Whether layer ``name`` (as listed in ``modules``) has per-channel scales."""
        return name in self.per_channel if isinstance(self.per_channel, list) else self.per_channel

    def bits_of(self, name: str) -> float:
        """Bits per weight (2 or 1.6) of layer ``name``'s packed weights."""
        return (1.6 if name in self.bits else 2) if isinstance(self.bits, list) else self.bits


class _PackedSlot(nn.Module):
    """Load-time stand-in for a packed BitLinear: exposes the canonical tensors under their
    state-dict names so transformers' name-based loader can fill them."""

    weight_packed: torch.Tensor  # buffers
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, per_channel: bool, bits: float):
        super().__init__()
        N, K = linear.out_features, linear.in_features
        self.in_features, self.bits = K, bits
        self.register_buffer(
            "weight_packed", torch.empty(N, _ceil_div(K, LAYOUTS[bits][1]), dtype=torch.uint8, device="meta")
        )
        # fp32 explicitly: under from_pretrained(dtype=bf16) the default dtype is bf16, and the
        # loader casts a checkpoint tensor to its placeholder's dtype.
        self.register_buffer("weight_scale", torch.empty(N if per_channel else 1, dtype=torch.float32, device="meta"))
        self.bias = None if linear.bias is None else nn.Parameter(torch.empty_like(linear.bias, device="meta"))

    def to_bitlinear(self, name: str) -> BitLinear:
        try:
            return BitLinear.from_packed(self.weight_packed, self.weight_scale, self.in_features, self.bias, self.bits)
        except ValueError as exc:
            raise ValueError(f"{QUANT_METHOD}: layer '{name}': {exc}") from None


def _checkpoint_index(files) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (safetensors dtype, shape)} from the checkpoint headers (no tensor data read)."""
    from safetensors import safe_open

    index = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{QUANT_METHOD}: {path} is not a safetensors file; agentforge loads safetensors only")
        try:
            with safe_open(path, framework="pt") as fh:
                for key in fh.keys():
                    tensor = fh.get_slice(key)
                    index[key] = (tensor.get_dtype(), list(tensor.get_shape()))
        except Exception as exc:  # safetensors raises its own error types for unreadable headers
            raise ValueError(f"{QUANT_METHOD}: cannot read checkpoint {path}: {exc}") from None
    return index


def _expected_tensors(
    linear: nn.Linear, state: str, per_channel: bool, bits: float
) -> dict[str, tuple[set, list[int]]]:
    """{suffix: (allowed safetensors dtypes, shape)} that a layer's checkpoint must hold."""
    N, K = linear.out_features, linear.in_features
    floats = {"F32", "F16", "BF16", "F64"}
    packed = [N, _ceil_div(K, LAYOUTS[bits][1])]
    tensors = (
        {"weight_packed": ({"U8"}, packed), "weight_scale": (floats, [N if per_channel else 1])}
        if state == PACKED
        else {"weight": (floats, [N, K])}
    )
    if linear.bias is not None:
        tensors["bias"] = (floats, [N])
    return tensors


def _spellings(name: str, prefix: str) -> list[str]:
    """``name`` with and without the base-model prefix (e.g. "model."): a checkpoint saved from
    ``LlamaForCausalLM`` may be loaded as ``LlamaModel`` and vice versa."""
    return [name, name.removeprefix(prefix + "."), f"{prefix}.{name}"]


def _find_linear(model: nn.Module, name: str) -> tuple[str, nn.Linear]:
    for candidate in _spellings(name, cast(str, model.base_model_prefix)):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if type(module) is nn.Linear:
            return candidate, module
    raise ValueError(
        f"{QUANT_METHOD}: config.json lists '{name}' as a BitLinear layer, but "
        f"{type(model).__name__} has no nn.Linear of that name"
    )


def _check_checkpoint(
    index: dict,
    layers: dict[str, nn.Linear],
    per_channel: dict[str, bool],
    bits: dict[str, float],
    cfg: AgentForgeBitNetConfig,
    prefix: str,
) -> None:
    for name, linear in layers.items():
        for suffix, (dtypes, shape) in _expected_tensors(linear, cfg.state, per_channel[name], bits[name]).items():
            key = next((k for k in _spellings(f"{name}.{suffix}", prefix) if k in index), None)
            if key is None:
                raise ValueError(
                    f"{QUANT_METHOD}: the checkpoint has no tensor '{name}.{suffix}' that config.json "
                    f"promises for a {cfg.state} BitLinear layer; checkpoint and config do not match"
                )
            dtype, found = index[key]
            if dtype not in dtypes or found != shape:
                raise ValueError(
                    f"{QUANT_METHOD}: checkpoint tensor '{key}' is {dtype} {found}, but a {cfg.state} "
                    f"BitLinear({linear.in_features} -> {linear.out_features}) needs "
                    f"{'/'.join(sorted(dtypes))} {shape}; checkpoint and config do not match"
                )


class AgentForgeBitNetQuantizer(HfQuantizer):
    """Rebuilds BitLinear layers when transformers loads an ``agentforge_bitnet`` model."""

    requires_calibration = False  # a float checkpoint plus this config converts on load (training state)
    quantization_config: AgentForgeBitNetConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.state == PACKED and not self.pre_quantized:
            raise ValueError(
                f"{QUANT_METHOD}: state='packed' needs a packed checkpoint; load the float model with "
                "state='training' and call agentforge.nn.pack_bitnet(model)"
            )
        names = cfg.modules if cfg.modules is not None else linear_names(model, cfg.skip)
        layers, per_channel, bits = {}, {}, {}
        for name in names:  # the model may spell a name with or without its base-model prefix
            found, linear = _find_linear(model, name)
            layers[found], per_channel[found], bits[found] = linear, cfg.per_channel_of(name), cfg.bits_of(name)
        if self.pre_quantized and kwargs.get("checkpoint_files"):
            _check_checkpoint(
                _checkpoint_index(kwargs["checkpoint_files"]), layers, per_channel, bits, cfg, model.base_model_prefix
            )
        for name, linear in layers.items():
            new = (
                _PackedSlot(linear, per_channel[name], bits[name])
                if cfg.state == PACKED
                else BitLinear(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    per_channel=per_channel[name],
                    device="meta",
                    dtype=linear.weight.dtype,
                )
            )
            model.set_submodule(name, new)
        cfg.modules = sorted(layers)
        if isinstance(cfg.per_channel, list):
            cfg.per_channel = sorted(name for name, flag in per_channel.items() if flag)
        if isinstance(cfg.bits, list):
            cfg.bits = sorted(name for name, b in bits.items() if b == 1.6)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, slot in list(model.named_modules()):
            if isinstance(slot, _PackedSlot):
                model.set_submodule(name, slot.to_bitlinear(name))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:  # transformers 4.x passes safe_serialization
        return True

    @property
    def is_trainable(self) -> bool:
        return self.quantization_config.state == TRAINING

    @property
    def is_qat_trainable(self) -> bool:
        return self.quantization_config.state == TRAINING

    @property
    def is_compileable(self) -> bool:
        return True


def register(auto_module) -> None:
    """Add the config and quantizer to transformers' registries (``transformers.quantizers.auto``)."""
    if QUANT_METHOD not in auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto_module.register_quantization_config(QUANT_METHOD)(AgentForgeBitNetConfig)
    if QUANT_METHOD not in auto_module.AUTO_QUANTIZER_MAPPING:
        auto_module.register_quantizer(QUANT_METHOD)(AgentForgeBitNetQuantizer)
