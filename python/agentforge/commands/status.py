"""``agentforge status [DIR]``: the eight pipeline phases, what each does, needs and hands over; with DIR, the run's status, who holds it, and the state of each phase there.
"""
from __future__ import annotations

from pathlib import Path

HELP = "list the pipeline phases, or the state of each phase in a run directory"


def add_arguments(parser) -> None:
    parser.add_argument("dir", nargs="?", metavar="DIR", help="a run directory")


def table(rows: list[list[str]]) -> str:
    """Rows of text as left-aligned columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def run_status(run_dir: Path, info: dict) -> str:
    """``running (pid N)``, ``completed``, ``failed: why`` or ``interrupted``, from run.json and the lock."""
    from agentforge.rundir import lock_holder

    holder = lock_holder(run_dir)
    if holder is not None:
        return f"running (pid {holder})"
    status = info.get("status", "unknown")
    if status in ("running", "interrupted"):
        return f"interrupted; continue with: agentforge run --resume {run_dir}"
    return f"failed: {info.get('error')}" if status == "failed" else status


def run(args) -> int:
    from agentforge import pipeline, rundir
    from agentforge.errors import ConfigError

    phases = pipeline.default_phases()
    states, seconds = {}, {}
    if args.dir:
        run_dir = Path(args.dir)
        info = rundir.read_run(run_dir)
        if info is None:
            raise ConfigError(f"{run_dir}: no run there ({rundir.RUN_FILE} is missing)")
        config = info["config"]
        print(f"run {info['id']} in {run_dir}: {run_status(run_dir, info)}")
        print(f"preset {config['preset']}, seed {config['seed']}; created {info['created']}, updated {info.get('updated')}")
        states = rundir.phase_states(run_dir, phases)
        for spec in phases:
            record = rundir.read_record(run_dir / spec.dirname)
            if states[spec.name] == "completed":
                seconds[spec.name] = f"{record['seconds']:.1f} s"
    rows = [["#", "phase", "state", "time", "needs", "provides"]]
    for spec in phases:
        needs = ", ".join(need.source for need in spec.needs.values()) or "-"
        rows.append([f"{spec.number:02d}", spec.name, states.get(spec.name, spec.summary), seconds.get(spec.name, ""),
                     needs, ", ".join(spec.provides)])
    print(table(rows))
    return 0
