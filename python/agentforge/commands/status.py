"""``agentforge status [DIR]``: the eight pipeline phases, what each does, needs and hands over;
with DIR, the run's status, who holds it, and the state of each phase there."""

from __future__ import annotations

from pathlib import Path

HELP = "list the pipeline phases, or the state of each phase in a run directory"


def add_arguments(parser) -> None:
    parser.add_argument("dir", nargs="?", metavar="DIR", help="a run directory")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="with DIR: hash every file each phase record lists and check that every phase's "
        "inputs are still what it consumed; list every mismatch (exit code 1 if any)",
    )


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
        print(
            f"preset {config['preset']}, seed {config['seed']}; "
            f"created {info['created']}, updated {info.get('updated')}"
        )
        states = rundir.phase_states(run_dir, phases)
        for spec in phases:
            record = rundir.read_record(run_dir / spec.dirname)
            if states[spec.name] == "completed" and record is not None:  # (completed: it has a record)
                seconds[spec.name] = f"{record['seconds']:.1f} s"
    rows = [["#", "phase", "state", "time", "needs", "provides"]]
    for spec in phases:
        needs = ", ".join(need.source for need in spec.needs.values()) or "-"
        rows.append(
            [
                f"{spec.number:02d}",
                spec.name,
                states.get(spec.name, spec.summary),
                seconds.get(spec.name, ""),
                needs,
                ", ".join(spec.provides),
            ]
        )
    print(table(rows))
    if args.verify:
        if not args.dir:
            raise ConfigError("--verify needs a run directory: agentforge status DIR --verify")
        problems = verify_run(Path(args.dir), phases)
        print("\n".join(problems) if problems else "verified: every file of every completed phase matches its record")
        return 1 if problems else 0
    return 0


def verify_run(run_dir: Path, phases) -> list[str]:
    """Every mismatch in a run directory: files that differ from their phase's record, and phases
    whose recorded input digests are not their producers' artifacts any more."""
    from agentforge import rundir
    from agentforge.data.spec import DATA_ARTIFACT

    problems, records = [], {}
    for spec in phases:
        phase_dir = run_dir / spec.dirname
        record = rundir.read_record(phase_dir)
        if record is None:
            continue
        records[spec.name] = record
        try:
            problems += [f"{spec.dirname}: {problem}" for problem in rundir.verify(phase_dir, record)]
        except Exception as e:  # an edited record (a path leaving its directory, a malformed entry)
            problems.append(f"{spec.dirname}: {e}")
    for spec in phases:
        record = records.get(spec.name)
        if not record:
            continue
        sources = {name: (need.producer, need.artifact) for name, need in spec.needs.items()}
        if spec is not phases[0]:
            sources[DATA_ARTIFACT] = (phases[0].name, DATA_ARTIFACT)
        for name, (producer, artifact) in sources.items():
            recorded, theirs = record["inputs"].get(name), records.get(producer)
            current = rundir.artifact_digest(theirs, artifact) if theirs and artifact in theirs["artifacts"] else None
            if recorded != current:
                problems.append(
                    f"{spec.dirname}: its input {name} ({producer}.{artifact}) is not the artifact it consumed any more"
                )
    return problems
