"""Experts' report figures: test accuracy and answer NLL per expert domain for the base, each
expert and the two-pass model, and the mixture candidates of each router class with their Pareto
front."""

from __future__ import annotations

import json
from pathlib import Path


def figures(phase_dir: Path) -> list:
    """Report figures from ``summary.json``: test accuracy and answer NLL per expert domain for the
    base, each expert and the two-pass model (95 % bootstrap intervals), and the measured mixture
    candidates of each router class with their Pareto front. ``[(title, Figure, [source file])]``."""
    source = Path(phase_dir) / "summary.json"
    if not source.is_file():
        return []
    summary = json.loads(source.read_text())
    out = [
        (f"Experts: held-out {label} per expert domain", _domain_figure(summary, metric, label), [source])
        for metric, label in (("accuracy", "accuracy"), ("answer_nll", "answer NLL (lower is better)"))
    ]
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
        errors = [
            [m - table[d][model]["low"] for d, m in zip(domains, means)],
            [table[d][model]["high"] - m for d, m in zip(domains, means)],
        ]
        ax.bar(x, means, width, yerr=errors, capsize=2, label=model)
    ax.set_xticks(range(len(domains)), domains, fontsize="small")
    ax.set_xlabel("expert domain (its learning-zone units, test split)")
    ax.set_ylabel(f"{label}, 95 % CI")
    ax.legend(title="model", fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _pareto_figure(summary: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (cls, rows) in enumerate(summary["search"].items()):
        color = f"C{i}"
        compute = [r["compute"] / 1e6 for r in rows]
        accuracy = [r["accuracy"] for r in rows]
        ax.scatter(
            compute,
            accuracy,
            s=[12 if r["memory_bytes"] else 40 for r in rows],
            color=color,
            alpha=0.4,
            label=f"{cls}: candidates",
        )
        front = sorted((c, a) for c, a, r in zip(compute, accuracy, rows) if r["pareto"])
        ax.plot([c for c, _ in front], [a for _, a in front], "o-", color=color, label=f"{cls}: Pareto front")
    ax.set_xlabel("compute per answered item (MFLOPs, counted: answering + building the mixture)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("large dots: α = 0 (base weights, no adapted copy in memory)", fontsize="small")
    ax.legend(fontsize="x-small", ncols=2)
    return fig
