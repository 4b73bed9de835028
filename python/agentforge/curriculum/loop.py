"""The level loop: questions at the edge of the model's ability, variants, hints, tool traces,
self-modeling samples and dreams, trained quantization-aware through ``agentforge.train.train``.

Per curriculum level k (each family at data level ``min(baseline + k, 9)``):
  1. ``questions_per_family`` training questions per family; self-modeling samples of them at the
     level's scheduled temperatures.
  2. Rounds until at most ``done_fraction`` of the questions remain, the level's step budget is
     spent or ``max_rounds`` pass. A round attempts every remaining question (greedy, hint in
     front), applies the state machine (``state.py``), and poses the tool families' questions
     with tools available: a verified own trace is kept, a failed one is replaced by a
     demonstration made by executing the tool on the item. Then ``steps_per_round`` optimizer
     steps on the round's new examples, replayed older ones and some self-modeling samples.
  3. Dreams: verified high-temperature answers to practised questions, one short step.
  4. Level accuracy on the level's fixed validation items; below ``hard_wall`` the curriculum
     stops (the hard wall). It also stops when the phase's step budget is spent.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentforge.curriculum import measure, rows, selfmodel, tasks
from agentforge.curriculum.state import CORRECTED, HINT, MASTER, SKIP, VARIANT, LevelState
from agentforge.data import score
from agentforge.tools import follows_tool_format


def stop_reason(k: int, accuracy: float, settings, budget_spent: bool) -> str:
    """Why the curriculum stops after level ``k`` (whose validation accuracy ended at
    ``accuracy``), or "" to go on: the hard wall first, then the last level, then the step budget."""
    if accuracy < settings.hard_wall:
        return f"hard wall at level {k} (accuracy {accuracy:.3f} < {settings.hard_wall})"
    if k + 1 >= settings.levels:
        return f"all {settings.levels} levels done"
    if budget_spent:
        return f"step budget spent ({settings.total_steps} steps) after level {k}"
    return ""


class Trainer:
    """Optimizer steps on lists of examples. One MuGrokfast for the whole run, so its warm-up and
    cosine schedule span ``total_steps`` however the steps are split into calls."""

    def __init__(self, model, tokenizer, settings, out_dir: Path, seed: int, phase: str):
        from agentforge.optim import PRESETS, MuGrokfast

        rates = {key: PRESETS[settings.optimizer][key] * settings.lr_scale for key in ("muon_lr", "adamw_lr")}
        self.optimizer = MuGrokfast.from_preset(model, settings.optimizer, total_steps=settings.total_steps, **rates)
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.out_dir, self.seed, self.phase = Path(out_dir), seed, phase
        self.steps, self.calls, self.dropped = 0, 0, 0

    @property
    def exhausted(self) -> bool:
        return self.steps >= self.settings.total_steps

    def train(self, examples: list, steps: int) -> float | None:
        """Up to ``steps`` optimizer steps (never past the budget) on ``examples``; returns the
        mean loss, or None when nothing was trained."""
        from agentforge.train import TrainConfig, train

        steps = min(steps, self.settings.total_steps - self.steps)
        if steps <= 0 or not examples:
            return None
        packed, dropped = rows.pack(self.tokenizer, examples, self.settings.train_seq_len, seed=self.seed + self.calls)
        self.dropped += dropped
        if not packed:
            return None
        config = TrainConfig(
            steps=steps,
            batch_size=self.settings.batch_size,
            seed=self.seed + self.calls,
            checkpoint_every=0,
            log_every=0,
            wandb_mode="disabled",
            progress=False,
        )
        # each call starts afresh in one scratch directory: the phase, not this loop, is resumable
        result = train(
            self.model, packed, config, optimizer=self.optimizer, out_dir=self.out_dir, phase=self.phase, resume=False
        )
        self.steps += steps
        self.calls += 1
        return sum(result.losses) / len(result.losses)


@dataclass
class Record:
    """What the curriculum did: per-level and per-round rows, every example it trained on, the
    data levels each family visited, steps, and why it stopped."""

    levels: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    visited: dict = field(default_factory=dict)
    steps: int = 0
    stop_reason: str = ""

    def summary(self) -> dict:
        """The record without its rounds and wall-clock times: what the trained model's metadata
        keeps, which must not depend on the machine (the level rows in metrics.jsonl keep their
        seconds, and the rounds are rows there too)."""
        kinds: dict[str, int] = {}
        for example in self.examples:
            kinds[example.kind] = kinds.get(example.kind, 0) + 1
        levels = [{key: value for key, value in row.items() if key != "seconds"} for row in self.levels]
        return {
            "levels": levels,
            "visited": self.visited,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "examples": len(self.examples),
            "examples_by_kind": kinds,
        }


class Curriculum:
    """Runs the levels on ``model`` in place. ``baselines`` maps family -> baseline data level;
    ``validation`` maps (family, level) -> fixed held-out items (the hard-wall check);
    ``probe_prompts`` are held-out prompts for the per-level self-prediction."""

    def __init__(
        self,
        model,
        tokenizer,
        settings,
        baselines: dict,
        validation: dict,
        probe_prompts: list,
        trainer: Trainer,
        seed: int,
        level_log=None,
        round_log=None,
        say=print,
        render=None,
    ):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.baselines, self.validation, self.probe_prompts = baselines, validation, probe_prompts
        self.trainer, self.seed, self.say = trainer, seed, say
        self.level_log, self.round_log = level_log, round_log
        self.variants = tasks.VariantSource(seed, render=render)
        self.rng = random.Random(seed)
        self.record = Record()
        self.practised: list = []  # items attempted so far: what dreams replay
        self._trained: set = set()  # every distinct example trained on (record.examples, as a set)
        self._demonstrations: dict = {}

    # ------------------------------------------------------------------ the levels

    def run(self) -> Record:
        for k in range(self.settings.levels):
            levels = {family: tasks.level_of(base, k) for family, base in self.baselines.items()}
            row = self.run_level(k, levels)
            self.record.levels.append(row)
            for family, level in levels.items():
                visited = self.record.visited.setdefault(family, [])
                if level not in visited:
                    visited.append(level)
            if self.level_log:
                self.level_log.log(row, step=k)
            self.say(
                f"curriculum: level {k} (data levels {sorted(set(levels.values()))}): validation accuracy "
                f"{row['accuracy']:.3f}, {row['mastered']} mastered, {row['skipped']} skipped, "
                f"{row['hints']} hints, {row['tool_calls']} tool calls, {self.trainer.steps} steps"
            )
            self.record.stop_reason = stop_reason(k, row["accuracy"], self.settings, self.trainer.exhausted)
            if self.record.stop_reason:
                break
        self.record.steps = self.trainer.steps
        return self.record

    def run_level(self, k: int, levels: dict) -> dict:
        started, steps_before = time.perf_counter(), self.trainer.steps
        s = self.settings
        items = [
            item
            for family, level in levels.items()
            for item in self.variants.take(family, level, s.questions_per_family)
        ]
        state = LevelState(
            items,
            lambda item: self.variants.take(item.family, levels[item.family])[0],
            mastery=s.mastery,
            max_hints=s.max_hints,
        )
        self_examples = self.self_model_examples(k, items)
        stats = {
            "attempts": 0,
            "first_try_correct": 0,
            "unaided_correct": 0,
            "tool_calls": 0,
            "tool_ok_calls": 0,
            "tool_attempts": 0,
            "tool_correct": 0,
            "demonstrations": 0,
        }
        level_examples, rounds = [], 0
        while (
            state.remaining > s.done_fraction * len(items)
            and rounds < s.max_rounds
            and self.trainer.steps - steps_before < s.steps_per_level
            and not self.trainer.exhausted
        ):
            attempted = [q.item for q in state.active]
            new = self.attempt(state, stats) + (self.tool_round(attempted, stats) if s.tools else [])
            level_examples += new
            self.practised += attempted
            chosen_self = self._sample(self_examples, s.self_examples_per_round)
            batch = new + self._sample(self.record.examples, s.replay_examples) + chosen_self
            loss = self.trainer.train(
                batch, min(s.steps_per_round, s.steps_per_level - (self.trainer.steps - steps_before))
            )
            self._remember(new + chosen_self)
            rounds += 1
            round_row = {
                "level": k,
                "round": rounds,
                "remaining": state.remaining,
                "loss": loss,
                "steps": self.trainer.steps,
                **{f"total_{key}": n for key, n in state.counts.items()},
            }
            self.record.rounds.append(round_row)
            if self.round_log:
                self.round_log.log(round_row, step=len(self.record.rounds))
        dream_row = self.dream(k)
        accuracy = self.level_accuracy(levels)
        probe = selfmodel.self_prediction(
            self.model,
            self.tokenizer,
            self.probe_prompts,
            selfmodel.schedule_temperatures(k + 1, s.self_model_ranges),
            max_new_tokens=s.self_model_new_tokens,
            seed=self.seed + 7919 * (k + 1),
            batch_size=s.eval_batch_size,
        )
        counts = state.counts
        return {
            "level": k,
            "data_levels": levels,
            "questions": len(items),
            "rounds": rounds,
            "steps": self.trainer.steps - steps_before,
            "remaining": state.remaining,
            "mastered": counts[MASTER],
            "skipped": counts[SKIP],
            "hints": counts[HINT],
            "hint_corrected": counts[CORRECTED],
            "variants": counts[VARIANT],
            **stats,
            "loop_accuracy": stats["unaided_correct"] / max(stats["attempts"], 1),
            "accuracy": accuracy,
            "self_prediction": probe["accuracy"],
            "self_prediction_nll": probe["nll"],
            **dream_row,
            "examples": len(level_examples),
            "seconds": time.perf_counter() - started,
        }

    # ------------------------------------------------------------------ one round

    def attempt(self, state: LevelState, stats: dict) -> list:
        """Answer every remaining question once; apply the rules; the examples to train on."""
        from agentforge.eval import generate_answers

        active = state.active
        budget = tasks.answer_budget(self.tokenizer, [q.item for q in active])
        answers = generate_answers(
            self.model,
            self.tokenizer,
            [q.prompt for q in active],
            max_new_tokens=budget,
            batch_size=self.settings.eval_batch_size,
        )
        examples = []
        for question, answer in zip(active, answers):
            hinted, first = bool(question.hints), question.attempts == 0 and question.variants == 0
            success = score(question.item, answer) >= 1.0
            stats["attempts"] += 1
            stats["unaided_correct"] += success and not hinted
            stats["first_try_correct"] += success and first
            result = state.record(question, answer, success)
            for prompt in result.train_prompts:
                kind = rows.TASK if prompt == result.item.prompt else rows.HINTED
                examples.append(rows.task_example(prompt, result.item.answer, kind))
        return examples

    def tool_round(self, items: list, stats: dict) -> list:
        """Pose the tool families' questions with tools available: keep verified own traces,
        replace failed ones by executed demonstrations."""
        items = [item for item in items if tasks.tool_call_for(item) is not None][: self.settings.tool_items_per_round]
        if not items:
            return []
        result = measure.tool_accuracy(
            self.model,
            self.tokenizer,
            items,
            max_new_tokens=self.settings.tool_new_tokens,
            batch_size=self.settings.eval_batch_size,
        )
        examples = []
        for item, value, text in zip(items, result["scores"], result["completions"]):
            if value >= 1.0 and follows_tool_format(text):
                examples.append(rows.trace_example(item.prompt, text))
                stats["tool_correct"] += 1
                continue
            demo = self.demonstration(item)
            if demo is not None:
                examples.append(rows.trace_example(item.prompt, demo.call + demo.result + item.answer))
                stats["demonstrations"] += 1
        stats["tool_attempts"] += len(items)
        stats["tool_calls"] += result["calls"]
        stats["tool_ok_calls"] += result["ok_calls"]
        return examples

    def demonstration(self, item):
        if item.prompt not in self._demonstrations:
            self._demonstrations[item.prompt] = tasks.demonstrate(item)
        return self._demonstrations[item.prompt]

    # ------------------------------------------------------------------ self-modeling and dreams

    def self_model_examples(self, k: int, items: list) -> list:
        """The level's questions answered at its scheduled temperatures, tagged for self-prediction."""
        s = self.settings
        if s.self_model_ranges == 0 or s.self_model_prompts == 0:
            return []
        prompts = [item.prompt for item in self.rng.sample(items, min(s.self_model_prompts, len(items)))]
        examples = []
        for i, temperature in enumerate(selfmodel.schedule_temperatures(k + 1, s.self_model_ranges)):
            samples = selfmodel.sample(
                self.model,
                self.tokenizer,
                prompts,
                temperature=temperature,
                max_new_tokens=s.self_model_new_tokens,
                seed=self.seed + 104729 * (k + 1) + i,
                batch_size=s.eval_batch_size,
            )
            for prompt, (ids, ended) in zip(prompts, samples):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if text or ended:
                    examples.append(rows.self_example(temperature, prompt, text, ended))
        return examples

    def dream(self, k: int) -> dict:
        """Sample answers to practised questions at the dream temperature; replay the verified ones."""
        s = self.settings
        if s.dream_samples == 0 or not self.practised:
            return {"dream_samples": 0, "dream_kept": 0, "dream_loss": None}
        items = self.rng.sample(self.practised, min(s.dream_samples, len(self.practised)))
        kept, sampled = selfmodel.dream(
            self.model,
            self.tokenizer,
            items,
            temperature=s.dream_temperature,
            max_new_tokens=tasks.answer_budget(self.tokenizer, items),
            seed=self.seed + 15485863 * (k + 1),
            batch_size=s.eval_batch_size,
        )
        dreams = [rows.task_example(item.prompt, answer, rows.DREAM) for item, answer in kept]
        loss = (
            self.trainer.train(dreams + self._sample(self.record.examples, s.replay_examples), s.dream_steps)
            if dreams
            else None
        )
        self._remember(dreams)
        return {"dream_samples": sampled, "dream_kept": len(kept), "dream_loss": loss}

    def level_accuracy(self, levels: dict) -> float:
        sets = {(family, level): self.validation[(family, level)] for family, level in levels.items()}
        scores = measure.item_scores(self.model, self.tokenizer, sets, batch_size=self.settings.eval_batch_size)
        return measure.mean([v for values in scores.values() for v in values])

    def _sample(self, pool: list, n: int) -> list:
        return self.rng.sample(pool, min(n, len(pool)))

    def _remember(self, examples: list) -> None:
        for example in examples:
            if example not in self._trained:
                self._trained.add(example)
                self.record.examples.append(example)
