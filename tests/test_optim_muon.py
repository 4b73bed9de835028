"""agentforge's Muon: torch's update with the Newton–Schulz iteration in a chosen dtype."""

import copy

import pytest
import torch
from torch import nn

from agentforge.optim import Muon
from agentforge.optim.muon import cpu_has_native_bf16, default_ns_dtype, newton_schulz

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def layers(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13, bias=False), nn.Linear(13, 5, bias=False))


def run_steps(model, optimizer, steps=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(9, 7, generator=generator)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("options", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.3}])
def test_bf16_iteration_steps_exactly_like_torch(options):
    ours, theirs = layers(), layers()
    run_steps(ours, Muon(ours.parameters(), lr=0.05, ns_dtype=torch.bfloat16, **options))
    run_steps(theirs, torch.optim.Muon(theirs.parameters(), lr=0.05, **options))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_default_dtype_follows_the_hardware():
    assert default_ns_dtype(torch.device("cuda", 0)) == torch.bfloat16
    expected_cpu = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert default_ns_dtype(torch.device("cpu")) == expected_cpu


def test_fp32_iteration_is_close_to_bf16():
    fp32, bf16 = layers(), layers()
    start = copy.deepcopy(fp32)
    run_steps(fp32, Muon(fp32.parameters(), lr=0.05, ns_dtype=torch.float32))
    run_steps(bf16, Muon(bf16.parameters(), lr=0.05, ns_dtype=torch.bfloat16))
    for a, b, s in zip(fp32.parameters(), bf16.parameters(), start.parameters()):
        assert not torch.equal(a, b)  # the dtype is really used
        moved = (a - s).norm()
        assert (a - b).norm() < 0.1 * moved  # ... and only rounding differs (bf16 keeps ~3 digits)


@pytest.mark.parametrize("shape", [(5, 13), (13, 5), (8, 8)])
def test_newton_schulz_flattens_the_spectrum(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * torch.logspace(-1, 1, shape[1])
    out = newton_schulz(g, COEFFICIENTS, 5, 1e-7, torch.float32)
    assert out.shape == g.shape and out.dtype == torch.float32
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.3 and singular.max() < 1.3  # Muon's S' ~ U(0.5, 1.5), from a 100:1 spread
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(out.flatten(), (u @ vh).flatten(), dim=0) > 0.9
