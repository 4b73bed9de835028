"""``agentforge models DIR``: the models in a run's registry: id, parameters, bytes on disk,
sha256 of its files, parents (lineage) and path; ``--json`` prints the full rows with metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "list the models a run registered (parameters, size, hash, parents)"


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a run directory")
    parser.add_argument("--json", action="store_true", help="full rows (with metrics) as JSON")


def run(args) -> int:
    from agentforge.commands.status import table
    from agentforge.errors import ConfigError
    from agentforge.pipeline import default_phases
    from agentforge.registry import registry_of
    from agentforge.rundir import RUN_FILE, read_run

    if read_run(args.dir) is None:
        raise ConfigError(f"{args.dir}: no run there ({RUN_FILE} is missing)")
    with registry_of(Path(args.dir), default_phases()) as registry:
        models = registry.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"{args.dir}: no models registered yet (no phase has completed)")
        return 0
    rows = [["model", "parameters", "bytes", "sha256", "parents", "path"]]
    rows += [
        [
            m["id"],
            f"{m['parameters']:,}" if m["parameters"] else "-",
            f"{m['bytes']:,}",
            m["sha256"][:12],
            ", ".join(m["parents"]) or "-",
            m["path"],
        ]
        for m in models
    ]
    print(table(rows))
    return 0
