"""The ``agentforge`` command line: one subcommand per module.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; add a new one to ``COMMANDS``. Modules keep heavy imports (torch)
inside ``run`` so that ``agentforge --help`` stays fast.

An error ends a command with one line on stderr and a non-zero exit code: 2 for a bad command
line or configuration (found before anything is written), 1 for a failure while working. The
traceback is shown only with ``--debug`` or ``AGENTFORGE_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module
COMMANDS = {
    "run": "agentforge.commands.run",
    "status": "agentforge.commands.status",
    "models": "agentforge.commands.models",
    "report": "agentforge.commands.report",
    "generate": "agentforge.commands.generate",
    "bench": "agentforge.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentforge",
        description="An eight-phase pipeline for small, compressed reasoning models, on ternary (BitNet b1.58) "
                    "kernels. Nothing is downloaded: "
                    "HF_HUB_OFFLINE=1 is set for every command.")
    from agentforge import __version__
    parser.add_argument("--version", action="version", version=f"agentforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback (also: environment AGENTFORGE_DEBUG=1)")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def one_line(error: BaseException) -> str:
    """An exception as one line: our own errors by their message, others with their type."""
    from agentforge.errors import ConfigError
    from agentforge.errors import PipelineError

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if isinstance(error, (ConfigError, PipelineError)):
        return message
    return f"{type(error).__name__}: {message} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("agentforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from agentforge.errors import ConfigError

        if args.debug or os.environ.get("AGENTFORGE_DEBUG") == "1":
            raise
        print(f"agentforge {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
