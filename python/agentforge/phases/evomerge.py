"""Phase 2, EvoMerge: evolve a merge recipe for the Cognate siblings and keep the champion.

Inputs: ``siblings`` (the models to merge) and ``trunk`` (their shared ancestor: the base of the
task-vector methods). Any HF causal LMs of one architecture work; the tokenizer comes from the
trunk's directory.

Fitness is measured on held-out data, never estimated:

    fitness = w_accuracy · mean domain accuracy − w_answer_nll · mean answer NLL
              − w_perplexity · log(text perplexity) + w_speed · log(tokens/s ÷ parents' mean)
              − w_memory · log(parameter bytes ÷ parents' mean)

Selection sees only the *validation* split (tasks) and validation text rows. The champion, the
parents and the best recipe of every method are then scored on the *test* split, which
selection never saw; the phase reports the champion's margin over the best parent there, and
the per-method table is the ablation that shows what evolution added.

Outputs: ``champion/`` (HF model directory; its recipe in agentforge.json), ``metrics.jsonl``
(every recipe evaluated with its metrics and fitness, one row per generation), ``summary.json``.
A rerun replays the search from the recipes already in metrics.jsonl without re-evaluating them.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.merge import evolve
from agentforge.phases import PhaseContext, PhaseResult, standalone_main

NAME = "evomerge"


@dataclass
class Settings:
    population: int = 8
    generations: int = 5
    elites: int = 2
    mutation_rate: float = 0.3
    crossover_rate: float = 0.5
    cma_per_generation: int = 2
    patience: int = 3
    min_delta: float = 0.001
    methods: list = field(default_factory=lambda: list(evolve.METHODS))
    # fitness weights
    w_accuracy: float = 1.0
    w_answer_nll: float = 0.5
    w_perplexity: float = 0.5
    w_speed: float = 0.05
    w_memory: float = 0.05
    # held-out data (the trunk's own data settings, from its agentforge.json, take precedence)
    seq_len: int = 64
    text_docs: int = 300
    task_levels: list = field(default_factory=lambda: [0, 1])
    selection_items: int = 25  # validation items per family and level
    selection_text_rows: int = 96
    final_items: int = 100  # test items per family and level
    final_text_rows: int = 256
    eval_batch_size: int = 64


PRESETS: dict[str, Settings] = {
    "micro": Settings(generations=2, population=4, elites=1, cma_per_generation=0, methods=["linear", "ties", "dfs"],
                      seq_len=48, text_docs=20, task_levels=[0], selection_items=4, selection_text_rows=16,
                      final_items=6, final_text_rows=16, eval_batch_size=32),
    "tiny": Settings(),
    "small": Settings(generations=50, population=16, elites=3, cma_per_generation=4, patience=8, seq_len=256,
                      text_docs=1500, task_levels=[0, 1, 2, 3], selection_items=50, selection_text_rows=256,
                      final_items=100, final_text_rows=512),
}


# ---------------------------------------------------------------------------------------------
# held-out data


@dataclass
class HeldOut:
    """One evaluation set: text rows, task items per domain, and those items packed for NLL."""

    text: object
    items: dict
    rows: dict


def _data_settings(settings: Settings, trunk_metadata: dict) -> dict:
    """The data the parents were trained on decides which documents are held out: use the trunk's
    recorded settings when it has them."""
    own = {"seq_len": settings.seq_len, "text_docs": settings.text_docs, "task_levels": settings.task_levels}
    return {**own, **{k: v for k, v in trunk_metadata.get("data", {}).items() if k in own or k == "seed"}}


def build_held_out(tokenizer, settings: Settings, data: dict, seed: int) -> tuple[HeldOut, HeldOut]:
    """(selection, final): validation and test splits of the text documents and the task items."""
    from agentforge.data import DOMAINS, load_text, make_split, pack_tasks, text_splits

    texts = load_text("stdlib", max_docs=data["text_docs"]) + load_text("pydoc")
    splits = text_splits(tokenizer, texts, data["seq_len"], seed=data.get("seed", seed))

    def held_out(split: str, n_items: int, n_rows: int) -> HeldOut:
        text = splits[split].select(range(min(n_rows, len(splits[split]))))
        items = {d: [it for f in fams for level in data["task_levels"]
                     for it in make_split(f, "validation" if split == "validation" else "test", n_items,
                                          seed=seed, level=level)]
                 for d, fams in DOMAINS.items()}
        rows = {d: pack_tasks(tokenizer, its, data["seq_len"], seed=seed) for d, its in items.items()}
        return HeldOut(text, items, rows)

    return (held_out("validation", settings.selection_items, settings.selection_text_rows),
            held_out("test", settings.final_items, settings.final_text_rows))


# ---------------------------------------------------------------------------------------------
# measuring a model


def measure(model, tokenizer, held_out: HeldOut, batch_size: int) -> dict:
    """Perplexity and forward tokens/s on the text, accuracy and answer NLL per domain, bytes."""
    from agentforge.data import score
    from agentforge.eval import parameter_bytes, perplexity, task_accuracy

    started = time.perf_counter()
    text_perplexity = perplexity(model, held_out.text, batch_size=batch_size)
    seconds = time.perf_counter() - started
    report = {"perplexity": text_perplexity,
              "tokens_per_s": len(held_out.text) * len(held_out.text[0]["input_ids"]) / max(seconds, 1e-9),
              "parameter_bytes": parameter_bytes(model), "accuracy": {}, "answer_nll": {}}
    for domain, items in held_out.items.items():
        budget = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1
        report["accuracy"][domain] = task_accuracy(model, tokenizer, items, score=score, max_new_tokens=budget,
                                                   batch_size=batch_size).accuracy
        report["answer_nll"][domain] = math.log(perplexity(model, held_out.rows[domain], batch_size=batch_size))
    return report


def fitness(report: dict, reference: dict, settings: Settings) -> float:
    """The weighted fitness of a measured model; speed and memory relative to ``reference``."""
    accuracy = sum(report["accuracy"].values()) / len(report["accuracy"])
    nll = sum(report["answer_nll"].values()) / len(report["answer_nll"])
    return (settings.w_accuracy * accuracy - settings.w_answer_nll * nll
            - settings.w_perplexity * math.log(report["perplexity"])
            + settings.w_speed * math.log(report["tokens_per_s"] / reference["tokens_per_s"])
            - settings.w_memory * math.log(report["parameter_bytes"] / reference["parameter_bytes"]))


def _reference(reports: list[dict]) -> dict:
    return {key: sum(r[key] for r in reports) / len(reports) for key in ("tokens_per_s", "parameter_bytes")}


# ---------------------------------------------------------------------------------------------
# the phase


def _load(path: Path):
    from agentforge.artifacts import load_model_dir

    model, tokenizer, metadata = load_model_dir(path)
    return model.eval(), tokenizer, metadata


def build(recipe: dict, parents: list, base):
    """The merged model a recipe describes."""
    from agentforge.merge import merged_model

    method, kwargs = evolve.merge_arguments(recipe)
    sources = [parents[i] for i in evolve.recipe_sources(recipe, len(parents))]
    return merged_model(method, sources, base, **kwargs).eval()


def search_space(parents: list, settings: Settings) -> evolve.SearchSpace:
    from agentforge.merge import dfs_stack_of
    from agentforge.merge.layers import layer_slots, layer_stacks

    state = parents[0].state_dict()
    return evolve.SearchSpace(n_sources=len(parents), layer_slots=len(layer_slots(state)),
                              stack_layers=layer_stacks(state)[dfs_stack_of(state)], methods=tuple(settings.methods))


def _cached_history(log_path: Path) -> dict:
    """recipe hash -> fitness for every recipe a previous (interrupted) run already evaluated."""
    from agentforge.train import read_metrics

    return {row["recipe_hash"]: row["fitness"] for row in read_metrics(log_path, phase=f"{NAME}/candidate")}


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Evolve, pick the champion by selection fitness, compare it with its parents on the test
    split, save it, and write the history and summary. Under torchrun every rank takes its share
    of each generation's candidates; rank 0 alone measures the finalists and writes."""
    from agentforge.eval import peak_memory_bytes
    from agentforge.train import MetricsLogger, distributed

    started = time.perf_counter()
    distributed.maybe_init()
    torch.manual_seed(ctx.seed)
    base, tokenizer, trunk_meta = _load(Path(inputs["trunk"]))
    parents = [_load(Path(p))[0] for p in inputs["siblings"]]
    data = _data_settings(settings, trunk_meta)
    ctx.say(f"{NAME}: held-out data (selection: validation split, final: test split)")
    selection, final = build_held_out(tokenizer, settings, data, ctx.seed)
    # one reference for every rank, so that all ranks rank the candidates alike
    parent_reports = distributed.broadcast_from_main(
        [measure(p, tokenizer, selection, settings.eval_batch_size) for p in parents] if distributed.is_main() else None)
    reference = _reference(parent_reports)
    space = search_space(parents, settings)
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/candidate", wandb_mode=ctx.wandb_mode,
                       enabled=distributed.is_main()) as log:
        evaluate = _candidate_evaluator(parents, base, tokenizer, selection, reference, settings, log)
        evolution = evolve.Evolution(space, _evolution_settings(settings, ctx.seed), evaluate,
                                     cache=_cached_history(ctx.out_dir),
                                     on_generation=lambda row: ctx.say(
                                         f"{NAME}: generation {row['generation']}: best {row['best_fitness']:.4f}, "
                                         f"mean {row['mean_fitness']:.4f}"))
        result, peak = peak_memory_bytes(evolution.run, device="cpu")
    headline = {}
    if distributed.is_main():
        headline = _finish(inputs, settings, ctx, evolution, result, space, parents, base, tokenizer, final, data,
                           {"search_peak_rss_bytes": peak, "world_size": distributed.world_size(),
                            "search_seconds": time.perf_counter() - started})
    distributed.barrier()
    return PhaseResult(artifacts={"champion": ctx.out_dir / "champion"}, metrics=headline)


def _candidate_evaluator(parents, base, tokenizer, selection, reference, settings, log):
    """``evaluate(recipes) -> fitness values``: rank r measures recipes r, r + world, ...; the
    reports are gathered so every rank returns every value, and each candidate is logged."""
    from agentforge.train import distributed

    def evaluate(recipes: list[dict]) -> list[float]:
        rank, world = distributed.rank(), distributed.world_size()
        mine = [(i, measure(build(r, parents, base), tokenizer, selection, settings.eval_batch_size))
                for i, r in enumerate(recipes) if i % world == rank]
        reports = dict(pair for part in distributed.all_gather(mine) for pair in part)
        values = [fitness(reports[i], reference, settings) for i in range(len(recipes))]
        for i, (recipe, value) in enumerate(zip(recipes, values)):
            log.log({"recipe": recipe, "recipe_hash": evolve.recipe_hash(recipe), "fitness": value, **_flat(reports[i])})
        return values

    return evaluate


def _finish(inputs, settings, ctx, evolution, result, space, parents, base, tokenizer, final, data, extra) -> dict:
    """Rank 0: score the champion, the parents and each method's best on the test split; save the
    champion; write the generation rows, summary.json and the headline row."""
    from agentforge.artifacts import atomic_write_json, save_model_dir
    from agentforge.train import MetricsLogger

    finish_started = time.perf_counter()
    # the candidate rows went to W&B already; these summaries live in metrics.jsonl
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/generation", wandb_mode="disabled") as log:
        for row in result.generations:
            log.log(row, step=row["generation"])
    ctx.say(f"{NAME}: champion {result.best['method']}; scoring it, the parents and each method's best on the test split")
    champion = build(result.best, parents, base)
    final_reports = {"champion": measure(champion, tokenizer, final, settings.eval_batch_size)}
    for i, parent in enumerate(parents):
        final_reports[f"parent_{i}"] = measure(parent, tokenizer, final, settings.eval_batch_size)
    reference = _reference([final_reports[f"parent_{i}"] for i in range(len(parents))])
    final_fitness = {name: fitness(r, reference, settings) for name, r in final_reports.items()}
    best_parent = max((n for n in final_fitness if n.startswith("parent_")), key=final_fitness.get)
    summary = {
        "settings": dataclasses.asdict(settings), "data": data,
        "champion_recipe": result.best, "champion_selection_fitness": result.best_fitness,
        "final_fitness": final_fitness, "final_reports": final_reports,
        "margin_over_best_parent": final_fitness["champion"] - final_fitness[best_parent], "best_parent": best_parent,
        "beats_every_parent": all(final_fitness["champion"] > v for n, v in final_fitness.items() if n != "champion"),
        "ablation": _ablation(evolution, space, parents, base, tokenizer, final, reference, settings),
        "generations": len(result.generations), "stop_reason": result.stop_reason,
        "evaluations": len(evolution.cache), **extra,
    }
    summary["phase_seconds"] = extra["search_seconds"] + time.perf_counter() - finish_started  # search + test scoring
    save_model_dir(champion, tokenizer, ctx.out_dir / "champion",
                   {"phase": NAME, "recipe": result.best, "parents": [str(p) for p in inputs["siblings"]],
                    "base": str(inputs["trunk"]), "final_fitness": final_fitness["champion"], "data": data})
    atomic_write_json(ctx.out_dir / "summary.json", summary)
    headline = {"champion_method": result.best["method"], "champion_final_fitness": final_fitness["champion"],
                "best_parent_final_fitness": final_fitness[best_parent],
                "margin_over_best_parent": summary["margin_over_best_parent"],
                "generations": len(result.generations), "evaluations": summary["evaluations"],
                "phase_seconds": summary["phase_seconds"]}
    with MetricsLogger(ctx.out_dir, phase=NAME, wandb_mode="disabled") as log:
        log.log(headline)
    return headline


def _evolution_settings(settings: Settings, seed: int) -> evolve.EvolutionSettings:
    names = {f.name for f in dataclasses.fields(evolve.EvolutionSettings)}
    return evolve.EvolutionSettings(**{k: v for k, v in dataclasses.asdict(settings).items() if k in names}, seed=seed)


def _ablation(evolution, space, parents, base, tokenizer, final, reference, settings) -> dict:
    """Each method alone: its default recipe and the best recipe of it that the search found,
    both scored on the test split."""
    def final_fitness(recipe):
        return fitness(measure(build(recipe, parents, base), tokenizer, final, settings.eval_batch_size),
                       reference, settings)

    table = {}
    for method in space.methods:
        default, best = space.default(method), evolution.best_of(method) or space.default(method)
        table[method] = {"default_final_fitness": final_fitness(default), "best_recipe": best,
                         "best_selection_fitness": evolution.cache.get(evolve.recipe_hash(best)),
                         "best_final_fitness": final_fitness(best)}
    return table


def figures(phase_dir: Path) -> list:
    """Report figures: best and mean selection fitness per generation, and the champion's recipe
    against the best recipe of every method on the test split. ``[(title, Figure, [source])]``."""
    import json

    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    rows = read_metrics(phase_dir, phase=f"{NAME}/generation")
    out = []
    if rows:
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.plot([r["generation"] for r in rows], [r["best_fitness"] for r in rows], "o-", label="best so far")
        ax.plot([r["generation"] for r in rows], [r["mean_fitness"] for r in rows], "s--", label="population mean")
        ax.set_xlabel("generation")
        ax.set_ylabel("selection fitness (validation split)")
        ax.legend()
        out.append(("EvoMerge fitness per generation", fig, [phase_dir / "metrics.jsonl"]))
    summary_path = phase_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        methods = list(summary["ablation"])
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        ax.bar(methods, [summary["ablation"][m]["best_final_fitness"] for m in methods], color="tab:blue",
               label="best recipe of the method")
        ax.axhline(summary["final_fitness"]["champion"], color="tab:red", label="champion")
        ax.axhline(summary["final_fitness"][summary["best_parent"]], color="k", ls=":", label="best parent")
        ax.set_ylabel("fitness on the test split")
        ax.set_title(f"champion: {json.dumps(summary['champion_recipe'])[:90]}", fontsize="small")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize="small")
        out.append(("EvoMerge: each method's best recipe vs the champion (test split)", fig, [summary_path]))
    return out


def _flat(report: dict) -> dict:
    row = {k: v for k, v in report.items() if not isinstance(v, dict)}
    for group in ("accuracy", "answer_nll"):
        row.update({f"{group}/{d}": v for d, v in report[group].items()})
    return row


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {"siblings": "the three Cognate sibling model directories",
                                  "trunk": "the shared trunk (base of the task vectors)"}, argv)


if __name__ == "__main__":
    sys.exit(main())
