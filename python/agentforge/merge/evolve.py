"""Evolutionary search over merge recipes.

A recipe is a JSON-able dict: ``{"method", "behaviour", <genes>}``, where ``behaviour`` picks the
source whose config (Cognate's recursion/halting/memory settings) the merged model keeps and the
genes are the method's parameters:

    linear, task_arithmetic     weights (one per source)
    ties, dare_linear, dare_ties weights, density
    slerp                        pair (two sources), t
    frankenmerge                 layers (a source per layer slot), weights (for the other tensors)
    dfs                          path [(source, layer), ...], scales (one per step), weights

The search: generation 0 holds each method's default recipe; every later generation keeps the
``elites`` best, adds recipes asked from a CMA-ES (the ``cma`` package) over the continuous genes of
the best method (restarted when another method takes the lead), and fills up with children of
tournament-selected parents (uniform crossover between recipes of one method, then mutation).
A diversity guard keeps at least ``min_methods`` methods alive; the run stops early after
``patience`` generations without a gain of ``min_delta``. Fitness values are cached by recipe
hash, so a recipe is never evaluated twice (and a resumed run replays its cached decisions).
The settings are ``EvolutionSettings``; the random draws follow ``Evolution``'s ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random  # for annotations inside SearchSpace, whose random() method hides the module
from typing import Any

from agentforge.merge import METHODS
from agentforge.settings import Checked, setting

WEIGHT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "frankenmerge", "dfs")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
DENSITY_RANGE = (0.1, 1.0)
SCALE_RANGE = (0.5, 1.5)
MAX_REPEATS = 3  # how often a DFS path may use one (source, layer), as in the Sakana paper
DECIMALS = 4  # recipes are rounded so that near-identical ones share a cache entry


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _round(values):
    return [round(float(v), DECIMALS) for v in values]


def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


@dataclass
class SearchSpace:
    """What a recipe may contain, for ``n_sources`` models with ``layer_slots`` layer slots in all
    and ``stack_layers`` layers in the stack that DFS rewires."""

    n_sources: int
    layer_slots: int
    stack_layers: int
    methods: tuple = METHODS

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"evolve: unknown merge methods {unknown}; choose from {list(METHODS)}")
        if self.n_sources < 2:
            raise ValueError(f"evolve: merging needs at least 2 sources, got {self.n_sources}")

    # --- construction ------------------------------------------------------------------------

    def default(self, method: str) -> dict:
        """The textbook recipe: equal weights, density 0.5, the midpoint of the first two sources,
        each layer slot from a different source in turn, and source 0's own layer order for DFS."""
        recipe = {"method": method, "behaviour": 0}
        n = self.n_sources
        if method in WEIGHT_METHODS:
            recipe["weights"] = _round([1.0 / n if method == "task_arithmetic" else 1.0] * n)
        if method in DENSITY_METHODS:
            recipe["density"] = 0.5
        if method == "slerp":
            recipe.update(pair=[0, 1], t=0.5)
        if method == "frankenmerge":
            recipe["layers"] = [i % n for i in range(self.layer_slots)]
        if method == "dfs":
            recipe["path"] = [[i % n, i] for i in range(self.stack_layers)]
            recipe["scales"] = _round([1.0] * self.stack_layers)
        return recipe

    def random(self, rng: Random, method: str | None = None) -> dict:
        recipe = self.default(method or rng.choice(self.methods))
        recipe["behaviour"] = rng.randrange(self.n_sources)
        recipe = self.with_vector(recipe, [rng.random() for _ in self.vector(recipe)])
        if recipe["method"] == "slerp":
            recipe["pair"] = sorted(rng.sample(range(self.n_sources), 2))
        if recipe["method"] == "frankenmerge":
            recipe["layers"] = [rng.randrange(self.n_sources) for _ in range(self.layer_slots)]
        if recipe["method"] == "dfs":
            recipe = self._with_path(recipe, self._random_path(rng))
        return recipe

    def _random_path(self, rng: Random) -> list:
        length = rng.randint(max(1, self.stack_layers - 1), self.stack_layers + 2)
        return self._legal(
            [[rng.randrange(self.n_sources), rng.randrange(self.stack_layers)] for _ in range(length)], rng
        )

    def _legal(self, path: list, rng: Random) -> list:
        """``path`` with every (source, layer) used at most MAX_REPEATS times and layers mostly in
        order (a random path that runs the last layer first rarely helps)."""
        counts: dict = {}
        legal = []
        for step in sorted(path, key=lambda s: s[1] + 0.5 * rng.random()):
            key = tuple(step)
            if counts.get(key, 0) < MAX_REPEATS:
                counts[key] = counts.get(key, 0) + 1
                legal.append(list(step))
        return legal or [[0, 0]]

    def _with_path(self, recipe: dict, path: list) -> dict:
        scales = list(recipe.get("scales", []))
        scales = (scales + [1.0] * len(path))[: len(path)]
        return {**recipe, "path": path, "scales": _round(scales)}

    # --- continuous genes in [0, 1] (what CMA-ES and mutation move) ------------------------------

    def vector(self, recipe: dict) -> list[float]:
        v = list(recipe.get("weights", []))
        if "density" in recipe:
            v.append((recipe["density"] - DENSITY_RANGE[0]) / (DENSITY_RANGE[1] - DENSITY_RANGE[0]))
        if "t" in recipe:
            v.append(recipe["t"])
        v += [(s - SCALE_RANGE[0]) / (SCALE_RANGE[1] - SCALE_RANGE[0]) for s in recipe.get("scales", [])]
        return v

    def with_vector(self, recipe: dict, vector) -> dict:
        v = [_clip(float(x), 0.0, 1.0) for x in vector]
        out = dict(recipe)
        i = 0
        if "weights" in recipe:
            n = len(recipe["weights"])
            weights = v[i : i + n]
            out["weights"] = _round(weights if sum(weights) > 1e-3 else [1.0] * n)  # never all zero
            i += n
        if "density" in recipe:
            out["density"] = round(DENSITY_RANGE[0] + v[i] * (DENSITY_RANGE[1] - DENSITY_RANGE[0]), DECIMALS)
            i += 1
        if "t" in recipe:
            out["t"] = round(v[i], DECIMALS)
            i += 1
        if "scales" in recipe:
            out["scales"] = _round(
                SCALE_RANGE[0] + x * (SCALE_RANGE[1] - SCALE_RANGE[0]) for x in v[i : i + len(recipe["scales"])]
            )
        return out

    # --- variation ---------------------------------------------------------------------------------

    def mutate(self, recipe: dict, rng: Random, rate: float) -> dict:
        """Gaussian steps (σ 0.15 of each range) on the continuous genes, and with probability
        ``rate`` per gene a new source, layer choice, SLERP pair, behaviour or DFS step."""
        out = self.with_vector(recipe, [x + rng.gauss(0, 0.15) for x in self.vector(recipe)])
        if rng.random() < rate:
            out["behaviour"] = rng.randrange(self.n_sources)
        if "pair" in out and rng.random() < rate:
            out["pair"] = sorted(rng.sample(range(self.n_sources), 2))
        if "layers" in out:
            out["layers"] = [rng.randrange(self.n_sources) if rng.random() < rate else s for s in out["layers"]]
        if "path" in out and rng.random() < rate:
            out = self._with_path(out, self._legal(self._edit_path(out["path"], rng), rng))
        return out

    def _edit_path(self, path: list, rng: Random) -> list:
        path = [list(step) for step in path]
        step = [rng.randrange(self.n_sources), rng.randrange(self.stack_layers)]
        edit = rng.choice(("insert", "delete", "replace") if len(path) > 1 else ("insert", "replace"))
        i = rng.randrange(len(path))
        if edit == "insert" and len(path) < self.stack_layers * 2:
            path.insert(i, step)
        elif edit == "delete":
            del path[i]
        else:
            path[i] = step
        return path

    def crossover(self, a: dict, b: dict, rng: Random) -> dict:
        """Uniform crossover of two recipes of one method (gene by gene); across methods, ``a``."""
        if a["method"] != b["method"]:
            return dict(a)
        child = {key: (a[key] if rng.random() < 0.5 else b[key]) for key in a}
        if "path" in child:
            child = self._with_path(child, child["path"])
        return child


def merge_arguments(recipe: dict) -> tuple[str, dict]:
    """``(method, keyword arguments)`` for ``agentforge.merge.merged_model`` from a recipe; the
    ``models`` argument follows from ``pair`` for SLERP (see ``recipe_sources``)."""
    kwargs = {"config_from": recipe["behaviour"]}
    for gene in ("weights", "density", "t", "layers", "path", "scales"):
        if gene in recipe:
            kwargs[gene] = [tuple(s) for s in recipe[gene]] if gene == "path" else recipe[gene]
    if recipe["method"] == "slerp":
        kwargs["config_from"] = 0 if recipe["behaviour"] == recipe["pair"][0] else 1
    return recipe["method"], kwargs


def recipe_sources(recipe: dict, n_sources: int) -> list[int]:
    """The source indices a recipe merges, in order (SLERP takes its pair)."""
    return list(recipe["pair"]) if recipe["method"] == "slerp" else list(range(n_sources))


def _numbers(values) -> str:
    return "/".join(f"{v:.2g}" for v in values)


def describe(recipe: dict) -> str:
    """A recipe in a short readable line, e.g. ``ties: weights 1/0.42/0.8, density 0.5; config of
    source 1`` (for titles and progress lines; the recipe itself is the JSON)."""
    parts = []
    if "pair" in recipe:
        parts.append(f"sources {recipe['pair'][0]} and {recipe['pair'][1]} at t {recipe['t']:.2g}")
    if "path" in recipe:
        scales = recipe["scales"]
        spread = f"{min(scales):.2g}" if min(scales) == max(scales) else f"{min(scales):.2g} to {max(scales):.2g}"
        parts.append(f"{len(recipe['path'])}-step layer path, branch scales {spread}")
    if "layers" in recipe:
        parts.append("layers from sources " + "".join(str(s) for s in recipe["layers"]))
    if "weights" in recipe:
        parts.append(f"weights {_numbers(recipe['weights'])}")
    if "density" in recipe:
        parts.append(f"density {recipe['density']:.2g}")
    return f"{recipe['method']}: {', '.join(parts)}; config of source {recipe['behaviour']}"


@dataclass
class EvolutionSettings(Checked):
    """How the search runs: generation size and count, variation, early stopping."""

    population: int = setting(8, "[2, 10000]", doc="recipes per generation")
    generations: int = setting(5, "[1, 100000]", doc="at most this many generations")
    elites: int = setting(2, "[0, 10000]", doc="best recipes carried over unchanged")
    mutation_rate: float = setting(0.3, "[0, 1]", doc="per discrete gene, the chance of a new value")
    crossover_rate: float = setting(0.5, "[0, 1]", doc="share of children crossed from two parents")
    cma_per_generation: int = setting(2, "[0, 10000]", doc="CMA-ES recipes per generation (below 2: none)")
    tournament: int = setting(3, "[1, 10000]", doc="contenders per tournament selection")
    patience: int = setting(3, "[1, 100000]", doc="stop after this many generations without a gain")
    min_delta: float = setting(1e-3, "[0, 1000]", doc="the smallest fitness gain that counts")
    min_methods: int = setting(2, "[1, 8]", doc="methods kept alive in every generation")

    def check(self) -> None:
        if self.population <= self.elites:
            self.fail("elites", f"must be below population ({self.population}): need population > elites")


@dataclass
class EvolutionResult:
    best: dict
    best_fitness: float
    generations: list = field(default_factory=list)  # per generation: best, mean, recipes evaluated
    stop_reason: str = ""


class Evolution:
    """Runs the search; ``evaluate(recipes) -> fitness values`` is called once per generation with
    the recipes that are not in ``cache`` (hash -> fitness), so it can spread them over ranks.
    Every random draw (variation, CMA-ES) follows ``seed``."""

    def __init__(
        self,
        space: SearchSpace,
        settings: EvolutionSettings,
        evaluate: Callable[[list[dict]], list[float]],
        *,
        seed: int = 0,
        cache: dict | None = None,
        on_generation: Callable[[dict], None] = lambda row: None,
    ):
        self.space, self.settings, self.evaluate, self.seed = space, settings, evaluate, seed
        self.cache = {} if cache is None else cache
        self.recipes: dict[str, dict] = {}  # hash -> recipe, for every recipe this run has met
        self.on_generation = on_generation
        self.rng = random.Random(seed)
        self._cma: Any = None  # the running CMA-ES, its (method, dims), the recipe it varies, its open ask
        self._cma_method: tuple[str, int] | None = None
        self._cma_template: dict | None = None
        self._cma_asked: Any = None

    def fitness(self, recipe: dict) -> float:
        return self.cache[recipe_hash(recipe)]

    def best_of(self, method: str) -> dict | None:
        """The fittest recipe of ``method`` met so far, or None."""
        mine = [r for r in self.recipes.values() if r["method"] == method]
        return max(mine, key=self.fitness) if mine else None

    def _evaluate_missing(self, recipes: list[dict]) -> None:
        self.recipes.update((recipe_hash(r), r) for r in recipes)
        missing = list({recipe_hash(r): r for r in recipes if recipe_hash(r) not in self.cache}.values())
        if missing:
            for recipe, value in zip(missing, self.evaluate(missing)):
                self.cache[recipe_hash(recipe)] = float(value)

    def run(self) -> EvolutionResult:
        s = self.settings
        population = [self.space.default(m) for m in self.space.methods][: s.population]
        while len(population) < s.population:
            population.append(self.space.random(self.rng))
        result = EvolutionResult(best={}, best_fitness=float("-inf"))
        stale = 0
        for generation in range(s.generations):
            if generation:
                population = self._next_generation(population)
            self._evaluate_missing(population)
            ranked = sorted(population, key=self.fitness, reverse=True)
            self._tell_cma(population)
            best = ranked[0]
            improved = self.fitness(best) > result.best_fitness + s.min_delta
            if self.fitness(best) > result.best_fitness:
                result.best, result.best_fitness = best, self.fitness(best)
            stale = 0 if improved else stale + 1
            row = {
                "generation": generation,
                "best_fitness": result.best_fitness,
                "generation_best": self.fitness(best),
                "mean_fitness": sum(map(self.fitness, population)) / len(population),
                "methods": sorted({r["method"] for r in population}),
                "best_recipe": best,
            }
            result.generations.append(row)
            self.on_generation(row)
            population = ranked
            if stale >= s.patience:
                result.stop_reason = f"no gain above {s.min_delta} for {s.patience} generations"
                break
        result.stop_reason = result.stop_reason or f"{len(result.generations)} generations"
        return result

    def _next_generation(self, ranked: list[dict]) -> list[dict]:
        s = self.settings
        children = [dict(r) for r in ranked[: s.elites]]
        children += self._ask_cma(ranked[0])
        seen = {recipe_hash(r) for r in children}
        while len(children) < s.population:
            child = self._child(ranked)
            for _ in range(5):  # a child identical to one we have teaches nothing
                if recipe_hash(child) not in seen:
                    break
                child = self.space.mutate(child, self.rng, 1.0)
            seen.add(recipe_hash(child))
            children.append(child)
        return self._keep_diverse(children)

    def _child(self, ranked: list[dict]) -> dict:
        first = self._tournament(ranked)
        child = (
            self.space.crossover(first, self._tournament(ranked), self.rng)
            if self.rng.random() < self.settings.crossover_rate
            else dict(first)
        )
        return self.space.mutate(child, self.rng, self.settings.mutation_rate)

    def _tournament(self, ranked: list[dict]) -> dict:
        contenders = self.rng.sample(range(len(ranked)), min(self.settings.tournament, len(ranked)))
        return ranked[min(contenders)]  # ranked best first

    def _keep_diverse(self, children: list[dict]) -> list[dict]:
        """Replace the last (non-elite) children with recipes of missing methods until at least
        ``min_methods`` methods are present."""
        want = min(self.settings.min_methods, len(self.space.methods))
        present = {c["method"] for c in children}
        missing = [m for m in self.space.methods if m not in present]
        i = len(children) - 1
        while len(present) < want and missing and i >= self.settings.elites:
            method = missing.pop(self.rng.randrange(len(missing)))
            children[i] = self.space.random(self.rng, method)
            present.add(method)
            i -= 1
        return children

    # --- CMA-ES over the continuous genes of the leading method --------------------------------------

    def _ask_cma(self, best: dict) -> list[dict]:
        import cma

        k = self.settings.cma_per_generation
        dims = len(self.space.vector(best))
        if k < 2 or dims < 2:  # pycma needs a population of 2 and at least 2 dimensions
            self._cma = None
            return []
        if self._cma is None or self._cma_method != (best["method"], dims):
            self._cma = cma.CMAEvolutionStrategy(
                self.space.vector(best), 0.2, {"seed": self.seed + 1, "popsize": k, "bounds": [0, 1], "verbose": -9}
            )
            self._cma_method = (best["method"], dims)
        self._cma_template = best
        self._cma_asked = self._cma.ask()
        return [self.space.with_vector(best, x) for x in self._cma_asked]

    def _tell_cma(self, population: list[dict]) -> None:
        if self._cma is None or self._cma_asked is None or self._cma_template is None:
            return
        recipes = [self.space.with_vector(self._cma_template, x) for x in self._cma_asked]
        self._cma.tell(self._cma_asked, [-self.fitness(r) for r in recipes])  # cma minimises
        self._cma_asked = None
