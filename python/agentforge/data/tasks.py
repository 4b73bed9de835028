"""Procedural, verifiable task families with compact prompts and ten difficulty levels.

A tiny model learns compact formats (`12+7=` → `19`) in minutes and verbose ones hardly at all
(DESIGN.md, "What a tiny model can learn in minutes"), so every family renders its items as a
short prompt whose answer follows directly, then eos:

    domain     family            level-0 prompt → answer
    reasoning  chain_sum         24-7=                 → 17
               basic_arithmetic  -3*7=                 → -21
    memory     kv_recall         a7=3 k2=9 ?k2=        → 9
               spell_backward    rev cat=              → tac
    speed      add_small         4+5=                  → 9
               count_bits        bits 13=              → 3
    (none)     letter_counting   count l in hello=     → 2

reasoning-gym generates and scores six of them (its `score_answer` on the original entry);
kv_recall is generated here and scored by exact match. `/` in basic_arithmetic is floor
division, as in reasoning-gym.

Splits: every prompt string belongs to exactly one split, chosen by a hash of the prompt
(80 % train, 10 % validation, 10 % test). `make_split` draws from a seed stream of its own per
split and keeps only the prompts of that split, so a held-out prompt can never appear in
training data, for any seed, level or family that renders the same prompt.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "NUM_LEVELS",
    "SPLITS",
    "TaskItem",
    "TaskFamily",
    "ReasoningGymFamily",
    "SpellBackwardFamily",
    "KeyValueRecall",
    "FAMILIES",
    "DOMAINS",
    "make_split",
    "rendered",
    "split_of",
    "score",
]

NUM_LEVELS = 10
SPLITS = ("train", "validation", "test")
# Hash buckets (of ten) owned by each split.
_SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
# reasoning-gym seeds each item with Random(dataset.seed + index): streams are index ranges of
# one long sequence, so start offsets are 62-bit hashes that no two streams share in practice.
_STREAM_BITS = 62


@dataclass(frozen=True)
class TaskItem:
    """One task: train on `prompt + answer + eos` (loss on answer and eos); evaluate by generating
    from `prompt`. `entry` is the raw reasoning-gym entry used for scoring, None for our families.
    `question` is the compact question itself (`12+7=`): the same as `prompt` unless the prompt
    was rendered for a model (e.g. in a chat template, see `rendered`); code that reads the task's
    content (hints, tool calls) reads the question."""

    family: str
    prompt: str
    answer: str
    entry: dict | None = field(default=None, hash=False)  # dicts are unhashable
    question: str = ""

    def __post_init__(self):
        if not self.question:
            object.__setattr__(self, "question", self.prompt)


def rendered(items: Sequence[TaskItem], render: Callable[[TaskItem], str] | None) -> list[TaskItem]:
    """`items` with their prompts rendered for a model (``render(item) -> prompt``, e.g. the
    question in a chat template); unchanged without a renderer. Scoring reads the answer and entry,
    not the prompt."""
    if render is None:
        return list(items)
    return [replace(item, prompt=render(item)) for item in items]


def _stable_int(*parts: object) -> int:
    """A 62-bit integer hash of `parts` that is the same in every process (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _STREAM_BITS)


def split_of(prompt: str) -> str:
    """The split that owns `prompt` ("train", "validation" or "test"), the same everywhere."""
    bucket = _stable_int(prompt) % 10
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


class TaskFamily:
    """A named generator of TaskItems with ten difficulty levels and a scorer.

    `levels[k]` holds the generator settings of level k (0 = easiest, 9 = hardest): for
    reasoning-gym families these are its config kwargs. Subclasses implement `item`.
    """

    def __init__(self, name: str, domain: str, levels: Sequence[Mapping[str, Any]]):
        if len(levels) != NUM_LEVELS:
            raise ValueError(f"{name}: expected {NUM_LEVELS} levels, got {len(levels)}")
        self.name = name
        self.domain = domain
        self.levels = [dict(kwargs) for kwargs in levels]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, domain={self.domain!r})"

    def check_level(self, level: int) -> None:
        """Raise ValueError unless `level` is an int in [0, NUM_LEVELS)."""
        if not isinstance(level, int) or not 0 <= level < NUM_LEVELS:
            raise ValueError(f"level must be an int in 0..{NUM_LEVELS - 1}, got {level!r}")

    def item(self, index: int, level: int) -> TaskItem:
        """Item number `index` of this family's infinite, deterministic sequence at `level`."""
        raise NotImplementedError

    def make(self, n: int, *, seed: int, level: int = 0) -> list[TaskItem]:
        """`n` items from the stream named by (seed, level); deterministic.

        Raw generation with no split filtering: use `make_split` for training and evaluation data.
        """
        _check_count(n)
        self.check_level(level)
        start = _stable_int(self.name, level, seed)
        return [self.item(start + i, level) for i in range(n)]

    def score(self, item: TaskItem, prediction: str) -> float:
        """1.0 when the stripped prediction equals the answer, else 0.0."""
        self._check_owns(item)
        return float(prediction.strip() == item.answer)

    def _check_owns(self, item: TaskItem) -> None:
        if item.family != self.name:
            raise ValueError(f"{self.name} cannot score an item of family {item.family!r}")


class ReasoningGymFamily(TaskFamily):
    """A reasoning-gym dataset whose entries `render` turns into a compact (prompt, answer).

    reasoning-gym is imported on first use: it takes about 2 s to import.
    """

    def __init__(
        self,
        name: str,
        domain: str,
        rg_name: str,
        levels: Sequence[Mapping[str, Any]],
        render: Callable[[dict], tuple[str, str]],
    ):
        super().__init__(name, domain, levels)
        self.rg_name = rg_name
        self.render = render
        self._datasets: dict[int, Any] = {}
        self._score_answer: Callable[[str, dict], float] | None = None

    def _dataset(self, level: int):
        if level not in self._datasets:
            import reasoning_gym

            # size is virtual: items are fetched by index and never iterated
            self._datasets[level] = reasoning_gym.create_dataset(self.rg_name, seed=0, size=2**63, **self.levels[level])
        return self._datasets[level]

    def item(self, index: int, level: int) -> TaskItem:
        entry = self._dataset(level)[index]
        prompt, answer = self.render(entry)
        return TaskItem(self.name, prompt, answer, entry)

    def score(self, item: TaskItem, prediction: str) -> float:
        """reasoning-gym's own score_answer on the entry (compact answers already use its format)."""
        self._check_owns(item)
        if item.entry is None:
            raise ValueError(f"{self.name} item {item.prompt!r} has no reasoning-gym entry to score against")
        if self._score_answer is None:
            import reasoning_gym

            # rg's scorers read only the entry, so one scorer serves every level
            self._score_answer = reasoning_gym.get_score_answer_fn(self.rg_name)
        return min(1.0, max(0.0, float(self._score_answer(prediction.strip(), item.entry))))


class SpellBackwardFamily(ReasoningGymFamily):
    """spell_backward with reasoning-gym's partial credit, minus a float bug in it."""

    def score(self, item: TaskItem, prediction: str) -> float:
        """reasoning-gym's score; a wrong answer that starts with the right spelling gets 0.8."""
        value = super().score(item, prediction)
        assert item.entry is not None  # a reasoning-gym item, scored on its entry above
        # reasoning-gym docks 0.2 from such answers by testing `reward == 1.0` after adding 1/len
        # per matching letter, and 9 * (1/9) > 1.0 skips the test, scoring them 1.0
        if value == 1.0 and prediction.strip().lower() != item.entry["answer"].lower():
            return 0.8
        return value


class KeyValueRecall(TaskFamily):
    """Recall the value of one key among `pairs` key=value pairs: `a7=3 k2=9 ?k2=` → `9`.

    Keys are a letter and a digit (distinct within an item), values one digit.
    """

    KEYS = [letter + digit for letter in string.ascii_lowercase for digit in string.digits]

    def item(self, index: int, level: int) -> TaskItem:
        rng = random.Random(index)
        keys = rng.sample(self.KEYS, self.levels[level]["pairs"])
        values = [str(rng.randrange(10)) for _ in keys]
        query = rng.randrange(len(keys))
        pairs = " ".join(f"{key}={value}" for key, value in zip(keys, values))
        return TaskItem(self.name, f"{pairs} ?{keys[query]}=", values[query], None)


def _render_expression(entry: dict) -> tuple[str, str]:
    return entry["metadata"]["expression"].replace(" ", "") + "=", entry["answer"]


def _render_spell_backward(entry: dict) -> tuple[str, str]:
    # reasoning-gym scores case-insensitively; lowercase spares a tiny model the capitals
    return f"rev {entry['metadata']['word'].lower()}=", entry["answer"].lower()


def _render_letter_counting(entry: dict) -> tuple[str, str]:
    # reasoning-gym counts case-insensitively, so the lowercased span has the same answer
    span = " ".join(entry["metadata"]["span"]).lower()
    return f"count {entry['metadata']['target_letter']} in {span}=", entry["answer"]


def _render_count_bits(entry: dict) -> tuple[str, str]:
    return f"bits {entry['metadata']['number']}=", entry["answer"]


def _chain_sum_levels(table: Sequence[tuple[int, int, int, int]]) -> list[dict]:
    return [dict(min_terms=a, max_terms=b, min_digits=c, max_digits=d) for a, b, c, d in table]


# (min_terms, max_terms, min_digits, max_digits): every knob is non-decreasing with level and
# each level raises at least one, so the expected amount of arithmetic grows at every step.
CHAIN_SUM_LEVELS = _chain_sum_levels(
    [
        (2, 2, 1, 2),
        (2, 3, 1, 2),
        (3, 3, 1, 2),
        (3, 3, 2, 2),
        (3, 4, 2, 2),
        (4, 4, 2, 2),
        (4, 5, 2, 3),
        (5, 5, 2, 3),
        (5, 6, 3, 3),
        (6, 8, 3, 4),
    ]
)
# Small numbers for the speed sibling: one-digit terms, more of them, two digits late.
ADD_SMALL_LEVELS = _chain_sum_levels(
    [
        (2, 2, 1, 1),
        (2, 3, 1, 1),
        (3, 3, 1, 1),
        (3, 4, 1, 1),
        (4, 4, 1, 1),
        (4, 4, 1, 2),
        (4, 5, 1, 2),
        (5, 5, 1, 2),
        (5, 6, 1, 2),
        (6, 6, 1, 2),
    ]
)
_NO_DIVISION = ("+", "-", "*")
_ALL_OPERATORS = ("+", "-", "*", "/")
# allow_parentheses stays True: reasoning-gym's parenthesis-free generator evaluates left to right,
# ignoring operator precedence, while the parenthesised one evaluates the expression with eval.
BASIC_ARITHMETIC_LEVELS = [
    dict(
        min_terms=a, max_terms=b, min_digits=c, max_digits=d, operators=ops, allow_parentheses=True, allow_negation=neg
    )
    for a, b, c, d, ops, neg in [
        (2, 2, 1, 1, _NO_DIVISION, False),
        (2, 3, 1, 1, _NO_DIVISION, False),
        (3, 3, 1, 1, _NO_DIVISION, False),
        (3, 4, 1, 1, _ALL_OPERATORS, False),
        (4, 4, 1, 1, _ALL_OPERATORS, False),
        (4, 5, 1, 1, _ALL_OPERATORS, True),
        (4, 5, 1, 2, _ALL_OPERATORS, True),
        (5, 5, 1, 2, _ALL_OPERATORS, True),
        (5, 6, 1, 2, _ALL_OPERATORS, True),
        (5, 6, 2, 2, _ALL_OPERATORS, True),
    ]
]
# reasoning-gym's default word list holds words of 3 to 10 letters
SPELL_BACKWARD_LEVELS = [
    dict(min_word_len=a, max_word_len=b)
    for a, b in [(3, 3), (3, 4), (4, 4), (4, 5), (5, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
]
LETTER_COUNTING_LEVELS = [
    dict(min_words=a, max_words=b)
    for a, b in [(1, 1), (1, 2), (2, 2), (2, 3), (3, 4), (4, 5), (5, 7), (7, 9), (9, 12), (12, 16)]
]
KV_RECALL_LEVELS = [dict(pairs=k) for k in (2, 3, 4, 5, 6, 7, 8, 9, 10, 12)]
# numbers of up to 6, 8, ..., 24 bits: level 0 already has 63 prompts, enough for a held-out split
COUNT_BITS_LEVELS = [dict(min_n=1, max_n=2 ** (6 + 2 * level) - 1) for level in range(NUM_LEVELS)]

FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in [
        ReasoningGymFamily("chain_sum", "reasoning", "chain_sum", CHAIN_SUM_LEVELS, _render_expression),
        ReasoningGymFamily(
            "basic_arithmetic", "reasoning", "basic_arithmetic", BASIC_ARITHMETIC_LEVELS, _render_expression
        ),
        KeyValueRecall("kv_recall", "memory", KV_RECALL_LEVELS),
        SpellBackwardFamily(
            "spell_backward", "memory", "spell_backward", SPELL_BACKWARD_LEVELS, _render_spell_backward
        ),
        ReasoningGymFamily("add_small", "speed", "chain_sum", ADD_SMALL_LEVELS, _render_expression),
        ReasoningGymFamily("count_bits", "speed", "count_bits", COUNT_BITS_LEVELS, _render_count_bits),
        # not in a domain: reasoning-gym's answers are lopsided (91 % are "1" at level 0)
        ReasoningGymFamily(
            "letter_counting", "counting", "letter_counting", LETTER_COUNTING_LEVELS, _render_letter_counting
        ),
    ]
}

# What each family's compact question asks, in words: an instruct model is shown it above the
# question (a model trained here learns the compact form instead).
INSTRUCTIONS: dict[str, str] = {
    "chain_sum": "Work out the expression. Reply with the number only.",
    "basic_arithmetic": "Work out the expression. Reply with the number only.",
    "add_small": "Work out the expression. Reply with the number only.",
    "kv_recall": "Each pair is key=value. Reply with only the value of the key asked for after '?'.",
    "spell_backward": "Spell the word after 'rev' backwards. Reply with the reversed word only.",
    "count_bits": "How many 1 bits does the number after 'bits' have in binary? Reply with the number only.",
    "letter_counting": "How many times does the letter occur in the text? Reply with the number only.",
}

DOMAINS: dict[str, tuple[str, ...]] = {
    "reasoning": ("chain_sum", "basic_arithmetic"),
    "memory": ("kv_recall", "spell_backward"),
    "speed": ("add_small", "count_bits"),
}


def _family(family: TaskFamily | str) -> TaskFamily:
    if isinstance(family, TaskFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def make_split(family: TaskFamily | str, split: str, n: int, *, seed: int, level: int) -> list[TaskItem]:
    """`n` items of `split` ("train", "validation" or "test"), deterministic in (family, split, seed, level).

    Each split draws from its own seed stream and keeps only prompts that `split_of` assigns to
    it, so splits never share a prompt. Duplicates within a split are possible when a level has
    few distinct prompts (add_small level 0 has 200).
    """
    family = _family(family)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_count(n)
    family.check_level(level)
    start = _stable_int(family.name, level, seed, split)
    # a held-out split keeps one draw in ten; give up only far beyond that rate
    max_draws = 100 * n + 10_000
    items: list[TaskItem] = []
    draws = 0
    while len(items) < n:
        if draws == max_draws:
            raise RuntimeError(
                f"{family.name} level {level}: only {len(items)} of {n} {split} items in {max_draws} draws; "
                "this level has too few distinct prompts for that split"
            )
        item = family.item(start + draws, level)
        draws += 1
        if split_of(item.prompt) == split:
            items.append(item)
    return items


def score(item: TaskItem, prediction: str) -> float:
    """Score `prediction` for `item` in [0, 1] with the scorer of the item's family."""
    return _family(item.family).score(item, prediction)
