"""The curriculum's algorithms on small hand-checkable cases: the question state machine driven by
a scripted answerer, failure diagnosis and hint escalation, the stopping rules, the record the
trained model keeps, the temperature schedule, example packing, held-out sets and variants, the
baseline choice, bootstrap intervals, tool demonstrations, and (measured) that accuracy falls with
the difficulty level."""

import collections
import math
import types

import numpy as np
import pytest

from agentforge.curriculum import hints, measure, rows, selfmodel, tasks
from agentforge.curriculum.loop import Record, stop_reason
from agentforge.curriculum.state import CORRECTED, HINT, MASTER, MASTERED, SKIP, SKIPPED, VARIANT, LevelState
from agentforge.data import TaskItem, score
from agentforge.data.tasks import split_of

pytestmark = pytest.mark.usefixtures("one_thread")


def item(prompt, answer, family="add_small"):
    return TaskItem(family, prompt, answer)


class Variants:
    """Fresh items of the same family for the state machine: 1+1=, 1+2=, 1+3=, ..."""

    def __init__(self):
        self.made = 0

    def __call__(self, old):
        self.made += 1
        return item(f"1+{self.made}=", str(1 + self.made), old.family)


def play(state, answerer, rounds):
    """Run ``rounds`` rounds: every active question answered by ``answerer(shown prompt, item)``."""
    history = []
    for _ in range(rounds):
        for question in state.active:
            guess = answerer(question.prompt, question.item)
            history.append(state.record(question, guess, guess == question.item.answer))
    return history


# ---------------------------------------------------------------------------------------------
# the state machine


def test_success_brings_a_fresh_variant_of_the_same_family():
    variants = Variants()
    state = LevelState([item("2+2=", "4", "chain_sum")], variants)
    [attempt] = play(state, lambda prompt, it: it.answer, 1)
    question = state.questions[0]
    assert attempt.event == VARIANT and attempt.train_prompts == ("2+2=",)
    assert question.item == item("1+1=", "2", "chain_sum") and question.streak == 1 and question.hints == []


def test_three_unaided_successes_in_a_row_master_a_concept():
    state = LevelState([item("2+2=", "4"), item("3+3=", "6")], Variants())
    events = [a.event for a in play(state, lambda prompt, it: it.answer, 3)]
    assert events == [VARIANT, VARIANT, VARIANT, VARIANT, MASTER, MASTER]
    assert state.remaining == 0 and all(q.status == MASTERED for q in state.questions)
    assert state.counts[MASTER] == 2 and state.counts[VARIANT] == 4


def test_the_streak_survives_variants_and_a_failure_or_a_hint_restarts_it():
    script = iter(["4", "2", "wrong", "4"])
    state = LevelState([item("2+2=", "4")], Variants())
    answer = lambda prompt, it: it.answer if "hint" in prompt else next(script)
    events = [a.event for a in play(state, answer, 2)]
    assert events == [VARIANT, VARIANT] and state.questions[0].streak == 2  # two different items, one streak
    events = [a.event for a in play(state, answer, 3)]
    assert events == [HINT, CORRECTED, VARIANT] and state.questions[0].streak == 1 and state.remaining == 1


def test_five_escalating_hints_then_skip():
    state = LevelState([item("24-7=", "17", "chain_sum")], Variants())
    attempts = play(state, lambda prompt, it: "-17", 7)
    assert [a.event for a in attempts] == [HINT] * 5 + [SKIP]  # nothing is attempted once skipped
    question = state.questions[0]
    assert question.status == SKIPPED and state.remaining == 0 and len(question.hints) == hints.MAX_HINTS
    assert question.hints == [
        "hint: check the sign",
        "hint: check the sign, positive, 2 digits",
        "hint: check the sign, starts 1",
        "hint: check the sign, starts 1",
        "hint: answer 17",
    ]
    assert all(a.failure == "sign" and a.train_prompts == () for a in attempts)


def test_a_hint_corrected_answer_trains_with_and_without_the_hint():
    state = LevelState([item("24-7=", "17", "chain_sum")], Variants())
    copies_the_answer_hint = lambda prompt, it: (
        prompt.split("hint: answer ")[1].split(";")[0] if "hint: answer" in prompt else "3"
    )
    attempts = play(state, copies_the_answer_hint, 6)
    assert [a.event for a in attempts[:6]] == [HINT] * 5 + [CORRECTED]
    assert attempts[5].train_prompts == ("hint: answer 17; 24-7=", "24-7=")
    assert state.questions[0].hints == [] and state.questions[0].item.prompt == "1+1="  # a variant, no hints


def test_max_hints_zero_skips_at_the_first_failure_and_bad_settings_are_refused():
    state = LevelState([item("2+2=", "4")], Variants(), max_hints=0)
    assert [a.event for a in play(state, lambda p, it: "5", 1)] == [SKIP]
    with pytest.raises(ValueError, match="at least one question"):
        LevelState([], Variants())
    with pytest.raises(ValueError, match="mastery >= 1"):
        LevelState([item("2+2=", "4")], Variants(), mastery=0)
    with pytest.raises(ValueError, match="not active"):
        state.record(state.questions[0], "4", True)


def test_the_record_summary_keeps_no_wall_clock_times():
    record = Record(
        levels=[{"level": 0, "accuracy": 0.5, "seconds": 1.25}],
        visited={"add_small": [0]},
        steps=3,
        examples=[rows.task_example("1+1=", "2"), rows.task_example("hint: x; 1+1=", "2", rows.HINTED)],
    )
    summary = record.summary()
    assert summary["levels"] == [{"level": 0, "accuracy": 0.5}] and record.levels[0]["seconds"] == 1.25
    assert summary["examples"] == 2 and summary["examples_by_kind"] == {"task": 1, "hinted": 1}
    assert summary["steps"] == 3 and summary["visited"] == {"add_small": [0]}


def test_stop_rules_hard_wall_budget_and_last_level():
    settings = types.SimpleNamespace(hard_wall=0.5, total_steps=100, levels=3)
    assert stop_reason(0, 0.49, settings, budget_spent=False).startswith("hard wall at level 0")
    assert stop_reason(0, 0.49, settings, budget_spent=True).startswith("hard wall")  # the wall comes first
    assert stop_reason(1, 0.5, settings, budget_spent=True).startswith("step budget spent")
    assert stop_reason(1, 0.9, settings, budget_spent=False) == ""
    assert stop_reason(2, 0.9, settings, budget_spent=True) == "all 3 levels done"


# ---------------------------------------------------------------------------------------------
# diagnosis and hints


@pytest.mark.parametrize(
    "family, prompt, answer, guess, kind",
    [
        ("chain_sum", "24-7=", "17", "", "empty"),
        ("chain_sum", "24-7=", "17", "seventeen", "format_number"),
        ("chain_sum", "24-7=", "17", "-17", "sign"),
        ("chain_sum", "24-7=", "17", "16", "off_by_one"),
        ("chain_sum", "24-7=", "17", "31", "operation"),  # 24+7
        ("basic_arithmetic", "(3*5)=", "15", "8", "operation"),  # 3+5
        ("kv_recall", "a7=3 k2=9 ?k2=", "9", "3", "other_key"),
        ("chain_sum", "24-7=", "17", "170", "magnitude"),
        ("chain_sum", "24-7=", "17", "42", "wrong"),
        ("spell_backward", "rev cat=", "tac", "ta", "partial"),
        ("spell_backward", "rev cat=", "tac", "cat", "order"),
        ("spell_backward", "rev cat=", "tac", "t4c", "format_word"),
        ("spell_backward", "rev cat=", "tac", "dog", "wrong"),
    ],
)
def test_diagnosis(family, prompt, answer, guess, kind):
    assert hints.diagnose(item(prompt, answer, family), guess) == kind


def test_hints_escalate_to_the_answer():
    negative = item("-70+30*17/17=", "-140153", "basic_arithmetic")
    ladder = [hints.hint(negative, "magnitude", rung) for rung in range(1, 6)]
    assert ladder == [
        "hint: check the size",
        "hint: check the size, negative, 6 digits",
        "hint: check the size, starts -1",
        "hint: check the size, starts -140",
        "hint: answer -140153",
    ]
    word = item("rev cat=", "tac", "spell_backward")
    assert [hints.hint(word, "order", r) for r in (2, 3, 4)] == [
        "hint: check the order, 3 letters",
        "hint: check the order, starts t",
        "hint: check the order, starts ta",
    ]
    assert hints.hinted("hint: off by one", "24-7=") == "hint: off by one; 24-7=" and hints.hinted("", "x=") == "x="
    with pytest.raises(ValueError, match="rung must be an int in 1..5"):
        hints.hint(word, "order", 6)
    with pytest.raises(ValueError, match="unknown failure kind"):
        hints.hint(word, "bad luck", 1)


# ---------------------------------------------------------------------------------------------
# tasks, variants and held-out sets


def test_variants_are_fresh_training_items_of_the_same_family_and_level():
    source = tasks.VariantSource(seed=3, chunk=16)
    items = source.take("chain_sum", 2, 40)
    assert len({it.prompt for it in items}) == 40 and all(it.family == "chain_sum" for it in items)
    assert all(split_of(it.prompt) == "train" for it in items)
    more = source.take("chain_sum", 2, 5)
    assert not {it.prompt for it in more} & {it.prompt for it in items}
    # count_bits level 0 has 63 prompts, about 50 of them in the train split: repeats, never runs dry
    few = tasks.VariantSource(seed=0, chunk=32).take("count_bits", 0, 70)
    assert len(few) == 70 and 40 < len({it.prompt for it in few}) < 64


def test_held_out_sets_are_fixed_and_never_training_prompts():
    first = tasks.held_out(["kv_recall", "count_bits"], "test", 6, seed=0, levels=[0, 4])
    again = tasks.held_out(["kv_recall", "count_bits"], "test", 6, seed=0, levels=[0, 4])
    assert first == again and set(first) == {("kv_recall", 0), ("kv_recall", 4), ("count_bits", 0), ("count_bits", 4)}
    assert all(split_of(it.prompt) == "test" for items in first.values() for it in items)
    with pytest.raises(ValueError, match="'validation' or 'test'"):
        tasks.held_out(["kv_recall"], "train", 2, seed=0)


def test_curriculum_levels_climb_from_the_baseline_and_stop_at_nine():
    assert [tasks.level_of(3, k) for k in range(10)] == [3, 4, 5, 6, 7, 8, 9, 9, 9, 9]


@pytest.mark.parametrize("family", ["chain_sum", "basic_arithmetic", "add_small", "count_bits", "spell_backward"])
def test_tool_demonstrations_are_executed_and_verified(family):
    for it in tasks.VariantSource(seed=1).take(family, 3, 4):
        demo = tasks.demonstrate(it)
        assert demo is not None and demo.call.startswith(("[calc: ", "[py: "))
        assert demo.result == f"[out: {it.answer}]" and score(it, demo.result[6:-1]) == 1.0
    assert tasks.demonstrate(item("a7=3 k2=9 ?k2=", "9", "kv_recall")) is None


# ---------------------------------------------------------------------------------------------
# rows


@pytest.fixture(scope="module")
def tokenizer():
    from agentforge.data import load_text, train_tokenizer

    return train_tokenizer(load_text("stdlib", max_docs=10), 320)


def decode_trained(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != rows.IGNORE_INDEX])


def test_a_trace_takes_no_loss_on_the_tool_result(tokenizer):
    example = rows.trace_example("37*48=", "[calc: 37*48][out: 1776]1776")
    ids, labels = rows.encode(tokenizer, example)
    assert tokenizer.decode(ids) == rows.tool_prompt("37*48=") + "[calc: 37*48][out: 1776]1776<|endoftext|>"
    assert decode_trained(tokenizer, ids, labels) == "[calc: 37*48]1776<|endoftext|>"


def test_self_samples_are_tagged_and_keep_eos_only_when_sampled(tokenizer):
    ids, labels = rows.encode(tokenizer, rows.self_example(0.7, "12+7=", "19", ended=False))
    assert tokenizer.decode(ids) == "<t=0.70> 12+7=19" and decode_trained(tokenizer, ids, labels) == "19"


def test_packing_fills_fixed_rows_and_drops_what_cannot_fit(tokenizer):
    examples = [rows.task_example(f"{i}+1=", str(i + 1)) for i in range(20)]
    examples.append(rows.trace_example("1+1=", "[calc: 1+1][out: 2]2"))  # far longer than 24 tokens
    packed, dropped = rows.pack(tokenizer, examples, 24, seed=0)
    assert dropped == 1 and all(len(r["input_ids"]) == len(r["labels"]) == 24 for r in packed)
    trained = "".join(decode_trained(tokenizer, r["input_ids"], r["labels"]) for r in packed)
    assert sorted(trained.split("<|endoftext|>"))[1:] == sorted(str(i + 1) for i in range(20))


# ---------------------------------------------------------------------------------------------
# self-modeling schedule


def test_temperature_ranges_follow_the_design():
    assert selfmodel.temperature_ranges(1) == [(round(0.1 * i, 4), round(0.1 * i + 0.2, 4)) for i in range(10)]
    level10 = selfmodel.temperature_ranges(10)
    assert len(level10) == 19 and level10[0] == (0.9, 2.0) and level10[-1] == (2.7, 3.8)
    assert sum(len(selfmodel.temperature_ranges(level)) for level in range(1, 11)) == 145
    assert selfmodel.schedule_temperatures(1, 3) == [0.1, 0.5, 1.0]
    assert selfmodel.schedule_temperatures(1, 20) == [round(0.1 * (i + 1), 4) for i in range(10)]
    with pytest.raises(ValueError, match="level must be an int >= 1"):
        selfmodel.temperature_ranges(0)


# ---------------------------------------------------------------------------------------------
# measurement


def test_baseline_is_the_level_closest_to_the_target():
    scores = {
        ("a", 0): [1, 1, 1, 1],
        ("a", 1): [1, 1, 1, 0],
        ("a", 2): [1, 0, 0, 0],
        ("b", 0): [0, 0],
        ("b", 1): [0, 0],
    }
    assert measure.baselines(scores, ["a", "b"], 0.75) == {"a": 1, "b": 0}  # b fails everywhere: lowest level
    assert measure.baselines(scores, ["a"], 0.3) == {"a": 2}
    # one lucky answer at a hard level does not make it the edge: the fit is non-increasing
    lucky = {("c", 0): [0, 0, 0, 1], ("c", 1): [0, 0, 0, 0], ("c", 2): [0, 1, 1, 0]}
    assert measure.baselines(lucky, ["c"], 0.75) == {"c": 0}
    with pytest.raises(ValueError, match="no assessment scores for family 'd'"):
        measure.baselines(scores, ["d"], 0.75)


def test_assessment_scans_each_family_up_to_the_first_level_at_or_below_target(monkeypatch):
    accuracy = {"a": [1.0, 0.9, 0.55, 0.2], "b": [0.5, 0.4]}
    asked = []

    def scores_of_a_fixed_model(model, tokenizer, sets, batch_size):
        asked.append(sorted(sets))
        return {key: [accuracy[key[0]][key[1]]] for key in sets}

    monkeypatch.setattr(measure, "item_scores", scores_of_a_fixed_model)
    scores = measure.assess(None, None, collections.defaultdict(list), ["a", "b"], 0.75)
    assert asked == [[("a", 0), ("b", 0)], [("a", 1)], [("a", 2)]]
    assert measure.baselines(scores, ["a", "b"], 0.75) == {"a": 1, "b": 0}


def test_non_increasing_fit():
    assert measure.non_increasing([0.5, 0.2, 0.4, 0.1]) == pytest.approx([0.5, 0.3, 0.3, 0.1])
    assert measure.non_increasing([0.0, 0.0, 0.3]) == pytest.approx([0.1, 0.1, 0.1])
    assert measure.non_increasing([3, 2, 1]) == [3, 2, 1]


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_more_items():
    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 2, 20), rng.integers(0, 2, 2000)
    lo_s, hi_s = measure.bootstrap_ci(small, samples=500)
    lo_l, hi_l = measure.bootstrap_ci(large, samples=500)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l and hi_l - lo_l < hi_s - lo_s
    paired = measure.compare([1, 1, 1, 0], [0, 1, 0, 0], samples=500)
    assert paired["difference"] == 0.5 and paired["ci"][0] >= 0 and paired["n"] == 4
    assert all(math.isnan(v) for v in measure.bootstrap_ci([]))
    with pytest.raises(ValueError, match="same shape"):
        measure.compare([1, 0], [1])


def test_final_answer_is_the_text_after_the_last_result():
    assert measure.final_answer("[calc: 2+2][out: 4]4") == "4"
    assert measure.final_answer("[calc: 2+2][out: 4] then [py: print(1)][out: 1] 5 ") == "5"
    assert measure.final_answer("17") == "17"


def test_accuracy_falls_with_the_level_for_a_fixed_model(cognate_micro):
    """Measured: the trained micro trunk's probability of the exact answer (its sampling accuracy),
    averaged over families, falls with the difficulty level (Spearman rank correlation)."""
    from agentforge.artifacts import load_model_dir

    model, tokenizer, _ = load_model_dir(cognate_micro[1].artifacts["trunk"])
    families = ["chain_sum", "basic_arithmetic", "spell_backward", "add_small", "count_bits"]
    held = tasks.held_out(families, "validation", 8, seed=0)
    by_level = [
        np.mean([np.mean(measure.answer_log_probability(model, tokenizer, held[(f, level)])) for f in families])
        for level in range(10)
    ]
    ranks = np.argsort(np.argsort(by_level))
    assert np.corrcoef(np.arange(10), ranks)[0, 1] < -0.8 and by_level[0] > by_level[9]
