"""The compression phase's report figures, drawn from its ``summary.json``: bits per weight and
codec of every tensor, the codecs tried on the largest tensors, quality against size. Each
drawing function returns ``(title, matplotlib Figure or None)``."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure


def figures(phase_dir: Path) -> list:
    """Report figures from ``summary.json``: ``[(title, Figure, [source])]``."""
    source = Path(phase_dir) / "summary.json"
    if not source.is_file():
        return []
    summary = json.loads(source.read_text())
    drawn = [bits_per_tensor(summary), codecs_tried(summary), quality_vs_size(summary)]
    return [(title, fig, [source]) for title, fig in drawn if fig is not None]


def bits_per_tensor(summary: dict):
    """Measured bits per weight of every tensor (log scale), coloured by the codec chosen."""
    tensors = summary["tensors"]
    codecs = sorted({t["codec"] for t in tensors})
    colours = {c: f"C{i % 10}" for i, c in enumerate(codecs)}
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(tensors)), [t["bits_per_weight"] for t in tensors], color=[colours[t["codec"]] for t in tensors])
    ax.set_yscale("log")
    ax.set_xticks(range(len(tensors)), [t["tensor"].removeprefix("model.") for t in tensors], rotation=90, fontsize=5)
    ax.set_ylabel("bits per weight (measured)")
    ax.legend(
        handles=[ax.bar(0, 0, color=colours[c], label=c) for c in codecs],
        fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    return "Compression: bits per weight and codec of every tensor", fig


def codecs_tried(summary: dict, largest: int = 3):
    """Layer-output error against bits per weight of every codec tried on the largest non-ternary
    matrices (RTN, the control, as crosses); the dotted line is the budget."""
    matrices = sorted(
        (t for t in summary["tensors"] if t["group"] != "ternary" and len(t["trials"]) > 2), key=lambda t: -t["bytes"]
    )[:largest]
    title = "Compression: codecs tried per tensor (dotted: the budget)"
    if not matrices:
        return title, None
    fig = Figure(figsize=(4 * len(matrices), 3.4), layout="constrained")
    for ax, t in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices):
        for name, trial in t["trials"].items():
            control = name.startswith(("rtn", "int"))
            ax.scatter(
                trial["bits_per_weight"], max(trial["output_error"], 1e-9), label=name, marker="x" if control else "o"
            )
        ax.axvline(summary["settings"]["bits_budget"], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{t['tensor']} -> {t['codec']}", fontsize="small")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("relative layer-output error")
        ax.legend(fontsize="xx-small", ncol=2)
    return title, fig


def quality_vs_size(summary: dict):
    """Validation perplexity against artifact bytes over the budget sweep (no distillation), the
    uncompressed model, the gate's limit, and the final distilled and gated artifact."""
    reference = summary["gate_reference"]["perplexity"]
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    rows = summary["sweep"]
    ax.plot([r["bytes"] for r in rows], [r["perplexity"] for r in rows], "o-", label="budget sweep (no distillation)")
    for r in rows:
        ax.annotate(f"{r['budget']:g} b", (r["bytes"], r["perplexity"]), fontsize="x-small")
    ax.axhline(reference, color="k", ls=":", label="uncompressed")
    ax.axhline(reference * summary["settings"]["max_perplexity_ratio"], color="r", ls=":", label="gate")
    last = summary["attempts"][-1]
    ax.plot([last["bytes"]], [reference * last["perplexity_ratio"]], "r*", ms=12, label="artifact")
    ax.set_xscale("log")
    ax.set_xlabel("artifact bytes")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize="small")
    return "Compression: quality vs size", fig
