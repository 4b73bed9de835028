"""BitNet's report figures: held-out quality of the float, ternary-before and packed models,
per-layer calibration error and sparsity, the fine-tuning loss with λ, speed and size."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from agentforge.figures import integer_ticks
from agentforge.phases.bitnet import layer_rows


def figures(phase_dir: Path) -> list:
    """Report figures from ``summary.json`` and the fine-tuning rows: held-out quality of the three
    states, per-layer calibration error and sparsity, the loss and λ during fine-tuning, and
    speed and size packed vs float. Returns ``[(title, matplotlib Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    source = phase_dir / "summary.json"
    if not source.is_file():
        return []
    summary = json.loads(source.read_text())
    labels = {
        "fp": "float input",
        "ternary_before": "ternary, before FT",
        "finetuned": "packed, after FT",
        "fp_control": "float, same FT (control)",
    }
    models = [m for m in labels if m in summary["models"]]
    out = []

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ppl, acc = fig.subplots(1, 2)
    ppl.bar(range(len(models)), [summary["models"][m]["perplexity"] for m in models], color="tab:blue")
    ppl.set_xticks(range(len(models)), [labels[m] for m in models], rotation=20, fontsize="small")
    ppl.set_ylabel("held-out text perplexity")
    domains = list(summary["models"]["fp"]["accuracy"])
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        acc.bar(
            [d + (i - (len(models) - 1) / 2) * width for d in range(len(domains))],
            [summary["models"][model]["accuracy"][d] for d in domains],
            width,
            label=labels[model],
        )
    acc.set_xticks(range(len(domains)), domains)
    acc.set_ylabel("held-out task accuracy")
    acc.legend(fontsize="small")
    out.append(("BitNet: held-out quality, float vs ternary before and after fine-tuning", fig, [source]))

    layers = layer_rows(summary)
    fig = Figure(figsize=(8, 0.8 + 0.22 * len(layers)), layout="constrained")
    err, sparse = fig.subplots(1, 2, sharey=True)
    ys = range(len(layers))
    err.barh([y + 0.2 for y in ys], [r["error_per_tensor"] for r in layers], 0.4, label="per-tensor scale")
    err.barh([y - 0.2 for y in ys], [r["error_per_channel"] for r in layers], 0.4, label="per-channel scales")
    err.set_yticks(
        list(ys),
        [("* " if r["sensitive"] else "") + r["name"] + (" [pc]" if r["per_channel"] else "") for r in layers],
        fontsize="x-small",
    )
    err.set_xlabel("relative output error (calibration)")
    err.legend(fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2)
    sparse.barh(list(ys), [r.get("sparsity", 0.0) for r in layers], color="tab:gray")
    sparse.set_xlabel("fraction of zero codes (packed)")
    out.append(("BitNet: per-layer calibration (* sensitive, [pc] per-channel) and sparsity", fig, [source]))

    train_source = phase_dir / "train" / "ternary" / "metrics.jsonl"
    rows = read_metrics(train_source, phase="bitnet/ternary")
    if rows:
        fig = Figure(figsize=(6, 3), layout="constrained")
        loss = fig.add_subplot()
        loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue")
        loss.set_xlabel("fine-tuning step")
        integer_ticks(loss.xaxis)
        loss.set_ylabel("training loss", color="tab:blue")
        lam = loss.twinx()
        lam.plot([r["step"] for r in rows], [r["lambda"] for r in rows], color="tab:red", ls="--")
        lam.set_ylabel("quantization strength λ", color="tab:red")
        out.append(("BitNet: STE fine-tuning loss and the λ warm-up", fig, [train_source]))

    speed = summary["speed"]
    keys = [k for k in speed["fp"] if k.startswith("tokens_per_s_b")]
    fig = Figure(figsize=(8, 3), layout="constrained")
    tps, size = fig.subplots(1, 2)
    for i, name in enumerate(("fp", "packed")):
        tps.bar(
            [j + (i - 0.5) * 0.4 for j in range(len(keys))],
            [speed[name][k] for k in keys],
            0.4,
            label="float (F.linear)" if name == "fp" else "packed (ternary kernels)",
        )
    tps.set_xticks(range(len(keys)), [f"batch {k.removeprefix('tokens_per_s_b')}" for k in keys])
    tps.set_ylabel("generation tokens/s")
    tps.legend(fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2)
    size.bar(
        ["float", "packed"],
        [summary["sizes"]["fp_bytes"] / 1e6, summary["sizes"]["packed_bytes"] / 1e6],
        color=["tab:blue", "tab:orange"],
    )
    size.set_ylabel("weights on disk (MB)")
    note = speed_note(speed, summary["sizes"])
    if note:
        fig.supxlabel(textwrap.fill(note, 120), fontsize="small", ha="left", x=0.01)
    out.append(("BitNet: generation speed and size on disk, packed vs float", fig, [source]))
    return out


def speed_note(speed: dict, sizes: dict) -> str | None:
    """What the speed panel shows, from the measurements: the share of batch-1 generation time the
    converted layers take in each model (their ``layer_time_share``) and, where packed is slower
    than float, where the time goes: into those layers when they take longer packed (at small
    matrix sizes a kernel call's fixed cost outweighs its arithmetic), else into the rest of the
    model. None when the summary has no layer shares (an older run)."""
    fp, packed = speed["fp"], speed["packed"]
    if "layer_time_share" not in fp or "layer_time_share" not in packed or "tokens_per_s_b1" not in fp:
        return None
    ms_fp = 1e3 * fp["layer_time_share"] / fp["tokens_per_s_b1"]
    ms_packed = 1e3 * packed["layer_time_share"] / packed["tokens_per_s_b1"]
    shares = (
        f"The converted layers take {fp['layer_time_share']:.0%} of the float model's batch-1 generation time "
        f"({ms_fp:.2f} ms per token) and {packed['layer_time_share']:.0%} of the packed model's "
        f"({ms_packed:.2f} ms)"
    )
    slower = [k.removeprefix("tokens_per_s_b") for k in fp if k.startswith("tokens_per_s_b") and packed[k] < fp[k]]
    if not slower:
        return f"{shares}: the most that faster kernels for them can save."
    if ms_packed <= ms_fp:
        return (
            f"Packed is slower at batch {', '.join(slower)}, though not in the converted layers. {shares}: "
            "the difference lies in the rest of the model's work."
        )
    weights = max((r["weights"] for r in sizes.get("layers", {}).values()), default=None)
    at_most = f" ({weights:,} weights at most)" if weights else ""
    return (
        f"Packed is slower at batch {', '.join(slower)}. {shares}: at these matrix sizes{at_most} a packed "
        "call's fixed cost (quantizing the activations, dispatch) outweighs the matmul it replaces. The ternary "
        "kernels gain on large matrices (agentforge bench)."
    )
