"""Calibration of a ternary conversion from measured errors, before any weight changes.

For every ``nn.Linear`` that will become a BitLinear:

1. Its inputs on calibration rows are recorded (forward hooks; a layer called several times per
   forward, e.g. a weight-shared recursive block, contributes every call).
2. The layer's output error is measured on those inputs for both weight-scale schemes, as the
   relative squared error ``||y_q - y||² / ||y||²`` of ``y_q = act_q(x) · ternary(W)ᵀ`` against
   ``y = x Wᵀ`` (the same int8 activations and absmean ternary weights the layer will compute).
   Per-channel scales cost one fp32 per output row, so a layer takes them only when they cut its
   error by at least ``min_gain`` (relative); otherwise it keeps one scale per tensor (b1.58).
3. Sensitivity is measured end to end: the increase of the model's mean next-token NLL on the
   calibration rows when that layer alone is ternary (with its chosen scales). The
   ``n_sensitive`` layers with the largest increase are flagged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agentforge import ops


@dataclass
class LayerCalibration:
    """What calibration measured for one layer and what it chose."""

    name: str
    out_features: int
    in_features: int
    error_per_tensor: float  # relative squared output error, one scale per tensor
    error_per_channel: float  # the same with one scale per output row
    per_channel: bool  # the scheme chosen
    loss_increase: float  # nats/token added when only this layer is ternary
    sensitive: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def layer_inputs(model: nn.Module, names: list[str], batches: list[dict], max_tokens: int,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """The inputs each named ``nn.Linear`` sees while ``model`` reads ``batches`` (dicts of
    ``input_ids`` and optional ``attention_mask``; captured by ``agentforge.eval.capture``),
    flattened to ``[tokens, in_features]`` and subsampled (seeded, without replacement) to at most
    ``max_tokens`` rows per layer."""
    from agentforge.eval.capture import capture_calls

    seen = capture_calls(model, names, batches, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, calls in seen.items():
        if not calls:
            raise ValueError(f"calibration: layer {name!r} was never called on the calibration rows")
        x = torch.cat([args[0].reshape(-1, args[0].shape[-1]).float() for args in calls])
        if len(x) > max_tokens:
            x = x[torch.randperm(len(x), generator=generator)[:max_tokens]]
        inputs[name] = x
    return inputs


@torch.no_grad()
def output_error(x: torch.Tensor, linear: nn.Linear, per_channel: bool) -> float:
    """Relative squared error of the layer's ternary output on inputs ``x`` [T, K] (see module doc)."""
    weight = linear.weight.detach().float()
    bias = None if linear.bias is None else linear.bias.detach().float()
    exact = F.linear(x, weight, bias)
    ternary = F.linear(ops.act_fake_quant(x), ops.ternary_fake_quant(weight, per_channel), bias)
    return float((ternary - exact).pow(2).sum() / exact.pow(2).sum().clamp(min=1e-30))


def choose_per_channel(error_per_tensor: float, error_per_channel: float, min_gain: float) -> bool:
    """Per-channel scales only when they cut the error by at least the fraction ``min_gain``."""
    return error_per_channel < (1.0 - min_gain) * error_per_tensor


@torch.no_grad()
def loss_increase(model: nn.Module, name: str, per_channel: bool, mean_nll, base_nll: float) -> float:
    """``mean_nll(model)`` with layer ``name`` alone made ternary, minus ``base_nll``; the layer is
    restored afterwards (the BitLinear shares its Parameters, so nothing is copied)."""
    from agentforge.nn import BitLinear

    linear = model.get_submodule(name)
    model.set_submodule(name, BitLinear.from_linear(linear, per_channel))
    try:
        return mean_nll(model) - base_nll
    finally:
        model.set_submodule(name, linear)


def calibrate(model: nn.Module, names: list[str], batches: list[dict], mean_nll, *, min_gain: float,
              n_sensitive: int, max_tokens: int, seed: int = 0) -> list[LayerCalibration]:
    """Measure every named ``nn.Linear`` of ``model`` (a float model, left unchanged): output
    errors of both scale schemes on the calibration ``batches``, the chosen scheme, and the loss
    increase ``mean_nll(model with that layer ternary) - mean_nll(model)``; flag the
    ``n_sensitive`` layers with the largest increase. Returns one record per layer, in order."""
    if not names:
        raise ValueError("calibrate: no layers to calibrate")
    if not 0 <= min_gain < 1:
        raise ValueError(f"calibrate: min_gain must be in [0, 1), got {min_gain!r}")
    inputs = layer_inputs(model, names, batches, max_tokens, seed)
    base_nll = mean_nll(model)
    if not math.isfinite(base_nll):
        raise ValueError(f"calibrate: the float model's calibration NLL is {base_nll}")
    records = []
    for name in names:
        linear = model.get_submodule(name)
        per_tensor = output_error(inputs[name], linear, per_channel=False)
        per_row = output_error(inputs[name], linear, per_channel=True)
        chosen = choose_per_channel(per_tensor, per_row, min_gain)
        records.append(LayerCalibration(name, linear.out_features, linear.in_features, per_tensor, per_row, chosen,
                                        loss_increase(model, name, chosen, mean_nll, base_nll)))
    for record in sorted(records, key=lambda r: r.loss_increase, reverse=True)[:n_sensitive]:
        record.sensitive = True
    return records
