"""Parameter-space merge rules, one tensor at a time.

Every rule takes the same-named tensor of each source (and of the base, for task-vector rules)
and returns the merged tensor; ``agentforge.merge.merge`` walks the state dicts. Parameters mean
what they mean in a mergekit YAML recipe:

* ``weights``: one per source model; ``normalize`` divides by their sum (per entry, over the
  sources that survive TIES' sign election).
* ``density``: the fraction of each task vector kept (TIES: the largest magnitudes; DARE: a
  random subset, the survivors rescaled by 1 / density so the expectation is unchanged).
* ``t``: SLERP position, 0 = first model, 1 = second.

Task vectors are τ_i = θ_i − θ_base. Sign election (TIES) picks, per entry, the sign of the
weighted sum Σ w_i τ_i ("sum" consensus, the paper's), and only the sources that agree with it
are averaged ("disjoint mean").
"""

from __future__ import annotations

import math

import torch

# |cos| above this: the two vectors are (anti)parallel and SLERP's sin θ would divide by ~0
SLERP_DOT_THRESHOLD = 0.9995


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.float() for t in tensors])


def _broadcast(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(weights, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_i θ_i, divided by Σ w_i when ``normalize``."""
    stacked = _stack(tensors)
    w = _broadcast(weights, stacked)
    total = (w * stacked).sum(0)
    return total / sum(weights) if normalize else total


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between the flattened ``a`` (t = 0) and ``b`` (t = 1), along the
    great circle of their directions; linear interpolation when they are (anti)parallel or zero."""
    a32, b32 = a.float().flatten(), b.float().flatten()
    norm_a, norm_b = a32.norm(), b32.norm()
    if norm_a < 1e-12 or norm_b < 1e-12:
        return torch.lerp(a32, b32, t).view(a.shape)
    dot = float((a32 / norm_a) @ (b32 / norm_b))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return torch.lerp(a32, b32, t).view(a.shape)
    theta = math.acos(dot)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return (s0 * a32 + s1 * b32).view(a.shape)


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest (TIES)."""
    if density >= 1.0:
        return delta
    k = int(round(density * delta.numel()))
    if k == 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide survivors by it, so that
    E[result] = delta."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return delta * keep / density


def elected_sign_mask(weighted: torch.Tensor) -> torch.Tensor:
    """Per entry, which sources agree with the sign of the weighted sum (ties go to +)."""
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    return weighted.sign() == majority


def combine_task_vectors(
    base: torch.Tensor, deltas: torch.Tensor, weights: list[float], *, consensus: bool, normalize: bool
) -> torch.Tensor:
    """base + Σ w_i τ_i (over the sign-agreeing sources when ``consensus``), divided by the summed
    weight of the contributing sources when ``normalize``."""
    w = _broadcast(weights, deltas)
    weighted = deltas * w
    contributing = elected_sign_mask(weighted) if consensus else torch.ones_like(weighted, dtype=torch.bool)
    mixed = (weighted * contributing).sum(0)
    if normalize:
        divisor = (w * contributing).sum(0)
        mixed = mixed / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return base.float() + mixed


def task_vector_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    sparsify: str | None,
    density: float,
    consensus: bool,
    normalize: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The generalised task-arithmetic family: task arithmetic (no sparsification, no consensus),
    TIES (magnitude trim + consensus), DARE linear (random drop + rescale), DARE TIES (both)."""
    deltas = _stack(tensors) - base.float()
    if sparsify == "magnitude":
        deltas = torch.stack([trim_to_density(d, density) for d in deltas])
    elif sparsify == "random":
        deltas = torch.stack([drop_and_rescale(d, density, generator) for d in deltas])
    elif sparsify is not None:
        raise ValueError(f"unknown sparsification {sparsify!r}")
    return combine_task_vectors(base, deltas, weights, consensus=consensus, normalize=normalize)
