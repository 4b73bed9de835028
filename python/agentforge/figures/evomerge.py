"""EvoMerge's report figures: the selection fitness per generation, and each method's best
recipe against the champion on the test split."""

from __future__ import annotations

import json
from pathlib import Path

from agentforge.figures import integer_ticks
from agentforge.merge.evolve import describe


def figures(phase_dir: Path) -> list:
    """Report figures: best and mean selection fitness per generation, and the champion and the
    best recipe of every method on the test split, as fitness above the best parent's.
    Returns ``[(title, matplotlib Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    rows = read_metrics(phase_dir, phase="evomerge/generation")
    out = []
    if rows:
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.plot([r["generation"] for r in rows], [r["best_fitness"] for r in rows], "o-", label="best so far")
        ax.plot([r["generation"] for r in rows], [r["mean_fitness"] for r in rows], "s--", label="population mean")
        ax.set_xlabel("generation")
        integer_ticks(ax.xaxis)
        ax.set_ylabel("selection fitness (validation split)")
        ax.legend()
        out.append(("EvoMerge fitness per generation", fig, [phase_dir / "metrics.jsonl"]))
    summary_path = phase_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        title = (
            "each method's best recipe vs the champion"
            if summary["ablation"]
            else "the champion vs the best parent (no per-method ablation in this run)"
        )
        out.append((f"EvoMerge: {title} (test split)", methods_figure(summary), [summary_path]))
    return out


def methods_figure(summary: dict):
    """Bars: each method's best recipe and the champion, as test-split fitness minus the best
    parent's. The differences are small next to the fitness itself (0.01 against about −5), so
    they are what is drawn, on an axis zoomed to them."""
    from matplotlib.figure import Figure

    parent = summary["final_fitness"][summary["best_parent"]]
    methods = list(summary["ablation"])
    gains = [summary["ablation"][m]["best_final_fitness"] - parent for m in methods]
    champion = summary["final_fitness"]["champion"] - parent
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(methods, gains, color="tab:blue", label="best recipe of the method")
    ax.bar(["champion"], [champion], color="tab:red", label="champion")
    ax.axhline(0.0, color="k", ls=":", label=f"best parent ({summary['best_parent']}, fitness {parent:.3f})")
    low, high = min(0.0, champion, *gains), max(0.0, champion, *gains)
    pad = 0.1 * (high - low) or 1e-3
    ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel("test fitness − best parent's")
    ax.set_title(f"champion: {describe(summary['champion_recipe'])}", fontsize="small", wrap=True)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize="small")
    return fig
