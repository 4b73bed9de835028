"""Phase 5, Curriculum: edge-of-chaos training with hints, variants, tools, self-modeling and dreams.

Input ``model``: in the pipeline, the BitNet phase's latent model (BitLinear layers in training
state), trained here quantization-aware through the STE, so it stays ternary; any HF causal LM
with a tokenizer works. Output ``model``.

1. Assessment: greedy accuracy per family on fixed validation items, from level 0 upward until
   it falls to ``target_accuracy`` (75 %); each family's baseline is the measured level closest
   to the target (accuracies fitted non-increasing in the level first).
2. Levels (``agentforge.curriculum.loop``): curriculum level k trains data level baseline + k;
   variants, three-in-a-row mastery, escalating rule-based hints, skips, tool traces (calculator
   and sandboxed Python), temperature-tagged self-modeling samples, dreams at the level's end,
   and a hard wall when a level's validation accuracy ends below ``hard_wall``.
3. Control: the same input trained for the same number of optimizer steps (same batch, optimizer
   and schedule) on as many randomly drawn tasks from the levels the curriculum visited, with
   their gold answers: plain fine-tuning.
4. Evaluation on the *test* split, which neither training nor selection saw: accuracy per level
   (0 .. ``eval_levels`` - 1) before / after / control with bootstrap intervals (paired
   differences); self-prediction before / after / control; arithmetic accuracy with vs without
   the tool runtime; perplexity on the run's held-out text (retention).

Outputs in the phase directory: ``model/`` and ``control/`` (HF model directories; the model's
``agentforge.json`` records what the curriculum did: levels, visited data levels, steps, stop
reason, examples by kind), ``steps/`` (the assessment and the three evaluations), ``train/``,
``metrics.jsonl`` (rows per level, per round and a headline row) and ``summary.json``.

Run alone: ``python -m agentforge.phases.curriculum --model DIR --preset tiny --out DIR``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from agentforge.data import DOMAINS, FAMILIES
from agentforge.errors import ConfigError
from agentforge.optim import PRESETS as OPTIMIZERS
from agentforge.quant import bitlinear_layers
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

# the families of the three domains, in their order: what the curriculum trains by default
DOMAIN_FAMILIES = [family for families in DOMAINS.values() for family in families]


@dataclass
class Settings(Checked):
    """The curriculum's knobs (per-preset values in ``PRESETS``)."""

    families: list[str] = setting(
        DOMAIN_FAMILIES,
        choices=tuple(FAMILIES),
        length="[1, 64]",
        doc="task families the curriculum trains and measures",
    )
    target_accuracy: float = setting(0.75, "[0, 1]", doc="edge of chaos: the baseline level's accuracy")
    levels: int = setting(10, "[1, 10]", doc="curriculum levels from the baseline upward")
    hard_wall: float = setting(0.5, "[0, 1]", doc="stop after a level whose validation accuracy ends below this")
    assess_items: int = setting(12, "[1, 100000]", doc="validation items per family and level (assessment, hard wall)")
    questions_per_family: int = setting(8, "[1, 100000]", doc="concepts per family in a level")
    mastery: int = setting(3, "[1, 1000]", doc="unaided successes in a row that master a concept")
    max_hints: int = setting(5, "[0, 5]", doc="hint rungs shown before a question is skipped")
    done_fraction: float = setting(0.1, "[0, 1]", doc="a level is done when at most this share of its questions remain")
    max_rounds: int = setting(15, "[1, 100000]")
    steps_per_round: int = setting(4, "[1, 1000000]")
    steps_per_level: int = setting(60, "[1, 10000000]")
    total_steps: int = setting(120, "[1, 10000000]", doc="the phase's step budget (the optimizer's schedule spans it)")
    batch_size: int = setting(8, "[1, 65536]")
    train_seq_len: int = setting(
        128,
        "[2, 65536]",
        doc="tokens per packed training row (a tool trace with the "
        "tool prompt needs more than the data spec's seq_len)",
    )
    # MuGrokfast preset. On the tiny run "qat" (BitNet's rates) raised held-out text perplexity
    # 6.97 -> 11.24 within 42 steps and "finetune" 6.97 -> 8.41, at the same task accuracy
    optimizer: str = setting("finetune", choices=tuple(OPTIMIZERS), doc="MuGrokfast preset")
    lr_scale: float = setting(1.0, "(0, 100]", doc="learning rates relative to the preset's")
    replay_examples: int = setting(96, "[0, 10000000]", doc="older examples mixed into each round")
    tools: bool = setting(True, doc="pose the tool families' questions with tools available each round")
    tool_items_per_round: int = setting(8, "[0, 100000]")
    tool_new_tokens: int = setting(40, "[1, 65536]")
    self_model_ranges: int = setting(3, "[0, 1000]", doc="temperatures per level, spread over the design's ranges")
    self_model_prompts: int = setting(16, "[0, 100000]")
    self_model_new_tokens: int = setting(8, "[1, 65536]")
    self_examples_per_round: int = setting(12, "[0, 100000]")
    dream_samples: int = setting(48, "[0, 100000]")
    dream_temperature: float = setting(1.3, "(0, 100]")
    dream_steps: int = setting(2, "[0, 1000000]")
    eval_items: int = setting(16, "[1, 100000]", doc="test items per family and level")
    eval_levels: int = setting(5, "[1, 10]", doc="levels 0 .. eval_levels-1 are compared before / after / control")
    tool_eval_items: int = setting(
        4, "[0, 100000]", doc="test items per arithmetic family and level, with and without tools"
    )
    probe_prompts: int = setting(24, "[1, 100000]", doc="held-out prompts for self-prediction")
    probe_temperatures: list[float] = setting([0.5, 1.0, 1.5], "(0, 100]", length="[1, 64]")
    text_rows: int = setting(64, "[0, 1000000]", doc="held-out text rows for perplexity (0: skip)")
    control: bool = setting(True, doc="train the equal-step plain fine-tuning control")
    bootstrap_samples: int = setting(1000, "[1, 10000000]")
    eval_batch_size: int = setting(64, "[1, 65536]")


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        families=["add_small", "kv_recall", "count_bits"],
        levels=2,
        hard_wall=0.0,
        assess_items=4,
        questions_per_family=3,
        max_rounds=2,
        steps_per_round=1,
        steps_per_level=2,
        total_steps=4,
        batch_size=4,
        train_seq_len=96,
        replay_examples=8,
        tool_items_per_round=2,
        tool_new_tokens=12,
        self_model_ranges=2,
        self_model_prompts=3,
        self_model_new_tokens=4,
        self_examples_per_round=2,
        dream_samples=4,
        dream_steps=1,
        eval_items=2,
        eval_levels=10,
        tool_eval_items=1,
        probe_prompts=4,
        probe_temperatures=[0.7, 1.5],
        text_rows=8,
        bootstrap_samples=100,
        eval_batch_size=32,
    ),
    "tiny": Settings(),
    "small": Settings(
        assess_items=50,
        questions_per_family=64,
        max_rounds=30,
        steps_per_round=8,
        steps_per_level=400,
        total_steps=3000,
        batch_size=32,
        train_seq_len=256,
        replay_examples=512,
        tool_items_per_round=64,
        self_model_ranges=5,
        self_model_prompts=64,
        self_examples_per_round=64,
        dream_samples=256,
        dream_steps=8,
        eval_items=100,
        eval_levels=10,
        tool_eval_items=25,
        probe_prompts=128,
        text_rows=256,
    ),
    "smol": Settings(
        levels=3,
        assess_items=6,
        questions_per_family=4,
        max_rounds=4,
        steps_per_round=3,
        steps_per_level=12,
        total_steps=24,
        batch_size=4,
        train_seq_len=192,
        replay_examples=16,
        tool_items_per_round=4,
        tool_new_tokens=24,
        self_model_ranges=2,
        self_model_prompts=6,
        self_examples_per_round=4,
        dream_samples=8,
        dream_steps=1,
        eval_items=8,
        eval_levels=3,
        tool_eval_items=4,
        probe_prompts=8,
        text_rows=16,
        eval_batch_size=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# inputs


def load_input(p: PhaseRun) -> Loaded:
    """The input model, with a tokenizer that has eos and pad tokens (generation and packing need both)."""
    source = p.load("model")
    tokenizer = source.tokenizer
    if tokenizer is None or tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError(
            f"curriculum: {source.path} needs a tokenizer with eos and pad tokens (save it with the model)"
        )
    return source


def layer_states(model) -> dict[str, str]:
    """``{qualified name: state}`` of the model's BitLinear layers."""
    return {name: module.state for name, module in bitlinear_layers(model).items()}


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class HeldOut:
    """Everything the evaluations read: test items per (family, level), arithmetic items for
    the tool comparison, self-prediction prompts and held-out text rows (or None)."""

    test: dict
    tool_items: list
    probe_prompts: list
    text: object


def build_held_out(p: PhaseRun, tokenizer, validation: dict) -> HeldOut:
    from agentforge.curriculum import tasks

    settings = p.settings
    test = tasks.held_out(
        settings.families,
        "test",
        settings.eval_items,
        p.seed,
        levels=range(settings.eval_levels),
        render=p.suite(tokenizer).render,
    )
    tool_items = [
        item
        for (family, _), items in test.items()
        if family in tasks.ARITHMETIC
        for item in items[: settings.tool_eval_items]
    ]
    # probes: the easiest validation prompts of every family, where samples are still answers
    pool = [item.prompt for family in settings.families for item in validation[(family, 0)]]
    probes = pool[:: max(1, len(pool) // settings.probe_prompts)][: settings.probe_prompts]
    text = p.suite(tokenizer).text("test", settings.text_rows) if settings.text_rows else None
    return HeldOut(test, tool_items, probes, text)


def assess(p: PhaseRun, model, tokenizer, validation: dict) -> dict:
    """Validation scores per ``"family/level"``, from level 0 up to each family's edge."""
    from agentforge.curriculum import measure

    settings = p.settings
    scores = measure.assess(
        model, tokenizer, validation, settings.families, settings.target_accuracy, batch_size=settings.eval_batch_size
    )
    return {f"{family}/{level}": values for (family, level), values in scores.items()}


def evaluate(p: PhaseRun, model, tokenizer, held: HeldOut, with_tools: bool) -> dict:
    """Per-item test scores per (family, level), self-prediction, tool accuracy and perplexity."""
    from agentforge.curriculum import measure, selfmodel
    from agentforge.eval import perplexity

    settings = p.settings
    scores = measure.item_scores(model, tokenizer, held.test, batch_size=settings.eval_batch_size)
    predicted = {
        tag: selfmodel.self_prediction(
            model,
            tokenizer,
            held.probe_prompts,
            settings.probe_temperatures,
            max_new_tokens=settings.self_model_new_tokens,
            seed=p.seed + 1,
            batch_size=settings.eval_batch_size,
            tag=tag,
        )
        for tag in selfmodel.TAGS
    }
    report = {
        "scores": {f"{family}/{level}": values for (family, level), values in scores.items()},
        "self_prediction": predicted["right"],
        # the ablations: if the temperature tag carries information, a wrong or missing tag does worse
        "self_prediction_ablation": {tag: predicted[tag]["accuracy"] for tag in ("wrong", "none")},
        "perplexity": perplexity(model, held.text, batch_size=settings.eval_batch_size)
        if held.text is not None
        else None,
    }
    if with_tools and held.tool_items:
        direct = measure.item_scores(model, tokenizer, {"tools": held.tool_items}, batch_size=settings.eval_batch_size)
        tooled = measure.tool_accuracy(
            model,
            tokenizer,
            held.tool_items,
            max_new_tokens=settings.tool_new_tokens,
            batch_size=settings.eval_batch_size,
        )
        report["tools"] = {
            "without": direct["tools"],
            "with": tooled["scores"],
            "calls": tooled["calls"],
            "ok_calls": tooled["ok_calls"],
            "format_rate": tooled["format_rate"],
            "examples": tooled["completions"][:5],
        }
    return report


def score_table(scores: dict) -> dict:
    """``{(family, level): scores}`` from ``{"family/level": scores}``."""
    return {(key.rsplit("/", 1)[0], int(key.rsplit("/", 1)[1])): v for key, v in scores.items()}


# ---------------------------------------------------------------------------------------------
# the curriculum and the control


def train_curriculum(p: PhaseRun, source: Loaded, baselines: dict, validation: dict, held: HeldOut) -> Built:
    """The levels, run on the input model in place; the model's metadata records what they did.
    Level and round rows go to metrics.jsonl as they happen (W&B too, for the levels)."""
    from agentforge.curriculum import loop

    model, tokenizer, settings = source.model, source.tokenizer, p.settings
    p.say(f"levels from baselines {baselines}")
    states = layer_states(model)
    trainer = loop.Trainer(
        model, tokenizer, settings, p.out_dir / "train" / "curriculum", p.seed, phase=f"{p.spec.name}/train"
    )
    with p.logger("level", wandb=True) as level_log, p.logger("round") as round_log:
        level_log.truncate_after(-1)  # rows of an interrupted earlier run describe lost work
        round_log.truncate_after(-1)
        curriculum = loop.Curriculum(
            model,
            tokenizer,
            settings,
            baselines,
            validation,
            held.probe_prompts,
            trainer,
            p.seed,
            level_log=level_log,
            round_log=round_log,
            say=p.say,
            render=p.suite(tokenizer).render,
        )
        record = {**curriculum.run().summary(), "dropped_examples": trainer.dropped}
    if layer_states(model) != states:
        raise RuntimeError("curriculum: training changed the model's BitLinear layers; refusing to save it")
    return Built(
        model,
        tokenizer,
        {
            "parents": [source.path],
            "baselines": baselines,
            "stop_reason": record["stop_reason"],
            "steps": record["steps"],
            "bitlinear_layers": len(states),
            "curriculum": record,
        },
        carry=head_files(source.path),
    )


def train_control(p: PhaseRun, record: dict) -> Built:
    """Plain fine-tuning with equal compute: the same input, optimizer, schedule, batch and step
    count as the curriculum, on as many examples: random tasks (gold answers) from the levels it
    visited, and as many temperature-tagged samples of its own as the curriculum trained on, so
    that the self-prediction format is no advantage of the curriculum's alone."""
    import random

    from agentforge.curriculum import loop, rows, tasks

    settings = p.settings
    n_self = record["examples_by_kind"].get(rows.SELF, 0)
    n_tasks = max(record["examples"] - n_self, 1)
    p.say(f"equal-compute control ({record['steps']} steps on {n_tasks} random tasks and {n_self} own tagged samples)")
    source = load_input(p)
    rng, variants = random.Random(p.seed + 1), tasks.VariantSource(p.seed + 1, render=p.suite(source.tokenizer).render)
    visited = record["visited"]
    families = [f for f in settings.families if visited.get(f)]
    items = []
    for _ in range(n_tasks):
        family = rng.choice(families)
        items += variants.take(family, rng.choice(visited[family]))
    own = own_tagged_samples(source, [item.prompt for item in items], n_self, settings, p.seed + 1)
    trainer = loop.Trainer(
        source.model,
        source.tokenizer,
        settings,
        p.out_dir / "train" / "control",
        p.seed + 1,
        phase=f"{p.spec.name}/control",
    )
    trainer.train([rows.task_example(item.prompt, item.answer) for item in items] + own, max(record["steps"], 1))
    return Built(
        source.model,
        source.tokenizer,
        {"role": "control", "parents": [source.path], "steps": record["steps"], "tasks": len(items), "self": len(own)},
    )


def own_tagged_samples(source: Loaded, prompts: list[str], count: int, settings: Settings, seed: int) -> list:
    """``count`` self-modeling examples of the control: its own samples of ``prompts`` at the
    curriculum's first-level temperatures, each tagged with its temperature."""
    from agentforge.curriculum import rows, selfmodel

    temperatures = selfmodel.schedule_temperatures(1, max(settings.self_model_ranges, 1))
    rounds = math.ceil(count / len(prompts)) if count and prompts else 0
    examples = []
    for i in range(rounds):  # all prompts at one temperature per round, the temperatures in turn
        temperature = temperatures[i % len(temperatures)]
        samples = selfmodel.sample(
            source.model,
            source.tokenizer,
            prompts,
            temperature=temperature,
            max_new_tokens=settings.self_model_new_tokens,
            seed=seed + 104729 * i,
            batch_size=settings.eval_batch_size,
        )
        examples += [
            rows.self_example(temperature, prompt, source.tokenizer.decode(ids, skip_special_tokens=True), ended)
            for prompt, (ids, ended) in zip(prompts, samples)
        ]
    return examples[:count]


# ---------------------------------------------------------------------------------------------
# the phase


def run(p: PhaseRun) -> PhaseResult:
    """Assess, run the levels, train the control, evaluate on the test split, summarise."""
    from agentforge.curriculum import measure, tasks

    settings = p.settings
    torch.manual_seed(p.seed)
    source = load_input(p)
    model, tokenizer = source.model, source.tokenizer
    n_layers = len(bitlinear_layers(model))
    validation = tasks.HeldOut("validation", settings.assess_items, p.seed, p.suite(tokenizer).render)
    assessment = score_table(p.step("assessment", lambda: assess(p, model, tokenizer, validation)))
    baselines = measure.baselines(assessment, settings.families, settings.target_accuracy)
    held = build_held_out(p, tokenizer, validation)
    reports = {"before": p.step("evaluate_before", lambda: evaluate(p, model, tokenizer, held, with_tools=False))}

    trained = p.model_step("model", lambda: train_curriculum(p, source, baselines, validation, held))
    record = trained.metadata["curriculum"]
    reports["after"] = p.step("evaluate_after", lambda: evaluate(p, trained.model, tokenizer, held, with_tools=True))
    if settings.control:
        control = p.model_step("control", lambda: train_control(p, record))
        reports["control"] = p.step(
            "evaluate_control", lambda: evaluate(p, control.model, control.tokenizer, held, with_tools=False)
        )
    summary = build_summary(settings, assessment, baselines, record, reports, n_layers, p.timings.get("model"))
    return p.finish({"model": trained.path}, summary["headline"], summary, effects=effects(summary))


def effects(summary: dict) -> list[Effect]:
    """Held-out accuracy of the curriculum model against the equal-compute control (or, without a
    control, against the input model), and its arithmetic accuracy with the tools against without."""
    comparisons = summary["comparisons"]
    key, control = (
        ("after_vs_control", "plain fine-tuning of equal compute")
        if "after_vs_control" in comparisons
        else ("after_vs_before", "the input model")
    )
    found = [effect("held-out task accuracy, curriculum model", control, comparisons[key]["all"])]
    if "after" in summary["tools"]:
        found.append(
            effect(
                "arithmetic accuracy with the tool runtime",
                "the same model without it",
                summary["tools"]["after"]["without"],
            )
        )
    return found


def effect(what: str, control: str, compared: dict) -> Effect:
    """An ``Effect`` from ``agentforge.curriculum.measure.compare``'s paired comparison."""
    return Effect(what, control, compared["difference"], compared["ci"][0], compared["ci"][1])


def build_summary(
    settings: Settings,
    assessment: dict,
    baselines: dict,
    record: dict,
    reports: dict,
    n_layers: int,
    curriculum_seconds: float | None,
) -> dict:
    """Per-level accuracy with bootstrap intervals, the paired comparisons, tool use,
    self-prediction and perplexity per model, and the headline row. ``curriculum_seconds``: how
    long the levels took in this run (None when a previous run trained the model)."""
    from agentforge.curriculum import measure

    n, seed = settings.bootstrap_samples, 0
    tables = {name: score_table(report["scores"]) for name, report in reports.items()}
    per_level = {name: measure.level_table(t, samples=n, seed=seed) for name, t in tables.items()}
    comparisons = {"after_vs_before": measure.paired_by_level(tables["after"], tables["before"], samples=n, seed=seed)}
    if "control" in tables:
        comparisons["after_vs_control"] = measure.paired_by_level(
            tables["after"], tables["control"], samples=n, seed=seed
        )
        comparisons["control_vs_before"] = measure.paired_by_level(
            tables["control"], tables["before"], samples=n, seed=seed
        )
    tools = {
        name: {
            "without": measure.compare(r["tools"]["with"], r["tools"]["without"], samples=n, seed=seed),
            **{k: r["tools"][k] for k in ("calls", "ok_calls", "format_rate", "examples")},
        }
        for name, r in reports.items()
        if "tools" in r
    }
    self_prediction = {name: r["self_prediction"] for name, r in reports.items()}
    perplexity = {name: r["perplexity"] for name, r in reports.items()}
    visited = sorted({level for levels in record["visited"].values() for level in levels})
    headline = {
        "levels_completed": len(record["levels"]),
        "stop_reason": record["stop_reason"],
        "steps": record["steps"],
        "examples": record["examples"],
        "baseline_levels": baselines,
        "visited_levels": visited,
        **{
            f"{name}/accuracy": comparisons["after_vs_before"]["all"]["a" if name == "after" else "b"]
            for name in ("before", "after")
        },
        "gain": comparisons["after_vs_before"]["all"]["difference"],
        "gain_ci": comparisons["after_vs_before"]["all"]["ci"],
        **(
            {
                "control/accuracy": comparisons["after_vs_control"]["all"]["b"],
                "gain_over_control": comparisons["after_vs_control"]["all"]["difference"],
                "gain_over_control_ci": comparisons["after_vs_control"]["all"]["ci"],
            }
            if "control" in reports
            else {}
        ),
        **{f"{name}/self_prediction": sp["accuracy"] for name, sp in self_prediction.items()},
        **{
            f"{name}/self_prediction_{tag}_tag": accuracy
            for name, r in reports.items()
            if r is not None
            for tag, accuracy in r.get("self_prediction_ablation", {}).items()
        },
        **{f"{name}/tool_gain": t["without"]["difference"] for name, t in tools.items()},
        **{f"{name}/perplexity": p for name, p in perplexity.items() if p is not None},
        **({"curriculum_seconds": curriculum_seconds} if curriculum_seconds is not None else {}),
    }
    return {
        "headline": headline,
        "assessment": {f"{f}/{level}": measure.mean(v) for (f, level), v in assessment.items()},
        "baselines": baselines,
        "curriculum": {**record, "seconds": curriculum_seconds},
        "per_level": per_level,
        "comparisons": comparisons,
        "tools": tools,
        "self_prediction": self_prediction,
        "perplexity": perplexity,
        "bitlinear_layers": n_layers,
    }


SPEC = PhaseSpec(
    number=5,
    name="curriculum",
    summary="edge-of-chaos levels with hints, variants, tools, self-modeling, against a plain fine-tuning control",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={"model": Input("bitnet.latent", "input model directory (BitNet latent; any HF causal LM with a tokenizer)")},
    provides={"model": model_dir},
    figures="agentforge.figures.curriculum",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
