"""Phase 5, Curriculum: edge-of-chaos training with hints, variants, tools, self-modeling and dreams.

Input ``{"model": dir}``: in the pipeline, the BitNet phase's latent model (BitLinear layers in
training state), trained here quantization-aware through the STE, so it stays ternary; any HF
causal LM with a tokenizer works. Output ``{"model": dir}``.

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
   (0 .. ``eval_levels`` - 1) before / after / control with bootstrap intervals (paired differences); self-prediction
   before / after / control; arithmetic accuracy with vs without the tool runtime; held-out text
   perplexity (retention).

Outputs: ``model/`` and ``control/`` (HF model dirs), ``record.json`` (what the curriculum did),
``metrics.jsonl`` (rows per level, per round and a headline row), ``evaluations.json`` (cache),
``summary.json``. A rerun reuses the finished model dirs (hash-verified) and cached evaluations.

Run alone: ``python -m agentforge.phases.curriculum --model DIR --preset tiny --out DIR``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.artifacts import load_finished_model_dir
from agentforge.phases import PhaseContext, PhaseResult, standalone_main

NAME = "curriculum"
FAMILIES = ["chain_sum", "basic_arithmetic", "kv_recall", "spell_backward", "add_small", "count_bits"]


@dataclass
class Settings:
    """The curriculum's knobs (per-preset values in ``PRESETS``)."""

    families: list = field(default_factory=lambda: list(FAMILIES))
    target_accuracy: float = 0.75  # edge of chaos: the baseline level's accuracy
    levels: int = 10  # curriculum levels from the baseline upward
    hard_wall: float = 0.5  # stop after a level whose validation accuracy ends below this
    assess_items: int = 12  # validation items per family and level (assessment, hard wall)
    questions_per_family: int = 8  # concepts per family in a level
    mastery: int = 3  # unaided successes in a row that master a concept
    max_hints: int = 5
    done_fraction: float = 0.1  # a level is done when at most this share of its questions remain
    max_rounds: int = 15
    steps_per_round: int = 4
    steps_per_level: int = 60
    total_steps: int = 120  # the phase's step budget (the optimizer's schedule spans it)
    batch_size: int = 8
    seq_len: int = 128
    # MuGrokfast preset. On the tiny run "qat" (BitNet's rates) raised held-out text perplexity
    # 6.97 -> 11.24 within 42 steps and "finetune" 6.97 -> 8.41, at the same task accuracy
    optimizer: str = "finetune"
    lr_scale: float = 1.0
    replay_examples: int = 96  # older examples mixed into each round
    tools: bool = True
    tool_items_per_round: int = 8
    tool_new_tokens: int = 40
    self_model_ranges: int = 3  # temperatures per level, spread over the design's ranges
    self_model_prompts: int = 16
    self_model_new_tokens: int = 8
    self_examples_per_round: int = 12
    dream_samples: int = 48
    dream_temperature: float = 1.3
    dream_steps: int = 2
    eval_items: int = 16  # test items per family and level
    eval_levels: int = 5  # levels 0 .. eval_levels-1 are compared before / after / control
    tool_eval_items: int = 4  # test items per arithmetic family and level, with and without tools
    probe_prompts: int = 24  # held-out prompts for self-prediction
    probe_temperatures: list = field(default_factory=lambda: [0.5, 1.0, 1.5])
    text_rows: int = 64  # held-out text rows for perplexity (0: skip)
    control: bool = True
    bootstrap_samples: int = 1000
    eval_batch_size: int = 64


PRESETS: dict[str, Settings] = {
    "micro": Settings(families=["add_small", "kv_recall", "count_bits"], levels=2, hard_wall=0.0, assess_items=4,
                      questions_per_family=3, max_rounds=2, steps_per_round=1, steps_per_level=2, total_steps=4,
                      batch_size=4, seq_len=96, replay_examples=8, tool_items_per_round=2, tool_new_tokens=12,
                      self_model_ranges=2, self_model_prompts=3, self_model_new_tokens=4, self_examples_per_round=2,
                      dream_samples=4, dream_steps=1, eval_items=2, eval_levels=10, tool_eval_items=1, probe_prompts=4,
                      probe_temperatures=[0.7, 1.5], text_rows=8, bootstrap_samples=100, eval_batch_size=32),
    "tiny": Settings(),
    "small": Settings(assess_items=50, questions_per_family=64, max_rounds=30, steps_per_round=8,
                      steps_per_level=400, total_steps=3000, batch_size=32, seq_len=256, replay_examples=512,
                      tool_items_per_round=64, self_model_ranges=5, self_model_prompts=64,
                      self_examples_per_round=64, dream_samples=256, dream_steps=8, eval_items=100, eval_levels=10,
                      tool_eval_items=25, probe_prompts=128, text_rows=256),
}


# ---------------------------------------------------------------------------------------------
# inputs and reuse


def _load(path: Path):
    from agentforge.artifacts import load_model_dir

    model, tokenizer, metadata = load_model_dir(path)
    if tokenizer is None or tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{NAME}: {path} needs a tokenizer with eos and pad tokens (save it with the model)")
    return model, tokenizer, metadata


def _weights_hash(path: Path) -> str:
    """A short hash of a model directory's file hashes (its manifest): the identity of its weights."""
    manifest = json.loads((path / "agentforge.json").read_text())
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def bitlinear_layers(model) -> dict[str, str]:
    """``{qualified name: state}`` of the model's BitLinear layers."""
    from agentforge.nn import BitLinear

    return {name: module.state for name, module in model.named_modules() if isinstance(module, BitLinear)}


def _check_settings(settings: Settings) -> None:
    from agentforge.data import FAMILIES as KNOWN
    from agentforge.optim import PRESETS as OPTIMIZERS

    unknown = [f for f in settings.families if f not in KNOWN]
    if unknown or not settings.families:
        raise ValueError(f"{NAME}.families: unknown or empty {unknown or settings.families}; known: {sorted(KNOWN)}")
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"{NAME}.optimizer: {settings.optimizer!r} is not a MuGrokfast preset ({sorted(OPTIMIZERS)})")
    for name in ("target_accuracy", "hard_wall", "done_fraction"):
        if not 0.0 <= getattr(settings, name) <= 1.0:
            raise ValueError(f"{NAME}.{name} must be in [0, 1], got {getattr(settings, name)}")
    if not 1 <= settings.levels <= 10 or settings.total_steps < 1 or settings.dream_temperature <= 0:
        raise ValueError(f"{NAME}: need 1 <= levels <= 10, total_steps >= 1 and dream_temperature > 0")


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


def build_held_out(tokenizer, settings: Settings, data: dict | None, validation: dict, seed: int) -> HeldOut:
    from agentforge.curriculum import tasks

    test = tasks.held_out(settings.families, "test", settings.eval_items, seed, levels=range(settings.eval_levels))
    tool_items = [item for (family, _), items in test.items() if family in tasks.ARITHMETIC
                  for item in items[:settings.tool_eval_items]]
    # probes: the easiest validation prompts of every family, where samples are still answers
    pool = [item.prompt for family in settings.families for item in validation[(family, 0)]]
    probes = pool[:: max(1, len(pool) // max(settings.probe_prompts, 1))][:settings.probe_prompts]
    return HeldOut(test, tool_items, probes, _held_out_text(tokenizer, settings, data, seed))


def _held_out_text(tokenizer, settings: Settings, data: dict | None, seed: int):
    """The test documents of the Cognate trunk's text split (its recorded data settings), so no
    row was ever trained on; None without a data record or with ``text_rows`` = 0."""
    if not data or settings.text_rows == 0:
        return None
    from agentforge.data import load_text, text_splits

    texts = load_text("stdlib", max_docs=data["text_docs"]) + load_text("pydoc")
    test = text_splits(tokenizer, texts, data["seq_len"], seed=data.get("seed", seed))["test"]
    return test.select(range(min(settings.text_rows, len(test))))


def evaluate(model, tokenizer, held: HeldOut, settings: Settings, seed: int, with_tools: bool) -> dict:
    """Per-item test scores per (family, level), self-prediction, tool accuracy and perplexity."""
    from agentforge.curriculum import measure, selfmodel
    from agentforge.eval import perplexity

    scores = measure.item_scores(model, tokenizer, held.test, batch_size=settings.eval_batch_size)
    report = {"scores": {f"{family}/{level}": values for (family, level), values in scores.items()},
              "self_prediction": selfmodel.self_prediction(model, tokenizer, held.probe_prompts,
                                                           settings.probe_temperatures,
                                                           max_new_tokens=settings.self_model_new_tokens,
                                                           seed=seed + 1, batch_size=settings.eval_batch_size),
              "perplexity": perplexity(model, held.text, batch_size=settings.eval_batch_size)
              if held.text is not None else None}
    if with_tools and held.tool_items:
        direct = measure.item_scores(model, tokenizer, {"tools": held.tool_items}, batch_size=settings.eval_batch_size)
        tooled = measure.tool_accuracy(model, tokenizer, held.tool_items, max_new_tokens=settings.tool_new_tokens,
                                       batch_size=settings.eval_batch_size)
        report["tools"] = {"without": direct["tools"], "with": tooled["scores"], "calls": tooled["calls"],
                           "ok_calls": tooled["ok_calls"], "format_rate": tooled["format_rate"],
                           "examples": tooled["completions"][:5]}
    return report


def _score_table(report: dict) -> dict:
    return {tuple((key.rsplit("/", 1)[0], int(key.rsplit("/", 1)[1]))): v for key, v in report["scores"].items()}


class EvaluationCache:
    """evaluations.json: reports keyed by the model's file hashes and the evaluation settings."""

    def __init__(self, path: Path, settings: Settings, seed: int):
        self.path = path
        self.entries = json.loads(path.read_text()) if path.is_file() else {}
        keys = ("families", "eval_items", "eval_levels", "tool_eval_items", "probe_prompts", "probe_temperatures",
                "text_rows", "self_model_new_tokens", "tool_new_tokens", "assess_items", "target_accuracy")
        self.salt = json.dumps({k: getattr(settings, k) for k in keys} | {"seed": seed}, sort_keys=True)

    def get(self, name: str, weights: str, compute):
        key = f"{name}:{weights}:{hashlib.sha256(self.salt.encode()).hexdigest()[:12]}"
        if key not in self.entries:
            self.entries[key] = compute()
        return self.entries[key]

    def save(self) -> None:
        from agentforge.artifacts import atomic_write_json

        atomic_write_json(self.path, self.entries)


# ---------------------------------------------------------------------------------------------
# the control


def train_control(input_dir: Path, settings: Settings, record: dict, ctx: PhaseContext):
    """Plain fine-tuning with equal compute: the same input, optimizer, schedule, batch and step
    count as the curriculum, on as many random tasks (gold answers) from the levels it visited."""
    import random

    from agentforge.curriculum import loop, rows, tasks

    model, tokenizer, _ = _load(input_dir)
    rng, variants = random.Random(ctx.seed + 1), tasks.VariantSource(ctx.seed + 1)
    visited = record["visited"]
    families = [f for f in settings.families if visited.get(f)]
    items = []
    for _ in range(max(record["examples"], 1)):
        family = rng.choice(families)
        items += variants.take(family, rng.choice(visited[family]))
    trainer = loop.Trainer(model, tokenizer, settings, ctx.out_dir / "train" / "control", ctx.seed + 1,
                           phase=f"{NAME}/control")
    trainer.train([rows.task_example(item.prompt, item.answer) for item in items], max(record["steps"], 1))
    return model, tokenizer, len(items)


# ---------------------------------------------------------------------------------------------
# the phase


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Assess, run the levels, train the control, evaluate on the test split, write the summary."""
    from agentforge.artifacts import atomic_write_json, save_model_dir
    from agentforge.curriculum import loop, measure, tasks
    from agentforge.train import MetricsLogger, barrier

    started = time.perf_counter()
    if "model" not in inputs:
        raise ValueError(f"{NAME}: inputs must name 'model' (a model directory), got {sorted(inputs)}")
    _check_settings(settings)
    input_dir, out = Path(inputs["model"]), ctx.out_dir
    artifacts = {"model": out / "model"}
    if (out / "summary.json").is_file() and load_finished_model_dir(out / "model") is not None:
        ctx.say(f"{NAME}: finished earlier; reusing {out / 'model'}")
        return PhaseResult(artifacts=artifacts, metrics=json.loads((out / "summary.json").read_text())["headline"])
    torch.manual_seed(ctx.seed)
    model, tokenizer, metadata = _load(input_dir)
    layers = bitlinear_layers(model)
    cache = EvaluationCache(out / "evaluations.json", settings, ctx.seed)
    timings = {}

    ctx.say(f"{NAME}: assessing {len(settings.families)} families from level 0 up (validation split)")
    clock = time.perf_counter()
    validation = tasks.HeldOut("validation", settings.assess_items, ctx.seed)
    assessment = cache.get("assessment", _weights_hash(input_dir), lambda: {
        f"{f}/{level}": v for (f, level), v in measure.assess(model, tokenizer, validation, settings.families,
                                                               settings.target_accuracy,
                                                               batch_size=settings.eval_batch_size).items()})
    assessment = _score_table({"scores": assessment})
    baselines = measure.baselines(assessment, settings.families, settings.target_accuracy)
    held = build_held_out(tokenizer, settings, metadata.get("data"), validation, ctx.seed)
    timings["assessment_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    before = cache.get("before", _weights_hash(input_dir),
                       lambda: evaluate(model, tokenizer, held, settings, ctx.seed, with_tools=False))
    timings["evaluate_before_s"] = time.perf_counter() - clock

    done = load_finished_model_dir(out / "model")
    clock = time.perf_counter()
    if done is not None and (out / "record.json").is_file():
        model, record = done[0], json.loads((out / "record.json").read_text())
    else:
        ctx.say(f"{NAME}: levels from baselines {baselines}")
        trainer = loop.Trainer(model, tokenizer, settings, out / "train" / "curriculum", ctx.seed, phase=f"{NAME}/train")
        with MetricsLogger(out, phase=f"{NAME}/level", wandb_mode=ctx.wandb_mode, enabled=ctx.is_main) as level_log, \
                MetricsLogger(out, phase=f"{NAME}/round", wandb_mode="disabled", enabled=ctx.is_main) as round_log:
            level_log.truncate_after(-1)  # rows of an interrupted earlier run describe lost work
            round_log.truncate_after(-1)
            curriculum = loop.Curriculum(model, tokenizer, settings, baselines, validation, held.probe_prompts,
                                         trainer, ctx.seed, level_log=level_log, round_log=round_log, say=ctx.say)
            record = {**curriculum.run().summary(), "dropped_examples": trainer.dropped,
                      "rounds": curriculum.record.rounds, "seconds": time.perf_counter() - clock}
        if bitlinear_layers(model) != layers:
            raise RuntimeError(f"{NAME}: training changed the model's BitLinear layers; refusing to save it")
        if ctx.is_main:
            save_model_dir(model, tokenizer, out / "model", {
                "phase": NAME, "parents": [str(input_dir)], "data": metadata.get("data"),
                "baselines": baselines, "stop_reason": record["stop_reason"], "steps": record["steps"],
                "bitlinear_layers": len(layers)})
            atomic_write_json(out / "record.json", record)
        barrier()
    timings["curriculum_s"] = record["seconds"]
    timings["curriculum_wall_s"] = time.perf_counter() - clock

    control_meta = None
    if settings.control:
        clock = time.perf_counter()
        control_done = load_finished_model_dir(out / "control")
        if control_done is None:
            ctx.say(f"{NAME}: equal-compute control ({record['steps']} steps on {record['examples']} random tasks)")
            control, _, n_tasks = train_control(input_dir, settings, record, ctx)
            if ctx.is_main:
                save_model_dir(control, tokenizer, out / "control", {
                    "phase": NAME, "role": "control", "parents": [str(input_dir)], "data": metadata.get("data"),
                    "steps": record["steps"], "tasks": n_tasks})
            barrier()
        timings["control_s"] = time.perf_counter() - clock
        control_meta = out / "control"

    if not ctx.is_main:
        return PhaseResult(artifacts=artifacts)
    clock = time.perf_counter()
    ctx.say(f"{NAME}: evaluating before / after / control on the test split")
    after = cache.get("after", _weights_hash(out / "model"),
                      lambda: evaluate(model, tokenizer, held, settings, ctx.seed, with_tools=True))
    control_report = None
    if control_meta is not None:
        control_model = _load(control_meta)[0]
        control_report = cache.get("control", _weights_hash(control_meta),
                                   lambda: evaluate(control_model, tokenizer, held, settings, ctx.seed, with_tools=False))
    cache.save()
    timings["evaluate_s"] = time.perf_counter() - clock
    timings["phase_s"] = time.perf_counter() - started
    summary = _summary(settings, assessment, baselines, record, before, after, control_report, layers, timings)
    atomic_write_json(out / "summary.json", summary)
    with MetricsLogger(out, phase=NAME, wandb_mode="disabled") as log:
        log.log(summary["headline"])
    return PhaseResult(artifacts=artifacts, metrics=summary["headline"])


def _summary(settings, assessment, baselines, record, before, after, control, layers, timings) -> dict:
    from agentforge.curriculum import measure

    n, seed = settings.bootstrap_samples, 0
    tables = {name: _score_table(report) for name, report in (("before", before), ("after", after),
                                                               ("control", control)) if report is not None}
    per_level = {name: measure.level_table(t, samples=n, seed=seed) for name, t in tables.items()}
    comparisons = {"after_vs_before": measure.paired_by_level(tables["after"], tables["before"], samples=n, seed=seed)}
    if "control" in tables:
        comparisons["after_vs_control"] = measure.paired_by_level(tables["after"], tables["control"], samples=n,
                                                                  seed=seed)
        comparisons["control_vs_before"] = measure.paired_by_level(tables["control"], tables["before"], samples=n,
                                                                   seed=seed)
    reports = {"before": before, "after": after, "control": control}
    tools = {name: {"without": measure.compare(r["tools"]["with"], r["tools"]["without"], samples=n, seed=seed),
                    **{k: r["tools"][k] for k in ("calls", "ok_calls", "format_rate", "examples")}}
             for name, r in reports.items() if r is not None and "tools" in r}
    self_prediction = {name: r["self_prediction"] for name, r in reports.items() if r is not None}
    perplexity = {name: r["perplexity"] for name, r in reports.items() if r is not None}
    visited = sorted({level for levels in record["visited"].values() for level in levels})
    headline = {
        "levels_completed": len(record["levels"]), "stop_reason": record["stop_reason"], "steps": record["steps"],
        "examples": record["examples"], "baseline_levels": baselines, "visited_levels": visited,
        **{f"{name}/accuracy": comparisons["after_vs_before"]["all"]["a" if name == "after" else "b"]
           for name in ("before", "after")},
        "gain": comparisons["after_vs_before"]["all"]["difference"],
        "gain_ci": comparisons["after_vs_before"]["all"]["ci"],
        **({"control/accuracy": comparisons["after_vs_control"]["all"]["b"],
            "gain_over_control": comparisons["after_vs_control"]["all"]["difference"],
            "gain_over_control_ci": comparisons["after_vs_control"]["all"]["ci"]} if control else {}),
        **{f"{name}/self_prediction": sp["accuracy"] for name, sp in self_prediction.items()},
        **{f"{name}/tool_gain": t["without"]["difference"] for name, t in tools.items()},
        **{f"{name}/perplexity": p for name, p in perplexity.items() if p is not None},
        "phase_seconds": timings["phase_s"], "curriculum_seconds": timings["curriculum_s"],
    }
    return {"settings": dataclasses.asdict(settings), "headline": headline,
            "assessment": {f"{f}/{level}": measure.mean(v) for (f, level), v in assessment.items()},
            "baselines": baselines, "curriculum": {k: v for k, v in record.items() if k != "rounds"},
            "per_level": per_level, "comparisons": comparisons, "tools": tools, "self_prediction": self_prediction,
            "perplexity": perplexity, "bitlinear_layers": len(layers), "timings": timings}


# ---------------------------------------------------------------------------------------------
# report


def figures(phase_dir: Path) -> list:
    """Report figures: held-out accuracy per level before / after / control (95 % bootstrap
    intervals), questions remaining over the rounds of each level, and self-prediction and tool
    accuracy per model. ``[(title, matplotlib Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    out = []
    summary_path = phase_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        fig = Figure(figsize=(7, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for offset, (name, table) in zip((-0.15, 0.0, 0.15), summary["per_level"].items()):
            levels = sorted(table, key=int)
            acc = [table[level]["accuracy"] for level in levels]
            err = [[a - table[level]["ci"][0] for a, level in zip(acc, levels)],
                   [table[level]["ci"][1] - a for a, level in zip(acc, levels)]]
            ax.errorbar([int(level) + offset for level in levels], acc, yerr=err, fmt="o-", capsize=2, label=name)
        for level in summary["headline"]["visited_levels"]:
            ax.axvspan(level - 0.45, level + 0.45, color="0.9", zorder=0)
        ax.set_xlabel("difficulty level (shaded: trained by the curriculum)")
        ax.set_ylabel("held-out test accuracy")
        ax.legend(title="model", fontsize="small")
        out.append(("Curriculum: held-out accuracy per level, before / after / control", fig, [summary_path]))
    rounds = read_metrics(phase_dir, phase=f"{NAME}/round")
    if rounds:
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.add_subplot()
        for level in sorted({r["level"] for r in rounds}):
            mine = [r for r in rounds if r["level"] == level]
            ax.plot([r["round"] for r in mine], [r["remaining"] for r in mine], "o-", label=f"level {level}")
        ax.set_xlabel("round")
        ax.set_ylabel("questions remaining")
        ax.legend(fontsize="small")
        out.append(("Curriculum: questions remaining over time", fig, [phase_dir / "metrics.jsonl"]))
    if summary_path.is_file():
        fig = Figure(figsize=(7, 3), layout="constrained")
        left, right = fig.subplots(1, 2)
        names = list(summary["self_prediction"])
        left.bar(names, [summary["self_prediction"][n]["accuracy"] for n in names], color="tab:purple")
        left.set_ylabel("self-prediction accuracy")
        tool_names = list(summary["tools"])
        for i, key in enumerate(("b", "a")):
            right.bar([j + (i - 0.5) * 0.4 for j in range(len(tool_names))],
                      [summary["tools"][n]["without"][key] for n in tool_names], 0.4,
                      label=("without tools", "with tools")[i])
        right.set_xticks(range(len(tool_names)), tool_names)
        right.set_ylabel("arithmetic accuracy (test)")
        right.legend(fontsize="small")
        out.append(("Curriculum: self-prediction and tool use", fig, [summary_path]))
    return out


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {'model': 'input model directory (BitNet latent)'}, argv)


if __name__ == "__main__":
    sys.exit(main())
