"""Intervals for held-out measurements: every phase reports a mean with a percentile-bootstrap
95 % interval, and a difference between two models as a *paired* difference (the same items
resampled together), which is far less noisy than the difference of two separate means."""
from __future__ import annotations

import numpy as np

SAMPLES = 1000
CONFIDENCE = 0.95


def bootstrap_interval(values, *, seed: int = 0, samples: int = SAMPLES, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean of per-item ``values`` and its percentile
    bootstrap interval (items resampled with replacement, ``samples`` times)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_interval: need a non-empty 1-D array of per-item values, got shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_interval: confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(values.size)}


def paired_difference(candidate, control, *, seed: int = 0, samples: int = SAMPLES) -> dict:
    """The bootstrap interval of ``mean(candidate − control)`` over the same items."""
    candidate, control = np.asarray(candidate, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if candidate.shape != control.shape:
        raise ValueError(f"paired_difference: score arrays differ in shape ({candidate.shape} vs {control.shape}); "
                         "pair the scores of the same items")
    return bootstrap_interval(candidate - control, seed=seed, samples=samples)
