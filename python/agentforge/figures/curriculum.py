"""The Curriculum's report figures: held-out accuracy per level before / after / control, questions
remaining over the rounds of each level, and self-prediction and tool accuracy per model."""

from __future__ import annotations

import json
from pathlib import Path

from agentforge.figures import integer_ticks


def figures(phase_dir: Path) -> list:
    """Report figures: held-out accuracy per level before / after / control (95 % bootstrap
    intervals), questions remaining over the rounds of each level, and self-prediction and tool
    accuracy per model. ``[(title, matplotlib Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    out = []
    summary_path = phase_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        fig = Figure(figsize=(7, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for offset, (name, table) in zip((-0.15, 0.0, 0.15), summary["per_level"].items()):
            levels = sorted(table, key=int)
            acc = [table[level]["accuracy"] for level in levels]
            err = [
                [a - table[level]["ci"][0] for a, level in zip(acc, levels)],
                [table[level]["ci"][1] - a for a, level in zip(acc, levels)],
            ]
            ax.errorbar([int(level) + offset for level in levels], acc, yerr=err, fmt="o-", capsize=2, label=name)
        for level in summary["headline"]["visited_levels"]:
            ax.axvspan(level - 0.45, level + 0.45, color="0.9", zorder=0)
        ax.set_xlabel("difficulty level (shaded: trained by the curriculum)")
        integer_ticks(ax.xaxis)
        ax.set_ylabel("held-out test accuracy")
        ax.legend(title="model", fontsize="small")
        out.append(("Curriculum: held-out accuracy per level, before / after / control", fig, [summary_path]))
    rounds = read_metrics(phase_dir, phase="curriculum/round")
    if rounds:
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.add_subplot()
        for i, level in enumerate(sorted({r["level"] for r in rounds})):
            mine = [r for r in rounds if r["level"] == level]
            # levels often share counts (each starts with the same number of questions): a marker
            # smaller than the one before keeps an earlier level visible under a later one
            ax.plot(
                [r["round"] for r in mine],
                [r["remaining"] for r in mine],
                "os^Dv"[i % 5] + "-",
                markersize=max(9 - 2 * i, 3),
                label=f"level {level}",
            )
        ax.set_xlabel("round")
        integer_ticks(ax.xaxis)
        integer_ticks(ax.yaxis)
        ax.set_ylabel("questions remaining")
        ax.legend(fontsize="small")
        out.append(("Curriculum: questions remaining over time", fig, [phase_dir / "metrics.jsonl"]))
    if summary_path.is_file():
        fig = Figure(figsize=(7, 3), layout="constrained")
        left, right = fig.subplots(1, 2)
        names = list(summary["self_prediction"])
        left.bar(names, [summary["self_prediction"][n]["accuracy"] for n in names], color="tab:purple")
        left.set_ylabel("self-prediction accuracy")
        tool_names = list(summary["tools"])
        for i, key in enumerate(("b", "a")):
            right.bar(
                [j + (i - 0.5) * 0.4 for j in range(len(tool_names))],
                [summary["tools"][n]["without"][key] for n in tool_names],
                0.4,
                label=("without tools", "with tools")[i],
            )
        right.set_xticks(range(len(tool_names)), tool_names)
        right.set_ylabel("arithmetic accuracy (test)")
        right.legend(fontsize="small")
        out.append(("Curriculum: self-prediction and tool use", fig, [summary_path]))
    return out
