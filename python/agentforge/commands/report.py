"""``agentforge report DIR``: rebuild DIR/report.html (run summary, phase table, training curves,
phase figures, model lineage) from what is on disk, and print its path.
"""

from __future__ import annotations

from pathlib import Path

HELP = "regenerate a run directory's report.html"


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a run directory")


def run(args) -> int:
    from agentforge.errors import ConfigError
    from agentforge.pipeline import default_phases
    from agentforge.report import write_report
    from agentforge.rundir import RUN_FILE, read_run

    if read_run(args.dir) is None:
        raise ConfigError(f"{args.dir}: no run there ({RUN_FILE} is missing)")
    print(write_report(Path(args.dir), default_phases()))
    return 0
