"""Phase 2, EvoMerge: evolve a merge recipe for the Cognate siblings and keep the champion.

Inputs: ``siblings`` (the models to merge) and ``trunk`` (their shared ancestor: the base of the
task-vector methods). Any HF causal LMs of one architecture work; the tokenizer comes from the
trunk's directory.

Fitness is measured on held-out data, never estimated, and nothing timed enters it:

    fitness = w_accuracy · mean domain accuracy − w_answer_nll · mean answer NLL
              − w_perplexity · log(text perplexity)
              − w_compute · log(FLOPs per token ÷ parents' mean)
              − w_memory · log(parameter bytes ÷ parents' mean)

FLOPs per token are counted from the merged model (``agentforge.merge.compute``: 2 × the
weights of every matrix a token passes through, a recurrent stack counted as often as its
config lets it run), so two runs with the same seed pick the same champion and write the same
bytes. The finalists' generation tokens/s is reported, never selected on.

Selection sees only the *validation* split (tasks) and validation text rows. The champion, the
parents and the best recipe of every method are then scored on the *test* split, which
selection never saw; the phase reports the champion's margin over the best parent there, and
the per-method table is the ablation that shows what evolution added.

Steps: ``measure_parents`` (the parents on the validation split); ``generation_NN_<digest of
its recipes>`` (that generation's new candidates, spread over the ranks under torchrun), so a
rerun replays the finished generations without evaluating them again; ``champion`` (the model);
``test_split`` (the champion and the parents on the test split); ``ablation``.

Outputs: ``champion/`` (HF model directory; its agentforge.json holds the recipe, the siblings
as parents and the trunk as ``base``), ``metrics.jsonl`` (every recipe evaluated with its
metrics and fitness, one row per generation), ``summary.json``.

Run alone: ``python -m agentforge.phases.evomerge --siblings A B C --trunk T --preset tiny --out DIR``.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass

import torch

from agentforge.errors import ConfigError
from agentforge.merge import METHODS, evolve
from agentforge.runtime import Built, Effect, Input, PhaseResult, PhaseRun, PhaseSpec, model_dir, standalone_main
from agentforge.settings import Checked, setting


@dataclass
class Settings(Checked):
    """The search, the fitness weights and the held-out sets (per-preset values in ``PRESETS``)."""

    evolution: evolve.EvolutionSettings = setting(evolve.EvolutionSettings, doc="the evolutionary search")
    methods: list[str] = setting(list(METHODS), choices=METHODS, length="[1, 8]", doc="merge methods to search")
    w_accuracy: float = setting(1.0, "[0, 1000]", doc="fitness weight of the mean domain accuracy")
    w_answer_nll: float = setting(0.5, "[0, 1000]", doc="fitness weight of the mean answer NLL")
    w_perplexity: float = setting(0.5, "[0, 1000]", doc="fitness weight of log text perplexity")
    w_compute: float = setting(0.05, "[0, 1000]", doc="fitness weight of log FLOPs per token ÷ parents' mean")
    w_memory: float = setting(0.05, "[0, 1000]", doc="fitness weight of log parameter bytes ÷ parents' mean")
    selection_items: int = setting(25, "[1, 100000]", doc="validation items per family and level (selection)")
    selection_text_rows: int = setting(96, "[1, 1000000]", doc="validation text rows (selection)")
    final_items: int = setting(100, "[1, 100000]", doc="test items per family and level (final comparison)")
    final_text_rows: int = setting(256, "[1, 1000000]", doc="test text rows (final comparison)")
    eval_batch_size: int = setting(64, "[1, 65536]")
    ablation: bool = setting(
        True,
        doc="score each method alone on the test split (its default recipe and its best "
        "found: up to two test evaluations per method)",
    )

    def check(self) -> None:
        if len(set(self.methods)) != len(self.methods):
            self.fail("methods", "must name each method once")


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        evolution=evolve.EvolutionSettings(generations=2, population=4, elites=1, cma_per_generation=0),
        methods=["linear", "ties", "dfs"],
        selection_items=4,
        selection_text_rows=16,
        final_items=6,
        final_text_rows=16,
        eval_batch_size=32,
    ),
    "tiny": Settings(),
    "small": Settings(
        evolution=evolve.EvolutionSettings(generations=50, population=16, elites=3, cma_per_generation=4, patience=8),
        selection_items=50,
        selection_text_rows=256,
        final_items=100,
        final_text_rows=512,
    ),
    # a candidate's selection costs ~25 s here; the per-method ablation (16 test evaluations) is left out
    "smol": Settings(
        evolution=evolve.EvolutionSettings(generations=2, population=4, elites=1, cma_per_generation=0, patience=2),
        methods=["linear", "task_arithmetic", "ties", "dare_ties", "slerp"],
        selection_items=4,
        selection_text_rows=16,
        final_items=12,
        final_text_rows=32,
        eval_batch_size=8,
        ablation=False,
    ),
}

COSTS = ("flops_per_token", "parameter_bytes")  # counted, so the fitness terms built on them are exact


# ---------------------------------------------------------------------------------------------
# held-out data, measurements, fitness


def held_out_sets(suite, settings: Settings) -> tuple:
    """(selection, final): the validation split that selection sees, the test split it never sees."""
    return (
        suite.held_out("validation", settings.selection_items, settings.selection_text_rows),
        suite.held_out("test", settings.final_items, settings.final_text_rows),
    )


def measure(suite, model, held, batch_size: int) -> dict:
    """The suite's measurements (perplexity; accuracy and answer NLL per domain and their means)
    and the counted costs: parameter bytes and FLOPs per token."""
    from agentforge.eval import parameter_bytes
    from agentforge.merge.compute import flops_per_token

    report = suite.measure(model, held, batch_size=batch_size)
    return {**report, "parameter_bytes": parameter_bytes(model), "flops_per_token": flops_per_token(model)}


def fitness(report: dict, reference: dict, settings: Settings) -> float:
    """The weighted fitness of a measured model; compute and memory relative to ``reference``."""
    return (
        settings.w_accuracy * report["accuracy_mean"]
        - settings.w_answer_nll * report["answer_nll_mean"]
        - settings.w_perplexity * math.log(report["perplexity"])
        - settings.w_compute * math.log(report["flops_per_token"] / reference["flops_per_token"])
        - settings.w_memory * math.log(report["parameter_bytes"] / reference["parameter_bytes"])
    )


def reference_costs(reports: list[dict]) -> dict:
    """The parents' mean costs, which the compute and memory terms are relative to."""
    return {key: sum(r[key] for r in reports) / len(reports) for key in COSTS}


def flat(report: dict) -> dict:
    row = {k: v for k, v in report.items() if not isinstance(v, dict)}
    for group in ("accuracy", "answer_nll"):
        row.update({f"{group}/{d}": v for d, v in report[group].items()})
    return row


# ---------------------------------------------------------------------------------------------
# merging and searching


def build(recipe: dict, parents: list, base):
    """The merged model a recipe describes."""
    from agentforge.merge import merged_model

    method, kwargs = evolve.merge_arguments(recipe)
    sources = [parents[i] for i in evolve.recipe_sources(recipe, len(parents))]
    return merged_model(method, sources, base, **kwargs).eval()


def search_space(parents: list, settings: Settings) -> evolve.SearchSpace:
    from agentforge.merge import dfs_stack_of
    from agentforge.merge.layers import layer_slots, layer_stacks

    stacks = layer_stacks(parents[0])
    return evolve.SearchSpace(
        n_sources=len(parents),
        layer_slots=len(layer_slots(stacks)),
        stack_layers=stacks[dfs_stack_of(parents[0])],
        methods=tuple(settings.methods),
    )


class Candidates:
    """The search's ``evaluate(recipes) -> fitness values``. Generation g's new recipes are merged
    and measured on the selection set in one step, ``generation_<g>_<digest of the recipes>``:
    rank r measures recipes r, r + world, ... and every rank gets every report; a rerun reads a
    finished generation back instead. One row per candidate is kept for metrics.jsonl."""

    def __init__(self, p: PhaseRun, parents: list, base, suite, selection, reference: dict):
        self.p, self.parents, self.base, self.suite = p, parents, base, suite
        self.selection, self.reference = selection, reference
        self.generation = 0
        self.rows: list[dict] = []
        self.peak_rss_bytes: list[int] = []

    def __call__(self, recipes: list[dict]) -> list[float]:
        hashes = [evolve.recipe_hash(r) for r in recipes]
        digest = hashlib.sha1(" ".join(hashes).encode()).hexdigest()[:8]
        done = self.p.step(
            f"generation_{self.generation:02d}_{digest}", lambda: self._measure(recipes), everywhere=True
        )
        self.peak_rss_bytes.append(done["peak_rss_bytes"])
        values = [fitness(report, self.reference, self.p.settings) for report in done["reports"]]
        self.rows += [
            {"generation": self.generation, "recipe": recipe, "recipe_hash": h, "fitness": value, **flat(report)}
            for recipe, h, value, report in zip(recipes, hashes, values, done["reports"])
        ]
        return values

    def _measure(self, recipes: list[dict]) -> dict:
        from agentforge.eval import peak_memory_bytes
        from agentforge.eval.speed import release_freed_memory
        from agentforge.train import distributed

        mine = list(enumerate(recipes))[distributed.rank() :: distributed.world_size()]

        def measure_one(recipe: dict) -> dict:
            report = measure(
                self.suite, build(recipe, self.parents, self.base), self.selection, self.p.settings.eval_batch_size
            )
            release_freed_memory()  # the candidate is gone; keep its fragments from adding up
            return report

        def measure_mine() -> list:
            return [
                (i, measure_one(recipe)) for i, recipe in self.p.bar(mine, f"generation {self.generation} candidates")
            ]

        measured, peak = peak_memory_bytes(measure_mine, device="cpu")
        parts = distributed.all_gather((measured, peak))
        reports = dict(pair for part, _ in parts for pair in part)
        return {"reports": [reports[i] for i in range(len(recipes))], "peak_rss_bytes": max(peak for _, peak in parts)}

    def generation_done(self, row: dict) -> None:
        self.p.say(f"generation {row['generation']}: best {row['best_fitness']:.4f}, mean {row['mean_fitness']:.4f}")
        self.generation += 1


def ablation(
    p: PhaseRun,
    evolution: evolve.Evolution,
    space: evolve.SearchSpace,
    parents: list,
    base,
    suite,
    final,
    reference: dict,
) -> dict:
    """Each method alone: its default recipe and the best recipe of it that the search found,
    both scored on the test split."""
    scored: dict[str, float] = {}  # a recipe that is both a method's default and its best is scored once

    def final_fitness(recipe: dict) -> float:
        key = evolve.recipe_hash(recipe)
        if key not in scored:
            report = measure(suite, build(recipe, parents, base), final, p.settings.eval_batch_size)
            scored[key] = fitness(report, reference, p.settings)
        return scored[key]

    table = {}
    for method in p.bar(space.methods, "ablation"):
        default, best = space.default(method), evolution.best_of(method) or space.default(method)
        table[method] = {
            "default_final_fitness": final_fitness(default),
            "best_recipe": best,
            "best_selection_fitness": evolution.cache.get(evolve.recipe_hash(best)),
            "best_final_fitness": final_fitness(best),
            "best_is_default": evolve.recipe_hash(best) == evolve.recipe_hash(default),
        }
    return table


def final_reports(p: PhaseRun, champion, parents: list, suite, final) -> dict:
    """The champion and each parent on the test split, with generation tokens/s (reported only)."""
    from agentforge.eval import tokens_per_second

    models = {"champion": champion, **{f"parent_{i}": parent for i, parent in enumerate(parents)}}
    return {
        name: {
            **measure(suite, model, final, p.settings.eval_batch_size),
            "tokens_per_s": tokens_per_second(model, prompt_len=16, new_tokens=16),
        }
        for name, model in p.bar(models.items(), "test split", total=len(models))
    }


# ---------------------------------------------------------------------------------------------
# the phase


def run(p: PhaseRun) -> PhaseResult:
    """Evolve, pick the champion by selection fitness, save it, compare it with its parents and
    each method's best on the test split."""
    from agentforge.train import distributed

    settings = p.settings
    torch.manual_seed(p.seed)
    trunk = p.load("trunk")
    if trunk.tokenizer is None:
        raise ConfigError(f"evomerge: {trunk.path} has no tokenizer; the phase needs the trunk's to build its data")
    base, tokenizer = trunk.model.eval(), trunk.tokenizer
    parents = [p.load("siblings", i).model.eval() for i in range(len(p.inputs["siblings"]))]
    suite = p.suite(tokenizer)
    selection, final = held_out_sets(suite, settings)
    reference = reference_costs(
        p.step("measure_parents", lambda: [measure(suite, m, selection, settings.eval_batch_size) for m in parents])
    )
    space = search_space(parents, settings)
    candidates = Candidates(p, parents, base, suite, selection, reference)
    evolution = evolve.Evolution(
        space, settings.evolution, candidates, seed=p.seed, on_generation=candidates.generation_done
    )
    result = evolution.run()
    p.say(f"champion {evolve.describe(result.best)}")

    champion = p.model_step(
        "champion",
        lambda: Built(
            build(result.best, parents, base),
            tokenizer,
            {
                "role": "champion",
                "recipe": result.best,
                "parents": list(p.inputs["siblings"]),
                "base": p.parent(p.inputs["trunk"], p.out_dir / "champion"),
            },
        ),
    )
    finals = p.step("test_split", lambda: final_reports(p, champion.model, parents, suite, final))
    test_reference = reference_costs([finals[f"parent_{i}"] for i in range(len(parents))])
    table = (
        p.step("ablation", lambda: ablation(p, evolution, space, parents, base, suite, final, test_reference))
        if settings.ablation
        else {}
    )
    summary = summarise(settings, result, finals, test_reference, table)
    summary.update(
        evaluations=len(evolution.cache),
        search_peak_rss_bytes=max(candidates.peak_rss_bytes),
        world_size=distributed.world_size(),
    )
    return p.finish(
        {"champion": champion.path},
        headline(summary),
        summary,
        rows={"candidate": candidates.rows, "generation": result.generations},
        effects=effects(summary, p.seed),
    )


def effects(summary: dict, seed: int) -> list[Effect]:
    """The champion against the best parent (by test fitness) on the test split: accuracy over
    the same items and the perplexity ratio over the same text rows (paired, 95 % intervals)."""
    from agentforge.eval.stats import paired_difference, perplexity_ratio

    champion, parent = summary["final_reports"]["champion"], summary["final_reports"][summary["best_parent"]]
    scores = lambda report: [s for domain in report["scores"].values() for s in domain]
    control = f"the best parent ({summary['best_parent']})"
    return [
        Effect.of(
            "held-out task accuracy, champion", control, paired_difference(scores(champion), scores(parent), seed=seed)
        ),
        Effect.of(
            "text perplexity ratio, champion",
            control,
            perplexity_ratio(
                champion["text_rows"]["nll"], parent["text_rows"]["nll"], parent["text_rows"]["tokens"], seed=seed
            ),
            better="lower",
            neutral=1.0,
        ),
    ]


def summarise(settings: Settings, result: evolve.EvolutionResult, finals: dict, reference: dict, table: dict) -> dict:
    """The test-split comparison: each model's fitness (costs relative to the parents' mean),
    the champion's margin over the best parent, and the search's outcome."""
    final_fitness = {name: fitness(report, reference, settings) for name, report in finals.items()}
    parents = [n for n in final_fitness if n.startswith("parent_")]
    best_parent = max(parents, key=lambda n: final_fitness[n])
    return {
        "champion_recipe": result.best,
        "champion_description": evolve.describe(result.best),
        "champion_selection_fitness": result.best_fitness,
        "final_fitness": final_fitness,
        "final_reports": finals,
        "best_parent": best_parent,
        "margin_over_best_parent": final_fitness["champion"] - final_fitness[best_parent],
        "beats_every_parent": all(final_fitness["champion"] > final_fitness[n] for n in parents),
        "ablation": table,
        "generations": len(result.generations),
        "stop_reason": result.stop_reason,
    }


def headline(summary: dict) -> dict:
    fitness_of = summary["final_fitness"]
    return {
        "champion_method": summary["champion_recipe"]["method"],
        "champion_final_fitness": fitness_of["champion"],
        "best_parent_final_fitness": fitness_of[summary["best_parent"]],
        "margin_over_best_parent": summary["margin_over_best_parent"],
        "generations": summary["generations"],
        "evaluations": summary["evaluations"],
    }


SPEC = PhaseSpec(
    number=2,
    name="evomerge",
    summary="evolve a merge recipe of the siblings (GA + CMA-ES), keep the champion",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={
        "siblings": Input("cognate.siblings", "the sibling model directories to merge", many=True),
        "trunk": Input("cognate.trunk", "their shared trunk (the base of the task vectors, and the tokenizer)"),
    },
    provides={"champion": model_dir},
    figures="agentforge.figures.evomerge",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
