"""Per-item task scores and bootstrap confidence intervals, the measurements every expert claim rests on.

Scores are kept per item (not just their mean) so that two models answering the *same* items can
be compared pairwise: the bootstrap of the paired difference is far tighter than two separate
intervals, because it cancels the items both models get right (or wrong).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agentforge.eval.stats import bootstrap_interval


def item_scores(model, tokenizer, items: Sequence, *, batch_size: int = 64) -> np.ndarray:
    """The score in [0, 1] of the model's greedy answer to each item (its family's own scorer)."""
    from agentforge.data import score
    from agentforge.eval import generate_answers
    from agentforge.eval.suite import answer_budget

    if not items:
        raise ValueError("item_scores: no items to answer")
    answers = generate_answers(
        model,
        tokenizer,
        [it.prompt for it in items],
        max_new_tokens=answer_budget(tokenizer, items),
        batch_size=batch_size,
    )
    return np.array([score(item, answer) for item, answer in zip(items, answers)], dtype=np.float64)


def answer_flops(model, tokenizer, items: Sequence) -> int:
    """FLOPs of answering ``items`` as ``item_scores`` does, counted, not timed: 2 per weight of
    every linear layer (the LM head included) for each token read or generated, the prompt and the
    answer budget (the longest answer and eos). Attention scores and repeated recursion passes are
    left out: an estimate, the same for every set of weights of one model."""
    import torch

    from agentforge.eval.suite import answer_budget

    prompts = tokenizer([it.prompt for it in items], add_special_tokens=False)["input_ids"]
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * weights * (sum(map(len, prompts)) + answer_budget(tokenizer, items) * len(items))


def paired_gain(candidate: np.ndarray, control: np.ndarray, *, seed: int = 0) -> dict:
    """The bootstrap interval of ``mean(candidate − control)`` over the same items, plus
    ``"significant"``: the whole interval lies above zero."""
    candidate, control = np.asarray(candidate), np.asarray(control)
    if candidate.shape != control.shape:
        raise ValueError(
            f"paired_gain: score arrays differ in shape ({candidate.shape} vs {control.shape}); "
            "pair the scores of the same items"
        )
    interval = bootstrap_interval(candidate - control, seed=seed)
    return {**interval, "significant": interval["low"] > 0}


def answer_nll(model, tokenizer, items: Sequence, *, batch_size: int = 64) -> np.ndarray:
    """Per item, the mean negative log-likelihood (nats per token) of its answer and eos after its
    prompt, teacher-forced: a graded measure that moves before greedy accuracy does. Each item is
    scored alone, left-padded as in generation."""
    import torch
    import torch.nn.functional as F

    from agentforge.eval._common import evaluation_mode

    if not items:
        raise ValueError("answer_nll: no items to score")
    prompts = tokenizer([it.prompt for it in items], add_special_tokens=False)["input_ids"]
    answers = tokenizer([it.answer for it in items], add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.empty(len(items))
    with evaluation_mode(model):
        for start in range(0, len(items), batch_size):
            rows = [
                p + a + [tokenizer.eos_token_id]
                for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])
            ]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            log_probs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            token_nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, answer in enumerate(answers[start : start + batch_size]):
                out[start + i] = float(token_nll[i, -(len(answer) + 1) :].mean())
    return out
