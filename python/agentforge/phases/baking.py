"""Phase 6, Baking: a tool-use prompt and a persona baked into the weights, measured by KL and behaviour.

Input ``{"model": dir}`` (in the pipeline the curriculum model, BitLinear layers in training
state); output ``{"model": dir}``, the same architecture with the prompts baked in.

Two cycles alternate, starting with A:

    A (tools)    prompts describing the tool-call format of ``agentforge.tools``; scored in
                 context by tool-call format adherence and answer accuracy, with the tools
                 executed (``generate_with_tools_batch``), on held-out arithmetic items; baked
                 on trajectories that execute the calls too and run the whole tool budget, so
                 a bake sees complete calls, their results and the answers after them (six
                 plain sampled tokens baked the opening "[calc:" but never the closing bracket)
    B (persona)  prompts describing how the model should think and answer; scored in context
                 by held-out task accuracy and the probability of the right answer

Each iteration proposes ``candidates`` prompts (the cycle's best so far, which re-bakes it, then
untried pool prompts, then small edits), scores each *in context* on validation items, and
half-bakes the winner (``agentforge.baking.bake`` until half of the validation
KL(prompted ‖ unprompted) is gone), unless it does no better in context than no prompt at all.
A bake that raises validation perplexity by more than ``retention_tolerance`` over the input
model, or lowers the probability of the right answers on the validation tasks of the families
the tools are not for by more than ``task_retention`` (a tool prompt baked too deep makes the
model open a calculator call before any answer), is rolled back. A cycle plateaus when its
unprompted score gains less than ``plateau_threshold`` (relative) over ``plateau_window``
iterations; then the other cycle runs.
The phase stops when both have plateaued with nothing gained in between, or at the iteration
or time budget. The first tool bake is run to full strength once, keeping the half-baked copy,
so the report shows the KL before, half-baked and fully baked from one training run.

Everything in the report is measured on the *test* split (task items and text documents the
baking, the selection and the stop rule never saw): KL of the tool prompt before / half / full /
final, tool and persona behaviour of the prompted original vs the unprompted baked models, and
held-out text perplexity (retention). A rerun reuses a finished ``model/`` and ``summary.json``.

Run alone: ``python -m agentforge.phases.baking --preset tiny --model DIR --out DIR``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.phases import PhaseContext, PhaseResult, standalone_main
from agentforge.tools import TOOL_PROMPT

NAME = "baking"
CYCLES = ("tools", "persona")
TOOL_PROMPTS = (
    TOOL_PROMPT,
    "To compute, write [calc: EXPR] and read the result from [out: RESULT], then give the answer.",
    "Use the calculator: [calc: 12+7] comes back as [out: 19], so the answer is 19.",
    "Call tools instead of guessing: [calc: EXPR] for arithmetic, [py: CODE] for Python; results arrive as [out: ...].",
)
PERSONA_PROMPTS = (
    "Think step by step, then answer with the result only.",
    "You are a careful solver. Check each digit before you answer.",
    "Answer briefly and exactly.",
    "I read the question twice and give only the final answer, like 12+7=19.",
)
ARITHMETIC_FAMILIES = ("chain_sum", "basic_arithmetic", "add_small")


def _all_domain_families() -> list[str]:
    from agentforge.data import DOMAINS

    return [family for families in DOMAINS.values() for family in families]


@dataclass
class Settings:
    """What the phase bakes and how much it measures (per-preset values in ``PRESETS``)."""

    bake_method: str = "full"  # "full" (every weight: tiny models) or "lora" (peft adapters, merged)
    lora_rank: int = 8
    strength: float = 0.5  # half-baking: the fraction of the validation KL each bake removes
    candidates: int = 3  # prompts scored in context per iteration
    tool_prompts: list = field(default_factory=lambda: list(TOOL_PROMPTS))
    persona_prompts: list = field(default_factory=lambda: list(PERSONA_PROMPTS))
    tool_families: list = field(default_factory=lambda: list(ARITHMETIC_FAMILIES))
    persona_families: list = field(default_factory=_all_domain_families)
    # item counts per cycle, spread evenly over its families and the task levels
    bake_items: int = 48  # training-split inputs of a bake
    samples_per_input: int = 1  # trajectories sampled per input
    selection_items: int = 18  # validation items: candidate scores and the half-bake stop rule
    final_items: int = 36  # test items: the report
    max_new_tokens: int = 6  # trajectory length of persona bakes
    tool_new_tokens: int = 12  # model tokens of tool-use generation and tool-bake trajectories (results not counted)
    bake_steps: int = 40
    eval_every: int = 5
    batch_size: int = 16
    optimizer_preset: str = "finetune"
    lr_scale: float = 1.0
    plateau_window: int = 1
    plateau_threshold: float = 0.01
    max_iterations: int = 4
    time_budget_s: float = 40.0  # no new iteration starts after this many seconds
    retention_tolerance: float = 0.05  # max relative rise of validation perplexity over the input model
    task_retention: float = 0.2  # max relative fall of the answer probability on non-tool families' tasks
    anchor_weight: float = 1.0  # each bake also holds the model to its own predictions on training text ...
    anchor_rows: int = 32  # ... rows (0: no anchor, the paper's objective alone)
    measure_full_bake: bool = True  # the first tool bake runs to full strength too (for the report)
    # held-out text (the input model's recorded data settings take precedence)
    seq_len: int = 64
    text_docs: int = 300
    task_levels: list = field(default_factory=lambda: [0, 1])
    text_rows: int = 64  # validation and test text rows for perplexity
    eval_batch_size: int = 64

    def __post_init__(self):
        from agentforge.baking.baker import METHODS
        from agentforge.data import FAMILIES

        def fail(name: str, what: str):
            raise ValueError(f"{NAME}.{name} must be {what}, got {getattr(self, name)!r}")

        if self.bake_method not in METHODS:
            fail("bake_method", f"one of {METHODS}")
        if not 0 < self.strength < 1:
            fail("strength", "in (0, 1): the fraction of the KL a half-bake removes")
        for name in ("lora_rank", "candidates", "bake_items", "samples_per_input", "selection_items", "final_items",
                     "max_new_tokens", "tool_new_tokens", "bake_steps", "eval_every", "batch_size", "plateau_window",
                     "max_iterations", "text_rows", "eval_batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "a positive int")
        for name in ("tool_prompts", "persona_prompts"):
            if not getattr(self, name) or not all(isinstance(p, str) and p.strip() for p in getattr(self, name)):
                fail(name, "a non-empty list of non-empty prompts")
        for name in ("tool_families", "persona_families"):
            if not getattr(self, name) or any(f not in FAMILIES for f in getattr(self, name)):
                fail(name, f"a non-empty list of task families from {sorted(FAMILIES)}")
        for name in ("plateau_threshold", "retention_tolerance", "task_retention", "time_budget_s", "anchor_weight"):
            if not getattr(self, name) >= 0:
                fail(name, "a number >= 0")
        if not self.lr_scale > 0:
            fail("lr_scale", "a number > 0")


PRESETS: dict[str, Settings] = {
    "micro": Settings(candidates=2, tool_families=["add_small"], persona_families=["add_small", "kv_recall"],
                      bake_items=12, selection_items=4, final_items=6, max_new_tokens=4, tool_new_tokens=6,
                      bake_steps=10, batch_size=6, max_iterations=2, seq_len=48, text_docs=20, task_levels=[0],
                      text_rows=8, eval_batch_size=16, lr_scale=4.0, time_budget_s=600.0),
    "tiny": Settings(),
    "small": Settings(bake_method="lora", lora_rank=16, candidates=4, bake_items=512, samples_per_input=2,
                      selection_items=96, final_items=300, max_new_tokens=24, tool_new_tokens=32, bake_steps=300,
                      eval_every=10, batch_size=32, max_iterations=10, time_budget_s=1800.0, seq_len=256,
                      text_docs=1500, task_levels=[0, 1, 2, 3], text_rows=256),
}


def trajectory_settings(settings: Settings, cycle: str) -> dict:
    """How a cycle's baking trajectories are sampled: tool prompts run their calls over the tool
    generation budget (so a bake covers whole calls, results and answers), the persona plain."""
    tools = cycle == "tools"
    return {"tools": tools, "max_new_tokens": settings.tool_new_tokens if tools else settings.max_new_tokens}


def bake_settings(settings: Settings, cycle: str):
    """The ``BakeSettings`` of the phase's bakes of a ``cycle``'s prompts."""
    from agentforge.baking import BakeSettings

    return BakeSettings(method=settings.bake_method, lora_rank=settings.lora_rank, lora_alpha=2.0 * settings.lora_rank,
                        samples_per_input=settings.samples_per_input, **trajectory_settings(settings, cycle),
                        batch_size=settings.batch_size, max_steps=settings.bake_steps, eval_every=settings.eval_every,
                        optimizer_preset=settings.optimizer_preset, lr_scale=settings.lr_scale,
                        anchor_weight=settings.anchor_weight)


# ---------------------------------------------------------------------------------------------
# held-out data


@dataclass
class PhaseData:
    """Per cycle: baking inputs (train split), selection items (validation) and report items
    (test); text rows: the retention anchor (train split, token ids) and for perplexity
    (validation: the retention guard, test: the report)."""

    bake_inputs: dict
    selection: dict
    final: dict
    anchor: list
    text_validation: object
    text_test: object


def _data_settings(settings: Settings, metadata: dict) -> dict:
    """The input model's recorded data (from the Cognate trunk) decides which documents are held out."""
    own = {"seq_len": settings.seq_len, "text_docs": settings.text_docs, "task_levels": settings.task_levels}
    return {**own, **{k: v for k, v in (metadata.get("data") or {}).items() if k in own or k == "seed"}}


def _items(families, split: str, total: int, levels, seed: int) -> list:
    """About ``total`` items of ``split``, the same number from each family and level."""
    from agentforge.data import make_split

    n = max(1, math.ceil(total / (len(families) * len(levels))))
    return [item for family in families for level in levels for item in make_split(family, split, n, seed=seed,
                                                                                     level=level)]


def spread(total: int, count: int) -> list[int]:
    """``count`` row indices spread evenly over ``total`` packed rows. Consecutive rows come from
    a few documents: the first 32 training rows of the tiny run are one odd document (perplexity
    304 against 5.6 elsewhere), and an anchor on them let a full tool bake raise held-out
    perplexity by 14 %; spread over the split, by 1.7 %."""
    count = min(count, total)
    return [(2 * i + 1) * total // (2 * count) for i in range(count)] if count else []


def build_data(tokenizer, settings: Settings, data: dict, seed: int) -> PhaseData:
    """Task items of each cycle's families for every split, and held-out text as Cognate split it."""
    from agentforge.data import load_text, text_splits

    families = {"tools": settings.tool_families, "persona": settings.persona_families}
    levels = data["task_levels"]
    texts = load_text("stdlib", max_docs=data["text_docs"]) + load_text("pydoc")
    splits = text_splits(tokenizer, texts, data["seq_len"], seed=data.get("seed", seed))
    rows = lambda split: splits[split].select(spread(len(splits[split]), settings.text_rows))  # noqa: E731
    return PhaseData(
        bake_inputs={c: [it.prompt for it in _items(f, "train", settings.bake_items, levels, seed)]
                     for c, f in families.items()},
        selection={c: _items(f, "validation", settings.selection_items, levels, seed) for c, f in families.items()},
        final={c: _items(f, "test", settings.final_items, levels, seed) for c, f in families.items()},
        anchor=splits["train"].select(spread(len(splits["train"]), settings.anchor_rows))["input_ids"],
        text_validation=rows("validation"), text_test=rows("test"))


# ---------------------------------------------------------------------------------------------
# behaviour, with or without a prompt in context


def in_context(prompt: str | None, text: str) -> str:
    """``text`` preceded by ``prompt`` (as baking trains it), or alone when ``prompt`` is None."""
    from agentforge.baking.kl import SEPARATOR

    return text if prompt is None else prompt + SEPARATOR + text


def final_answer(completion: str, used_tools: bool) -> str:
    """The answer in a completion: after the last ``[out: ...]`` when tools were called."""
    return completion.rsplit("]", 1)[-1].strip() if used_tools else completion.strip()


def tool_behaviour(model, tokenizer, prompt: str | None, items, settings: Settings) -> dict:
    """Greedy generation with the tools executed: the share of completions in the tool-call
    format, the accuracy of their final answers, and ``score`` = the mean of the two."""
    from agentforge.data import score
    from agentforge.tools import follows_tool_format, generate_with_tools_batch

    outputs = generate_with_tools_batch(model, tokenizer, [in_context(prompt, it.prompt) for it in items],
                                        max_new_tokens=settings.tool_new_tokens,
                                        batch_size=settings.eval_batch_size)
    formatted = [follows_tool_format(text) for text, _ in outputs]
    correct = [score(it, final_answer(text, bool(calls))) for it, (text, calls) in zip(items, outputs)]
    report = {"format": sum(formatted) / len(items), "accuracy": sum(correct) / len(items),
              "calls": sum(len(calls) for _, calls in outputs) / len(items)}
    return {**report, "score": (report["format"] + report["accuracy"]) / 2,
            "examples": [text for text, _ in outputs[:3]]}


def answer_rows(tokenizer, prompt: str | None, items):
    """One right-padded row per item, ``prompt + item prompt + answer + eos``, loss on answer and
    eos: a causal model's answer NLL on a row is exactly what it is on the item alone."""
    from datasets import Dataset

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pairs = [(tokenizer(in_context(prompt, it.prompt), add_special_tokens=False)["input_ids"],
              tokenizer(it.answer, add_special_tokens=False)["input_ids"] + [eos]) for it in items]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = [p + a + [pad] * (width - len(p) - len(a)) for p, a in pairs]
    labels = [[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in pairs]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def persona_behaviour(model, tokenizer, prompt: str | None, items, settings: Settings) -> dict:
    """Greedy task accuracy and the (geometric-mean) probability of the right answer tokens;
    ``score`` = their mean, graded even where accuracy is still zero."""
    from agentforge.data import score
    from agentforge.eval import task_accuracy

    shown = [dataclasses.replace(it, prompt=in_context(prompt, it.prompt)) for it in items]
    budget = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1
    # the scorers read the answer and the generator's entry, which the prompt does not change
    accuracy = task_accuracy(model, tokenizer, shown, score=score, max_new_tokens=budget,
                             batch_size=settings.eval_batch_size).accuracy
    probability = answer_probability(model, tokenizer, prompt, items, settings)
    return {"accuracy": accuracy, "answer_probability": probability, "score": (accuracy + probability) / 2}


def answer_probability(model, tokenizer, prompt: str | None, items, settings: Settings) -> float:
    """The geometric-mean probability of the right answer tokens (and eos) of ``items``."""
    from agentforge.eval import perplexity

    return 1.0 / perplexity(model, answer_rows(tokenizer, prompt, items), batch_size=settings.eval_batch_size)


def behaviour(cycle: str, model, tokenizer, prompt: str | None, items, settings: Settings) -> dict:
    """The cycle's behaviour scores of ``model`` with ``prompt`` in context (None: unprompted)."""
    measure = tool_behaviour if cycle == "tools" else persona_behaviour
    return measure(model, tokenizer, prompt, items, settings)


# ---------------------------------------------------------------------------------------------
# the A/B cycles


@dataclass
class CycleState:
    """Where the cycles stand. ``history[c]``: cycle c's unprompted validation score since its
    current visit began (the model the other cycle left is its new baseline); ``unprompted``:
    the current model's unprompted score per cycle, while the model is unchanged."""

    model: object
    cycle: str = "tools"
    best: dict = field(default_factory=lambda: dict.fromkeys(CYCLES))
    tried: dict = field(default_factory=lambda: {c: [] for c in CYCLES})
    history: dict = field(default_factory=lambda: {c: [] for c in CYCLES})
    plateau: dict = field(default_factory=lambda: dict.fromkeys(CYCLES, False))
    unprompted: dict = field(default_factory=dict)
    baked: list = field(default_factory=list)  # the bakes kept, in order (the stack of prompts)
    full_bake: object = None  # BakeResult of the first tool bake, run to full strength
    stop_reason: str = "iteration budget"


def _bake_winner(state: CycleState, winner: str, index: int, tokenizer, data: PhaseData, settings: Settings,
                 ctx: PhaseContext, reference_perplexity: float) -> dict:
    """Half-bake ``winner`` into the current model; keep the result unless the validation
    perplexity rose beyond the tolerance. Returns the row fields describing what happened."""
    from agentforge.baking import bake
    from agentforge.eval import perplexity

    cycle = state.cycle
    first_full = cycle == "tools" and settings.measure_full_bake and state.full_bake is None
    previous = copy.deepcopy(state.model)  # full baking trains in place; a rollback needs the original
    out_dir = ctx.out_dir / "bakes" / f"{index:02d}-{cycle}"
    result = bake(state.model, tokenizer, winner, data.bake_inputs[cycle], [it.prompt for it in data.selection[cycle]],
                  bake_settings(settings, cycle), out_dir=out_dir, strength=1.0 if first_full else settings.strength,
                  keep=(settings.strength,) if first_full else (), anchor=data.anchor, seed=ctx.seed + 7 * index,
                  wandb_mode="disabled", progress=False)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # a finished bake is never resumed; its log stays
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
    fields["validation_perplexity"] = perplexity(model, data.text_validation, batch_size=settings.eval_batch_size)
    limit = reference_perplexity * (1 + settings.retention_tolerance)
    if fields["validation_perplexity"] > limit:
        state.model = previous
        return {**fields, "baked": False, "outcome": f"rolled back: validation perplexity "
                                                     f"{fields['validation_perplexity']:.3f} > {limit:.3f}"}
    unrelated = [it for it in data.selection["persona"] if it.family not in settings.tool_families] \
        or data.selection["persona"]  # where a tool call is not the right first move
    fields["task_answer_probability"] = answer_probability(model, tokenizer, None, unrelated, settings)
    floor = answer_probability(previous, tokenizer, None, unrelated, settings) * (1 - settings.task_retention)
    if fields["task_answer_probability"] < floor:
        state.model = previous
        return {**fields, "baked": False, "outcome": f"rolled back: answer probability on the tasks "
                                                     f"{fields['task_answer_probability']:.3f} < {floor:.3f}"}
    state.model = model
    state.baked.append({"iteration": index, "cycle": cycle, "prompt": winner, "kl_before": result.kl_before,
                        "kl_after": kl_after})
    state.unprompted = {}  # the model changed
    return {**fields, "baked": True, "outcome": "baked"}


def iterate(state: CycleState, index: int, tokenizer, data: PhaseData, settings: Settings, ctx: PhaseContext,
            reference_perplexity: float) -> dict:
    """One iteration of the current cycle: propose, score in context, half-bake the winner."""
    from agentforge.baking import plateaued, propose_prompts, relative_gain

    cycle, items = state.cycle, data.selection[state.cycle]
    pool = settings.tool_prompts if cycle == "tools" else settings.persona_prompts
    candidates = propose_prompts(pool, state.best[cycle], settings.candidates, random.Random(ctx.seed * 1000 + index),
                                 tried=state.tried[cycle])
    state.tried[cycle] += [c for c in candidates if c not in state.tried[cycle]]
    if cycle not in state.unprompted:
        state.unprompted[cycle] = behaviour(cycle, state.model, tokenizer, None, items, settings)["score"]
    before = state.unprompted[cycle]
    if not state.history[cycle]:
        state.history[cycle].append(before)  # a visit starts from the model as it is now
    scores = {c: behaviour(cycle, state.model, tokenizer, c, items, settings)["score"] for c in candidates}
    state.best[cycle] = winner = max(candidates, key=scores.get)
    row = {"iteration": index, "cycle": cycle, "candidates": [{"prompt": c, "score": scores[c]} for c in candidates],
           "winner": winner, "winner_score": scores[winner], "unprompted_before": before}
    if scores[winner] < before:
        row.update(baked=False, outcome="no candidate does better in context than no prompt")
    else:
        row.update(_bake_winner(state, winner, index, tokenizer, data, settings, ctx, reference_perplexity))
    if cycle not in state.unprompted:
        state.unprompted[cycle] = behaviour(cycle, state.model, tokenizer, None, items, settings)["score"]
    state.history[cycle].append(state.unprompted[cycle])
    row.update(unprompted_after=state.unprompted[cycle],
               gain=relative_gain(state.history[cycle], settings.plateau_window)
               if len(state.history[cycle]) > settings.plateau_window else None,
               plateau=plateaued(state.history[cycle], settings.plateau_window, settings.plateau_threshold))
    return row


def run_cycles(model, tokenizer, data: PhaseData, settings: Settings, ctx: PhaseContext, log, started: float,
               reference_perplexity: float) -> CycleState:
    """Alternate the cycles until both plateau, ``max_iterations`` or ``time_budget_s``."""
    state = CycleState(model=model)
    for index in range(settings.max_iterations):
        if time.perf_counter() - started > settings.time_budget_s:
            state.stop_reason = "time budget"
            break
        cycle = state.cycle
        row = iterate(state, index, tokenizer, data, settings, ctx, reference_perplexity)
        log.log({**row, "elapsed_s": time.perf_counter() - started}, step=index)
        ctx.say(f"{NAME}: iteration {index} ({cycle}): winner score {row['winner_score']:.3f} in context, "
                f"unprompted {row['unprompted_before']:.3f} -> {row['unprompted_after']:.3f}; {row['outcome']}")
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


# ---------------------------------------------------------------------------------------------
# the report (test split only)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def tool_prompt_bake(original, state: CycleState, tokenizer, data: PhaseData, settings: Settings,
                     ctx: PhaseContext):
    """The tool prompt baked to full strength, with the half-baked copy kept: the cycles' first
    tool bake when they made one, else a bake of the best tool prompt into a copy of the input
    model made now, for the report only (the cycles found it not worth keeping)."""
    from agentforge.baking import bake

    if state.full_bake is not None or not settings.measure_full_bake:
        return state.full_bake
    result = bake(copy.deepcopy(original), tokenizer, state.best["tools"] or settings.tool_prompts[0],
                  data.bake_inputs["tools"], [it.prompt for it in data.selection["tools"]],
                  bake_settings(settings, "tools"),
                  out_dir=ctx.out_dir / "bakes" / "report-tools", strength=1.0, keep=(settings.strength,),
                  anchor=data.anchor, seed=ctx.seed + 1, wandb_mode="disabled", progress=False)
    shutil.rmtree(ctx.out_dir / "bakes" / "report-tools" / "checkpoint", ignore_errors=True)
    return result


def final_report(original, state: CycleState, tokenizer, data: PhaseData, settings: Settings,
                 ctx: PhaseContext) -> dict:
    """KL of the tool and persona prompts, behaviour of the prompted original against the
    unprompted models, and text perplexity, all on the test split."""
    from agentforge.baking import measured_kl, prompted_trajectories
    from agentforge.eval import perplexity

    full_bake = tool_prompt_bake(original, state, tokenizer, data, settings, ctx)
    prompts = {"tools": full_bake.prompt if full_bake else state.best["tools"] or settings.tool_prompts[0],
               "persona": state.best["persona"] or settings.persona_prompts[0]}
    models = {"original": original}
    if full_bake is not None and full_bake.stop_reason != "no effect":
        kept = full_bake.kept.get(settings.strength)
        models.update({"half": kept.model} if kept else {}, full=full_bake.model)
    models["final"] = state.model
    report = {"prompts": prompts, "full_bake": full_bake.summary() if full_bake else None,
              "kl": {}, "behaviour": {}, "perplexity": {}}
    for cycle, prompt in prompts.items():
        shown = models if cycle == "tools" else {n: models[n] for n in ("original", "final")}
        trajectories = prompted_trajectories(original, tokenizer, prompt, [it.prompt for it in data.final[cycle]],
                                             batch_size=settings.batch_size, **trajectory_settings(settings, cycle),
                                             seed=ctx.seed + 99)
        report["kl"][cycle] = {n: measured_kl(m, trajectories, batch_size=settings.batch_size) for n, m in shown.items()}
        report["behaviour"][cycle] = {
            "prompted_original": behaviour(cycle, original, tokenizer, prompt, data.final[cycle], settings),
            **{n: behaviour(cycle, m, tokenizer, None, data.final[cycle], settings) for n, m in shown.items()}}
    report["perplexity"] = {n: perplexity(m, data.text_test, batch_size=settings.eval_batch_size)
                            for n, m in models.items()}
    return report


def headline(report: dict) -> dict:
    """The figures the issue asks for, flat: KL removed, behaviour ratios, retention."""
    kl, tools, persona = report["kl"]["tools"], report["behaviour"]["tools"], report["behaviour"]["persona"]
    row = {f"kl_tools/{name}": value for name, value in kl.items()}
    row.update({f"kl_removed/{name}": 1 - value / kl["original"] for name, value in kl.items() if name != "original"})
    row.update({f"kl_persona/{name}": value for name, value in report["kl"]["persona"].items()})
    for name in (n for n in tools if n != "prompted_original"):
        for key in ("format", "accuracy"):
            row[f"tools/{name}/{key}"] = tools[name][key]
            row[f"tools/{name}/{key}_vs_prompted"] = _ratio(tools[name][key], tools["prompted_original"][key])
    row.update({f"tools/prompted_original/{k}": tools["prompted_original"][k] for k in ("format", "accuracy")})
    for name, measured in persona.items():
        row[f"persona/{name}/accuracy"] = measured["accuracy"]
        row[f"persona/{name}/answer_probability"] = measured["answer_probability"]
    row.update({f"perplexity/{name}": value for name, value in report["perplexity"].items()})
    row.update({f"perplexity_change/{name}": value / report["perplexity"]["original"] - 1
                for name, value in report["perplexity"].items() if name != "original"})
    return row


# ---------------------------------------------------------------------------------------------
# the phase


def _finished(out_dir: Path) -> PhaseResult | None:
    """The result of a previous run that completed (its model verifies and its summary exists)."""
    from agentforge.artifacts import CorruptArtifact, load_model_dir

    summary = out_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        load_model_dir(out_dir / "model")
    except (CorruptArtifact, OSError):
        return None
    return PhaseResult(artifacts={"model": out_dir / "model"}, metrics=json.loads(summary.read_text())["headline"])


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Run the A/B cycles on ``inputs["model"]``, measure on the test split, save the baked model."""
    from agentforge.artifacts import atomic_write_json, load_model_dir, save_model_dir
    from agentforge.eval import perplexity
    from agentforge.train import MetricsLogger, barrier

    started = time.perf_counter()
    if "model" not in inputs:
        raise ValueError(f"{NAME}: inputs need 'model' (a model directory), got {sorted(inputs)}")
    done = _finished(ctx.out_dir)
    if done is not None:
        ctx.say(f"{NAME}: reusing the finished phase in {ctx.out_dir}")
        return done
    torch.manual_seed(ctx.seed)
    model, tokenizer, metadata = load_model_dir(inputs["model"])
    data_record = _data_settings(settings, metadata)
    ctx.say(f"{NAME}: held-out data (selection: validation split, report: test split)")
    data = build_data(tokenizer, settings, data_record, ctx.seed)
    original = copy.deepcopy(model)
    reference = perplexity(model, data.text_validation, batch_size=settings.eval_batch_size)
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/iteration", wandb_mode=ctx.wandb_mode, enabled=ctx.is_main) as log:
        state = run_cycles(model, tokenizer, data, settings, ctx, log, started, reference)
    cycles_seconds = time.perf_counter() - started
    out = ctx.out_dir / "model"
    metrics = {}
    if ctx.is_main:
        ctx.say(f"{NAME}: {len(state.baked)} prompt(s) baked ({state.stop_reason}); measuring on the test split")
        report = final_report(original, state, tokenizer, data, settings, ctx)
        metrics = {**headline(report), "baked_prompts": len(state.baked), "cycles_seconds": cycles_seconds,
                   "phase_seconds": time.perf_counter() - started}
        save_model_dir(state.model, tokenizer, out, {"phase": NAME, "parents": [str(inputs["model"])],
                                                     "data": metadata.get("data") or data_record,
                                                     "baked_prompts": state.baked})
        atomic_write_json(ctx.out_dir / "summary.json", {
            "settings": dataclasses.asdict(settings), "data": data_record, "stop_reason": state.stop_reason,
            "baked": state.baked, "report": report, "headline": metrics, "validation_perplexity_input": reference})
        with MetricsLogger(ctx.out_dir, phase=NAME, wandb_mode="disabled") as log:
            log.log(metrics)
    barrier()
    return PhaseResult(artifacts={"model": out}, metrics=metrics)


def figures(phase_dir: Path) -> list:
    """Report figures: the cycles (each iteration's candidates in context and the unprompted score
    before and after its bake), the held-out KL curve of every bake, and the test-split
    comparison of the tool prompt's KL and behaviour. ``[(title, Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    rows = read_metrics(phase_dir, phase=f"{NAME}/iteration")
    out = []
    if rows:
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        for cycle, color in zip(CYCLES, ("tab:blue", "tab:orange")):
            mine = [r for r in rows if r["cycle"] == cycle]
            ax.scatter([r["iteration"] for r in mine for _ in r["candidates"]],
                       [c["score"] for r in mine for c in r["candidates"]], color=color, alpha=0.4, marker="x",
                       label=f"{cycle}: candidates in context")
            for r in mine:
                ax.plot([r["iteration"] - 0.3, r["iteration"] + 0.3], [r["unprompted_before"], r["unprompted_after"]],
                        "o-", color=color, label=f"{cycle}: unprompted before -> after" if r is mine[0] else None)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation score (cycle's own measure)")
        ax.legend(fontsize="small")
        out.append(("Baking cycles: candidates in context and the unprompted model", fig, [phase_dir / "metrics.jsonl"]))
        bakes = [r for r in rows if "bake" in r]
        if bakes:
            fig = Figure(figsize=(7, 3.2), layout="constrained")
            ax = fig.add_subplot()
            for r in bakes:
                curve = r["bake"]["curve"]
                ax.plot([p["step"] for p in curve], [p["kl"] for p in curve], "o-", markersize=3,
                        label=f"{r['iteration']} {r['cycle']} ({r['outcome'][:24]})")
            ax.set_xlabel("baking step")
            ax.set_ylabel("validation KL(prompted || unprompted), nats/token")
            ax.legend(fontsize="small")
            out.append(("Held-out KL during each bake", fig, [phase_dir / "metrics.jsonl"]))
    summary_path = phase_dir / "summary.json"
    if summary_path.is_file():
        report = json.loads(summary_path.read_text())["report"]
        fig = Figure(figsize=(8, 3.2), layout="constrained")
        kl_ax, tools_ax = fig.subplots(1, 2)
        kl = report["kl"]["tools"]
        kl_ax.bar(list(kl), list(kl.values()), color="tab:purple")
        kl_ax.set_ylabel("test KL(prompted original || model), nats/token")
        behaviour = report["behaviour"]["tools"]
        names = list(behaviour)
        for i, key in enumerate(("format", "accuracy")):
            tools_ax.bar([n + i * 0.4 for n in range(len(names))], [behaviour[n][key] for n in names], 0.4, label=key)
        tools_ax.set_xticks([n + 0.2 for n in range(len(names))], names, rotation=20, fontsize="small")
        tools_ax.set_ylabel("test share (unprompted unless 'prompted')")
        tools_ax.legend(fontsize="small")
        out.append(("Tool prompt on the test split: KL and behaviour", fig, [summary_path]))
    return out


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {'model': 'input model directory'}, argv)


if __name__ == "__main__":
    sys.exit(main())
