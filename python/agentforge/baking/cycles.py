"""What drives the baking cycles: a plateau detector and candidate prompts (a pool plus small
edits of the current best prompt)."""
from __future__ import annotations

import random
import re
from collections.abc import Sequence


def relative_gain(history: Sequence[float], window: int) -> float:
    """How much the best of the last ``window`` values improved on the best value before them,
    relative to that earlier best: ``(max(last) − max(before)) / max(|max(before)|, 1e-9)``.
    Needs more than ``window`` values."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"relative_gain: window must be a positive int, got {window!r}")
    if len(history) <= window:
        raise ValueError(f"relative_gain: need more than window={window} values, got {len(history)}")
    before, last = max(history[:-window]), max(history[-window:])
    return (last - before) / max(abs(before), 1e-9)


def plateaued(history: Sequence[float], window: int, threshold: float) -> bool:
    """True when a higher-is-better score has stopped rising: over the last ``window`` values
    its relative gain (see :func:`relative_gain`) is below ``threshold``. False while the
    history is too short to tell."""
    if not threshold >= 0:
        raise ValueError(f"plateaued: threshold must be >= 0, got {threshold!r}")
    return len(history) > window and relative_gain(history, window) < threshold


def sentences(prompt: str) -> list[str]:
    """``prompt`` cut after each '.', '!', '?' or ';' that ends a sentence."""
    return [s.strip() for s in re.split(r"(?<=[.!?;])\s+", prompt.strip()) if s.strip()]


def prompt_edits(prompt: str, pool: Sequence[str], rng: random.Random) -> list[str]:
    """Small edits of ``prompt``: each sentence dropped in turn, two sentences swapped, its first
    sentence alone, and its first sentence joined with the first sentence of another pool
    prompt. Distinct, in a seeded random order, never ``prompt`` itself."""
    parts = sentences(prompt)
    edits = [" ".join(parts[:i] + parts[i + 1:]) for i in range(len(parts))] if len(parts) > 1 else []
    if len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        swapped = list(parts)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        edits += [" ".join(swapped), parts[0]]
    edits += [f"{parts[0]} {sentences(other)[0]}" for other in pool if other != prompt and sentences(other)]
    rng.shuffle(edits)
    return list(dict.fromkeys(e for e in edits if e and e != prompt))


def propose_prompts(pool: Sequence[str], best: str | None, k: int, rng: random.Random,
                    tried: Sequence[str] = ()) -> list[str]:
    """``k`` distinct candidate prompts: the current ``best`` (baking it again is prompt pursuit),
    then pool prompts not ``tried`` yet, then edits of ``best`` (or of the first pool prompt)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"propose_prompts: k must be a positive int, got {k!r}")
    pool = [p for p in pool if isinstance(p, str) and p.strip()]
    if not pool:
        raise ValueError("propose_prompts: the prompt pool is empty")
    fresh = [p for p in pool if p not in tried and p != best]
    rng.shuffle(fresh)
    seed_prompt = best or pool[0]
    ordered = ([best] if best else []) + fresh + prompt_edits(seed_prompt, pool, rng)
    return list(dict.fromkeys(ordered))[:k]
