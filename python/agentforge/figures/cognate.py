"""Cognate's report figures: held-out accuracy and answer NLL per domain for the trunk and each
sibling, and (for Cognate models) each model's ACT passes beside its forward throughput."""

from __future__ import annotations

from pathlib import Path

from agentforge.phases.cognate import SIBLINGS


def figures(phase_dir: Path) -> list:
    """The report's figures for this phase, drawn from the summary row of ``phase_dir/metrics.jsonl``:
    held-out accuracy and answer NLL per domain for the trunk and each sibling, and each model's
    ACT passes beside its forward throughput. Returns ``[(title, matplotlib Figure, [source file])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    source = Path(phase_dir) / "metrics.jsonl"
    rows = read_metrics(source, phase="cognate")
    if not rows:
        return []
    row, models = rows[-1], ["trunk", *SIBLINGS]
    domains = [domain for domain, _ in SIBLINGS.values()]
    width = 0.8 / len(models)
    out = []
    for key, title, label in (
        ("accuracy", "Held-out accuracy per domain", "exact-match accuracy"),
        ("answer_nll", "Held-out answer NLL per domain (lower is better)", "mean NLL of answer tokens (nats)"),
    ):
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        for i, model in enumerate(models):
            offsets = [d + (i - (len(models) - 1) / 2) * width for d in range(len(domains))]
            ax.bar(offsets, [row[f"{model}/{key}/{domain}"] for domain in domains], width, label=model)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_xlabel("held-out domain")
        ax.set_ylabel(label)
        ax.legend(title="model", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        out.append((title, fig, [source]))
    if "trunk/act_steps" not in row:  # a pretrained base: no ACT recursion to show
        return out
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    passes, speed = fig.subplots(1, 2)
    passes.bar(models, [row[f"{model}/act_steps"] for model in models], color="tab:purple")
    passes.set_ylabel("mean ACT passes per token")
    speed.bar(models, [row[f"{model}/forward_tokens_per_s"] for model in models], color="tab:green")
    speed.set_ylabel("forward tokens/s (held-out text)")
    for ax in (passes, speed):
        ax.tick_params(axis="x", rotation=20)
    out.append(("ACT passes and forward throughput", fig, [source]))
    return out
