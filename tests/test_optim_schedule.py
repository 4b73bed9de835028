"""lr_factor against hand-computed values: linear warm-up from 0, cosine to the floor, then flat."""

import math

import pytest

from agentforge.optim import lr_factor

# warmup 10, total 110, floor 0.1: the cosine spans updates 10..110 (100 updates).
HAND_VALUES = [
    (0, 0.0),  # before any update: the ramp starts at 0
    (1, 0.1),  # first update already moves the weights
    (5, 0.5),  # mid warm-up
    (10, 1.0),  # warm-up end = peak
    (35, 0.1 + 0.45 * (1 + math.sqrt(0.5))),  # a quarter into the cosine
    (60, 0.55),  # half-way: floor + half the range
    (85, 0.1 + 0.45 * (1 - math.sqrt(0.5))),  # three quarters
    (110, 0.1),  # total_steps: the floor
    (500, 0.1),  # past the plan: stays at the floor
]


@pytest.mark.parametrize("step,expected", HAND_VALUES)
def test_warmup_then_cosine(step, expected):
    assert lr_factor(step, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_the_cosine():
    # total 3, floor 0: update k uses 0.5 * (1 + cos(pi * k / 3)).
    factors = [lr_factor(k, warmup_steps=0, total_steps=3, min_lr_ratio=0.0) for k in (0, 1, 2, 3, 4)]
    assert factors == pytest.approx([1.0, 0.75, 0.25, 0.0, 0.0], abs=1e-12)


def test_floor_of_one_is_constant_after_warmup():
    factors = [lr_factor(k, warmup_steps=2, total_steps=10, min_lr_ratio=1.0) for k in range(1, 15)]
    assert factors == [0.5] + [1.0] * 13
