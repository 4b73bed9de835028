"""Training examples of every kind the curriculum makes, and their packing into rows.

An ``Example`` is a prompt (no loss) followed by segments, each trained on or not:

    task answer       "24-7="                  ["17"]                                    + eos
    tool trace        TOOL_PROMPT " 24-7="     ["[calc: 24-7]", "[out: 17]" (no loss), "17"] + eos
    self-model        "<t=0.70> 24-7="         [the model's own sample at T = 0.7]     (+ eos if sampled)

Rows follow the convention of ``agentforge.data.pack_tasks``: every piece is encoded on its own
without special tokens (exactly as generation and the tool runtime produce them), labels are
-100 where no loss is taken, examples are packed greedily into rows of ``seq_len`` and never
straddle two rows, rows are right-padded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agentforge.tools import TOOL_PROMPT, trace_segments

# the label of positions without loss, as in agentforge.data.builders (not imported: it loads
# the datasets library, which nothing here needs)
IGNORE_INDEX = -100

TASK, HINTED, TOOL, SELF, DREAM = "task", "hinted", "tool", "self", "dream"


@dataclass(frozen=True)
class Example:
    """``prompt`` then ``segments`` of ``(text, trained)``; ``eos`` appends a trained eos."""

    kind: str
    prompt: str
    segments: tuple[tuple[str, bool], ...]
    eos: bool = True


def task_example(prompt: str, answer: str, kind: str = TASK) -> Example:
    """A question and its answer (loss on the answer and eos)."""
    return Example(kind, prompt, ((answer, True),))


def tool_prompt(prompt: str) -> str:
    """The question as posed with tools available."""
    return f"{TOOL_PROMPT} {prompt}"


def trace_example(prompt: str, completion: str) -> Example:
    """A tool-use completion (``[calc: ...][out: ...]answer``) as an example: loss on what the
    model writes, none on the ``[out: ...]`` blocks the runtime wrote."""
    pieces = tuple((text, not is_result) for text, is_result in trace_segments(completion))
    return Example(TOOL, tool_prompt(prompt), pieces)


def self_tag(temperature: float) -> str:
    """The tag that tells the model a text is its own sample at ``temperature``."""
    return f"<t={temperature:.2f}>"


def self_example(temperature: float, prompt: str, sample: str, ended: bool) -> Example:
    """The model's own sample of ``prompt`` at ``temperature``, to predict given the tag."""
    return Example(SELF, f"{self_tag(temperature)} {prompt}", ((sample, True),), eos=ended)


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    input_ids = ids(example.prompt)
    labels = [IGNORE_INDEX] * len(input_ids)
    for text, trained in example.segments:
        piece = ids(text)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if example.eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return input_ids, labels


def pack(tokenizer, examples: list[Example], seq_len: int, seed: int) -> tuple[list[dict], int]:
    """Rows ``{"input_ids", "labels"}`` of ``seq_len`` tokens from ``examples`` (shuffled by
    ``seed``), and the number of examples dropped because they alone exceed ``seq_len``."""
    if seq_len < 2:
        raise ValueError(f"pack: seq_len must be >= 2, got {seq_len}")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("pack: the tokenizer needs eos and pad tokens")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    dropped = 0

    def close_row():
        pad = seq_len - len(ids)
        rows.append({"input_ids": ids + [tokenizer.pad_token_id] * pad, "labels": labels + [IGNORE_INDEX] * pad})

    for index in order:
        example_ids, example_labels = encode(tokenizer, examples[index])
        if len(example_ids) > seq_len or all(label == IGNORE_INDEX for label in example_labels):
            dropped += 1
            continue
        if len(ids) + len(example_ids) > seq_len:
            close_row()
            ids, labels = [], []
        ids, labels = ids + example_ids, labels + example_labels
    if ids:
        close_row()
    return rows, dropped
