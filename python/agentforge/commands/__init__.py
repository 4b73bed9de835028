"""The subcommands of ``agentforge`` (run, status, models, report, generate, bench): one module
each, exposing ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` as agentforge.cli expects."""
