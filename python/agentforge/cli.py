"""The ``agentforge`` command line: one subcommand per module.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; add a new one to ``COMMANDS``. Modules keep heavy imports (torch)
inside ``run`` so that ``agentforge --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module; the pipeline commands (run, status, models, report, generate) join here.
COMMANDS = {
    "bench": "agentforge.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentforge",
        description="Ternary (BitNet b1.58) kernels for small language models. Nothing is downloaded: "
                    "HF_HUB_OFFLINE=1 is set for every command.")
    from agentforge import __version__
    parser.add_argument("--version", action="version", version=f"agentforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("agentforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
