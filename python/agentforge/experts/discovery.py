"""Expert discovery: which experts the model needs, decided by measuring it.

1. Capability: the base model's held-out (validation-split) accuracy on every *unit*, a task
   family at one difficulty level (``kv_recall@1``).
2. Learning zone: the units whose accuracy lies in [low, high] — solved sometimes, not always —
   are the ones training can move; hopeless and mastered units stay with the base model, and so
   does a family with no unit in the zone. When fewer than N families have a unit inside, the
   zone is widened just enough to let N in (recorded).
3. Gradient similarity: for each family with zone units, the gradient of the answer
   cross-entropy of those units' items with respect to the z of all adapted matrices, at z = 1;
   families whose gradients point the same way want the same change of the weights.
4. Clustering: average-linkage agglomeration of those families into N experts under the distance
   (1 − cos(g_i, g_j)) / 2 + w · |acc_i − acc_j| (gradient direction, then zone accuracy).

Each expert's training set is the training split of its families' zone units. Experts are made of
whole families because pass one must tell them apart from the prompt alone, and a prompt shows its
family far more plainly than its difficulty level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agentforge.experts.svf import SVDBasis, SVFExpert
from agentforge.experts.training import IGNORE_INDEX, frozen

MIN_EXPERTS, MAX_EXPERTS = 3, 10


@dataclass(frozen=True, order=True)
class Unit:
    """One task family at one difficulty level."""

    family: str
    level: int

    @property
    def name(self) -> str:
        return f"{self.family}@{self.level}"

    @classmethod
    def parse(cls, name: str) -> Unit:
        """The unit named ``family@level``."""
        family, sep, level = name.rpartition("@")
        if not sep or not level.isdigit():
            raise ValueError(f"unit {name!r}: expected FAMILY@LEVEL, e.g. kv_recall@1")
        return cls(family, int(level))


def unit_items(units: Sequence[Unit], split: str, n: int, seed: int, skip: int = 0, render=None) -> dict[Unit, list]:
    """Up to ``n`` items of ``split`` per unit, each prompt once, after skipping the first ``skip``
    distinct prompts (so two calls can take disjoint parts of one stream). A level with few
    distinct prompts (count_bits@0 has 63 in all) gives fewer items: repeated prompts would
    count one item several times and make a confidence interval look tighter than it is.
    ``render`` turns each item into the prompt the model sees (``agentforge.data.rendered``)."""
    from agentforge.data import make_split, rendered

    out = {}
    for unit in units:
        # four draws per wanted prompt: repeats are common only at levels with few prompts
        items = make_split(unit.family, split, 4 * (n + skip), seed=seed, level=unit.level)
        seen, unique = set(), []
        for item in items:
            if item.prompt not in seen:
                seen.add(item.prompt)
                unique.append(item)
        out[unit] = rendered(unique[skip : skip + n], render)
    return out


def capability(model, tokenizer, items: dict[Unit, list], batch_size: int = 64) -> dict[Unit, float]:
    """The model's mean score on each unit's items (one batched generation over all of them)."""
    from agentforge.experts.evaluation import item_scores

    flat = [it for unit_list in items.values() for it in unit_list]
    scores = item_scores(model, tokenizer, flat, batch_size=batch_size)
    out, start = {}, 0
    for unit, unit_list in items.items():
        out[unit] = float(scores[start : start + len(unit_list)].mean())
        start += len(unit_list)
    return out


def learning_zone(accuracy: dict[Unit, float], low: float, high: float) -> list[Unit]:
    """The units whose accuracy lies in [low, high], in sorted order."""
    if not 0 <= low <= high <= 1:
        raise ValueError(f"learning zone: need 0 <= low <= high <= 1, got [{low}, {high}]")
    return sorted(u for u, acc in accuracy.items() if low <= acc <= high)


def widened_zone(accuracy: dict[Unit, float], low: float, high: float, n_families: int) -> tuple[float, float]:
    """[low, high] if at least ``n_families`` families have a unit inside it, else the narrowest
    symmetric widening that lets that many in (each family counted by its unit closest to the zone)."""
    if not 0 <= low <= high <= 1:
        raise ValueError(f"learning zone: need 0 <= low <= high <= 1, got [{low}, {high}]")
    gap: dict[str, float] = {}
    for unit, acc in accuracy.items():
        gap[unit.family] = min(gap.get(unit.family, 1.0), max(low - acc, acc - high, 0.0))
    if len(gap) < n_families:
        raise ValueError(f"only {len(gap)} task families were measured, fewer than n_experts={n_families}")
    margin = sorted(gap.values())[n_families - 1]
    if margin == 0:
        return low, high
    margin += 1e-9  # the boundary unit must land inside despite rounding
    return max(0.0, low - margin), min(1.0, high + margin)


def zone_gradients(
    model, basis: SVDBasis, tokenizer, items: dict[str, list], seq_len: int, seed: int = 0, batch_rows: int = 8
) -> torch.Tensor:
    """One row per group of items (``{name: items}``): the gradient at z = 1 of the mean answer
    cross-entropy of its items (packed into rows of ``seq_len``) with respect to the flat z.
    Shape [groups, basis.total]. The rows go through ``batch_rows`` at a time, their summed losses
    over the group's answer tokens: a group's whole batch at once held its logits and their
    gradients over SmolLM2's 49,152-token vocabulary, gigabytes for a few dozen rows."""
    from agentforge.data import pack_tasks

    expert = SVFExpert(model, basis)
    rows = []
    with frozen(model):
        for group in items.values():
            packed = pack_tasks(tokenizer, group, seq_len, seed=seed).with_format("torch")[:]
            targets = packed["labels"][:, 1:].long()
            answer_tokens = int((targets != IGNORE_INDEX).sum())
            gradient = torch.zeros_like(expert.z)
            for start in range(0, len(targets), batch_rows):
                logits = expert(input_ids=packed["input_ids"][start : start + batch_rows]).logits[:, :-1]
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets[start : start + batch_rows].reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                gradient += torch.autograd.grad(loss / answer_tokens, expert.z)[0]
            rows.append(gradient)
    return torch.stack(rows)


def cosine_similarity(vectors: torch.Tensor) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``vectors``."""
    unit = F.normalize(vectors.double(), dim=1)
    return (unit @ unit.T).clamp(-1, 1).numpy()


def average_linkage(distance: np.ndarray, n_clusters: int) -> list[list[int]]:
    """Agglomerative clustering: start with singletons and merge the two clusters with the smallest
    mean pairwise distance until ``n_clusters`` remain. Clusters are sorted lists of row indices,
    ordered by their first member."""
    n = distance.shape[0]
    if distance.shape != (n, n):
        raise ValueError(f"average_linkage: distance must be square, got shape {distance.shape}")
    if not 1 <= n_clusters <= n:
        raise ValueError(f"average_linkage: cannot make {n_clusters} clusters of {n} points")
    clusters = [[i] for i in range(n)]
    while len(clusters) > n_clusters:
        pairs = [(a, b) for a in range(len(clusters)) for b in range(a + 1, len(clusters))]
        a, b = min(pairs, key=lambda p: distance[np.ix_(clusters[p[0]], clusters[p[1]])].mean())
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters)


@dataclass
class Discovery:
    """What discovery measured and decided: ``experts[k]`` lists the families of expert k and
    ``zone`` the units its training set is drawn from."""

    accuracy: dict[Unit, float]
    bounds: tuple[float, float]  # the learning zone used (widened when too few families were inside)
    zone: list[Unit]
    families: list[str]  # families with zone units, the rows of ``similarity``
    similarity: np.ndarray
    experts: list[list[str]]

    def expert_names(self) -> list[str]:
        """One name per expert: its families joined by '+'."""
        return ["+".join(families) for families in self.experts]

    def expert_units(self) -> dict[str, list[Unit]]:
        """``{expert name: its zone units}``, what it trains on and is judged on."""
        return {
            name: [u for u in self.zone if u.family in families]
            for name, families in zip(self.expert_names(), self.experts)
        }

    def expert_of(self, family: str) -> str | None:
        """The expert a family belongs to, or None when it has no zone unit."""
        return next((name for name, fams in zip(self.expert_names(), self.experts) if family in fams), None)

    def to_dict(self) -> dict:
        return {
            "accuracy": {u.name: acc for u, acc in sorted(self.accuracy.items())},
            "zone_bounds": list(self.bounds),
            "zone": [u.name for u in self.zone],
            "families": self.families,
            "similarity": np.round(self.similarity, 4).tolist(),
            "experts": {name: [u.name for u in units] for name, units in self.expert_units().items()},
        }

    @classmethod
    def from_dict(cls, record: dict) -> Discovery:
        """The discovery ``to_dict`` recorded (its similarity rounded as recorded)."""
        return cls(
            {Unit.parse(name): acc for name, acc in record["accuracy"].items()},
            tuple(record["zone_bounds"]),
            [Unit.parse(name) for name in record["zone"]],
            list(record["families"]),
            np.array(record["similarity"]),
            [name.split("+") for name in record["experts"]],
        )


def cluster_families(
    families: list[str], similarity: np.ndarray, accuracy: dict[str, float], n_experts: int, capability_weight: float
) -> list[list[str]]:
    """Group ``families`` into ``n_experts`` by gradient direction and measured zone accuracy."""
    if not MIN_EXPERTS <= n_experts <= MAX_EXPERTS:
        raise ValueError(f"n_experts must be in [{MIN_EXPERTS}, {MAX_EXPERTS}], got {n_experts}")
    if len(families) < n_experts:
        raise ValueError(
            f"only {len(families)} task families have units in the learning zone, fewer than "
            f"n_experts={n_experts}; widen the zone, add families or levels, or ask for fewer experts"
        )
    acc = np.array([accuracy[f] for f in families])
    distance = (1 - similarity) / 2 + capability_weight * np.abs(acc[:, None] - acc[None, :])
    return [[families[i] for i in cluster] for cluster in average_linkage(distance, n_experts)]


def discover(
    model,
    basis: SVDBasis,
    tokenizer,
    units: Sequence[Unit],
    *,
    n_experts: int,
    zone: tuple[float, float],
    capability_weight: float,
    eval_items: int,
    gradient_items: int,
    seq_len: int,
    seed: int,
    batch_size: int = 64,
    render=None,
) -> Discovery:
    """Measure every unit, keep the learning zone, and cluster its families into ``n_experts`` experts
    (``render``: how an item becomes the model's prompt, see ``unit_items``)."""
    if not MIN_EXPERTS <= n_experts <= MAX_EXPERTS:
        raise ValueError(f"n_experts must be in [{MIN_EXPERTS}, {MAX_EXPERTS}], got {n_experts}")
    accuracy = capability(
        model, tokenizer, unit_items(units, "validation", eval_items, seed, render=render), batch_size
    )
    zone_used = widened_zone(accuracy, *zone, n_experts)
    in_zone = learning_zone(accuracy, *zone_used)
    families = sorted({u.family for u in in_zone})
    zone_of = {f: [u for u in in_zone if u.family == f] for f in families}
    train = unit_items(in_zone, "train", gradient_items, seed, render=render)
    family_items = {f: [it for u in zone_of[f] for it in train[u]] for f in families}
    gradients = zone_gradients(model, basis, tokenizer, family_items, seq_len, seed)
    similarity = cosine_similarity(gradients)
    zone_accuracy = {f: float(np.mean([accuracy[u] for u in zone_of[f]])) for f in families}
    experts = cluster_families(families, similarity, zone_accuracy, n_experts, capability_weight)
    return Discovery(accuracy, zone_used, in_zone, families, similarity, experts)
