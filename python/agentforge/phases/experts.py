"""Phase 7, Experts: Transformer²-style singular-value experts, discovered and mixed by measurement.

Input ``model`` (in the pipeline the baked model, BitLinear layers in latent state; any HF causal
LM with a tokenizer works). Its task units are the ``families`` at the run's task levels (the data
spec). Every setting is checked before the model loads, and what the model must offer (a
tokenizer, adaptable linear layers, an LM head) right after, before the SVD. Steps, each measured
on the model itself and memoised:

1. ``discovery``: the SVD of every adapted weight (all linear layers but the LM head), then
   discovery (``agentforge.experts.discovery``): validation accuracy per unit (task family ×
   level), the learning zone, gradient similarity at z = 1, N experts by clustering.
2. ``expert_<name>``: each expert's z trained on the training split of its units: answer
   cross-entropy (and, if ``train.rl_steps``, REINFORCE on verified rewards), both with a KL
   penalty to the base model; an interrupted training resumes from its checkpoints.
3. ``router`` (pass one), trained on training prompts of every unit: class = the unit's expert,
   or ``base`` for units outside the learning zone.
4. ``search``: per router class, CMA-ES over α on the validation items the router sends to that
   class, every candidate measured: accuracy, answer NLL, memory and compute (FLOPs per answered
   item, counted: answering plus building the mixture's weights). Its wall-clock latency is
   reported, never selected on, so one seed selects one mixture on any machine.
5. ``model``: the base model + experts + router + ``experts.json`` (see ``agentforge.experts``).
6. ``comparison`` on the *test* split, which no step above saw: per-unit and per-domain accuracy
   of the base, of each expert alone and of the two-pass model, with bootstrap intervals and
   paired gains; held-out text perplexity of each (the KL penalty's retention control).

Outputs: ``model/``, ``train/<expert>/`` (checkpoints), ``steps/`` (the memoised results),
``metrics.jsonl`` (search candidates, headline), ``summary.json``. A rerun redoes only the steps
that did not finish: a finished phase takes no SVD and trains, searches and measures nothing.

Run alone: ``python -m agentforge.phases.experts --model DIR --out DIR [--preset tiny]``.
"""

# No ``from __future__ import annotations``: the settings' field types are read with
# ``typing.get_type_hints``, which cannot resolve the nested ``TrainSettings`` from a string when
# this module runs as ``__main__`` without being in ``sys.modules`` (runpy).
import functools
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from agentforge.data import DOMAINS, FAMILIES
from agentforge.errors import ConfigError
from agentforge.experts.discovery import MAX_EXPERTS, MIN_EXPERTS, Discovery, Unit
from agentforge.experts.mixture import SearchSettings
from agentforge.experts.training import TrainSettings
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

DOMAIN_FAMILIES = [family for families in DOMAINS.values() for family in families]


@dataclass
class Settings(Checked):
    """Discovery, training, search and evaluation sizes (per-preset values in ``PRESETS``)."""

    n_experts: int = setting(3, f"[{MIN_EXPERTS}, {MAX_EXPERTS}]", doc="experts the families are clustered into")
    families: list[str] = setting(
        DOMAIN_FAMILIES,
        choices=tuple(FAMILIES),
        length="[1, 1000]",
        doc="task families measured, each at the data spec's task levels",
    )
    zone_low: float = setting(0.2, "[0, 1]", doc="learning zone: units the base solves sometimes, not always")
    zone_high: float = setting(0.8, "[0, 1]")
    capability_weight: float = setting(
        0.5, "[0, 1000]", doc="clustering distance: gradient direction + this × |Δ accuracy|"
    )
    discovery_items: int = setting(32, "[1, 100000]", doc="validation items per unit for capability")
    gradient_items: int = setting(32, "[1, 100000]", doc="training items per unit for gradient similarity")
    train_items: int = setting(400, "[1, 1000000]", doc="training items per unit for its expert")
    train: TrainSettings = setting(TrainSettings)
    router_items: int = setting(64, "[1, 100000]", doc="training prompts per unit for the router")
    search_items: int = setting(
        40, "[1, 100000]", doc="validation items per unit for the mixture search (after discovery's)"
    )
    search: SearchSettings = setting(SearchSettings)
    test_items: int = setting(
        80, "[1, 100000]", doc="test items per unit for the final comparison (fewer where a level has fewer)"
    )
    text_rows: int = setting(64, "[0, 1000000]", doc="held-out text rows for the perplexity control (0: skip it)")
    eval_batch_size: int = setting(128, "[1, 65536]")

    def check(self) -> None:
        if self.zone_high < self.zone_low:
            self.fail("zone_high", f"must be at least zone_low ({self.zone_low})")
        if len(set(self.families)) != len(self.families):
            self.fail("families", "must name each family once")
        if self.n_experts > len(self.families):
            self.fail(
                "n_experts",
                f"must be at most the number of families ({len(self.families)}): an expert "
                "is a cluster of whole families",
            )


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        families=["kv_recall", "add_small", "count_bits"],
        zone_low=0.0,
        zone_high=1.0,
        discovery_items=6,
        gradient_items=8,
        train_items=40,
        train=TrainSettings(ce_steps=3, rl_steps=2, batch_size=4),
        router_items=8,
        search_items=4,
        search=SearchSettings(generations=1, population=2),
        test_items=6,
        text_rows=4,
        eval_batch_size=32,
    ),
    "tiny": Settings(),
    "small": Settings(
        n_experts=4,
        discovery_items=64,
        gradient_items=64,
        train_items=2000,
        train=TrainSettings(ce_steps=300, rl_steps=100, seq_len=64),
        router_items=128,
        search_items=48,
        search=SearchSettings(generations=4, population=8),
        test_items=200,
        text_rows=256,
    ),
    "smol": Settings(
        discovery_items=8,
        gradient_items=8,
        train_items=64,
        train=TrainSettings(ce_steps=10, rl_steps=4, batch_size=8, seq_len=128),
        router_items=16,
        search_items=8,
        search=SearchSettings(generations=1, population=4),
        test_items=16,
        text_rows=16,
        eval_batch_size=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# the model and its basis


def check_model(base: Loaded) -> None:
    """What discovery, training and routing need of the model, checked before the SVD starts."""
    from agentforge.experts import target_weights

    if base.tokenizer is None:
        raise ConfigError(f"experts: {base.path} has no tokenizer; the phase needs one to pose its tasks")
    if base.model.get_output_embeddings() is None:
        raise ConfigError(
            f"experts: {type(base.model).__name__} has no LM head; the router reads the hidden state entering it"
        )
    try:
        target_weights(base.model)
    except ValueError as e:
        raise ConfigError(f"experts: {base.path}: {e}") from None


def task_units(p: PhaseRun) -> list[Unit]:
    """Every family of the settings at every task level of the run's data spec."""
    return [Unit(family, level) for family in p.settings.families for level in p.data.task_levels]


def check_row_length(p: PhaseRun, tokenizer, units) -> None:
    """Every training item fits a row of ``train.seq_len`` (found before the SVD, not after it)."""
    from agentforge.data import pack_tasks
    from agentforge.experts.discovery import unit_items

    render = p.suite(tokenizer).render
    items = [
        it for its in unit_items(units, "train", p.settings.train_items, p.seed, render=render).values() for it in its
    ]
    try:
        pack_tasks(tokenizer, items, p.settings.train.seq_len, seed=p.seed)
    except ValueError as error:
        raise ConfigError(f"experts.train.seq_len: {error}") from None


def svd_basis(p: PhaseRun, model):
    """The thin SVD of every adapted weight (the costly part of starting: minutes on a real model)."""
    from agentforge.experts import SVDBasis

    basis = SVDBasis.of(model)
    p.say(f"SVD of {len(basis.names)} matrices: {basis.total} z values per expert")
    return basis


def _answer_scores(p: PhaseRun, model, tokenizer, items) -> np.ndarray:
    from agentforge.experts import item_scores

    return item_scores(model, tokenizer, items, batch_size=p.settings.eval_batch_size)


# ---------------------------------------------------------------------------------------------
# discovery, experts, router


def discover_experts(p: PhaseRun, base: Loaded, basis, units) -> dict:
    """The discovery record and the basis's parameter counts."""
    from agentforge.experts import discover

    settings = p.settings
    p.say(f"measuring {len(units)} task units")
    found = discover(
        base.model,
        basis,
        base.tokenizer,
        units,
        n_experts=settings.n_experts,
        zone=(settings.zone_low, settings.zone_high),
        capability_weight=settings.capability_weight,
        eval_items=settings.discovery_items,
        gradient_items=settings.gradient_items,
        seq_len=settings.train.seq_len,
        seed=p.seed,
        batch_size=settings.eval_batch_size,
        render=p.suite(base.tokenizer).render,
    )
    p.say(f"experts {found.to_dict()['experts']}")
    return {"discovery": found.to_dict(), "parameter_counts": basis.parameter_counts()}


def train_one_expert(p: PhaseRun, base: Loaded, basis, name: str, units) -> list[float]:
    """The z of expert ``name``, trained on the training split of its units in ``train/<name>/<stage>``."""
    from agentforge.experts import train_expert
    from agentforge.experts.discovery import unit_items

    render = p.suite(base.tokenizer).render
    items = [
        it
        for unit_list in unit_items(units, "train", p.settings.train_items, p.seed, render=render).values()
        for it in unit_list
    ]
    p.say(f"training expert {name} on {len(items)} items ({', '.join(u.name for u in units)})")

    def fit(module, rows, stage: str, **kwargs):
        return p.train(module, rows, f"{name}/{stage}", **kwargs)

    z, _ = train_expert(base.model, basis, base.tokenizer, items, p.settings.train, fit, seed=p.seed)
    return z.tolist()


def train_experts(p: PhaseRun, base: Loaded, basis, discovery: Discovery) -> dict[str, torch.Tensor]:
    """``{expert name: z}``, one step each, trained data-parallel on every rank; ``basis()`` takes
    the SVD when a step needs it (a rerun of finished steps reads their z back)."""
    experts = {}
    for name, units in discovery.expert_units().items():

        def train(name=name, units=units):
            return train_one_expert(p, base, basis(), name, units)

        z = p.step(f"expert_{name}", train, everywhere=True)
        experts[name] = torch.tensor(z, dtype=torch.float32)
    return experts


def unit_classes(discovery: Discovery, units) -> dict:
    """Router class of every unit: the expert of its family (whatever its level: the prompt shows the
    family, not the level), or ``base`` for a family no expert was trained on."""
    from agentforge.experts.router import BASE_CLASS

    return {u: discovery.expert_of(u.family) or BASE_CLASS for u in units}


def fit_router(p: PhaseRun, base: Loaded, classes: dict) -> dict:
    """The pass-one router, fitted on training prompts of every unit, as a JSON record."""
    from agentforge.experts import Router, features_of
    from agentforge.experts.discovery import unit_items

    items = unit_items(list(classes), "train", p.settings.router_items, p.seed, render=p.suite(base.tokenizer).render)
    prompts = [it.prompt for unit_list in items.values() for it in unit_list]
    labels = [classes[u] for u, unit_list in items.items() for _ in unit_list]
    features = features_of(base.model, base.tokenizer, prompts, p.settings.eval_batch_size)
    with torch.random.fork_rng():
        torch.manual_seed(p.seed)  # its initial weights, whatever ran before (a rerun may have trained nothing)
        router = Router(features.shape[1], sorted(set(classes.values())))
    router.fit(features, labels)
    return {"classes": router.classes, "state": {k: v.tolist() for k, v in router.state_dict().items()}}


def router_from(record: dict):
    """The router ``fit_router`` recorded (float32 survives JSON exactly)."""
    from agentforge.experts import Router

    router = Router(len(record["state"]["mean"]), record["classes"])
    router.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in record["state"].items()})
    return router


# ---------------------------------------------------------------------------------------------
# the mixture search


def search_mixtures(p: PhaseRun, base: Loaded, basis, router, experts: dict, units) -> dict:
    """Per router class, CMA-ES over α on the validation items the router sends to it:
    ``{"mixtures": {class: α}, "history": {class: measured candidates}}``."""
    from agentforge.experts import MixtureSearch, features_of
    from agentforge.experts.discovery import unit_items
    from agentforge.experts.svf import adapted_bytes

    settings, model, tokenizer = p.settings, base.model, base.tokenizer
    # the validation prompts after those discovery measured: selecting units on some items and then
    # judging mixtures on the same items would favour the base model by regression to the mean
    pool = unit_items(
        units,
        "validation",
        settings.search_items,
        p.seed,
        skip=settings.discovery_items,
        render=p.suite(tokenizer).render,
    )
    items = [it for unit_list in pool.values() for it in unit_list]
    routes = router.predict(features_of(model, tokenizer, [it.prompt for it in items], settings.eval_batch_size))
    names, memory = list(experts), adapted_bytes(model, basis.names)
    mixtures, histories = {}, {}
    for cls in router.classes:
        class_items = [it for it, route in zip(items, routes) if route == cls]
        start = [1.0 if name == cls else 0.0 for name in names]
        if not class_items:  # the router sends no validation prompt here: keep the class's own expert
            mixtures[cls] = start
            continue
        p.say(f"mixture search for class {cls} on {len(class_items)} validation items")
        evaluate = mixture_evaluator(p, base, basis, list(experts.values()), class_items, memory)
        searcher = MixtureSearch(evaluate, len(names), settings.search, seed=p.seed)
        mixtures[cls] = list(searcher.run(start, memory).alphas)
        histories[cls] = searcher.history()
    return {"mixtures": mixtures, "history": histories}


def mixture_evaluator(p: PhaseRun, base: Loaded, basis, zs: list, items: list, memory: int):
    """``evaluate(alphas) -> Measurement`` on ``items``: accuracy, answer NLL, counted FLOPs per item
    (answering, plus building the mixture's weights), cached bytes; latency for the report only."""
    from agentforge.experts import Measurement, answer_flops, compose, installed
    from agentforge.experts.evaluation import answer_nll

    model, tokenizer = base.model, base.tokenizer
    answering = answer_flops(model, tokenizer, items)

    def evaluate(alphas) -> Measurement:
        started = time.perf_counter()
        weights = basis.adapted(compose(zs, alphas)) if any(alphas) else {}
        with torch.no_grad(), installed(model, weights):
            scores = _answer_scores(p, model, tokenizer, items)
            seconds = time.perf_counter() - started
            nll = answer_nll(model, tokenizer, items, batch_size=p.settings.eval_batch_size)
        compute = (answering + basis.build_flops(sum(1 for a in alphas if a))) / len(items)
        return Measurement(
            tuple(alphas),
            float(scores.mean()),
            compute,
            memory if any(alphas) else 0,
            float(nll.mean()),
            seconds / len(items),
        )

    return evaluate


# ---------------------------------------------------------------------------------------------
# the model directory and the final comparison on the test split


def build_model(base: Loaded, adaptive, discovery: Discovery, parameter_counts: dict) -> Built:
    """The base model, unchanged, with the experts, the router and ``experts.json`` beside it."""
    from agentforge.experts import adaptive_files
    from agentforge.quietstar import head_files

    describe = {"units": discovery.to_dict()["experts"], "parameter_counts": parameter_counts}
    return Built(
        base.model,
        base.tokenizer,
        {"experts": adaptive.expert_names, "parents": [base.path]},
        write_extra=adaptive_files(adaptive, describe),
        carry=head_files(base.path),
    )


def final_measurements(p: PhaseRun, adaptive, tokenizer, experts: dict, items: list, routes: list) -> dict:
    """Per-item test scores and answer NLLs of the base, of each expert applied to every prompt,
    and of the two-pass model (its NLL under the mixture of the class ``routes`` gives each item)."""
    from agentforge.experts import compose, installed
    from agentforge.experts.evaluation import answer_nll

    model, basis = adaptive.model, adaptive.basis
    batch = p.settings.eval_batch_size
    scores = {"base": _answer_scores(p, model, tokenizer, items)}
    nll = {"base": answer_nll(model, tokenizer, items, batch_size=batch)}
    for name, z in experts.items():
        with torch.no_grad(), installed(model, basis.adapted(compose([z], [1.0]))):
            scores[name] = _answer_scores(p, model, tokenizer, items)
            nll[name] = answer_nll(model, tokenizer, items, batch_size=batch)
    scores["adaptive"] = _answer_scores(p, adaptive, tokenizer, items)
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


def compare(measured: dict, test_items: dict, discovery: Discovery, router_accuracy: float, seed: int) -> dict:
    """Accuracy and answer-NLL intervals per unit, per expert domain and per task domain; each
    expert's paired gain over the base on its own units; the two-pass model against the base and
    the best single expert on the whole mixed test set."""
    from agentforge.eval.stats import bootstrap_interval

    spans, start = {}, 0
    for unit, unit_list in test_items.items():
        spans[unit] = np.arange(start, start + len(unit_list))
        start += len(unit_list)

    def rows(units) -> np.ndarray:
        return np.concatenate([spans[u] for u in units if u in spans])

    groups = {
        "unit": {u.name: [u] for u in test_items},
        "expert_domain": discovery.expert_units(),
        "domain": {d: [u for u in test_items if u.family in fams] for d, fams in DOMAINS.items()},
    }
    groups["domain"] = {d: us for d, us in groups["domain"].items() if us}
    everything = np.arange(start)
    singles = [name for name in measured["accuracy"] if name not in ("base", "adaptive")]
    best_single = max(singles, key=lambda name: measured["accuracy"][name].mean())
    out = {"best_single_expert": best_single, "router_test_accuracy": router_accuracy}
    for metric, values in measured.items():
        out[metric] = {
            kind: {
                group: {model: bootstrap_interval(v[rows(us)], seed=seed) for model, v in values.items()}
                for group, us in table.items()
            }
            for kind, table in groups.items()
        }
        out[metric]["mixed"] = {model: bootstrap_interval(v, seed=seed) for model, v in values.items()}
        out[metric]["expert_gain_on_own_domain"] = {
            name: _gain(measured, metric, name, "base", rows(units), seed)
            for name, units in discovery.expert_units().items()
        }
        out[metric]["adaptive_vs_base"] = _gain(measured, metric, "adaptive", "base", everything, seed)
        out[metric]["adaptive_vs_best_single"] = _gain(measured, metric, "adaptive", best_single, everything, seed)
    return out


def text_perplexities(p: PhaseRun, adaptive, tokenizer, experts: dict) -> dict:
    """Held-out text perplexity (the run's test documents) of the base and of each expert: what
    the KL penalty is there to keep."""
    from agentforge.eval import perplexity
    from agentforge.experts import compose, installed

    settings = p.settings
    if not settings.text_rows:
        return {}
    rows = p.suite(tokenizer).text("test", settings.text_rows)
    model, basis = adaptive.model, adaptive.basis
    out = {"base": perplexity(model, rows, batch_size=settings.eval_batch_size)}
    for name, z in experts.items():
        with torch.no_grad(), installed(model, basis.adapted(compose([z], [1.0]))):
            out[name] = perplexity(model, rows, batch_size=settings.eval_batch_size)
    return out


def final_comparison(p: PhaseRun, adaptive, tokenizer, experts: dict, discovery: Discovery, classes: dict) -> dict:
    """The router's test accuracy, every model compared on the test items, and the held-out text
    perplexities."""
    from agentforge.experts import features_of
    from agentforge.experts.discovery import unit_items

    settings = p.settings
    test_items = unit_items(list(classes), "test", settings.test_items, p.seed, render=p.suite(tokenizer).render)
    items = [it for unit_list in test_items.values() for it in unit_list]
    routes = adaptive.router.predict(
        features_of(adaptive.model, tokenizer, [it.prompt for it in items], settings.eval_batch_size)
    )
    truth = [classes[u] for u, unit_list in test_items.items() for _ in unit_list]
    router_accuracy = sum(r == t for r, t in zip(routes, truth)) / len(items)
    p.say(f"final comparison on {len(items)} test items")
    measured = final_measurements(p, adaptive, tokenizer, experts, items, routes)
    return {
        "comparison": compare(measured, test_items, discovery, router_accuracy, p.seed),
        "text_perplexity": text_perplexities(p, adaptive, tokenizer, experts),
    }


# ---------------------------------------------------------------------------------------------
# the phase


def run(p: PhaseRun) -> PhaseResult:
    """Discover, train, route, search, save and compare (see the module docstring)."""
    from agentforge.experts import AdaptiveModel

    torch.manual_seed(p.seed)
    base = p.load("model")
    base.model.eval()
    check_model(base)
    units = task_units(p)
    check_row_length(p, base.tokenizer, units)
    basis = functools.cache(lambda: svd_basis(p, base.model))  # taken by the first step that needs it
    found = p.step("discovery", lambda: discover_experts(p, base, basis(), units))
    discovery = Discovery.from_dict(found["discovery"])
    experts = train_experts(p, base, basis, discovery)
    classes = unit_classes(discovery, units)
    router = router_from(p.step("router", lambda: fit_router(p, base, classes)))
    search = p.step("search", lambda: search_mixtures(p, base, basis(), router, experts, units))
    adaptive = functools.cache(lambda: AdaptiveModel(base.model, basis(), experts, router, search["mixtures"]))
    model = p.model_step("model", lambda: build_model(base, adaptive(), discovery, found["parameter_counts"]))
    results = p.step("comparison", lambda: final_comparison(p, adaptive(), base.tokenizer, experts, discovery, classes))
    summary = {
        "discovery": found["discovery"],
        "classes": {u.name: c for u, c in classes.items()},
        "mixtures": search["mixtures"],
        "parameter_counts": found["parameter_counts"],
        **results,
        "search": search["history"],
    }
    candidates = [{"class": cls, **row} for cls, rows in search["history"].items() for row in rows]
    return p.finish(
        {"model": model.path},
        headline(summary),
        summary,
        rows={"candidate": candidates},
        effects=effects(summary["comparison"]),
    )


def effects(comparison: dict) -> list[Effect]:
    """The two-pass model against the base (the input) and against the best single expert on the
    mixed test set: accuracy, and answer NLL for the base (paired differences, 95 % intervals)."""

    def effect(what: str, control: str, gain: dict, better: str = "higher") -> Effect:
        if better == "higher":
            return Effect(what, control, gain["mean"], gain["low"], gain["high"])
        # an NLL gain is control − model: the effect is model − control
        return Effect(what, control, -gain["mean"], -gain["high"], -gain["low"], better="lower")

    accuracy, nll = comparison["accuracy"], comparison["answer_nll"]
    best = f"the best single expert ({comparison['best_single_expert']})"
    return [
        effect("test accuracy, two-pass model", "the base model", accuracy["adaptive_vs_base"]),
        effect("test answer NLL, two-pass model", "the base model", nll["adaptive_vs_base"], "lower"),
        effect("test accuracy, two-pass model", best, accuracy["adaptive_vs_best_single"]),
    ]


def headline(summary: dict) -> dict:
    """The phase's headline numbers as one flat row (metrics.jsonl, the pipeline report)."""
    comparison = summary["comparison"]
    accuracy, nll = comparison["accuracy"], comparison["answer_nll"]
    row = {
        "experts": len(summary["mixtures"]) - ("base" in summary["mixtures"]),
        "z_parameters": summary["parameter_counts"]["svf_z"],
        "lora_rank1_parameters": summary["parameter_counts"]["lora_rank1"],
        "router_test_accuracy": comparison["router_test_accuracy"],
        "best_single_expert": comparison["best_single_expert"],
    }
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


SPEC = PhaseSpec(
    number=7,
    name="experts",
    summary="Transformer²-style singular-value experts with a router and a CMA-ES mixture",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={
        "model": Input(
            "baking.model",
            "input model directory with a tokenizer (the baked model, latent BitLinear layers; any HF causal LM works)",
        )
    },
    provides={"model": model_dir},
    figures="agentforge.figures.experts",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
