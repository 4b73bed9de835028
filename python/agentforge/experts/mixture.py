"""Mixture search: the mixing weights α of the experts for one router class, found by CMA-ES on
real evaluations of the adapted model.

Every candidate α is *measured*: ``evaluate(alphas)`` answers the class's validation items with
the mixture installed and returns its accuracy, the mean NLL of the reference answers, its compute
(FLOPs per answered item, counted, not timed: answering the items plus building the mixture's
adapted weights, spread over the items) and its memory (bytes of adapted weights the mixture keeps
cached; 0 for the base model). CMA-ES (the ``cma`` package) maximises

    accuracy − w_nll · answer NLL − w_compute · compute / compute(base) − w_memory · memory / memory(one copy)

(the small NLL term separates the many candidates a few dozen items score alike) and every
measured candidate is kept, so the Pareto front of (accuracy ↑, compute ↓, memory ↓) comes from
measurements, not from the scalarisation. Nothing timed enters the fitness or the front: a
candidate's wall-clock latency is recorded for the report only, so the same seed selects the same
mixture on any machine. Weights below ``floor`` are set to 0, so a mixture can drop an expert or
fall back to the base model (α = 0) when adapting does not pay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from agentforge.settings import Checked, setting


@dataclass(frozen=True)
class Measurement:
    """One evaluated mixture; ``latency_s`` (wall seconds per answered item) is reported, never selected on."""

    alphas: tuple[float, ...]
    accuracy: float
    compute: float  # FLOPs per answered item, the mixture's weight building included
    memory_bytes: int
    answer_nll: float = 0.0
    latency_s: float = 0.0


@dataclass
class SearchSettings(Checked):
    """CMA-ES over α ∈ [0, alpha_max]^N, from a start point with step size ``sigma``, and the
    fitness weights (see the module docstring)."""

    generations: int = setting(2, "[0, 10000]")
    population: int = setting(4, "[2, 10000]")
    sigma: float = setting(0.3, "(0, 100]", doc="CMA-ES initial step size")
    alpha_max: float = setting(1.5, "(0, 100]")
    floor: float = setting(0.05, "[0, 100]", doc="weights below it become 0 (the expert is dropped)")
    w_nll: float = setting(0.02, "[0, 1000]", doc="fitness weight of the mean answer NLL")
    w_compute: float = setting(0.02, "[0, 1000]", doc="fitness weight of the FLOPs per item, relative to the base's")
    w_memory: float = setting(0.01, "[0, 1000]", doc="fitness weight of the cached adapted bytes, relative to a copy")

    def check(self) -> None:
        if self.floor >= self.alpha_max:
            self.fail("floor", f"must be below alpha_max ({self.alpha_max}), or every weight would be dropped")


def sanitize(alphas: Sequence[float], settings: SearchSettings) -> tuple[float, ...]:
    """Clip to [0, alpha_max], zero the weights below ``floor``, round to 3 decimals (the cache key)."""
    clipped = np.clip(np.asarray(alphas, dtype=np.float64), 0.0, settings.alpha_max)
    return tuple(round(float(a), 3) if a >= settings.floor else 0.0 for a in clipped)


def pareto_front(measurements: Sequence[Measurement]) -> list[int]:
    """Indices of the measurements no other one dominates (accuracy ≥, compute ≤, memory ≤, one strictly)."""

    def dominates(a: Measurement, b: Measurement) -> bool:
        no_worse = a.accuracy >= b.accuracy and a.compute <= b.compute and a.memory_bytes <= b.memory_bytes
        better = a.accuracy > b.accuracy or a.compute < b.compute or a.memory_bytes < b.memory_bytes
        return no_worse and better

    return [i for i, m in enumerate(measurements) if not any(dominates(o, m) for o in measurements)]


class MixtureSearch:
    """Search α for one class. ``evaluate(alphas) -> Measurement`` runs the real model; ``seed``
    seeds CMA-ES."""

    def __init__(
        self,
        evaluate: Callable[[tuple[float, ...]], Measurement],
        n_experts: int,
        settings: SearchSettings,
        *,
        seed: int = 0,
    ):
        if n_experts < 2:
            raise ValueError(f"mixture search needs at least 2 experts (CMA-ES needs 2 dimensions), got {n_experts}")
        self.evaluate = evaluate
        self.n_experts = n_experts
        self.settings = settings
        self.seed = seed
        self.measured: dict[tuple[float, ...], Measurement] = {}
        self.reference: Measurement | None = None
        self.adapted_bytes = 0

    def measure(self, alphas: Sequence[float]) -> Measurement:
        """The measurement of the sanitised α, evaluated once and cached."""
        key = sanitize(alphas, self.settings)
        if key not in self.measured:
            self.measured[key] = self.evaluate(key)
        return self.measured[key]

    def fitness(self, m: Measurement) -> float:
        """The scalarised objective CMA-ES maximises (costs relative to the base model's)."""
        ref, s = self.reference, self.settings
        assert ref is not None, "fitness before the reference measurement"
        compute = m.compute / ref.compute if ref.compute > 0 else 0.0
        memory = m.memory_bytes / self.adapted_bytes if self.adapted_bytes else 0.0
        return m.accuracy - s.w_nll * m.answer_nll - s.w_compute * compute - s.w_memory * memory

    def run(self, start: Sequence[float], adapted_bytes: int) -> Measurement:
        """Measure the base model (α = 0) and ``start``, then run CMA-ES from ``start``; return the
        best measured mixture by fitness (ties: fewer bytes, then the earlier one)."""
        import cma

        self.adapted_bytes = adapted_bytes
        self.reference = self.measure([0.0] * self.n_experts)
        self.measure(start)
        s = self.settings
        if s.generations:
            strategy = cma.CMAEvolutionStrategy(
                list(map(float, start)),
                s.sigma,
                {"seed": self.seed + 1, "popsize": s.population, "bounds": [0, s.alpha_max], "verbose": -9},
            )
            for _ in range(s.generations):
                asked = strategy.ask()
                strategy.tell(asked, [-self.fitness(self.measure(x)) for x in asked])  # cma minimises
        return self.best()

    def best(self) -> Measurement:
        ranked = sorted(
            enumerate(self.measured.values()), key=lambda pair: (-self.fitness(pair[1]), pair[1].memory_bytes, pair[0])
        )
        return ranked[0][1]

    def history(self) -> list[dict]:
        """Every measured candidate with its fitness and whether it is on the Pareto front."""
        measured = list(self.measured.values())
        front = set(pareto_front(measured))
        return [
            {**asdict(m), "alphas": list(m.alphas), "fitness": self.fitness(m), "pareto": i in front}
            for i, m in enumerate(measured)
        ]
