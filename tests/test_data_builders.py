"""Dataset builders: packed text rows, document-level splits, answer-only task labels, mixtures."""

import collections
import re

import numpy as np
import pytest
from datasets import Dataset

from agentforge.data import (
    load_text,
    make_split,
    mixture,
    pack_tasks,
    pack_text,
    text_splits,
    train_tokenizer,
)
from agentforge.data.builders import IGNORE_INDEX
from agentforge.data.tasks import TaskItem


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(load_text("pydoc", max_docs=30), 512)


@pytest.fixture(scope="module")
def task_items():
    return (
        make_split("chain_sum", "train", 150, seed=0, level=1)
        + make_split("kv_recall", "train", 100, seed=0, level=3)
        + make_split("spell_backward", "train", 100, seed=0, level=5)
    )


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _assert_in_memory(dataset):
    assert dataset.cache_files == []


def test_pack_text_rows_are_the_eos_joined_stream(tokenizer):
    docs = load_text("pydoc", max_docs=8)
    packed = pack_text(tokenizer, docs, 64)
    _assert_in_memory(packed)
    stream = [t for doc in docs for t in _ids(tokenizer, doc) + [tokenizer.eos_token_id]]
    rows = np.array(packed["input_ids"])
    assert rows.shape == (len(stream) // 64, 64)
    assert rows.reshape(-1).tolist() == stream[: rows.size]
    assert packed["labels"] == packed["input_ids"]


def test_pack_text_needs_one_full_row(tokenizer):
    with pytest.raises(ValueError, match="less than one row"):
        pack_text(tokenizer, ["tiny"], 64)
    with pytest.raises(ValueError, match="seq_len"):
        pack_text(tokenizer, ["tiny"], 1)


def _marked_documents(n=60):
    prose = load_text("pydoc", max_docs=n)
    return [f"<doc {i}>\n{text[:2000]}" for i, text in enumerate(prose)]


def _documents_in(tokenizer, dataset):
    text = tokenizer.decode(np.array(dataset["input_ids"]).reshape(-1).tolist())
    return {int(i) for i in re.findall(r"<doc (\d+)>", text)}


def test_text_splits_keep_every_document_in_one_split(tokenizer):
    docs = _marked_documents()
    splits = text_splits(tokenizer, docs, 32, seed=0, validation=0.1, test=0.1)
    assert sorted(splits) == ["test", "train", "validation"]
    found = {name: _documents_in(tokenizer, split) for name, split in splits.items()}
    assert len(found["validation"]) == len(found["test"]) == 6
    train, validation, test = found["train"], found["validation"], found["test"]
    assert not (train & validation or train & test or validation & test)
    assert len(found["train"]) >= 40  # the partial last row may drop the tail of a document
    for split in splits.values():
        _assert_in_memory(split)
        assert len(split[0]["input_ids"]) == 32


def test_text_splits_depend_on_the_seed(tokenizer):
    docs = _marked_documents()
    first = _documents_in(tokenizer, text_splits(tokenizer, docs, 32, seed=0)["test"])
    assert _documents_in(tokenizer, text_splits(tokenizer, docs, 32, seed=0)["test"]) == first
    assert _documents_in(tokenizer, text_splits(tokenizer, docs, 32, seed=1)["test"]) != first


@pytest.mark.parametrize(
    "kwargs, match",
    [({"validation": 0.0}, "validation"), ({"test": 1.5}, "test"), ({"validation": 0.5, "test": 0.5}, "cannot fill")],
)
def test_text_splits_reject_bad_fractions(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        text_splits(tokenizer, _marked_documents(10), 32, seed=0, **kwargs)


def test_pack_tasks_labels_cover_answers_and_eos_only(tokenizer, task_items):
    packed = pack_tasks(tokenizer, task_items, 48, seed=0)
    _assert_in_memory(packed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    recovered = []
    for row in packed:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == 48
        # split the row at each eos: prompt (no loss) + answer + eos (loss), then padding
        start = 0
        for end in [i for i, t in enumerate(ids) if t == eos]:
            segment, segment_labels = ids[start : end + 1], labels[start : end + 1]
            n_prompt = segment_labels.count(IGNORE_INDEX)
            assert segment_labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
            assert segment_labels[n_prompt:] == segment[n_prompt:]
            recovered.append((segment[:n_prompt], segment[n_prompt:-1]))
            start = end + 1
        assert set(ids[start:]) <= {pad} and set(labels[start:]) <= {IGNORE_INDEX}
    # the training contract: prompt and answer encoded separately, exactly as an evaluator will
    expected = [(_ids(tokenizer, i.prompt), _ids(tokenizer, i.answer)) for i in task_items]
    assert sorted(map(repr, recovered)) == sorted(map(repr, expected))
    decoded = collections.Counter((tokenizer.decode(p), tokenizer.decode(a)) for p, a in recovered)
    assert decoded == collections.Counter((i.prompt, i.answer) for i in task_items)


def test_pack_tasks_packs_densely_and_shuffles_by_seed(tokenizer, task_items):
    packed = pack_tasks(tokenizer, task_items, 48, seed=0)
    tokens = sum(len(_ids(tokenizer, i.prompt)) + len(_ids(tokenizer, i.answer)) + 1 for i in task_items)
    assert len(packed) <= tokens / 48 * 1.5  # greedy packing wastes under a third of each row
    assert pack_tasks(tokenizer, task_items, 48, seed=0)["input_ids"] == packed["input_ids"]
    assert pack_tasks(tokenizer, task_items, 48, seed=1)["input_ids"] != packed["input_ids"]


def test_pack_tasks_rejects_items_longer_than_a_row(tokenizer):
    item = TaskItem("kv_recall", "a1=1 b2=2 c3=3 d4=4 ?c3=", "3")
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        pack_tasks(tokenizer, [item], 8, seed=0)
    with pytest.raises(ValueError, match="empty answer"):
        pack_tasks(tokenizer, [TaskItem("kv_recall", "a=", "")], 8, seed=0)
    with pytest.raises(ValueError, match="items is empty"):
        pack_tasks(tokenizer, [], 8, seed=0)


def _constant_rows(value, n, width=4):
    rows = [[value * 1000 + i] * width for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def _sources_of(dataset):
    return collections.Counter(row[0] // 1000 for row in dataset["input_ids"])


def test_mixture_follows_the_weights():
    parts = {"a": _constant_rows(1, 500), "b": _constant_rows(2, 500), "c": _constant_rows(3, 500)}
    mixed = mixture(parts, {"a": 0.2, "b": 0.3, "c": 0.5}, 1000, seed=0)
    _assert_in_memory(mixed)
    assert len(mixed) == 1000
    counts = _sources_of(mixed)
    for source, share in [(1, 0.2), (2, 0.3), (3, 0.5)]:
        assert abs(counts[source] - 1000 * share) <= 1
    assert len({row[0] for row in mixed["input_ids"]}) == 1000  # no row repeats while others are unused
    first_100 = _sources_of(mixed.select(range(100)))
    assert len(first_100) == 3  # shuffled, not concatenated in order


def test_mixture_repeats_a_small_source_evenly_and_is_deterministic():
    parts = {"small": _constant_rows(1, 10), "big": _constant_rows(2, 1000)}
    mixed = mixture(parts, {"small": 1, "big": 1}, 50, seed=3)
    small_rows = collections.Counter(row[0] for row in mixed["input_ids"] if row[0] < 2000)
    assert sum(small_rows.values()) == 25 and set(small_rows.values()) <= {2, 3}
    assert mixture(parts, {"small": 1, "big": 1}, 50, seed=3)["input_ids"] == mixed["input_ids"]
    assert mixture(parts, {"small": 1, "big": 1}, 50, seed=4)["input_ids"] != mixed["input_ids"]
    assert _sources_of(mixture(parts, {"small": 0, "big": 1}, 20, seed=0)) == {2: 20}


@pytest.mark.parametrize(
    "weights, n_rows, match",
    [
        ({"a": 1}, 10, "one weight per dataset"),
        ({"a": 1, "b": -1}, 10, "non-negative"),
        ({"a": 0, "b": 0}, 10, "not all zero"),
        ({"a": 1, "b": 1}, 0, "n_rows"),
    ],
)
def test_mixture_rejects_bad_arguments(weights, n_rows, match):
    parts = {"a": _constant_rows(1, 5), "b": _constant_rows(2, 5)}
    with pytest.raises(ValueError, match=match):
        mixture(parts, weights, n_rows, seed=0)


def test_mixture_rejects_mismatched_columns():
    parts = {"a": _constant_rows(1, 5, width=4), "b": Dataset.from_dict({"text": ["x"] * 5})}
    with pytest.raises(ValueError, match="share columns"):
        mixture(parts, {"a": 1, "b": 1}, 10, seed=0)
