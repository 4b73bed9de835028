"""Baking's report figures: the cycles (each iteration's candidates in context and the unprompted
score before and after its bake), the held-out KL curve of every bake, and the test-split
comparison of the tool prompt's KL and behaviour."""

from __future__ import annotations

import json
from pathlib import Path

from agentforge.baking import CYCLES
from agentforge.figures import integer_ticks


def figures(phase_dir: Path) -> list:
    """Report figures: the cycles (each iteration's candidates in context and the unprompted score
    before and after its bake), the held-out KL curve of every bake, and the test-split
    comparison of the tool prompt's KL and behaviour. ``[(title, Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    rows = read_metrics(phase_dir, phase="baking/iteration")
    out = []
    if rows:
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        for cycle, color in zip(CYCLES, ("tab:blue", "tab:orange")):
            mine = [r for r in rows if r["cycle"] == cycle]
            ax.scatter(
                [r["iteration"] for r in mine for _ in r["candidates"]],
                [c["score"] for r in mine for c in r["candidates"]],
                color=color,
                alpha=0.4,
                marker="x",
                label=f"{cycle}: candidates in context",
            )
            for r in mine:
                ax.plot(
                    [r["iteration"] - 0.3, r["iteration"] + 0.3],
                    [r["unprompted_before"], r["unprompted_after"]],
                    "o-",
                    color=color,
                    label=f"{cycle}: unprompted before -> after" if r is mine[0] else None,
                )
        ax.set_xlabel("iteration")
        integer_ticks(ax.xaxis)
        ax.set_ylabel("validation score (cycle's own measure)")
        ax.legend(fontsize="small")
        out.append(
            ("Baking cycles: candidates in context and the unprompted model", fig, [phase_dir / "metrics.jsonl"])
        )
        bakes = [r for r in rows if "bake" in r]
        if bakes:
            fig = Figure(figsize=(7, 3.2), layout="constrained")
            ax = fig.add_subplot()
            for r in bakes:
                curve = r["bake"]["curve"]
                ax.plot(
                    [p["step"] for p in curve],
                    [p["kl"] for p in curve],
                    "o-",
                    markersize=3,
                    label=f"{r['iteration']} {r['cycle']} ({r['outcome'][:24]})",
                )
            ax.set_xlabel("baking step")
            integer_ticks(ax.xaxis)
            ax.set_ylabel("validation KL, nats/token\n(prompted || unprompted)")
            ax.legend(fontsize="small")
            out.append(("Held-out KL during each bake", fig, [phase_dir / "metrics.jsonl"]))
    summary_path = phase_dir / "summary.json"
    if summary_path.is_file():
        report = json.loads(summary_path.read_text())["report"]
        fig = Figure(figsize=(8, 3.2), layout="constrained")
        kl_ax, tools_ax = fig.subplots(1, 2)
        kl = report["kl"]["tools"]
        kl_ax.bar(list(kl), list(kl.values()), color="tab:purple")
        kl_ax.set_ylabel("test KL, nats/token\n(prompted original || model)")
        behaviour = report["behaviour"]["tools"]
        names = list(behaviour)
        for i, key in enumerate(("format", "accuracy")):
            tools_ax.bar([n + i * 0.4 for n in range(len(names))], [behaviour[n][key] for n in names], 0.4, label=key)
        tools_ax.set_xticks([n + 0.2 for n in range(len(names))], names, rotation=20, fontsize="small")
        tools_ax.set_ylabel("test share\n(unprompted unless 'prompted')")
        tools_ax.legend(fontsize="small")
        out.append(("Tool prompt on the test split: KL and behaviour", fig, [summary_path]))
    return out
