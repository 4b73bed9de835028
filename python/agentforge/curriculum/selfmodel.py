"""Self-modeling and dreams: the model's own samples, drawn at known temperatures.

Self-modeling. At curriculum level L (1-based) the design's schedule has n(L) = 10 + (L-1)
temperature ranges of width w(L) = 0.2 + 0.1(L-1) starting at 0.1(L-1) + 0.1 i; the model
samples answers at range midpoints and learns to predict each sample given a tag naming its
temperature (``<t=0.70> 24-7=`` → its own sample). Self-prediction is measured on held-out
prompts: fresh samples at probe temperatures, then, given the tag, the fraction of sample tokens
the model's greedy next-token prediction reproduces (accuracy) and their mean negative
log-likelihood. A model that knows how it samples at temperature T puts more mass on its
T-samples; this is the design's reading of "self-modeling" (Premakumar et al. 2024 predict their
own hidden activations instead, as a regulariser), and it is reported as measured.

Dreams. At the end of a level the model answers prompts drawn from what it has practised so far
(this level and earlier ones) at a high temperature; the answers a verifier scores correct are
replayed as a short training step (rehearsal against forgetting; unverified high-temperature
samples of a small model are mostly wrong and would teach it errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from agentforge.curriculum.rows import self_tag


def temperature_ranges(level: int) -> list[tuple[float, float]]:
    """The design's temperature ranges of curriculum level ``level`` (1-based)."""
    if not isinstance(level, int) or level < 1:
        raise ValueError(f"temperature_ranges: level must be an int >= 1, got {level!r}")
    width, count = 0.2 + 0.1 * (level - 1), 10 + (level - 1)
    starts = [0.1 * (level - 1) + 0.1 * i for i in range(count)]
    return [(round(s, 4), round(s + width, 4)) for s in starts]


def schedule_temperatures(level: int, k: int) -> list[float]:
    """``k`` midpoints spread evenly over the ranges of ``level`` (all of them when k >= n)."""
    ranges = temperature_ranges(level)
    picks: Sequence[int]
    if k >= len(ranges):
        picks = range(len(ranges))
    else:
        picks = sorted({round(i * (len(ranges) - 1) / max(k - 1, 1)) for i in range(k)})
    return [round((ranges[i][0] + ranges[i][1]) / 2, 4) for i in picks]


@torch.no_grad()
def sample(
    model, tokenizer, prompts: list[str], *, temperature: float, max_new_tokens: int, seed: int, batch_size: int = 64
) -> list[tuple[list[int], bool]]:
    """One sample per prompt at ``temperature`` (no top-k/top-p): ``(new token ids without eos,
    ended with eos)``. Seeded, and the caller's random state is left as it was."""
    from agentforge.eval._common import evaluation_mode, left_padded, model_device

    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out = []
    device = model_device(model)
    with torch.random.fork_rng(devices=[]), evaluation_mode(model):
        torch.manual_seed(seed)
        for start in range(0, len(encoded), batch_size):
            ids, mask = left_padded(encoded[start : start + batch_size], pad)
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=float(temperature),
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row in generated[:, ids.shape[1] :].tolist():
                ended = eos in row
                out.append((row[: row.index(eos)] if ended else row, ended))
    return out


TAGS = ("right", "wrong", "none")


def shown_tag(temperature: float, temperatures: list[float], tag: str) -> str:
    """The context prefix the samples at ``temperature`` are predicted after: their own tag
    ("right"), the tag of the probe temperature farthest from it ("wrong"), or nothing ("none").
    If the tag carries information, "right" predicts the samples better than the other two."""
    if tag == "none":
        return ""
    if tag == "wrong":
        temperature = max(temperatures, key=lambda t: abs(t - temperature))
    return f"{self_tag(temperature)} "


@torch.no_grad()
def self_prediction(
    model,
    tokenizer,
    prompts: list[str],
    temperatures: list[float],
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    tag: str = "right",
) -> dict:
    """Self-prediction on ``prompts``: per temperature, the model samples, then predicts those
    samples given the temperature tag (``tag``: see ``shown_tag``; the samples are the same for
    every ``tag``). Returns ``{"accuracy", "nll", "tokens", "per_temperature": {T: {"accuracy",
    "nll", "tokens"}}}`` (accuracy = greedy top-1 agreement over sample tokens, the eos included
    when sampled; nll in nats per token)."""
    if tag not in TAGS:
        raise ValueError(f"self_prediction: tag must be one of {TAGS}, got {tag!r}")
    from agentforge.eval._common import evaluation_mode, left_padded, model_device

    device = model_device(model)
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    per_temperature, hits, nll, tokens = {}, 0, 0.0, 0
    for t_index, temperature in enumerate(temperatures):
        samples = sample(
            model,
            tokenizer,
            prompts,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed + t_index,
            batch_size=batch_size,
        )
        prefix = shown_tag(temperature, temperatures, tag)
        contexts = tokenizer([f"{prefix}{p}" for p in prompts], add_special_tokens=False)["input_ids"]
        t_hits, t_nll, t_tokens = 0, 0.0, 0
        with evaluation_mode(model):
            for start in range(0, len(prompts), batch_size):
                rows, spans = [], []
                for context, (ids, ended) in zip(
                    contexts[start : start + batch_size], samples[start : start + batch_size]
                ):
                    target = ids + ([eos] if ended else [])
                    rows.append(context + target)
                    spans.append(len(target))
                input_ids, mask = left_padded(rows, pad)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = (
                    model(
                        input_ids=input_ids.to(device),
                        attention_mask=mask.to(device),
                        position_ids=positions.to(device),
                    )
                    .logits.float()
                    .cpu()
                )
                log_probs = logits.log_softmax(-1)
                width = input_ids.shape[1]
                for row, span in enumerate(spans):
                    if span == 0:
                        continue
                    # logits at position p predict the token at p + 1
                    predicting = torch.arange(width - span - 1, width - 1)
                    targets = input_ids[row, width - span :]
                    t_hits += int((log_probs[row, predicting].argmax(-1) == targets).sum())
                    t_nll -= float(log_probs[row, predicting, targets].sum())
                    t_tokens += span
        per_temperature[temperature] = {
            "accuracy": t_hits / max(t_tokens, 1),
            "nll": t_nll / max(t_tokens, 1),
            "tokens": t_tokens,
        }
        hits, nll, tokens = hits + t_hits, nll + t_nll, tokens + t_tokens
    return {
        "accuracy": hits / max(tokens, 1),
        "nll": nll / max(tokens, 1) if tokens else math.nan,
        "tokens": tokens,
        "per_temperature": per_temperature,
    }


def dream(
    model, tokenizer, items: list, *, temperature: float, max_new_tokens: int, seed: int, batch_size: int = 64
) -> tuple[list[tuple[Any, str]], int]:
    """Answers to ``items`` sampled at ``temperature``; returns the ``(item, answer)`` pairs the
    family's scorer marks fully correct, and how many were sampled."""
    from agentforge.data import score

    if not items:
        return [], 0
    samples = sample(
        model,
        tokenizer,
        [item.prompt for item in items],
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    kept = []
    for item, (ids, ended) in zip(items, samples):
        answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if ended and answer and score(item, answer) >= 1.0:
            kept.append((item, answer))
    return kept, len(items)
