"""Task families: answers verified independently, scoring, difficulty levels, leak-free splits."""

import dataclasses
import statistics
import time

import pytest

from agentforge.data import DOMAINS, FAMILIES, NUM_LEVELS, TaskFamily, TaskItem, make_split, score
from agentforge.data.tasks import SPLITS, split_of


def _recompute_answer(item: TaskItem) -> str:
    """The answer worked out from the compact prompt alone, independently of the generators."""
    body = item.prompt.removesuffix("=")
    if item.family in ("chain_sum", "add_small", "basic_arithmetic"):
        assert set(body) <= set("0123456789+-*/()"), item.prompt
        return str(eval(body.replace("/", "//")))  # reasoning-gym's "/" is floor division
    if item.family == "kv_recall":
        *pairs, query = body.split(" ")
        table = dict(pair.split("=") for pair in pairs)
        assert len(table) == len(pairs), "keys must be distinct"
        return table[query.removeprefix("?")]
    if item.family == "spell_backward":
        return body.removeprefix("rev ")[::-1]
    if item.family == "count_bits":
        return str(bin(int(body.removeprefix("bits "))).count("1"))
    if item.family == "letter_counting":
        letter, span = body.removeprefix("count ").split(" in ", 1)
        return str(span.count(letter))
    raise AssertionError(f"no independent check for {item.family}")


def _wrong_answers(answer: str) -> list[str]:
    off_by_one = str(int(answer) + 1) if answer.lstrip("-").isdigit() else answer[::-1] + "q"
    return ["", answer + "7", "x" + answer, off_by_one]


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> TaskFamily:
    return FAMILIES[request.param]


def test_domains_partition_their_families():
    in_domains = sorted(name for names in DOMAINS.values() for name in names)
    assert in_domains == sorted(name for name, family in FAMILIES.items() if family.domain in DOMAINS)
    assert len(in_domains) == len(set(in_domains))
    for domain, names in DOMAINS.items():
        assert all(FAMILIES[name].domain == domain for name in names)


@pytest.mark.parametrize("level", [0, 5, 9])
def test_items_are_correct_and_score_their_own_answer(family, level):
    items = family.make(60, seed=3, level=level)
    assert len(items) == 60
    for item in items:
        assert item.family == family.name and item.prompt.endswith("=") and item.answer
        assert "\n" not in item.prompt + item.answer
        assert item.answer == _recompute_answer(item), item
        assert (item.entry is None) == (family.name == "kv_recall")
        assert family.score(item, item.answer) == 1.0
        assert score(item, f"  {item.answer}\n") == 1.0  # surrounding whitespace is ignored
        for wrong in _wrong_answers(item.answer):
            if wrong != item.answer:
                assert 0.0 <= score(item, wrong) < 1.0, (item, wrong)


def test_prompts_are_compact_at_low_levels(family):
    for level in range(4):
        longest = max(len(item.prompt) for item in family.make(200, seed=0, level=level))
        assert longest <= 40, (family.name, level, longest)


def test_level_settings_grow_monotonically(family):
    assert len(family.levels) == NUM_LEVELS
    for easier, harder in zip(family.levels, family.levels[1:]):
        assert easier.keys() == harder.keys() and easier != harder
        for knob, value in easier.items():
            if isinstance(value, tuple):  # operator sets only gain operators
                assert set(value) <= set(harder[knob]), knob
            else:
                assert value <= harder[knob], knob


def test_difficulty_increases_with_level(family):
    sizes = [
        statistics.mean(len(item.prompt) + len(item.answer) for item in family.make(300, seed=0, level=level))
        for level in range(NUM_LEVELS)
    ]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] > 1.5 * sizes[0], sizes


def test_generation_is_deterministic(family):
    first = family.make(50, seed=7, level=2)
    assert family.make(50, seed=7, level=2) == first
    assert family.make(50, seed=8, level=2) != first
    assert make_split(family, "test", 30, seed=7, level=2) == make_split(family.name, "test", 30, seed=7, level=2)


def test_splits_are_disjoint_and_training_never_sees_held_out_prompts(family):
    level = 0  # the smallest prompt spaces, where collisions are likeliest
    held_out = {
        split: {item.prompt for item in make_split(family, split, 300, seed=0, level=level)}
        for split in ("validation", "test")
    }
    assert not held_out["validation"] & held_out["test"]
    for seed in (0, 1):  # other seeds' training data must not leak either
        train = {item.prompt for item in make_split(family, "train", 2000, seed=seed, level=level)}
        assert not train & (held_out["validation"] | held_out["test"])
    # every item lands in the split that owns its prompt, at every level
    for split in SPLITS:
        assert all(split_of(item.prompt) == split for item in make_split(family, split, 50, seed=1, level=9))


def test_split_streams_differ():
    train = make_split("kv_recall", "train", 100, seed=0, level=4)
    validation = make_split("kv_recall", "validation", 100, seed=0, level=4)
    test = make_split("kv_recall", "test", 100, seed=0, level=4)
    assert len({item.prompt for item in train + validation + test}) == 300


def test_a_thousand_items_generate_quickly(family):
    family.make(1, seed=0, level=5)  # the first call imports reasoning-gym and loads word lists
    start = time.perf_counter()
    make_split(family, "train", 1000, seed=0, level=5)
    make_split(family, "test", 1000, seed=0, level=5)  # keeps one draw in ten
    assert time.perf_counter() - start < 6.0  # measured: under 0.7 s for both on an idle 2-core CPU


def test_task_items_are_frozen_and_hashable():
    item = FAMILIES["chain_sum"].make(1, seed=0)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.answer = "0"
    assert len({item, item}) == 1


class _OnePrompt(TaskFamily):
    def item(self, index, level):
        return TaskItem(self.name, "1+1=", "2", None)


def test_a_prompt_space_too_small_for_a_split_raises():
    tiny = _OnePrompt("one_prompt", "reasoning", [{}] * NUM_LEVELS)
    owner = split_of("1+1=")
    assert make_split(tiny, owner, 3, seed=0, level=0) == [TaskItem("one_prompt", "1+1=", "2")] * 3
    other = next(split for split in SPLITS if split != owner)
    with pytest.raises(RuntimeError, match="too few distinct prompts"):
        make_split(tiny, other, 1, seed=0, level=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: FAMILIES["chain_sum"].make(5, seed=0, level=10), "level"),
        (lambda: FAMILIES["chain_sum"].make(5, seed=0, level=-1), "level"),
        (lambda: FAMILIES["chain_sum"].make(-1, seed=0), "non-negative"),
        (lambda: make_split("chain_sum", "dev", 5, seed=0, level=0), "split"),
        (lambda: make_split("no_such_family", "test", 5, seed=0, level=0), "unknown task family"),
        (lambda: FAMILIES["kv_recall"].score(TaskItem("chain_sum", "1+1=", "2"), "2"), "cannot score"),
        (lambda: score(TaskItem("chain_sum", "1+1=", "2"), "2"), "no reasoning-gym entry"),
        (lambda: TaskFamily("x", "speed", [{}] * 3), "10 levels"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_spell_backward_answers_with_extra_letters_lose_credit():
    # reasoning-gym alone scores "sisoileta7" 1.0 for "ateliosis": float error skips its 0.2 penalty
    item = next(i for i in FAMILIES["spell_backward"].make(200, seed=3, level=9) if len(i.answer) == 9)
    assert score(item, item.answer + "7") == 0.8
    assert score(item, item.answer.upper()) == 1.0  # reasoning-gym ignores case
