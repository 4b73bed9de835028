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
        raise ValueError(
            f"paired_difference: score arrays differ in shape ({candidate.shape} vs {control.shape}); "
            "pair the scores of the same items"
        )
    return bootstrap_interval(candidate - control, seed=seed, samples=samples)


def perplexity_ratio(nll, reference_nll, tokens, *, seed: int = 0, samples: int = SAMPLES) -> dict:
    """The ratio of two models' perplexities on the same text rows, ``exp(Σ nll − Σ reference) / Σ
    tokens)``, with a bootstrap interval over the rows (resampled together: paired). ``nll`` and
    ``reference_nll`` are per-row summed NLLs, ``tokens`` the rows' target counts."""
    nll, reference_nll = np.asarray(nll, dtype=np.float64), np.asarray(reference_nll, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if not nll.shape == reference_nll.shape == tokens.shape or nll.ndim != 1 or nll.size == 0:
        raise ValueError("perplexity_ratio: need per-row NLLs of both models and token counts for the same rows")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, nll.size, size=(samples, nll.size))
    ratios = np.exp((nll[rows] - reference_nll[rows]).sum(1) / np.maximum(tokens[rows].sum(1), 1))
    low, high = np.quantile(ratios, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return {
        "mean": float(np.exp((nll - reference_nll).sum() / tokens.sum())),
        "low": float(low),
        "high": float(high),
        "n": int(nll.size),
    }


def ratio_of_sums(numerator, denominator, *, seed: int = 0, samples: int = SAMPLES) -> dict:
    """``Σ numerator / Σ denominator`` over the same rows (e.g. the KL two models leave on the same
    trajectories), with a bootstrap interval over the rows resampled together."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if numerator.shape != denominator.shape or numerator.ndim != 1 or numerator.size == 0:
        raise ValueError("ratio_of_sums: need two per-row arrays of the same rows")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, numerator.size, size=(samples, numerator.size))
    ratios = numerator[rows].sum(1) / np.maximum(denominator[rows].sum(1), 1e-300)
    low, high = np.quantile(ratios, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return {
        "mean": float(numerator.sum() / denominator.sum()),
        "low": float(low),
        "high": float(high),
        "n": int(numerator.size),
    }
