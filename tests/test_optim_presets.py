"""MuGrokfast presets and argument validation: every preset builds, bad input is refused clearly."""

import inspect

import pytest
import torch
from torch import nn

from agentforge.optim import PRESETS, MuGrokfast
from agentforge.optim.presets import ALLOWED_KEYS, OPTIMIZER_KEYS


def small_model() -> nn.Module:
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.LayerNorm(8))


def valid_arguments(**changes):
    arguments = dict(
        muon_lr=0.02,
        adamw_lr=3e-3,
        weight_decay=0.01,
        adamw_betas=(0.9, 0.95),
        momentum=0.95,
        grokfast_alpha=0.98,
        grokfast_lambda=0.2,
        warmup_steps=2,
        total_steps=10,
        min_lr_ratio=0.1,
    )
    arguments.update(changes)
    return arguments


def test_optimizer_keys_match_the_constructor():
    signature = inspect.signature(MuGrokfast.__init__)
    keyword_only = [name for name, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert tuple(keyword_only) == OPTIMIZER_KEYS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_its_values(name):
    preset = PRESETS[name]
    assert set(preset) == set(ALLOWED_KEYS) - {"total_steps", "warmup_steps"}
    optimizer = MuGrokfast.from_preset(small_model(), name, total_steps=200)
    muon_group = optimizer.inner["muon"].param_groups[0]
    adamw_group = optimizer.inner["adamw"].param_groups[0]
    assert muon_group["base_lr"] == preset["muon_lr"] and adamw_group["base_lr"] == preset["adamw_lr"]
    assert muon_group["weight_decay"] == adamw_group["weight_decay"] == preset["weight_decay"]
    assert muon_group["momentum"] == preset["momentum"] and muon_group["adjust_lr_fn"] == preset["muon_adjust_lr_fn"]
    assert adamw_group["betas"] == preset["adamw_betas"]
    assert optimizer.defaults["warmup_steps"] == round(preset["warmup_fraction"] * 200)
    assert optimizer.defaults["grokfast_lambda"] == preset["grokfast_lambda"]


def test_overrides_replace_preset_values():
    optimizer = MuGrokfast.from_preset(small_model(), "pretrain", total_steps=100, warmup_steps=7, muon_lr=0.01)
    assert optimizer.defaults["warmup_steps"] == 7
    assert optimizer.inner["muon"].param_groups[0]["base_lr"] == 0.01
    by_fraction = MuGrokfast.from_preset(small_model(), "pretrain", total_steps=100, warmup_fraction=0.2)
    assert by_fraction.defaults["warmup_steps"] == 20


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown MuGrokfast preset 'pretrian'.*'finetune'.*'pretrain'"):
        MuGrokfast.from_preset(small_model(), "pretrian", total_steps=10)


def test_unknown_setting_lists_the_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown MuGrokfast setting\(s\) \['lr'\]; allowed: .*'muon_lr'"):
        MuGrokfast.from_preset(small_model(), "pretrain", total_steps=10, lr=0.1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({}, "needs total_steps"),
        ({"total_steps": 0}, "needs total_steps"),
        ({"total_steps": 10, "warmup_steps": 1, "warmup_fraction": 0.1}, "not both"),
        ({"total_steps": 10, "warmup_fraction": 1.5}, "warmup_fraction must be in"),
    ],
)
def test_from_preset_refuses_bad_run_lengths(overrides, message):
    with pytest.raises(ValueError, match=message):
        MuGrokfast.from_preset(small_model(), "finetune", **overrides)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"muon_lr": 0.0}, "muon_lr must be a positive"),
        ({"adamw_lr": float("nan")}, "adamw_lr must be a positive"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"adamw_betas": (0.9,)}, "adamw_betas must be two numbers"),
        ({"adamw_betas": (0.9, 1.0)}, "adamw_betas must be two numbers"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"grokfast_alpha": 1.0}, "grokfast_alpha must be in"),
        ({"grokfast_lambda": -0.5}, "grokfast_lambda must be >= 0"),
        ({"warmup_steps": 10}, "0 <= warmup_steps < total_steps"),
        ({"total_steps": 10.0}, "0 <= warmup_steps < total_steps"),
        ({"warmup_steps": True}, "0 <= warmup_steps < total_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
        ({"qk_clip_tau": 0.0}, "qk_clip_tau must be None or a positive"),
        ({"muon_adjust_lr_fn": "bogus"}, "muon_adjust_lr_fn must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        MuGrokfast(small_model(), **valid_arguments(**changes))


def test_model_without_trainable_parameters_is_refused():
    model = small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no trainable parameters"):
        MuGrokfast(model, **valid_arguments())


def test_param_groups_are_fixed():
    optimizer = MuGrokfast(small_model(), **valid_arguments())
    with pytest.raises(RuntimeError, match="param groups are fixed"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
