"""Training datasets from text and tasks: fixed-length rows of `input_ids` and `labels`.

Every builder returns an in-memory `datasets.Dataset` (no cache files, nothing downloaded)
whose rows hold exactly `seq_len` token ids. `labels` follow the Hugging Face causal-LM
convention: aligned with `input_ids` (the model shifts them), -100 where no loss is taken.

Tokenization contract, shared with evaluation:
    Text is encoded without special tokens; no BOS is ever added. A task item becomes
    `ids(prompt) + ids(answer) + [eos]`, where prompt and answer are encoded *separately*
    (`tokenizer(s, add_special_tokens=False)`) and the ids concatenated; the loss covers the
    answer ids and the eos only. An evaluator therefore encodes `tokenizer(prompt,
    add_special_tokens=False)`, generates until eos, and decodes the generated ids as the
    answer: exactly the distribution seen in training. Items are packed back to back, so in
    training a prompt starts either a row or right after the previous item's eos.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from agentforge.data.tasks import TaskItem

__all__ = ["IGNORE_INDEX", "pack_text", "text_splits", "pack_tasks", "mixture"]

IGNORE_INDEX = -100  # label of positions without loss (torch cross_entropy's default ignore_index)


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")


def _special_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id")
    if token_id is None:
        raise ValueError(f"the tokenizer has no {which} token; use agentforge.data.train_tokenizer or set one")
    return token_id


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _rows_dataset(input_ids: np.ndarray, labels: np.ndarray) -> Dataset:
    """A Dataset of fixed-length int32 rows, built from Arrow arrays (~40x faster than from Python lists)."""
    seq_len = input_ids.shape[1]

    def column(rows: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1).astype(np.int32)), seq_len)

    return Dataset.from_dict({"input_ids": column(input_ids), "labels": column(labels)})


def pack_text(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int) -> Dataset:
    """Concatenate documents, each followed by eos, and cut the stream into rows of `seq_len`.

    labels == input_ids. The last partial row is dropped.
    """
    _check_seq_len(seq_len)
    eos = _special_id(tokenizer, "eos")
    stream = np.fromiter((token for ids in _encode(tokenizer, texts) for token in (*ids, eos)), dtype=np.int64)
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise ValueError(
            f"texts hold {len(stream)} tokens, less than one row of seq_len={seq_len}; "
            "pass more text or a smaller seq_len"
        )
    rows = stream[: n_rows * seq_len].reshape(n_rows, seq_len)
    return _rows_dataset(rows, rows)


def _held_out_count(fraction: float, n_docs: int, name: str) -> int:
    if not 0 < fraction < 1:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {fraction!r}")
    return max(1, round(fraction * n_docs))


def document_split(n_docs: int, *, seed: int, validation: float = 0.05, test: float = 0.05) -> dict[str, list[int]]:
    """Indices of the documents of each split: shuffled with `seed`, then validation, test, train.
    Everything trained on text (the tokenizer too) must use only the train indices."""
    n_val = _held_out_count(validation, n_docs, "validation")
    n_test = _held_out_count(test, n_docs, "test")
    if n_val + n_test >= n_docs:
        raise ValueError(
            f"{n_docs} documents cannot fill train, validation ({n_val}) and test ({n_test}); "
            "pass more documents or smaller fractions"
        )
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}


def text_splits(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    seq_len: int,
    *,
    seed: int,
    validation: float = 0.05,
    test: float = 0.05,
) -> DatasetDict:
    """Split whole documents with `document_split`, then pack each split.

    Splitting documents before packing keeps every document inside one split.
    """
    parts = document_split(len(texts), seed=seed, validation=validation, test=test)
    splits = {}
    for split in ("train", "validation", "test"):
        try:
            splits[split] = pack_text(tokenizer, [texts[i] for i in parts[split]], seq_len)
        except ValueError as error:
            raise ValueError(f"{split} split: {error}") from None
    return DatasetDict(splits)


def _item_tokens(
    item: TaskItem, prompt_ids: list[int], answer_ids: list[int], eos: int, seq_len: int
) -> tuple[list[int], list[int]]:
    if not answer_ids:
        raise ValueError(f"task item {item.prompt!r} ({item.family}) has an empty answer")
    ids = prompt_ids + answer_ids + [eos]
    if len(ids) > seq_len:
        raise ValueError(
            f"task item {item.prompt!r} ({item.family}) is {len(ids)} tokens with answer and eos, "
            f"longer than seq_len={seq_len}; raise seq_len or use a lower level"
        )
    return ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [eos]


def pack_tasks(tokenizer: PreTrainedTokenizerBase, items: Sequence[TaskItem], seq_len: int, *, seed: int) -> Dataset:
    """Pack `prompt + answer + eos` items (shuffled by `seed`) greedily into rows of `seq_len`.

    Loss (labels != -100) only on answer tokens and the eos after each answer; an item never
    straddles two rows; rows are right-padded with the pad id (label -100).
    """
    _check_seq_len(seq_len)
    if not items:
        raise ValueError("items is empty: pass at least one TaskItem")
    eos, pad = _special_id(tokenizer, "eos"), _special_id(tokenizer, "pad")
    prompts = _encode(tokenizer, [item.prompt for item in items])
    answers = _encode(tokenizer, [item.answer for item in items])
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)

    rows_ids, rows_labels = [], []
    row_ids: list[int] = []
    row_labels: list[int] = []
    for i in order:
        ids, labels = _item_tokens(items[i], prompts[i], answers[i], eos, seq_len)
        if len(row_ids) + len(ids) > seq_len:
            rows_ids.append(row_ids + [pad] * (seq_len - len(row_ids)))
            rows_labels.append(row_labels + [IGNORE_INDEX] * (seq_len - len(row_labels)))
            row_ids, row_labels = [], []
        row_ids += ids
        row_labels += labels
    rows_ids.append(row_ids + [pad] * (seq_len - len(row_ids)))
    rows_labels.append(row_labels + [IGNORE_INDEX] * (seq_len - len(row_labels)))
    return _rows_dataset(np.array(rows_ids), np.array(rows_labels))


def _row_counts(weights: Mapping[str, float], n_rows: int) -> dict[str, int]:
    """Split `n_rows` in proportion to `weights`, rounding by largest remainder (sums exactly)."""
    total = sum(weights.values())
    exact = {name: n_rows * w / total for name, w in weights.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: n_rows - sum(counts.values())]:
        counts[name] += 1
    return counts


def _check_weights(datasets: Mapping[str, Dataset], weights: Mapping[str, float]) -> None:
    if set(weights) != set(datasets):
        raise ValueError(
            f"weights name {sorted(weights)} but datasets are {sorted(datasets)}; give one weight per dataset"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {dict(weights)}")
    features = {name: ds.features for name, ds in datasets.items() if weights[name] > 0}
    if len({repr(f) for f in features.values()}) > 1:
        raise ValueError(f"datasets to mix must share columns and types, got {features}")
    empty = [name for name, ds in datasets.items() if weights[name] > 0 and len(ds) == 0]
    if empty:
        raise ValueError(f"datasets {empty} are empty but have positive weight")


def mixture(datasets: Mapping[str, Dataset], weights: Mapping[str, float], n_rows: int, *, seed: int) -> Dataset:
    """`n_rows` rows drawn from `datasets` in proportion to `weights`, shuffled; deterministic in seed.

    Each dataset contributes round(n_rows * weight / sum(weights)) rows (exact total). Its rows
    are taken in a seeded random order without repetition, repeating (new order per pass) only
    when it has fewer rows than its share.
    """
    if not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
    _check_weights(datasets, weights)
    rng = np.random.default_rng(seed)
    parts = []
    for name, count in _row_counts(weights, n_rows).items():
        if count == 0:
            continue
        size = len(datasets[name])
        passes = [rng.permutation(size) for _ in range(-(-count // size))]
        parts.append(datasets[name].select(np.concatenate(passes)[:count], keep_in_memory=True))
    mixed = concatenate_datasets(parts)
    return mixed.select(rng.permutation(n_rows), keep_in_memory=True)
