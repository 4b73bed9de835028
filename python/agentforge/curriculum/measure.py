"""Held-out measurements: per-item scores on fixed sets, the edge-of-chaos baseline, bootstrap
confidence intervals, and accuracy with and without tools."""

from __future__ import annotations

import numpy as np

from agentforge.curriculum.rows import tool_prompt
from agentforge.curriculum.tasks import answer_budget, tool_budget
from agentforge.data import NUM_LEVELS, score


def item_scores(model, tokenizer, sets: dict, *, batch_size: int = 64) -> dict:
    """``{key: [score of each item]}`` for ``sets = {key: items}``: greedy answers, scored by
    each family's scorer (in [0, 1])."""
    from agentforge.eval import generate_answers

    keys = list(sets)
    items = [item for key in keys for item in sets[key]]
    if not items:
        return {key: [] for key in keys}
    answers = generate_answers(
        model,
        tokenizer,
        [item.prompt for item in items],
        max_new_tokens=answer_budget(tokenizer, items),
        batch_size=batch_size,
    )
    out, position = {}, 0
    for key in keys:
        n = len(sets[key])
        out[key] = [score(item, answer) for item, answer in zip(sets[key], answers[position : position + n])]
        position += n
    return out


def mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def accuracy_by_level(scores: dict) -> dict[int, float]:
    """``{level: mean score over every family's items at that level}`` from ``{(family, level): scores}``."""
    levels = sorted({level for _, level in scores})
    return {level: mean([s for (_, lvl), values in scores.items() if lvl == level for s in values]) for level in levels}


def non_increasing(values: list[float]) -> list[float]:
    """The closest non-increasing sequence to ``values`` in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]  # n: a count


def baselines(scores: dict, families, target: float) -> dict[str, int]:
    """Edge of chaos, per family: the level whose held-out accuracy is closest to ``target``.
    Difficulty rises with the level, so the per-level accuracies are first fitted with a
    non-increasing curve: a few lucky answers at a hard level must not pick it. Ties go to the
    lowest level (a model that fails everywhere starts at level 0)."""
    out = {}
    for family in families:
        levels = [level for level in range(NUM_LEVELS) if (family, level) in scores]
        if not levels:
            raise ValueError(f"baselines: no assessment scores for family {family!r}")
        fitted = dict(zip(levels, non_increasing([mean(scores[(family, level)]) for level in levels])))
        out[family] = min(levels, key=lambda level: (round(abs(fitted[level] - target), 9), level))
    return out


def assess(model, tokenizer, sets, families, target: float, *, batch_size: int = 64) -> dict:
    """Scores per (family, level) from level 0 upward, each family until the first level whose
    accuracy is at or below ``target``: difficulty rises with the level, so harder levels are
    further from the target and need not be measured. ``sets`` maps (family, level) to items."""
    scores, scanning = {}, list(families)
    for level in range(NUM_LEVELS):
        if not scanning:
            break
        measured = item_scores(
            model, tokenizer, {(family, level): sets[(family, level)] for family in scanning}, batch_size=batch_size
        )
        scores.update(measured)
        scanning = [family for family in scanning if mean(measured[(family, level)]) > target]
    return scores


def bootstrap_ci(values, *, samples: int = 1000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def compare(a, b, *, samples: int = 1000, seed: int = 0) -> dict:
    """``a`` against ``b`` scored on the same items (paired): means, the difference a - b and its
    bootstrap interval (items resampled together)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"compare: paired scores must have the same shape, got {a.shape} and {b.shape}")
    low, high = bootstrap_ci(a - b, samples=samples, seed=seed)
    return {"a": mean(a), "b": mean(b), "difference": mean(a - b), "ci": [low, high], "n": int(a.size)}


def level_table(scores: dict, *, samples: int, seed: int) -> dict[int, dict]:
    """``{level: {"accuracy", "ci", "n"}}`` over all families' items at each level."""
    table = {}
    for level in sorted({level for _, level in scores}):
        values = [s for (_, lvl), vals in scores.items() if lvl == level for s in vals]
        low, high = bootstrap_ci(values, samples=samples, seed=seed + level)
        table[level] = {"accuracy": mean(values), "ci": [low, high], "n": len(values)}
    return table


def paired_by_level(a: dict, b: dict, *, samples: int, seed: int) -> dict:
    """``compare`` per level and over all levels, for two score tables on the same items."""
    levels = sorted({level for _, level in a})
    out = {}
    for level in levels:
        keys = [key for key in a if key[1] == level]
        out[level] = compare(
            [s for k in keys for s in a[k]], [s for k in keys for s in b[k]], samples=samples, seed=seed + level
        )
    out["all"] = compare([s for k in a for s in a[k]], [s for k in a for s in b[k]], samples=samples, seed=seed)
    return out


def tool_accuracy(model, tokenizer, items: list, *, max_new_tokens: int, batch_size: int = 32) -> dict:
    """Accuracy on ``items`` answered with the tool runtime (``TOOL_PROMPT`` in front), the
    answer being the text after the last ``[out: ...]``; plus how often calls were made,
    succeeded and the whole completion followed the tool format. Generation stops at eos or
    after enough tokens to write the right call and answer (``max_new_tokens`` at most)."""
    from agentforge.tools import follows_tool_format, generate_with_tools_batch

    budget = tool_budget(tokenizer, items, max_new_tokens)
    outputs = generate_with_tools_batch(
        model, tokenizer, [tool_prompt(item.prompt) for item in items], max_new_tokens=budget, batch_size=batch_size
    )
    scores, calls, ok_calls, formatted = [], 0, 0, 0
    for item, (text, item_calls) in zip(items, outputs):
        scores.append(score(item, final_answer(text)))
        calls += len(item_calls)
        ok_calls += sum(result.ok for _, result in item_calls)
        formatted += follows_tool_format(text)
    return {
        "scores": scores,
        "accuracy": mean(scores),
        "calls": calls,
        "ok_calls": ok_calls,
        "format_rate": formatted / max(len(items), 1),
        "completions": [text for text, _ in outputs],
    }


def final_answer(completion: str) -> str:
    """The answer in a tool-use completion: the text after its last ``[out: ...]`` block (the
    whole text when there is none)."""
    from agentforge.tools import trace_segments

    pieces = trace_segments(completion)
    last_result = max((i for i, (_, is_result) in enumerate(pieces) if is_result), default=-1)
    return "".join(text for text, _ in pieces[last_result + 1 :]).strip()


def answer_log_probability(model, tokenizer, items: list, *, batch_size: int = 64) -> list[float]:
    """log P(answer + eos | prompt) of each item under ``model``: the log of its chance of
    sampling exactly the right answer at temperature 1, a graded accuracy that still moves
    where greedy accuracy is 0."""
    import torch

    from agentforge.curriculum.rows import encode, task_example
    from agentforge.eval._common import evaluation_mode, model_device

    device, pad = model_device(model), tokenizer.pad_token_id
    out = []
    with evaluation_mode(model):
        for start in range(0, len(items), batch_size):
            encoded = [
                encode(tokenizer, task_example(it.prompt, it.answer)) for it in items[start : start + batch_size]
            ]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            for row, (row_ids, row_labels) in enumerate(encoded):  # right padding: positions start at 0
                ids[row, : len(row_ids)] = torch.tensor(row_ids)
                labels[row, : len(row_labels)] = torch.tensor(row_labels)
            log_probs = model(input_ids=ids.to(device)).logits.float().log_softmax(-1).cpu()
            targets = labels[:, 1:]
            picked = log_probs[:, :-1].gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            out += (picked * (targets != -100)).sum(-1).tolist()
    return out
