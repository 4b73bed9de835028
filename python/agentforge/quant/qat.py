"""Quantization-aware training helpers for BitLinear models: conversion as a calibration chose,
the quantization warm-up λ of the Hugging Face 1.58-bit fine-tuning recipe, and the check that
every latent weight still learns through the straight-through estimator.

Phases after BitNet train the latent weights of the same BitLinear layers; they can use
``require_state``, ``set_lambda`` and ``gradient_flow`` to check that the model stays ternary
and trainable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from agentforge.nn import BitLinear


def bitlinear_layers(model: nn.Module) -> dict:
    """``{qualified name: BitLinear}`` of every BitLinear in ``model``."""
    from agentforge.nn import BitLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


def require_state(model: nn.Module, state: str, where: str = "model") -> None:
    """Raise ``RuntimeError`` unless ``model`` has BitLinear layers and all are in ``state``
    ("training" or "packed"): a model handed on as ternary must not have lost its layers."""
    layers = bitlinear_layers(model)
    wrong = sorted(name for name, layer in layers.items() if layer.state != state)
    if not layers or wrong:
        raise RuntimeError(
            f"{where}: expected BitLinear layers in {state} state, found {len(layers)} BitLinear "
            f"layers of which {len(wrong)} are not ({wrong[:3]})"
        )


def convert_as_calibrated(
    model: nn.Module, calibration: Sequence[dict], skip: Sequence[str], keep_fp: int = 0
) -> list[str]:
    """Convert ``model`` in place as calibrated: every layer of ``calibration`` (records with
    ``name``, ``per_channel`` and ``loss_increase``) becomes a training-state BitLinear with its
    chosen scales, except the ``keep_fp`` layers with the largest loss increase, which stay
    ``nn.Linear``; ``skip`` patterns are passed on to ``convert_to_bitnet``. The per-layer
    choices are recorded in the model's quantization config. Returns the names kept float."""
    from agentforge.nn import convert_to_bitnet
    from agentforge.nn.convert import record_in_config

    ranked = sorted(calibration, key=lambda r: r["loss_increase"], reverse=True)
    kept = [r["name"] for r in ranked[:keep_fp]]
    skip = (*skip, *kept)  # a full qualified name matches only its own layer
    convert_to_bitnet(model, skip=skip)
    layers = bitlinear_layers(model)
    for record in calibration:
        if record["name"] in layers:
            layers[record["name"]].per_channel = record["per_channel"]
    record_in_config(model, skip=skip)
    return kept


def warmup_lambda(step: int, warmup_steps: int) -> float:
    """The quantization strength for optimizer step ``step`` (0-based): ``min(step / warmup_steps, 1)``,
    the recipe's linear schedule, and 1 throughout without a warm-up."""
    return 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)


def set_lambda(layers: Iterable[BitLinear], value: float) -> None:
    """Set the warm-up strength λ of every given BitLinear (1 = fully ternary)."""
    for layer in layers:
        layer.lambda_ = value


def gradient_flow(model: nn.Module, batch: dict) -> dict:
    """One forward/backward of the fully ternary model (λ = 1) on ``batch`` (``input_ids``,
    ``labels``): the gradient norm of every BitLinear latent weight through the STE. Returns
    ``ok`` (all finite and non-zero), ``bad_layers``, ``layers`` and the min/max norms; leaves
    no gradient behind and restores the training flag."""
    from agentforge.train import default_loss

    layers = bitlinear_layers(model)
    set_lambda(layers.values(), 1.0)
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        default_loss(model, batch).backward()
        norms = {
            name: float(layer.weight.grad.norm()) if layer.weight.grad is not None else math.nan
            for name, layer in layers.items()
        }
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    bad = sorted(name for name, norm in norms.items() if not (math.isfinite(norm) and norm > 0))
    return {
        "layers": len(norms),
        "ok": bool(norms) and not bad,
        "bad_layers": bad,
        "min_grad_norm": min(norms.values(), default=math.nan),
        "max_grad_norm": max(norms.values(), default=math.nan),
    }
