"""Quiet-STaR's report figures: accuracy and answer log-likelihood (with 95 % intervals) of the
parent, the thinker thinking and not thinking, and the equal-compute control; the training losses
of the thinker and the control."""

from __future__ import annotations

import json
from pathlib import Path

from agentforge.figures import integer_ticks


def figures(phase_dir: Path) -> list:
    """The report's figures for this phase, drawn from ``phase_dir/summary.json``. Returns
    ``[(title, matplotlib Figure, [source file])]``."""
    from matplotlib.figure import Figure

    summary_path = Path(phase_dir) / "summary.json"
    if not summary_path.is_file():
        return []
    summary = json.loads(summary_path.read_text())
    names = list(summary["table"])
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    for ax, metric, label in zip(
        fig.subplots(1, 2), ("accuracy", "answer_loglik"), ("test accuracy", "answer log-likelihood (nats)")
    ):
        stats = [summary["table"][n][metric] for n in names]
        ax.bar(
            names,
            [s["mean"] for s in stats],
            yerr=[[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]],
            capsize=4,
        )
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
    out = [("Quiet-STaR vs controls on held-out tasks (95 % bootstrap intervals)", fig, [summary_path])]
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(summary["thinker_losses"], label="Quiet-STaR loss (thinker)")
    ax.plot(summary["control_losses"], label="plain NLL (equal-compute control)")
    ax.set_xlabel("step")
    integer_ticks(ax.xaxis)
    ax.legend()
    out.append(("Quiet-STaR training loss vs the control", fig, [summary_path]))
    return out
