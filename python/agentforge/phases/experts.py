"""Phase 7, Experts: Transformer²-style singular-value experts, discovered and mixed by measurement.

Input ``{"model": dir}`` (in the pipeline the baked model, BitLinear layers in latent state; any HF
causal LM works). Steps, each measured on the model itself:

1. SVD of every adapted weight (all linear layers but the LM head), once.
2. Discovery (``agentforge.experts.discovery``): validation accuracy per unit (task family ×
   level), the learning zone, gradient similarity at z = 1, N experts by clustering.
3. Each expert's z trained on the training split of its units: answer cross-entropy (and,
   if ``rl_steps``, REINFORCE on verified rewards), both with a KL penalty to the base model.
4. Router (pass one) trained on training prompts of every unit: class = the unit's expert, or
   ``base`` for units outside the learning zone.
5. Mixture search: per router class, CMA-ES over α on the validation items the router sends to
   that class, every candidate measured (accuracy, latency, memory).
6. Final comparison on the *test* split, which no step above saw: per-unit and per-domain accuracy
   of the base, of each expert alone and of the two-pass model, with bootstrap intervals and
   paired gains; held-out text perplexity of each (the KL penalty's retention control).

Outputs: ``model/`` (base model + experts + router + ``experts.json``, see ``agentforge.experts``),
``train/<expert>/`` (checkpoints), ``metrics.jsonl`` (search candidates, headline), ``summary.json``.
A rerun reuses a finished ``model/`` and ``summary.json``; otherwise it resumes expert training
from its checkpoints and measures again.

Run alone: ``python -m agentforge.phases.experts --model DIR --out DIR [--preset tiny]``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agentforge.phases import PhaseContext, PhaseResult, standalone_main

NAME = "experts"
ALL_FAMILIES = ["chain_sum", "basic_arithmetic", "kv_recall", "spell_backward", "add_small", "count_bits"]


@dataclass
class Settings:
    """Discovery, training, search and evaluation sizes (per-preset values in ``PRESETS``)."""

    n_experts: int = 3
    families: list = field(default_factory=lambda: list(ALL_FAMILIES))
    levels: list = field(default_factory=lambda: [0, 1])
    zone_low: float = 0.2  # learning zone: units the base solves sometimes, not always (DESIGN: 20–80 %)
    zone_high: float = 0.8
    capability_weight: float = 0.5  # clustering distance: gradient direction + this × |Δ accuracy|
    discovery_items: int = 32  # validation items per unit for capability
    gradient_items: int = 32  # training items per unit for gradient similarity
    train_items: int = 400  # training items per unit for its expert
    ce_steps: int = 30
    rl_steps: int = 30
    batch_size: int = 32
    seq_len: int = 32
    lr: float = 3e-2
    rl_lr: float = 1e-2
    kl_weight: float = 0.05
    router_items: int = 64  # training prompts per unit for the router
    search_items: int = 40  # validation items per unit for the mixture search (after discovery's)
    search_generations: int = 2
    search_population: int = 4
    alpha_max: float = 1.5
    w_nll: float = 0.02  # search fitness: accuracy − w_nll·answer NLL − w_latency·latency − w_memory·memory
    w_latency: float = 0.02
    w_memory: float = 0.01
    test_items: int = 80  # test items per unit for the final comparison (fewer where a level has fewer)
    text_rows: int = 64  # held-out text rows for the perplexity control (0: skip it)
    eval_batch_size: int = 128
    checkpoint_every: int = 0


PRESETS: dict[str, Settings] = {
    "micro": Settings(families=["kv_recall", "add_small", "count_bits"], levels=[0], zone_low=0.0, zone_high=1.0,
                      discovery_items=6, gradient_items=8, train_items=40, ce_steps=3, rl_steps=2, batch_size=4,
                      router_items=8, search_items=4, search_generations=1, search_population=2, test_items=6,
                      text_rows=4, eval_batch_size=32),
    "tiny": Settings(),
    "small": Settings(n_experts=4, levels=[0, 1, 2, 3], discovery_items=64, gradient_items=64, train_items=2000,
                      ce_steps=300, rl_steps=100, seq_len=64, router_items=128, search_items=48, search_generations=4,
                      search_population=8, test_items=200, text_rows=256),
}


# ---------------------------------------------------------------------------------------------
# building blocks


def _units(settings: Settings):
    from agentforge.data import FAMILIES
    from agentforge.experts import Unit

    unknown = sorted(set(settings.families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"{NAME}.families: unknown task families {unknown}; choose from {sorted(FAMILIES)}")
    return [Unit(f, level) for f in settings.families for level in settings.levels]


def _train_settings(settings: Settings):
    from agentforge.experts import TrainSettings

    names = {f.name for f in dataclasses.fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in dataclasses.asdict(settings).items() if k in names})


def train_experts(model, basis, tokenizer, discovery, settings: Settings, ctx: PhaseContext) -> dict:
    """``{expert name: z}``, each trained on the training split of its units."""
    from agentforge.experts import train_expert
    from agentforge.experts.discovery import unit_items

    experts = {}
    for name, units in discovery.expert_units().items():
        items = [it for unit_list in unit_items(units, "train", settings.train_items, ctx.seed).values()
                 for it in unit_list]
        ctx.say(f"{NAME}: training expert {name} on {len(items)} items ({', '.join(u.name for u in units)})")
        experts[name], _ = train_expert(model, basis, tokenizer, items, _train_settings(settings),
                                        ctx.out_dir / "train" / name, name,
                                        seed=ctx.seed, wandb_mode=ctx.wandb_mode, progress=ctx.progress)
    return experts


def unit_classes(discovery, units) -> dict:
    """Router class of every unit: the expert of its family (whatever its level: the prompt shows the
    family, not the level), or ``base`` for a family no expert was trained on."""
    from agentforge.experts.router import BASE_CLASS

    return {u: discovery.expert_of(u.family) or BASE_CLASS for u in units}


def train_router(model, tokenizer, classes: dict, settings: Settings, seed: int):
    """The pass-one router, fitted on training prompts of every unit."""
    from agentforge.experts import Router, features_of
    from agentforge.experts.discovery import unit_items

    items = unit_items(list(classes), "train", settings.router_items, seed)
    prompts = [it.prompt for unit_list in items.values() for it in unit_list]
    labels = [classes[u] for u, unit_list in items.items() for _ in unit_list]
    features = features_of(model, tokenizer, prompts, settings.eval_batch_size)
    names = sorted(set(classes.values()))
    return Router(features.shape[1], names).fit(features, labels)


def _answer_scores(model, tokenizer, items, settings: Settings) -> np.ndarray:
    from agentforge.experts import item_scores

    return item_scores(model, tokenizer, items, batch_size=settings.eval_batch_size)


def search_mixtures(model, basis, tokenizer, router, experts: dict, settings: Settings, ctx: PhaseContext,
                    units) -> tuple[dict, dict]:
    """Per router class, CMA-ES over α on the validation items the router sends to it. Returns
    ``({class: α}, {class: candidate history})``."""
    from agentforge.experts import Measurement, MixtureSearch, SearchSettings, compose, features_of, installed
    from agentforge.experts.discovery import unit_items
    from agentforge.experts.evaluation import answer_nll
    from agentforge.experts.svf import adapted_bytes

    # the validation prompts after those discovery measured: selecting units on some items and then
    # judging mixtures on the same items would favour the base model by regression to the mean
    pool = unit_items(units, "validation", settings.search_items, ctx.seed, skip=settings.discovery_items)
    items = [it for unit_list in pool.values() for it in unit_list]
    routes = router.predict(features_of(model, tokenizer, [it.prompt for it in items], settings.eval_batch_size))
    names, zs = list(experts), list(experts.values())
    memory = adapted_bytes(model, basis.names)
    search = SearchSettings(generations=settings.search_generations, population=settings.search_population,
                            alpha_max=settings.alpha_max, w_nll=settings.w_nll, w_latency=settings.w_latency,
                            w_memory=settings.w_memory, seed=ctx.seed)

    def evaluator(class_items):
        def evaluate(alphas) -> Measurement:
            started = time.perf_counter()
            weights = basis.adapted(compose(zs, alphas)) if any(alphas) else {}
            with torch.no_grad(), installed(model, weights):
                scores = _answer_scores(model, tokenizer, class_items, settings)
                seconds = time.perf_counter() - started
                nll = answer_nll(model, tokenizer, class_items, batch_size=settings.eval_batch_size)
            return Measurement(tuple(alphas), float(scores.mean()), seconds / len(class_items),
                               memory if any(alphas) else 0, float(nll.mean()))
        return evaluate

    mixtures, histories = {}, {}
    for cls in router.classes:
        class_items = [it for it, route in zip(items, routes) if route == cls]
        start = [1.0 if name == cls else 0.0 for name in names]
        if not class_items:  # the router sends no validation prompt here: keep the class's own expert
            mixtures[cls] = start
            continue
        ctx.say(f"{NAME}: mixture search for class {cls} on {len(class_items)} validation items")
        searcher = MixtureSearch(evaluator(class_items), len(names), search)
        mixtures[cls] = list(searcher.run(start, memory).alphas)
        histories[cls] = searcher.history()
    return mixtures, histories


# ---------------------------------------------------------------------------------------------
# the final comparison on the test split


def final_measurements(adaptive, tokenizer, experts: dict, items: list, routes: list, settings: Settings) -> dict:
    """Per-item test scores and answer NLLs of the base, of each expert applied to every prompt,
    and of the two-pass model (its NLL under the mixture of the class ``routes`` gives each item)."""
    from agentforge.experts import compose, installed
    from agentforge.experts.evaluation import answer_nll

    model, basis = adaptive.model, adaptive.basis
    batch = settings.eval_batch_size
    scores = {"base": _answer_scores(model, tokenizer, items, settings)}
    nll = {"base": answer_nll(model, tokenizer, items, batch_size=batch)}
    for name, z in experts.items():
        with torch.no_grad(), installed(model, basis.adapted(compose([z], [1.0]))):
            scores[name] = _answer_scores(model, tokenizer, items, settings)
            nll[name] = answer_nll(model, tokenizer, items, batch_size=batch)
    scores["adaptive"] = _answer_scores(adaptive, tokenizer, items, settings)
    nll["adaptive"] = np.empty(len(items))
    for cls in set(routes):
        rows = [i for i, route in enumerate(routes) if route == cls]
        with torch.no_grad(), installed(model, adaptive.adapted_weights(adaptive.mixtures[cls])):
            nll["adaptive"][rows] = answer_nll(model, tokenizer, [items[i] for i in rows], batch_size=batch)
    return {"accuracy": scores, "answer_nll": nll}


def _gain(measured: dict, metric: str, candidate: str, control: str, rows, seed: int) -> dict:
    """Paired gain of ``candidate`` over ``control`` on ``rows``: higher accuracy, or lower NLL."""
    from agentforge.experts import paired_gain

    first, second = measured[metric][candidate][rows], measured[metric][control][rows]
    return paired_gain(first, second, seed=seed) if metric == "accuracy" else paired_gain(second, first, seed=seed)


def compare(measured: dict, test_items: dict, discovery, router_accuracy: float, seed: int) -> dict:
    """Accuracy and answer-NLL intervals per unit, per expert domain and per task domain; each
    expert's paired gain over the base on its own units; the two-pass model against the base and
    the best single expert on the whole mixed test set."""
    from agentforge.data import DOMAINS
    from agentforge.experts import bootstrap_interval

    spans, start = {}, 0
    for unit, unit_list in test_items.items():
        spans[unit] = np.arange(start, start + len(unit_list))
        start += len(unit_list)

    def rows(units) -> np.ndarray:
        return np.concatenate([spans[u] for u in units if u in spans])

    groups = {"unit": {u.name: [u] for u in test_items}, "expert_domain": discovery.expert_units(),
              "domain": {d: [u for u in test_items if u.family in fams] for d, fams in DOMAINS.items()}}
    groups["domain"] = {d: us for d, us in groups["domain"].items() if us}
    everything = np.arange(start)
    singles = [name for name in measured["accuracy"] if name not in ("base", "adaptive")]
    best_single = max(singles, key=lambda name: measured["accuracy"][name].mean())
    out = {"best_single_expert": best_single, "router_test_accuracy": router_accuracy}
    for metric, values in measured.items():
        out[metric] = {kind: {group: {model: bootstrap_interval(v[rows(us)], seed=seed) for model, v in values.items()}
                              for group, us in table.items()} for kind, table in groups.items()}
        out[metric]["mixed"] = {model: bootstrap_interval(v, seed=seed) for model, v in values.items()}
        out[metric]["expert_gain_on_own_domain"] = {
            name: _gain(measured, metric, name, "base", rows(units), seed)
            for name, units in discovery.expert_units().items()}
        out[metric]["adaptive_vs_base"] = _gain(measured, metric, "adaptive", "base", everything, seed)
        out[metric]["adaptive_vs_best_single"] = _gain(measured, metric, "adaptive", best_single, everything, seed)
    return out


def text_perplexities(adaptive, tokenizer, experts: dict, data: dict, settings: Settings) -> dict:
    """Held-out text perplexity (documents the Cognate trunk never trained on) of the base and of
    each expert: what the KL penalty is there to keep."""
    from agentforge.data import load_text, text_splits
    from agentforge.eval import perplexity
    from agentforge.experts import compose, installed

    if not settings.text_rows or not data:
        return {}
    texts = load_text("stdlib", max_docs=data["text_docs"]) + load_text("pydoc")
    test = text_splits(tokenizer, texts, data["seq_len"], seed=data.get("seed", 0))["test"]
    rows = test.select(range(min(settings.text_rows, len(test))))
    model, basis = adaptive.model, adaptive.basis
    out = {"base": perplexity(model, rows, batch_size=settings.eval_batch_size)}
    for name, z in experts.items():
        with torch.no_grad(), installed(model, basis.adapted(compose([z], [1.0]))):
            out[name] = perplexity(model, rows, batch_size=settings.eval_batch_size)
    return out


# ---------------------------------------------------------------------------------------------
# the phase


def _finished(ctx: PhaseContext):
    """The summary of a previous run whose model directory verifies, else None."""
    from agentforge.artifacts import CorruptArtifact, MANIFEST, verify_hashes

    model_dir, summary = ctx.out_dir / "model", ctx.out_dir / "summary.json"
    if not (model_dir / MANIFEST).is_file() or not summary.is_file():
        return None
    try:
        verify_hashes(model_dir, json.loads((model_dir / MANIFEST).read_text())["files"], ignore=(MANIFEST,))
    except (CorruptArtifact, ValueError, KeyError):
        return None
    return json.loads(summary.read_text())


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Discover, train, route, search and compare (see the module docstring); write ``model/``."""
    from agentforge.artifacts import load_model_dir
    from agentforge.experts import AdaptiveModel, SVDBasis, discover, features_of
    from agentforge.experts.discovery import unit_items
    from agentforge.train import barrier

    if "model" not in inputs:
        raise ValueError(f"{NAME}: needs inputs['model'], a model directory; got {sorted(inputs)}")
    artifacts = {"model": ctx.out_dir / "model"}
    done = _finished(ctx)
    if done is not None:
        ctx.say(f"{NAME}: reusing the finished model and summary in {ctx.out_dir}")
        return PhaseResult(artifacts=artifacts, metrics=done["headline"])
    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model, tokenizer, metadata = load_model_dir(inputs["model"])
    model.eval()
    units = _units(settings)
    timings = {}

    def lap(name: str, since: list = [started]) -> None:  # noqa: B006 (a running clock)
        now = time.perf_counter()
        timings[name] = round(now - since[0], 2)
        since[0] = now

    basis = SVDBasis.of(model)
    ctx.say(f"{NAME}: measuring {len(units)} task units, {basis.total} z values over {len(basis.names)} matrices")
    discovery = discover(model, basis, tokenizer, units, n_experts=settings.n_experts,
                         zone=(settings.zone_low, settings.zone_high), capability_weight=settings.capability_weight,
                         eval_items=settings.discovery_items, gradient_items=settings.gradient_items,
                         seq_len=settings.seq_len, seed=ctx.seed, batch_size=settings.eval_batch_size)
    ctx.say(f"{NAME}: experts {discovery.to_dict()['experts']}")
    lap("load_and_discovery_s")
    experts = train_experts(model, basis, tokenizer, discovery, settings, ctx)
    lap("training_s")
    barrier()
    if not ctx.is_main:  # training is data-parallel; routing, search, evaluation and writing are rank 0's
        return PhaseResult(artifacts=artifacts)
    classes = unit_classes(discovery, units)
    router = train_router(model, tokenizer, classes, settings, ctx.seed)
    test_items = unit_items(units, "test", settings.test_items, ctx.seed)
    items = [it for unit_list in test_items.values() for it in unit_list]
    routes = router.predict(features_of(model, tokenizer, [it.prompt for it in items], settings.eval_batch_size))
    truth = [classes[u] for u, unit_list in test_items.items() for _ in unit_list]
    router_accuracy = sum(r == t for r, t in zip(routes, truth)) / len(items)
    lap("router_s")
    mixtures, histories = search_mixtures(model, basis, tokenizer, router, experts, settings, ctx, units)
    lap("search_s")
    adaptive = AdaptiveModel(model, basis, experts, router, mixtures)
    ctx.say(f"{NAME}: final comparison on {len(items)} test items")
    comparison = compare(final_measurements(adaptive, tokenizer, experts, items, routes, settings), test_items,
                         discovery, router_accuracy, ctx.seed)
    perplexities = text_perplexities(adaptive, tokenizer, experts, metadata.get("data"), settings)
    lap("evaluation_s")
    summary = {"settings": dataclasses.asdict(settings), "discovery": discovery.to_dict(),
               "classes": {u.name: c for u, c in classes.items()}, "mixtures": mixtures,
               "parameter_counts": basis.parameter_counts(), "comparison": comparison,
               "text_perplexity": perplexities, "timings": timings}
    _save(adaptive, tokenizer, inputs, metadata, discovery, summary, ctx)
    lap("save_s")
    summary["phase_seconds"] = round(time.perf_counter() - started, 2)
    summary["headline"] = headline(summary)
    _write_reports(summary, histories, ctx)
    return PhaseResult(artifacts=artifacts, metrics=summary["headline"])


def _save(adaptive, tokenizer, inputs, metadata, discovery, summary, ctx: PhaseContext) -> None:
    from agentforge.experts import save_adaptive

    record = {"phase": NAME, "parents": [str(inputs["model"])], "data": metadata.get("data"),
              "experts": adaptive.expert_names}
    describe = {"units": discovery.to_dict()["experts"], "parameter_counts": summary["parameter_counts"]}
    save_adaptive(adaptive, tokenizer, ctx.out_dir / "model", record, describe)


def headline(summary: dict) -> dict:
    """The phase's headline numbers as one flat row (metrics.jsonl, the pipeline report)."""
    comparison = summary["comparison"]
    accuracy, nll = comparison["accuracy"], comparison["answer_nll"]
    row = {"experts": len(summary["mixtures"]) - ("base" in summary["mixtures"]),
           "z_parameters": summary["parameter_counts"]["svf_z"],
           "lora_rank1_parameters": summary["parameter_counts"]["lora_rank1"],
           "router_test_accuracy": comparison["router_test_accuracy"],
           "best_single_expert": comparison["best_single_expert"],
           "phase_seconds": summary["phase_seconds"]}
    for model, interval in accuracy["mixed"].items():
        row[f"mixed_accuracy/{model}"] = interval["mean"]
        row[f"mixed_answer_nll/{model}"] = nll["mixed"][model]["mean"]
    for name, gain in accuracy["expert_gain_on_own_domain"].items():
        row[f"own_domain_gain/{name}"] = gain["mean"]
        row[f"own_domain_gain_low/{name}"] = gain["low"]
        row[f"own_domain_nll_gain/{name}"] = nll["expert_gain_on_own_domain"][name]["mean"]
        row[f"own_domain_nll_gain_low/{name}"] = nll["expert_gain_on_own_domain"][name]["low"]
    for key in ("adaptive_vs_base", "adaptive_vs_best_single"):
        row.update({f"{key}/{end}": accuracy[key][end] for end in ("mean", "low", "high")})
        row.update({f"{key}/nll_{end}": nll[key][end] for end in ("mean", "low", "high")})
    row.update({f"text_perplexity/{k}": v for k, v in summary["text_perplexity"].items()})
    return row


def _write_reports(summary: dict, histories: dict, ctx: PhaseContext) -> None:
    from agentforge.artifacts import atomic_write_json
    from agentforge.train import MetricsLogger

    summary["search"] = histories
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/candidate", wandb_mode=ctx.wandb_mode) as log:
        for cls, rows in histories.items():
            for row in rows:
                log.log({"class": cls, **row})
    with MetricsLogger(ctx.out_dir, phase=NAME, wandb_mode="disabled") as log:
        log.log(summary["headline"])
    atomic_write_json(ctx.out_dir / "summary.json", summary)


# ---------------------------------------------------------------------------------------------
# report figures


def figures(phase_dir: Path) -> list:
    """Report figures from ``summary.json``: test accuracy and answer NLL per expert domain for the
    base, each expert and the two-pass model (95 % bootstrap intervals), and the measured mixture
    candidates of each router class with their Pareto front. ``[(title, Figure, [source file])]``."""
    source = Path(phase_dir) / "summary.json"
    if not source.is_file():
        return []
    summary = json.loads(source.read_text())
    out = [(f"Experts: held-out {label} per expert domain", _domain_figure(summary, metric, label), [source])
           for metric, label in (("accuracy", "accuracy"), ("answer_nll", "answer NLL (lower is better)"))]
    if summary.get("search"):
        out.append(("Experts: mixture candidates and Pareto front per router class", _pareto_figure(summary), [source]))
    return out


def _domain_figure(summary: dict, metric: str, label: str):
    from matplotlib.figure import Figure

    table = summary["comparison"][metric]["expert_domain"]
    domains = list(table)
    models = list(next(iter(table.values())))
    fig = Figure(figsize=(7.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        x = [d + (i - (len(models) - 1) / 2) * width for d in range(len(domains))]
        means = [table[d][model]["mean"] for d in domains]
        errors = [[m - table[d][model]["low"] for d, m in zip(domains, means)],
                  [table[d][model]["high"] - m for d, m in zip(domains, means)]]
        ax.bar(x, means, width, yerr=errors, capsize=2, label=model)
    ax.set_xticks(range(len(domains)), domains, fontsize="small")
    ax.set_xlabel("expert domain (its learning-zone units, test split)")
    ax.set_ylabel(f"{label}, 95 % CI")
    ax.legend(title="model", fontsize="x-small", ncols=2)
    return fig


def _pareto_figure(summary: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (cls, rows) in enumerate(summary["search"].items()):
        color = f"C{i}"
        latency = [1000 * r["latency_s"] for r in rows]
        accuracy = [r["accuracy"] for r in rows]
        ax.scatter(latency, accuracy, s=[12 if r["memory_bytes"] else 40 for r in rows], color=color, alpha=0.4,
                   label=f"{cls}: candidates")
        front = sorted((l, a) for l, a, r in zip(latency, accuracy, rows) if r["pareto"])
        ax.plot([l for l, _ in front], [a for _, a in front], "o-", color=color, label=f"{cls}: Pareto front")
    ax.set_xlabel("measured latency (ms per answered item)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("large dots: α = 0 (base weights, no adapted copy in memory)", fontsize="small")
    ax.legend(fontsize="x-small", ncols=2)
    return fig


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {'model': 'input model directory'}, argv)


if __name__ == "__main__":
    sys.exit(main())
