"""The evolutionary search on synthetic fitness functions: recipes stay legal, the search
improves and converges, the cache prevents re-evaluation, runs are deterministic, early
stopping and the diversity guard work."""

import random

import pytest

from agentforge.errors import ConfigError
from agentforge.merge import evolve
from agentforge.settings import undeclared

SPACE = evolve.SearchSpace(n_sources=3, layer_slots=4, stack_layers=3)


def test_defaults_and_random_recipes_are_legal():
    rng = random.Random(0)
    for method in SPACE.methods:
        for recipe in [SPACE.default(method)] + [SPACE.random(rng, method) for _ in range(20)]:
            _assert_legal(recipe)


def _assert_legal(recipe):
    assert recipe["method"] in evolve.METHODS and 0 <= recipe["behaviour"] < 3
    assert all(0 <= w <= 1 for w in recipe.get("weights", [])) and sum(recipe.get("weights", [1])) > 0
    assert evolve.DENSITY_RANGE[0] <= recipe.get("density", 0.5) <= 1
    if "path" in recipe:
        steps = [tuple(s) for s in recipe["path"]]
        assert steps and all(0 <= k < 3 and 0 <= j < 3 for k, j in steps)
        assert max(steps.count(s) for s in steps) <= evolve.MAX_REPEATS
        assert len(recipe["scales"]) == len(steps) and all(0.5 <= s <= 1.5 for s in recipe["scales"])
    if "layers" in recipe:
        assert len(recipe["layers"]) == 4 and all(0 <= s < 3 for s in recipe["layers"])


def test_mutation_and_crossover_keep_recipes_legal():
    rng = random.Random(1)
    population = [SPACE.random(rng) for _ in range(30)]
    for _ in range(300):
        a, b = rng.sample(population, 2)
        child = SPACE.mutate(SPACE.crossover(a, b, rng), rng, 0.5)
        _assert_legal(child)
        population[rng.randrange(len(population))] = child


def test_vector_round_trip():
    recipe = SPACE.random(random.Random(2), "ties")
    assert SPACE.with_vector(recipe, SPACE.vector(recipe)) == recipe


def test_merge_arguments_follow_the_recipe():
    method, kwargs = evolve.merge_arguments({"method": "slerp", "behaviour": 2, "pair": [1, 2], "t": 0.3})
    assert method == "slerp" and kwargs == {"config_from": 1, "t": 0.3}
    assert evolve.recipe_sources({"method": "slerp", "pair": [1, 2]}, 3) == [1, 2]
    method, kwargs = evolve.merge_arguments(
        {"method": "dfs", "behaviour": 0, "weights": [1, 0, 0], "path": [[0, 1], [2, 0]], "scales": [1.0, 0.7]}
    )
    assert kwargs["path"] == [(0, 1), (2, 0)] and kwargs["scales"] == [1.0, 0.7]


TARGET = [0.2, 0.9, 0.5]


def synthetic_fitness(recipe):
    """Best at linear with weights TARGET; other methods score lower."""
    if recipe["method"] != "linear":
        return -1.0 + 0.1 * random.Random(evolve.recipe_hash(recipe)).random()
    return -sum((w - t) ** 2 for w, t in zip(recipe["weights"], TARGET))


def run_search(seed=0, generations=12, **overrides):
    calls = []

    def evaluate(recipes):
        calls.append(len(recipes))
        return [synthetic_fitness(r) for r in recipes]

    settings = evolve.EvolutionSettings(generations=generations, patience=generations, **overrides)
    evolution = evolve.Evolution(SPACE, settings, evaluate, seed=seed)
    return evolution, evolution.run(), calls


def test_search_improves_towards_the_optimum():
    evolution, result, _ = run_search()
    first = result.generations[0]["best_fitness"]
    assert result.best["method"] == "linear"
    assert result.best_fitness > first + 0.05 and result.best_fitness > -0.05
    assert all(a["best_fitness"] <= b["best_fitness"] for a, b in zip(result.generations, result.generations[1:]))


def test_cma_candidates_join_each_generation():
    evolution, result, _ = run_search(generations=4, cma_per_generation=3)
    assert evolution._cma is not None and evolution._cma_method[0] == "linear"


def test_cache_prevents_re_evaluation_and_replays_identically():
    evolution, result, calls = run_search(generations=6)
    assert sum(calls) == len(evolution.cache)  # every recipe evaluated once
    replay_calls = []
    replay = evolve.Evolution(
        SPACE,
        evolution.settings,
        lambda rs: replay_calls.append(rs) or [0.0] * len(rs),
        seed=evolution.seed,
        cache=dict(evolution.cache),
    )
    again = replay.run()
    assert replay_calls == [] and again.best == result.best and again.generations == result.generations


def test_runs_are_deterministic_per_seed():
    assert run_search(seed=3)[1].best == run_search(seed=3)[1].best
    assert run_search(seed=3)[1].generations != run_search(seed=4)[1].generations


def test_early_stop_after_patience_generations_without_gain():
    settings = evolve.EvolutionSettings(generations=20, patience=2)
    result = evolve.Evolution(SPACE, settings, lambda rs: [0.0] * len(rs), seed=0).run()
    assert len(result.generations) == 3 and "no gain" in result.stop_reason


def test_diversity_guard_keeps_several_methods():
    evolution, result, _ = run_search(generations=10, min_methods=3)
    assert all(len(row["methods"]) >= 3 for row in result.generations)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown merge methods"):
        evolve.SearchSpace(n_sources=3, layer_slots=2, stack_layers=2, methods=("linear", "soup"))
    with pytest.raises(ConfigError, match="population > elites"):
        evolve.EvolutionSettings(population=2, elites=2)
    with pytest.raises(ConfigError, match=r"generations: expected an int in \[1, 100000\], got 0"):
        evolve.EvolutionSettings(generations=0)
    assert undeclared(evolve.EvolutionSettings) == []


def test_describe_is_short_and_readable():
    assert evolve.describe(SPACE.default("slerp")) == "slerp: sources 0 and 1 at t 0.5; config of source 0"
    assert (
        evolve.describe(SPACE.default("dfs"))
        == "dfs: 3-step layer path, branch scales 1, weights 1/1/1; config of source 0"
    )
    assert (
        evolve.describe(SPACE.default("frankenmerge"))
        == "frankenmerge: layers from sources 0120, weights 1/1/1; config of source 0"
    )
