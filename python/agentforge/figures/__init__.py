"""Report figures, one module per phase: ``figures(phase_dir) -> [(title, matplotlib Figure,
[the files its numbers come from])]``, drawn from what the phase wrote (summary.json,
metrics.jsonl). A phase's ``SPEC.figures`` names its module; ``agentforge.report`` imports it.

Shared here: whole-number ticks for counted axes, and the notes ``agentforge.report`` puts on an
axis that shows nothing (so that a blank panel does not read as a drawing failure)."""

from __future__ import annotations

NOTE_COLOUR = "0.35"


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only on a counted axis (steps, generations, iterations, levels,
    rounds), also when it holds a single value (matplotlib's default then ticks 5.68, 5.76, ...)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _flat_value(ax) -> float | None:
    """The value every bar and point of ``ax`` sits at, when nothing drawn has any extent (all-zero
    bars, zero-length error bars), else None. A drawn line or a scatter is visible, flat or not."""
    from matplotlib.collections import PathCollection

    if any(line.get_linestyle() not in ("None", "none", "", " ") for line in ax.lines):
        return None
    # matplotlib types get_offsets() as any ArrayLike; a PathCollection's is an [n, 2] array
    if any(isinstance(c, PathCollection) and len(c.get_offsets()) for c in ax.collections):  # type: ignore[arg-type]
        return None
    limits = ax.dataLim
    if limits.height == 0:
        return limits.y0
    if limits.width == 0:
        return limits.x0
    return None


def mark_empty(fig) -> None:
    """Write "no data" on every axis of ``fig`` with nothing drawn in it, and "every value is V" on
    one whose bars all have zero length. Diagram axes (axis off, e.g. the lineage) are left alone."""
    for ax in fig.axes:
        if not ax.axison:
            continue
        if not ax.has_data():
            note = "no data"
        else:
            value = _flat_value(ax)
            if value is None:
                continue
            note = f"every value is {value:g}"
        # above the middle, on white: a row of zero-length error bars runs through the middle
        ax.text(
            0.5,
            0.75,
            note,
            transform=ax.transAxes,
            ha="center",
            va="center",
            color=NOTE_COLOUR,
            fontsize="large",
            style="italic",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.9},
        )
