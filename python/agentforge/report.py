"""``DIR/report.html``: one self-contained page about a run (no external files or scripts; every
plot is a matplotlib PNG embedded as a data URI), rebuilt from what is on disk:

* first, what each phase did: its headline effect against its control on held-out data, the 95 %
  interval, and a plain verdict (helped / no measurable effect / hurt), from each phase's
  ``summary.json`` (``effects``);
* the run: directory, id, preset, seed, status, times (``run.json``);
* one row per phase: state, time, artifacts and all its headline metrics (``DIR/metrics.jsonl``);
* training curves: the loss of every training stage, from each ``metrics.jsonl`` under a phase;
* each phase's own figures: a phase module may define ``figures(phase_dir)`` returning
  ``[(title, matplotlib Figure, [the files its numbers come from])]``;
* the model lineage: models and their parents from the registry.

Under every figure the files it was drawn from are named, relative to the run directory.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from agentforge.artifacts import atomic_write_text
from agentforge.rundir import phase_states, read_record, read_run

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.jsonl"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .source { font-family: monospace; }
.completed, .helped { color: #1a7f37; } .failed, .incomplete, .hurt { color: #b42318; }
.skipped, .none { color: #777; } .running { color: #9a6700; }
table.verdicts td, table.verdicts th { font-size: 1.05em; } td.nowrap { white-space: nowrap; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value + 0.0:.4g}"  # + 0.0: a zero that came out of a negative sum shows as 0, not -0
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(_fmt(value))


def _png(fig) -> str:
    """A matplotlib Figure as a ``data:image/png;base64,...`` URI, its empty axes marked as such."""
    from agentforge.figures import mark_empty

    mark_empty(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(run_dir: Path, title: str, fig, sources: list) -> str:
    names = ", ".join(f'<span class="source">{_esc(_relative(run_dir, Path(s)))}</span>' for s in sources)
    return (
        f'<figure><img src="{_png(fig)}" alt="{_esc(title)}">'
        f"<figcaption><b>{_esc(title)}</b>. Source: {names}</figcaption></figure>"
    )


def _relative(run_dir: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _rows(path: Path) -> list[dict]:
    from agentforge.train import read_metrics

    return read_metrics(path)


# ---------------------------------------------------------------------------------------------
# figures


def training_curves(phase_dir: Path) -> list[tuple[str, Any, list[Path]]]:
    """One figure per phase: a panel per training stage (its own step axis) with the training loss
    of every ``metrics.jsonl`` under ``phase_dir`` that holds per-step losses."""
    from matplotlib.figure import Figure

    from agentforge.figures import integer_ticks

    curves = []
    for path in sorted(phase_dir.rglob(METRICS_FILE)):
        if any(part.startswith(".") for part in path.relative_to(phase_dir).parts):
            continue  # a temp directory of an unfinished write
        points = [
            (r["step"], r["loss"])
            for r in _rows(path)
            if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))
        ]
        if points:
            curves.append((path, points))
    if not curves:
        return []
    columns = min(len(curves), 3)
    rows = -(-len(curves) // columns)
    fig = Figure(figsize=(3.6 * columns, 2.6 * rows), layout="constrained")
    for index, (path, points) in enumerate(curves):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(
            path.parent.relative_to(phase_dir).as_posix() if path.parent != phase_dir else phase_dir.name,
            fontsize="medium",
        )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        integer_ticks(ax.xaxis)
    return [(f"{phase_dir.name}: training loss per stage", fig, [path for path, _ in curves])]


def phase_figures(phase_dir: Path, spec) -> list[tuple[str, Any, list[Path]]]:
    """The figures of the module ``spec.figures`` names (none when it names none)."""
    import importlib

    if not spec.figures:
        return []
    module = importlib.import_module(spec.figures)
    figures = list(module.figures(phase_dir))
    for entry in figures:
        if len(entry) != 3 or not entry[2]:
            raise ValueError(
                f"{module.__name__}.figures() must return (title, Figure, [source files]) "
                f"entries; got one of length {len(entry)} for {entry[0]!r}"
            )
    return figures


def _depths(models: list[dict]) -> dict[str, int]:
    """Generation of each model: 0 without a parent in the run, else 1 + its deepest parent's."""
    by_id = {m["id"]: m for m in models}
    depth: dict[str, int] = {}

    def visit(model_id: str, seen: tuple = ()) -> int:
        if model_id not in depth:
            parents = [p for p in by_id[model_id]["parents"] if p in by_id and p not in seen]
            depth[model_id] = 1 + max((visit(p, seen + (model_id,)) for p in parents), default=-1)
        return depth[model_id]

    for model_id in by_id:
        visit(model_id)
    return depth


def _descendants_depth(models: list[dict]) -> dict[str, int]:
    """Length of each model's longest line of descendants (0 for a model without children)."""
    children: dict[str, list[str]] = {m["id"]: [] for m in models}
    for model in models:
        for parent in model["parents"]:
            if parent in children and parent != model["id"]:
                children[parent].append(model["id"])
    reach: dict[str, int] = {}

    def visit(model_id: str, seen: tuple = ()) -> int:
        if model_id not in reach:
            below = [c for c in children[model_id] if c not in seen]
            reach[model_id] = 1 + max((visit(c, seen + (model_id,)) for c in below), default=-1)
        return reach[model_id]

    for model_id in children:
        visit(model_id)
    return reach


def _count(n: int) -> str:
    """A parameter count as people say it: 950, 1.2 k, 134.5 M, 7.0 B."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def lineage_figure(models: list[dict]):
    """Models top to bottom, one row per generation (a model sits a row below its deepest parent),
    boxes coloured by phase, arrows from parent to child. Within a row the model with the longest
    line of descendants comes first, so the main line runs straight down the left and side branches
    stand beside it; an arrow that skips rows bends, so that it does not run through the boxes
    between its ends. Top to bottom keeps the text readable however many phases a run has."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    depth, reach = _depths(models), _descendants_depth(models)
    order = {m["id"]: i for i, m in enumerate(models)}
    rows: dict[int, list[str]] = {}
    for model in models:
        rows.setdefault(depth[model["id"]], []).append(model["id"])
    for ids in rows.values():
        ids.sort(key=lambda mid: (-reach[mid], order[mid]))
    widest = max(len(ids) for ids in rows.values())
    labels = {m["id"]: m["id"] + (f"  ({_count(m['parameters'])} params)" if m["parameters"] else "") for m in models}
    # a lane as wide as the longest label (about 0.075 in per character at 9 pt), so boxes never overlap
    lane = max(2.4, 0.075 * max(map(len, labels.values())) + 0.4)
    fig = Figure(figsize=(lane * widest + 0.4, 0.62 * len(rows) + 0.3), layout="constrained")
    ax = fig.add_subplot()
    position = {mid: (lane, -row) for row, ids in rows.items() for lane, mid in enumerate(ids)}
    phases = list(dict.fromkeys(m["phase"] for m in models))
    colours = {phase: f"C{i % 10}" for i, phase in enumerate(phases)}
    boxes = {}
    for model in models:
        boxes[model["id"]] = ax.text(
            *position[model["id"]],
            labels[model["id"]],
            ha="center",
            va="center",
            fontsize=9,
            zorder=3,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": colours[model["phase"]], "linewidth": 2},
        )
    for model in models:
        for parent in model["parents"]:
            if parent not in position or parent == model["id"]:
                continue
            (x0, y0), (x1, y1) = position[parent], position[model["id"]]
            bend = 0.0 if y0 - y1 <= 1 else (-0.35 if x1 <= x0 else 0.35)  # bow away from the boxes in between
            # drawn above the boxes (zorder 4), so that each box has its place on the page when the
            # arrow is clipped to the edges of the two boxes it joins
            ax.add_patch(
                FancyArrowPatch(
                    (x0, y0),
                    (x1, y1),
                    arrowstyle="-|>",
                    mutation_scale=12,
                    color="#555",
                    lw=1,
                    connectionstyle=f"arc3,rad={bend}",
                    zorder=4,
                    patchA=boxes[parent].get_bbox_patch(),
                    patchB=boxes[model["id"]].get_bbox_patch(),
                    shrinkA=2,
                    shrinkB=2,
                )
            )
    ax.set_xlim(-0.5, widest - 0.5)
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    ax.axis("off")
    return fig


def effects(run_dir: Path, spec) -> list[dict]:
    """The ``effects`` a completed phase recorded in its summary.json (none when it recorded none)."""
    try:
        summary = json.loads((run_dir / spec.dirname / "summary.json").read_text())
    except (OSError, ValueError):
        return []
    found = summary.get("effects") if isinstance(summary, dict) else None
    return [e for e in found if isinstance(e, dict) and "verdict" in e] if isinstance(found, list) else []


# ---------------------------------------------------------------------------------------------
# sections


def _summary_section(run_dir: Path, info: dict | None, states: dict[str, str]) -> str:
    info = info or {}
    config = info.get("config", {})
    done = sum(state == "completed" for state in states.values())
    items = [
        ("directory", run_dir),
        ("run id", info.get("id", "?")),
        ("preset", config.get("preset", "?")),
        ("seed", config.get("seed", "?")),
        ("status", info.get("status", "?")),
        ("phases completed", f"{done} of {len(states)}"),
        ("created", info.get("created", "?")),
        ("updated", info.get("updated", "?")),
    ]
    if info.get("error"):
        items.append(("error", info["error"]))
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    return f'<section id="summary"><h2>Run</h2><table>{rows}</table></section>'


def _phase_table(run_dir: Path, phases, states: dict[str, str]) -> str:
    metrics = {row["phase"]: row for row in _rows(run_dir / METRICS_FILE)}
    body = []
    for spec in phases:
        state = states[spec.name]
        record = read_record(run_dir / spec.dirname) if state == "completed" else None
        row = metrics.get(spec.name, {})
        numbers = {k: v for k, v in row.items() if k not in ("phase", "step", "seconds")}
        details = "".join(f"<tr><td>{_esc(k)}</td><td class=num>{_esc(v)}</td></tr>" for k, v in numbers.items())
        shown = (
            f"<details><summary>{len(numbers)} metrics</summary><table>{details}</table></details>" if numbers else ""
        )
        artifacts = ", ".join(
            f"{k} ({len(v)})" if isinstance(v, list) else k for k, v in (record or {}).get("artifacts", {}).items()
        )
        css = state.split(" ")[0].replace("not", "skipped")  # "not started" is greyed
        seconds = _fmt(row["seconds"]) if "seconds" in row else ""
        body.append(
            f"<tr><td class=num>{spec.number}</td><td>{_esc(spec.name)}</td><td class={css}>{_esc(state)}</td>"
            f"<td class=num>{_esc(seconds)}</td><td>{_esc(artifacts)}</td><td>{shown}</td></tr>"
        )
    head = "<tr><th>#</th><th>phase</th><th>state</th><th>seconds</th><th>artifacts</th><th>metrics</th></tr>"
    return (
        f'<section id="phases"><h2>Phases</h2><table>{head}{"".join(body)}</table>'
        f'<p class="source">Source: {METRICS_FILE}, NN-phase/phase.json</p></section>'
    )


def _effect_cells(effect: dict) -> str:
    interval = (
        f"[{_fmt(effect['low'])}, {_fmt(effect['high'])}]"
        if effect.get("low") is not None and effect.get("high") is not None
        else "not measured"
    )
    css = {"helped": "helped", "hurt": "hurt"}.get(effect["verdict"], "none")
    return (
        f"<td>{_esc(effect['what'])} <small>(vs {_esc(effect['control'])}; {_esc(effect['better'])} is better)"
        f"</small></td><td class='num nowrap'>{_esc(effect['value'])}</td><td class='num nowrap'>{_esc(interval)}"
        f"</td><td class='{css} nowrap'><b>{_esc(effect['verdict'])}</b></td>"
    )


def _verdict_table(run_dir: Path, phases, states: dict[str, str]) -> str:
    """The first table: each phase's headline effect against its control, and a verdict."""
    body = []
    for spec in phases:
        state = states[spec.name]
        found = effects(run_dir, spec) if state == "completed" else []
        head = f"<td class=num>{spec.number}</td><td>{_esc(spec.name)}</td>"
        if not found:
            css = state.split(" ")[0]
            body.append(f"<tr>{head}<td colspan=4 class={css}>{_esc(state)}</td></tr>")
            continue
        for i, effect in enumerate(found):
            body.append(f"<tr>{head if i == 0 else '<td></td><td></td>'}{_effect_cells(effect)}</tr>")
    header = (
        "<tr><th>#</th><th>phase</th><th>headline effect on held-out data</th><th>value</th><th>95 % interval</th>"
        "<th>verdict</th></tr>"
    )
    return (
        f'<section id="verdicts"><h2>What each phase did</h2><table class=verdicts>{header}{"".join(body)}</table>'
        "<p>Value: the phase's model against its control, as a difference (no change: 0) or, where the effect "
        "is a ratio, as a ratio (no change: 1). Verdict: <i>helped</i> or <i>hurt</i> when the 95 % interval "
        "excludes no change, otherwise <i>no measurable effect</i>. "
        '<span class="source">Source: NN-phase/summary.json (effects)</span></p></section>'
    )


def _lineage_section(run_dir: Path, models: list[dict]) -> str:
    if not models:
        return '<section id="lineage"><h2>Model lineage</h2><p>No models registered yet.</p></section>'
    fig = _figure(
        run_dir, "Model lineage (arrows from parent to child)", lineage_figure(models), [run_dir / "registry.sqlite"]
    )
    head = "<tr><th>model</th><th>path</th><th>parameters</th><th>bytes</th><th>sha256</th><th>parents</th></tr>"
    rows = "".join(
        f"<tr><td>{_esc(m['id'])}</td><td class=source>{_esc(m['path'])}</td>"
        f"<td class=num>{_esc(m['parameters'] or '')}</td><td class=num>{_esc(m['bytes'])}</td>"
        f"<td class=source>{_esc(m['sha256'][:16])}</td><td>{_esc(', '.join(m['parents']) or '-')}</td></tr>"
        for m in models
    )
    return f'<section id="lineage"><h2>Model lineage</h2>{fig}<table>{head}{rows}</table></section>'


def render(run_dir: Path, phases) -> str:
    """The report of the run in ``run_dir`` (whose phases are ``phases``) as one HTML string."""
    from agentforge.registry import registry_of

    info = read_run(run_dir)
    states = phase_states(run_dir, phases)
    curves, own = [], []
    for spec in phases:
        if states[spec.name] == "completed":
            phase_dir = run_dir / spec.dirname
            curves += training_curves(phase_dir)
            own += phase_figures(phase_dir, spec)
    with registry_of(run_dir, phases) as registry:
        models = registry.models()
    title = f"agentforge run {run_dir.name}"
    parts = [
        f"<h1>{_esc(title)}</h1>",
        _verdict_table(run_dir, phases, states),
        _summary_section(run_dir, info, states),
        _phase_table(run_dir, phases, states),
        '<section id="training"><h2>Training curves</h2>'
        + ("".join(_figure(run_dir, *c) for c in curves) or "<p>No training metrics yet.</p>")
        + "</section>",
        '<section id="phase-figures"><h2>Phase results</h2>'
        + ("".join(_figure(run_dir, *f) for f in own) or "<p>No phase figures yet.</p>")
        + "</section>",
        _lineage_section(run_dir, models),
        '<section id="config"><h2>Configuration</h2><pre>'
        + _esc(json.dumps((info or {}).get("config", {}), indent=2))
        + "</pre></section>",
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(run_dir: str | Path, phases) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_FILE
    atomic_write_text(path, render(run_dir, phases))
    return path
