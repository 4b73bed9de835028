"""``agentforge run``: run the pipeline phases in a run directory, or resume one.

    agentforge run                                   tiny preset, into runs/<timestamp>
    agentforge run --preset micro --out runs/micro   seconds per phase
    agentforge run --config my.yaml --set cognate.trunk_steps=400 --set seed=1
    agentforge run --resume runs/micro               continue after Ctrl-C, kill -9 or a failure
    agentforge run --out runs/p1 --to cognate        only the phases up to cognate
    torchrun --nproc_per_node 2 -m agentforge run --preset micro --out runs/ddp

The run directory holds NN-phase/ (one per phase; phase.json marks it complete),
run.json, metrics.jsonl, registry.sqlite and report.html. Everything is checked before anything is
written: a bad config, a missing input artifact or a directory held by another run exits with
code 2 and one line saying why.
"""
from __future__ import annotations

import sys

HELP = "run the pipeline (or resume a run directory) and write its report"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", help="micro (seconds per phase), tiny (the default) or small")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file: {preset: ..., seed: ..., <phase>: {<setting>: <value>}}")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. seed=1 or cognate.trunk_steps=400 (YAML syntax; repeatable)")
    parser.add_argument("--out", metavar="DIR", help="a new run directory (default: runs/<timestamp>)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its last completed phase and last checkpoint")
    parser.add_argument("--from", dest="start", metavar="PHASE",
                        help="first phase to run (the artifacts it needs must already be in the run directory)")
    parser.add_argument("--to", dest="stop", metavar="PHASE", help="last phase to run")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept a changed config and rerun the phases it affects")
    parser.add_argument("--wandb", choices=("online", "offline", "disabled"),
                        help="W&B mode of the training logs (default: environment WANDB_MODE, else offline)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, accepted back by --config) and exit; writes nothing")


def _header(run) -> str:
    skipped = [spec.name for spec in run.phases if spec.name not in run.selected]
    return (f"agentforge run: {run.dir} (preset {run.config.preset}, seed {run.config.seed}); "
            f"phases to run: {', '.join(run.selected) or 'none'}"
            + (f"; not selected: {', '.join(skipped)}" if skipped else ""))


def run(args) -> int:
    import os

    # Loading and saving a small model takes milliseconds; transformers' bars for it are noise
    # between the pipeline's lines (set before transformers is imported; the trainer keeps its bar).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from agentforge import pipeline
    from agentforge.errors import ConfigError
    from agentforge.report import REPORT_FILE, write_report
    from agentforge.train import distributed
    from agentforge.train.config import require_wandb_key, resolve_wandb_mode

    distributed.maybe_init()  # under torchrun: join the process group first, so the ranks can agree
    try:
        try:
            require_wandb_key(resolve_wandb_mode(args.wandb))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        planned = distributed.on_main(pipeline.prepare, out=args.out, resume=args.resume, preset=args.preset,
                                      config_file=args.config, sets=args.sets, start=args.start, stop=args.stop,
                                      allow_config_change=args.allow_config_change)
        if args.print_config:
            if distributed.is_main():
                print(planned.config.to_yaml(), end="")
            return 0
        if distributed.is_main():
            print(_header(planned), flush=True)
        try:
            pipeline.execute(planned, wandb_mode=args.wandb, progress=not args.no_progress,
                             say=lambda line: print(line, flush=True), on_change=write_report)
        except KeyboardInterrupt:
            print(f"agentforge run: interrupted; continue with: agentforge run --resume {planned.dir}",
                  file=sys.stderr)
            return 130
        if distributed.is_main():
            print(f"report: {planned.dir}/{REPORT_FILE}")
        return 0
    finally:
        distributed.shutdown()
