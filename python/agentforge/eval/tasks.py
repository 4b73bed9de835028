"""Task accuracy: greedy answers to prompts, scored per item and aggregated per task family.

Generation matches the training format ``prompt + answer + eos``, where the prompt is encoded
on its own without special tokens: each prompt's ids are exactly
``tokenizer(prompt, add_special_tokens=False)`` (no BOS) and the answer is whatever the model
generates after them, up to its first eos.

Batches are padded on the left so that every prompt ends in the same column and the new
tokens of all rows start together; the attention mask hides the padding, and Hugging Face
``generate`` derives position ids from that mask, so a padded row is generated exactly as it
would be alone (the tests check this).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from agentforge.eval._common import evaluation_mode, left_padded, model_device, require_positive

DEFAULT_EXAMPLES = 5  # prompt/answer/prediction triples kept in a report for a human to read


class TaskItem(Protocol):
    """What a task item must provide (the task families in ``agentforge.data`` produce these)."""

    family: str
    prompt: str
    answer: str


Scorer = Callable[[Any, str], float]


def exact_match(item: TaskItem, prediction: str) -> float:
    """1.0 when the prediction equals the item's answer (both stripped of surrounding space)."""
    return float(prediction.strip() == item.answer.strip())


@dataclasses.dataclass
class TaskReport:
    """Accuracy over a set of task items.

    ``accuracy`` is the mean score over all ``n`` items; ``per_family`` the mean score per
    ``item.family``; ``examples`` the first few items as dicts with ``family``, ``prompt``,
    ``answer``, ``prediction`` and ``score``."""

    accuracy: float
    per_family: dict[str, float]
    n: int
    examples: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for ``metrics.jsonl`` and reports)."""
        return dataclasses.asdict(self)


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 32
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts``, in prompt order.

    Each answer is the decoded text of the tokens generated after the prompt, cut at the first
    eos, with special tokens skipped and surrounding whitespace stripped."""
    if isinstance(prompts, str):
        raise TypeError("generate_answers: prompts must be a sequence of strings, not one string")
    require_positive("generate_answers", max_new_tokens=max_new_tokens, batch_size=batch_size)
    eos_id, pad_id = _special_ids(tokenizer)
    if not prompts:
        return []
    prompt_ids = _encode_prompts(tokenizer, prompts)
    # Rows of similar length waste less compute on padding; answers go back in prompt order.
    order = sorted(range(len(prompts)), key=lambda index: len(prompt_ids[index]))
    answers = [""] * len(prompts)
    with evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            new_tokens = _generate_batch(model, [prompt_ids[i] for i in rows], eos_id, pad_id, max_new_tokens)
            for index, tokens in zip(rows, new_tokens):
                answers[index] = tokenizer.decode(_until_eos(tokens, eos_id), skip_special_tokens=True).strip()
    return answers


def task_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[TaskItem],
    *,
    score: Scorer | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    n_examples: int = DEFAULT_EXAMPLES,
) -> TaskReport:
    """Score the model's greedy answer to every item with ``score(item, prediction)`` (a value
    in [0, 1]; default :func:`exact_match`) and aggregate overall and per family."""
    items = list(items)
    if not items:
        raise ValueError("task_accuracy: no items to evaluate")
    score = score or exact_match
    predictions = generate_answers(
        model, tokenizer, [item.prompt for item in items], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    scores = [_checked_score(score(item, prediction), item) for item, prediction in zip(items, predictions)]
    return TaskReport(
        accuracy=sum(scores) / len(scores),
        per_family=_mean_per_family(items, scores),
        n=len(items),
        examples=[
            {
                "family": item.family,
                "prompt": item.prompt,
                "answer": item.answer,
                "prediction": prediction,
                "score": value,
            }
            for item, prediction, value in zip(items[:n_examples], predictions, scores)
        ],
    )


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos id, pad id). Pad falls back to eos: padded positions are masked, so its value is unused."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("generate_answers: the tokenizer has no eos_token; answers are trained to end with one")
    pad_id = tokenizer.pad_token_id
    return eos_id, eos_id if pad_id is None else pad_id


def _encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, encoded alone and without special tokens as in training."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generate_answers: prompt {index} ({prompts[index]!r}) encodes to no tokens")
    return encoded


def _generate_batch(
    model: Any, prompt_ids: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy-generate after left-padded prompts; return only the new tokens of each row."""
    input_ids, attention_mask = left_padded(prompt_ids, pad_id)
    width = input_ids.shape[1]
    device = model_device(model)
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return output[:, width:].tolist()


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    # generate pads finished rows after their eos; cut there explicitly so that nothing after
    # the first eos is decoded, even where the pad token is not a special token.
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def _checked_score(value: Any, item: TaskItem) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"task_accuracy: score must return a value in [0, 1], got {value} for prompt {item.prompt!r}")
    return value


def _mean_per_family(items: list[TaskItem], scores: list[float]) -> dict[str, float]:
    by_family: dict[str, list[float]] = defaultdict(list)
    for item, value in zip(items, scores):
        by_family[item.family].append(value)
    return {family: sum(values) / len(values) for family, values in sorted(by_family.items())}
