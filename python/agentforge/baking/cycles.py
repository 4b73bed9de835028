"""The baking cycles of the Baking phase: two cycles of prompts, alternating, each iteration
proposing candidate prompts (a pool plus small edits of the current best), scoring them in
context and half-baking the winner; a plateau detector decides when a cycle has stopped gaining.

    tools    prompts describing the tool-call format of ``agentforge.tools``; scored by tool-call
             format adherence and answer accuracy, with the tools executed; baked on trajectories
             that execute the calls too and run the whole tool budget, so a bake sees complete
             calls, their results and the answers after them
    persona  prompts describing how the model should think and answer; scored by task accuracy
             and the probability of the right answer

    state = run_cycles(model, CycleRun(tokenizer, data, settings, seed, out_dir))
    state.model, state.baked, state.record()

A bake is rolled back when it raises validation perplexity by more than
``retention_tolerance`` over the input model, or lowers the probability of the right answers
on the validation tasks of the families the tools are not for by more than ``task_retention``.
The cycles stop when both have plateaued with nothing gained in between, or after
``max_iterations``: counted stop rules only, so a run repeats exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentforge.baking.behaviour import answer_probability, behaviour

if TYPE_CHECKING:
    from agentforge.baking.baker import BakeResult, BakeSettings

CYCLES = ("tools", "persona")
PREVIOUS_FILE = "previous-rank{rank}.safetensors"  # the model before a bake, while it runs (per process)


def relative_gain(history: Sequence[float], window: int) -> float:
    """How much the best of the last ``window`` values improved on the best value before them,
    relative to that earlier best: ``(max(last) − max(before)) / max(|max(before)|, 1e-9)``.
    Needs more than ``window`` values."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"relative_gain: window must be a positive int, got {window!r}")
    if len(history) <= window:
        raise ValueError(f"relative_gain: need more than window={window} values, got {len(history)}")
    before, last = max(history[:-window]), max(history[-window:])
    return (last - before) / max(abs(before), 1e-9)


def plateaued(history: Sequence[float], window: int, threshold: float) -> bool:
    """True when a higher-is-better score has stopped rising: over the last ``window`` values
    its relative gain (see :func:`relative_gain`) is below ``threshold``. False while the
    history is too short to tell."""
    if not threshold >= 0:
        raise ValueError(f"plateaued: threshold must be >= 0, got {threshold!r}")
    return len(history) > window and relative_gain(history, window) < threshold


def sentences(prompt: str) -> list[str]:
    """``prompt`` cut after each '.', '!', '?' or ';' that ends a sentence."""
    return [s.strip() for s in re.split(r"(?<=[.!?;])\s+", prompt.strip()) if s.strip()]


def prompt_edits(prompt: str, pool: Sequence[str], rng: random.Random) -> list[str]:
    """Small edits of ``prompt``: each sentence dropped in turn, two sentences swapped, its first
    sentence alone, and its first sentence joined with the first sentence of another pool
    prompt. Distinct, in a seeded random order, never ``prompt`` itself."""
    parts = sentences(prompt)
    edits = [" ".join(parts[:i] + parts[i + 1 :]) for i in range(len(parts))] if len(parts) > 1 else []
    if len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        swapped = list(parts)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        edits += [" ".join(swapped), parts[0]]
    edits += [f"{parts[0]} {sentences(other)[0]}" for other in pool if other != prompt and sentences(other)]
    rng.shuffle(edits)
    return list(dict.fromkeys(e for e in edits if e and e != prompt))


def propose_prompts(
    pool: Sequence[str], best: str | None, k: int, rng: random.Random, tried: Sequence[str] = ()
) -> list[str]:
    """``k`` distinct candidate prompts: the current ``best`` (baking it again is prompt pursuit),
    then pool prompts not ``tried`` yet, then edits of ``best`` (or of the first pool prompt)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"propose_prompts: k must be a positive int, got {k!r}")
    pool = [p for p in pool if isinstance(p, str) and p.strip()]
    if not pool:
        raise ValueError("propose_prompts: the prompt pool is empty")
    fresh = [p for p in pool if p not in tried and p != best]
    rng.shuffle(fresh)
    seed_prompt = best or pool[0]
    ordered = ([best] if best else []) + fresh + prompt_edits(seed_prompt, pool, rng)
    return list(dict.fromkeys(ordered))[:k]


# ---------------------------------------------------------------------------------------------
# the cycles


def cycle_bake_settings(bake: BakeSettings, cycle: str, tool_new_tokens: int) -> BakeSettings:
    """How ``cycle``'s prompts are baked: tool prompts on trajectories that run their calls over
    the tool generation budget (six plain sampled tokens baked the opening "[calc:" but never the
    closing bracket), persona prompts on plain trajectories of ``bake.max_new_tokens``."""
    if cycle == "tools":
        return dataclasses.replace(bake, tools=True, max_new_tokens=tool_new_tokens)
    return dataclasses.replace(bake, tools=False)


@dataclass
class CycleData:
    """What the cycles read, per cycle: baking inputs (training-split prompts) and selection
    items (validation split: candidate scores, the half-bake stop rule, the task guard); and
    text rows: the retention anchor (training split, token ids) and the validation rows of the
    perplexity guard."""

    bake_inputs: dict[str, list[str]]
    selection: dict[str, list]
    anchor: list
    text_validation: Any


@dataclass
class CycleRun:
    """The fixed parts of one run of the cycles. ``settings``: the Baking phase's settings (prompt
    pools and families, ``candidates``, ``strength``, the plateau and retention rules,
    ``max_iterations``, ``tool_new_tokens``, ``eval_batch_size`` and the nested ``bake``); bakes
    log under ``out_dir/bakes``; ``say`` takes a progress line per iteration."""

    tokenizer: Any
    data: CycleData
    settings: Any
    seed: int
    out_dir: Path
    say: Callable[[str], None] = print

    def bake_settings(self, cycle: str) -> BakeSettings:
        return cycle_bake_settings(self.settings.bake, cycle, self.settings.tool_new_tokens)

    def score(self, cycle: str, model, prompt: str | None) -> float:
        """``cycle``'s behaviour score of ``model`` on its selection items, ``prompt`` in context."""
        return behaviour(
            cycle,
            model,
            self.tokenizer,
            prompt,
            self.data.selection[cycle],
            tool_new_tokens=self.settings.tool_new_tokens,
            batch_size=self.settings.eval_batch_size,
        )["score"]

    def task_probability(self, model) -> float:
        """The unprompted probability of the right answers on the selection tasks of the families
        the tools are not for (where a tool call is not the right first move)."""
        persona = self.data.selection["persona"]
        unrelated = [it for it in persona if it.family not in self.settings.tool_families] or persona
        return answer_probability(model, self.tokenizer, None, unrelated, batch_size=self.settings.eval_batch_size)


@dataclass
class CycleState:
    """Where the cycles stand. ``history[c]``: cycle c's unprompted validation score since its
    current visit began (the model the other cycle left is its new baseline); ``unprompted``:
    the current model's unprompted score per cycle, while the model is unchanged."""

    model: Any
    reference_perplexity: float  # the input model's validation perplexity (the retention guard)
    cycle: str = "tools"
    best: dict = field(default_factory=lambda: dict.fromkeys(CYCLES))
    tried: dict = field(default_factory=lambda: {c: [] for c in CYCLES})
    history: dict = field(default_factory=lambda: {c: [] for c in CYCLES})
    plateau: dict = field(default_factory=lambda: dict.fromkeys(CYCLES, False))
    unprompted: dict = field(default_factory=dict)
    baked: list = field(default_factory=list)  # the bakes kept, in order (the stack of prompts)
    rows: list = field(default_factory=list)  # one per iteration
    full_bake: BakeResult | None = None  # the first tool bake, run to full strength
    stop_reason: str = "iteration budget"

    def record(self) -> dict:
        """What the cycles did, as JSON (no model)."""
        return {
            "stop_reason": self.stop_reason,
            "baked": self.baked,
            "best": self.best,
            "rows": self.rows,
            "validation_perplexity_input": self.reference_perplexity,
            "full_bake": self.full_bake.summary() if self.full_bake is not None else None,
        }


def _guards(state: CycleState, model, previous, run: CycleRun) -> dict:
    """The retention guards of a bake that left ``model`` (``previous`` before it): its
    validation perplexity against the input model's, its task answer probability against
    ``previous``'s. Returns the row fields, with ``outcome`` set when the bake must be rolled back."""
    from agentforge.eval import perplexity

    settings = run.settings
    fields = {"validation_perplexity": perplexity(model, run.data.text_validation, batch_size=settings.eval_batch_size)}
    limit = state.reference_perplexity * (1 + settings.retention_tolerance)
    if fields["validation_perplexity"] > limit:
        return {
            **fields,
            "outcome": f"rolled back: validation perplexity {fields['validation_perplexity']:.3f} > {limit:.3f}",
        }
    fields["task_answer_probability"] = run.task_probability(model)
    floor = run.task_probability(previous) * (1 - settings.task_retention)
    if fields["task_answer_probability"] < floor:
        return {
            **fields,
            "outcome": f"rolled back: answer probability on the tasks "
            f"{fields['task_answer_probability']:.3f} < {floor:.3f}",
        }
    return fields


def _bake_winner(state: CycleState, winner: str, index: int, run: CycleRun) -> dict:
    """Half-bake ``winner`` into the current model; keep the result unless a retention guard
    fails. The first tool bake runs to full strength once, keeping the half-baked copy (the
    cycles go on from it), so the report has both from one training run. Returns the row fields
    describing what happened."""
    from safetensors.torch import load_model

    from agentforge.baking.baker import bake, save_weights  # baker imports this module's plateau detector
    from agentforge.train import distributed

    cycle, settings = state.cycle, run.settings
    first_full = cycle == "tools" and settings.measure_full_bake and state.full_bake is None
    out_dir = run.out_dir / "bakes" / f"{index:02d}-{cycle}"
    # full baking trains in place and a rollback needs the weights from before: they wait on disk,
    # not in memory beside the bake's gradients and optimizer state
    previous_file = out_dir / PREVIOUS_FILE.format(rank=distributed.rank())
    save_weights(state.model, previous_file)
    result = bake(
        state.model,
        run.tokenizer,
        winner,
        run.data.bake_inputs[cycle],
        [it.prompt for it in run.data.selection[cycle]],
        run.bake_settings(cycle),
        out_dir=out_dir,
        strength=1.0 if first_full else settings.strength,
        keep=(settings.strength,) if first_full else (),
        anchor=run.data.anchor,
        seed=run.seed + 7 * index,
        wandb_mode="disabled",
        progress=False,
    )
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # a finished bake is never resumed; its log stays
    previous = copy.deepcopy(result.model)
    load_model(previous, str(previous_file))
    previous_file.unlink()
    model, kl_after = result.model, result.kl_after
    if first_full:  # continue with the half-baked copy; the fully baked model is kept for the report
        state.full_bake = result
        if settings.strength in result.kept:  # a copy: later bakes train state.model in place
            kept = result.kept[settings.strength]
            model, kl_after = copy.deepcopy(kept.model), kept.kl
    fields = {"bake": result.summary()}
    if result.stop_reason == "no effect" or result.reduction <= 0:
        state.model = previous
        return {**fields, "baked": False, "outcome": "nothing to bake: the prompt's KL did not fall"}
    fields.update(_guards(state, model, previous, run))
    if "outcome" in fields:
        state.model = previous
        return {**fields, "baked": False}
    state.model = model
    state.baked.append(
        {"iteration": index, "cycle": cycle, "prompt": winner, "kl_before": result.kl_before, "kl_after": kl_after}
    )
    state.unprompted = {}  # the model changed
    return {**fields, "baked": True, "outcome": "baked"}


def iterate(state: CycleState, index: int, run: CycleRun) -> dict:
    """One iteration of the current cycle: propose, score in context, half-bake the winner."""
    cycle, settings = state.cycle, run.settings
    pool = settings.tool_prompts if cycle == "tools" else settings.persona_prompts
    candidates = propose_prompts(
        pool, state.best[cycle], settings.candidates, random.Random(run.seed * 1000 + index), tried=state.tried[cycle]
    )
    state.tried[cycle] += [c for c in candidates if c not in state.tried[cycle]]
    if cycle not in state.unprompted:
        state.unprompted[cycle] = run.score(cycle, state.model, None)
    before = state.unprompted[cycle]
    if not state.history[cycle]:
        state.history[cycle].append(before)  # a visit starts from the model as it is now
    scores = {c: run.score(cycle, state.model, c) for c in candidates}
    state.best[cycle] = winner = max(candidates, key=lambda c: scores[c])
    row = {
        "iteration": index,
        "cycle": cycle,
        "candidates": [{"prompt": c, "score": scores[c]} for c in candidates],
        "winner": winner,
        "winner_score": scores[winner],
        "unprompted_before": before,
    }
    if scores[winner] < before:
        row.update(baked=False, outcome="no candidate does better in context than no prompt")
    else:
        row.update(_bake_winner(state, winner, index, run))
    if cycle not in state.unprompted:
        state.unprompted[cycle] = run.score(cycle, state.model, None)
    state.history[cycle].append(state.unprompted[cycle])
    row.update(
        unprompted_after=state.unprompted[cycle],
        gain=relative_gain(state.history[cycle], settings.plateau_window)
        if len(state.history[cycle]) > settings.plateau_window
        else None,
        plateau=plateaued(state.history[cycle], settings.plateau_window, settings.plateau_threshold),
    )
    return row


def run_cycles(model, run: CycleRun) -> CycleState:
    """Alternate the cycles on ``model`` (trained in place) until both plateau or
    ``max_iterations`` have run."""
    from agentforge.eval import perplexity

    settings = run.settings
    state = CycleState(
        model=model,
        reference_perplexity=perplexity(model, run.data.text_validation, batch_size=settings.eval_batch_size),
    )
    for index in range(settings.max_iterations):
        cycle = state.cycle
        row = iterate(state, index, run)
        state.rows.append(row)
        run.say(
            f"iteration {index} ({cycle}): winner score {row['winner_score']:.3f} in context, "
            f"unprompted {row['unprompted_before']:.3f} -> {row['unprompted_after']:.3f}; {row['outcome']}"
        )
        other = CYCLES[1 - CYCLES.index(cycle)]
        if row["plateau"]:
            state.plateau[cycle] = True
            if state.plateau[other]:
                state.stop_reason = "both cycles plateaued"
                break
            state.cycle, state.history[other] = other, []
        else:  # this cycle changed the model: the other one may have room again
            state.plateau[other] = False
    return state
