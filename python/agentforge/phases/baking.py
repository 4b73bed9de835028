"""Phase 6, Baking: a tool-use prompt and a persona baked into the weights, measured by KL and behaviour.

Input ``model`` (in the pipeline the curriculum model, BitLinear layers in training state);
output ``model``, the same architecture with the prompts baked in.

Two cycles alternate, starting with A (``agentforge.baking.cycles``):

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
The phase stops when both have plateaued with nothing gained in between, or after
``max_iterations`` (no wall-clock budget: a run with the same seed repeats exactly). The first
tool bake is run to full strength once, keeping the half-baked copy, so the report shows the KL
before, half-baked and fully baked from one training run.

Everything in the report is measured on the *test* split (task items and text documents the
baking, the selection and the stop rule never saw): KL of the tool prompt before / half / full /
final, tool and persona behaviour of the prompted original vs the unprompted baked models, and
held-out text perplexity (retention).

Outputs in the phase directory: ``model/`` (the baked model), ``bakes/`` (each bake's training
log, and ``bakes/full`` and ``bakes/half``: the tool prompt fully and half baked, the models the
report measures), ``metrics.jsonl`` (a ``baking/iteration`` row per iteration) and
``summary.json``.

Run alone: ``python -m agentforge.phases.baking --preset tiny --model DIR --out DIR``.
"""

# No ``from __future__ import annotations``: the settings' field types are read with
# ``typing.get_type_hints``, which cannot resolve the nested ``BakeSettings`` from a string when
# this module runs as ``__main__`` without being in ``sys.modules`` (runpy).
import copy
import functools
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agentforge.baking import BakeSettings, CycleData, CycleRun, CycleState, cycle_bake_settings, run_cycles
from agentforge.data import DOMAINS, FAMILIES
from agentforge.errors import ConfigError
from agentforge.quietstar import head_files
from agentforge.runtime import (
    Built,
    Effect,
    Input,
    Loaded,
    PhaseResult,
    PhaseRun,
    PhaseSpec,
    model_dir,
    standalone_main,
)
from agentforge.settings import Checked, setting
from agentforge.tools import TOOL_PROMPT

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
DOMAIN_FAMILIES = tuple(family for families in DOMAINS.values() for family in families)


@dataclass
class Settings(Checked):
    """What the phase bakes and how much it measures (per-preset values in ``PRESETS``). Item
    counts are per cycle, spread evenly over its families and the run's task levels."""

    strength: float = setting(0.5, "(0, 1)", doc="half-baking: the fraction of the validation KL each bake removes")
    candidates: int = setting(3, "[1, 100]", doc="prompts scored in context per iteration")
    tool_prompts: list[str] = setting(list(TOOL_PROMPTS), length="[1, 1000]")
    persona_prompts: list[str] = setting(list(PERSONA_PROMPTS), length="[1, 1000]")
    tool_families: list[str] = setting(list(ARITHMETIC_FAMILIES), choices=tuple(FAMILIES), length="[1, 64]")
    persona_families: list[str] = setting(list(DOMAIN_FAMILIES), choices=tuple(FAMILIES), length="[1, 64]")
    bake_items: int = setting(48, "[1, 1000000]", doc="training-split inputs of a bake")
    selection_items: int = setting(18, "[1, 100000]", doc="validation items: candidate scores, the half-bake stop rule")
    final_items: int = setting(36, "[1, 100000]", doc="test items: the report")
    tool_new_tokens: int = setting(
        12, "[1, 65536]", doc="model tokens of tool-use generation and tool-bake trajectories (results not counted)"
    )
    plateau_window: int = setting(1, "[1, 1000]", doc="iterations without a relative gain of ...")
    plateau_threshold: float = setting(0.01, "[0, 100]", doc="... this much end a cycle's visit")
    max_iterations: int = setting(4, "[1, 10000]")
    retention_tolerance: float = setting(
        0.05, "[0, 100]", doc="max relative rise of validation perplexity over the input model"
    )
    task_retention: float = setting(
        0.2, "[0, 1]", doc="max relative fall of the answer probability on non-tool families' tasks"
    )
    anchor_rows: int = setting(
        32,
        "[0, 1000000]",
        doc="training text rows each bake holds the model to its own "
        "predictions on (0: no anchor, the paper's objective alone)",
    )
    measure_full_bake: bool = setting(True, doc="the first tool bake runs to full strength too (for the report)")
    text_rows: int = setting(64, "[1, 1000000]", doc="validation and test text rows for perplexity")
    eval_batch_size: int = setting(64, "[1, 65536]")
    bake: BakeSettings = setting(
        BakeSettings,
        doc="how each prompt is baked; bake.tools and, for tool prompts, "
        "bake.max_new_tokens (tool_new_tokens) are set per cycle",
    )

    def check(self) -> None:
        for name in ("tool_prompts", "persona_prompts"):
            if not all(prompt.strip() for prompt in getattr(self, name)):
                self.fail(name, "must hold non-empty prompts")


# one short trajectory per input, short bakes held to the model's own predictions on training text
TINY_BAKE: dict[str, Any] = {
    "samples_per_input": 1,
    "max_new_tokens": 6,
    "batch_size": 16,
    "max_steps": 40,
    "anchor_weight": 1.0,
}

PRESETS: dict[str, Settings] = {
    "micro": Settings(
        candidates=2,
        tool_families=["add_small"],
        persona_families=["add_small", "kv_recall"],
        bake_items=12,
        selection_items=4,
        final_items=6,
        tool_new_tokens=6,
        max_iterations=2,
        text_rows=8,
        eval_batch_size=16,
        bake=BakeSettings(**{**TINY_BAKE, "max_new_tokens": 4, "max_steps": 10, "batch_size": 6, "lr_scale": 4.0}),
    ),
    "tiny": Settings(bake=BakeSettings(**TINY_BAKE)),
    "small": Settings(
        candidates=4,
        bake_items=512,
        selection_items=96,
        final_items=300,
        tool_new_tokens=32,
        max_iterations=10,
        text_rows=256,
        bake=BakeSettings(
            **{
                **TINY_BAKE,
                "method": "lora",
                "lora_rank": 16,
                "lora_alpha": 32.0,
                "samples_per_input": 2,
                "max_new_tokens": 24,
                "max_steps": 300,
                "eval_every": 10,
                "batch_size": 32,
            }
        ),
    ),
    "smol": Settings(
        candidates=2,
        bake_items=16,
        selection_items=6,
        final_items=12,
        tool_new_tokens=16,
        max_iterations=2,
        text_rows=16,
        eval_batch_size=8,
        bake=BakeSettings(
            **{
                **TINY_BAKE,
                "max_new_tokens": 12,
                "batch_size": 8,
                "micro_batch_size": 2,
                "max_steps": 12,
                "eval_every": 4,
            }
        ),
    ),
}


# ---------------------------------------------------------------------------------------------
# held-out data


@dataclass
class PhaseData(CycleData):
    """The cycles' data (training and validation splits) and the report's: test items per cycle
    and test text rows."""

    final: dict[str, list]
    text_test: Any


def build_data(p: PhaseRun, tokenizer) -> PhaseData:
    """Task items of each cycle's families for every split, and text rows spread over each split
    (consecutive rows come from a few documents: an anchor on the first training rows, one odd
    document, let a full tool bake raise held-out perplexity by 14 %; spread, by 1.7 %)."""
    settings, suite = p.settings, p.suite(tokenizer)
    families = {"tools": settings.tool_families, "persona": settings.persona_families}

    def items(split: str, total: int) -> dict[str, list]:
        """About ``total`` items of ``split`` per cycle, the same number from each family and level."""
        return {
            cycle: suite.items(split, math.ceil(total / (len(fams) * len(p.data.task_levels))), fams)
            for cycle, fams in families.items()
        }

    return PhaseData(
        bake_inputs={cycle: [it.prompt for it in its] for cycle, its in items("train", settings.bake_items).items()},
        selection=items("validation", settings.selection_items),
        anchor=suite.text("train", settings.anchor_rows, spread_rows=True)["input_ids"],
        text_validation=suite.text("validation", settings.text_rows, spread_rows=True),
        final=items("test", settings.final_items),
        text_test=suite.text("test", settings.text_rows, spread_rows=True),
    )


# ---------------------------------------------------------------------------------------------
# the report (test split only)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def tool_prompt_bake(p: PhaseRun, fp: Loaded, data: PhaseData, cycles: dict, state: Callable[[], CycleState]):
    """The tool prompt baked to full strength, with the half-baked copy kept: the cycles' first
    tool bake when they made one, else a bake of the best tool prompt into a copy of the input
    model made now, for the report only (the cycles found it not worth keeping)."""
    from agentforge.baking import bake

    if cycles["full_bake"] is not None:
        return state().full_bake
    settings, out_dir = p.settings, p.out_dir / "bakes" / "report-tools"
    result = bake(
        copy.deepcopy(fp.model),
        fp.tokenizer,
        cycles["best"]["tools"] or settings.tool_prompts[0],
        data.bake_inputs["tools"],
        [it.prompt for it in data.selection["tools"]],
        cycle_bake_settings(settings.bake, "tools", settings.tool_new_tokens),
        out_dir=out_dir,
        strength=1.0,
        keep=(settings.strength,),
        anchor=data.anchor,
        seed=p.seed + 1,
        wandb_mode="disabled",
        progress=False,
    )
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return result


def report_models(
    p: PhaseRun, fp: Loaded, final: Loaded, data: PhaseData, cycles: dict, state: Callable[[], CycleState]
) -> tuple[dict, dict | None]:
    """The models the report measures, ``{name: model}`` (original, half, full, final), and the
    summary of the tool prompt's full bake (None without ``measure_full_bake``). The full bake's
    models are saved in ``bakes/full`` and ``bakes/half``."""
    settings, tokenizer = p.settings, fp.tokenizer
    models = {"original": fp.model}
    full_bake = None
    if settings.measure_full_bake:
        baked = functools.cache(lambda: tool_prompt_bake(p, fp, data, cycles, state))
        full_bake = p.step("tool_bake", lambda: baked().summary(), everywhere=True)
        metadata = {"role": "tool prompt baked for the report", "prompt": full_bake["prompt"], "parents": [fp.path]}
        if full_bake["stop_reason"] != "no effect":
            if str(settings.strength) in full_bake["kept"]:
                models["half"] = p.model_step(
                    "tool_bake_half",
                    lambda: Built(
                        baked().kept[settings.strength].model, tokenizer, {**metadata, "strength": settings.strength}
                    ),
                    directory="bakes/half",
                ).model
            models["full"] = p.model_step(
                "tool_bake_full",
                lambda: Built(baked().model, tokenizer, {**metadata, "strength": 1.0}),
                directory="bakes/full",
            ).model
    models["final"] = final.model
    return models, full_bake


def measure_report(p: PhaseRun, tokenizer, data: PhaseData, models: dict, prompts: dict) -> dict:
    """KL of the tool and persona prompts, behaviour of the prompted original against the
    unprompted models, and text perplexity, all on the test split."""
    from agentforge.baking import behaviour, prompted_trajectories, row_kl
    from agentforge.eval.lm import row_nll

    settings, original = p.settings, models["original"]
    report: dict[str, dict] = {"kl": {}, "kl_rows": {}, "behaviour": {}, "perplexity": {}, "text_rows": {}}
    for cycle, prompt in prompts.items():
        shown = models if cycle == "tools" else {n: models[n] for n in ("original", "final")}
        bake = cycle_bake_settings(settings.bake, cycle, settings.tool_new_tokens)
        trajectories = prompted_trajectories(
            original,
            tokenizer,
            prompt,
            [it.prompt for it in data.final[cycle]],
            batch_size=bake.batch_size,
            tools=bake.tools,
            max_new_tokens=bake.max_new_tokens,
            seed=p.seed + 99,
        )
        report["kl_rows"][cycle] = {
            n: dict(zip(("sums", "tokens"), row_kl(m, trajectories, batch_size=bake.batch_size)))
            for n, m in shown.items()
        }
        report["kl"][cycle] = {n: sum(r["sums"]) / sum(r["tokens"]) for n, r in report["kl_rows"][cycle].items()}

        def measure(model, in_context: str | None, cycle: str = cycle) -> dict:
            return behaviour(
                cycle,
                model,
                tokenizer,
                in_context,
                data.final[cycle],
                tool_new_tokens=settings.tool_new_tokens,
                batch_size=settings.eval_batch_size,
            )

        report["behaviour"][cycle] = {
            "prompted_original": measure(original, prompt),
            **{n: measure(m, None) for n, m in shown.items()},
        }
    for name, model in models.items():
        nll, tokens = row_nll(model, data.text_test, batch_size=settings.eval_batch_size)
        report["text_rows"][name] = {"nll": nll, "tokens": tokens}
        report["perplexity"][name] = math.exp(sum(nll) / sum(tokens))
    return report


DESCRIBED = {"final": "handed-on model", "full": "full bake (kept for the report only)"}


def effects(report: dict, seed: int) -> list[Effect]:
    """The handed-on model first (the one later phases get): the tool prompt's KL it removed, its
    unprompted tool-call format rate against the unprompted input, and its text perplexity
    against the input's; then the full bake the report also measures (not handed on)."""
    from agentforge.eval.stats import paired_difference, perplexity_ratio, ratio_of_sums

    kl, tools, text = report["kl_rows"]["tools"], report["behaviour"]["tools"], report["text_rows"]

    def kl_removed(name: str) -> Effect:
        left = ratio_of_sums(kl[name]["sums"], kl["original"]["sums"], seed=seed)
        return Effect(
            f"tool-prompt KL removed, {DESCRIBED[name]}",
            "the unprompted input model",
            1 - left["mean"],
            1 - left["high"],
            1 - left["low"],
        )

    found = [
        kl_removed("final"),
        Effect.of(
            "tool-call format rate unprompted, handed-on model",
            "the unprompted input model",
            paired_difference(tools["final"]["items"]["format"], tools["original"]["items"]["format"], seed=seed),
        ),
        Effect.of(
            "text perplexity ratio, handed-on model",
            "the input model",
            perplexity_ratio(text["final"]["nll"], text["original"]["nll"], text["original"]["tokens"], seed=seed),
            better="lower",
            neutral=1.0,
        ),
    ]
    return found + [kl_removed("full")] if "full" in kl else found


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
    row.update(
        {
            f"perplexity_change/{name}": value / report["perplexity"]["original"] - 1
            for name, value in report["perplexity"].items()
            if name != "original"
        }
    )
    return row


# ---------------------------------------------------------------------------------------------
# the phase


def run(p: PhaseRun) -> PhaseResult:
    """Run the A/B cycles on the input model, save the baked model, measure on the test split."""
    settings = p.settings
    torch.manual_seed(p.seed)
    fp = p.load("model")
    if fp.tokenizer is None:
        raise ConfigError(f"baking: {fp.path} has no tokenizer; the phase needs one to build its data")
    tokenizer = fp.tokenizer
    p.say("held-out data (selection: validation split, report: test split)")
    data = build_data(p, tokenizer)
    # The cycles bake the loaded model in place; the report reads the input again once they are
    # done, so no untouched copy waits beside the cycles' training state (0.54 GB on SmolLM2).
    # The cycles' model and full bake stay in memory for the steps after them; a rerun that
    # finds those steps finished never runs the cycles.
    state = functools.cache(lambda: run_cycles(fp.model, CycleRun(tokenizer, data, settings, p.seed, p.out_dir, p.say)))
    cycles = p.step("cycles", lambda: state().record(), everywhere=True)
    final = p.model_step(
        "model",
        lambda: Built(
            state().model,
            tokenizer,
            {"baked_prompts": cycles["baked"], "parents": [fp.path]},
            carry=head_files(fp.path),
        ),
    )
    p.say(f"{len(cycles['baked'])} prompt(s) baked ({cycles['stop_reason']}); measuring on the test split")
    original = p.load("model")
    models, full_bake = report_models(p, original, final, data, cycles, state)
    prompts = {
        "tools": full_bake["prompt"] if full_bake else cycles["best"]["tools"] or settings.tool_prompts[0],
        "persona": cycles["best"]["persona"] or settings.persona_prompts[0],
    }
    report = p.step("report", lambda: measure_report(p, tokenizer, data, models, prompts))
    summary = {
        "stop_reason": cycles["stop_reason"],
        "baked": cycles["baked"],
        "report": {"prompts": prompts, "full_bake": full_bake, **report},
        "validation_perplexity_input": cycles["validation_perplexity_input"],
    }
    return p.finish(
        {"model": final.path},
        {**headline(report), "baked_prompts": len(cycles["baked"])},
        summary,
        rows={"iteration": cycles["rows"]},
        effects=effects(report, p.seed),
    )


SPEC = PhaseSpec(
    number=6,
    name="baking",
    summary="a tool-use prompt and a persona baked into the weights, measured by KL and behaviour",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={"model": Input("curriculum.model", "input model directory (in the pipeline the curriculum model)")},
    provides={"model": model_dir},
    figures="agentforge.figures.baking",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
