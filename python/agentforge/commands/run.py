"""``agentforge run``: run the pipeline phases in a run directory, or resume one.

    agentforge run                                   tiny preset, into runs/<timestamp>
    agentforge run --preset micro --out runs/micro   seconds per phase
    agentforge run --config my.yaml --set cognate.trunk_steps=400 --set seed=1
    agentforge run --preset smol                     SmolLM2-135M-Instruct through all eight phases
    agentforge run --base my-model/ --preset smol    your own HF model directory or .gguf file instead
    agentforge run --resume runs/micro               continue after Ctrl-C, kill -9 or a failure
    agentforge run --out runs/p1 --to cognate        only the phases up to cognate
    agentforge run --print-config --explain          every key: accepted values, presets, doc
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
    parser.add_argument(
        "--preset",
        help="micro (seconds per phase), tiny (the default), small, or smol (a "
        "pretrained 135M base, SmolLM2 unless --base names another)",
    )
    parser.add_argument(
        "--base",
        metavar="PATH_OR_NAME",
        help="start from a pretrained causal LM: an HF model directory, a .gguf file or smollm2 "
        "(sets cognate.base_model)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where models train and run (auto: the GPU when torch sees one)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file: {preset: ..., seed: ..., <phase>: {<setting>: <value>}}"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value, e.g. seed=1 or cognate.trunk_steps=400 (YAML syntax; repeatable)",
    )
    parser.add_argument("--out", metavar="DIR", help="a new run directory (default: runs/<timestamp>)")
    parser.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last completed phase and last checkpoint"
    )
    parser.add_argument(
        "--from",
        dest="start",
        metavar="PHASE",
        help="first phase to run (the artifacts it needs must already be in the run directory)",
    )
    parser.add_argument("--to", dest="stop", metavar="PHASE", help="last phase to run")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept a changed config and rerun the phases it affects",
    )
    parser.add_argument(
        "--wandb",
        choices=("online", "offline", "disabled"),
        help="W&B mode of the training logs (default: environment WANDB_MODE, else offline)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, accepted back by --config) and exit; writes nothing",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="with --print-config: a comment above every key with the values it accepts, its value "
        "in each preset and what it does (configs/all-keys.yaml is this output)",
    )


def _report_writer(write_report):
    """``write_report`` with a line before it: drawing the figures takes seconds, and a run
    should not go silent after its last phase."""

    from agentforge.report import REPORT_FILE

    def write(run_dir, phases):
        print(f"report: writing {run_dir}/{REPORT_FILE} ...", flush=True)
        return write_report(run_dir, phases)

    return write


def _header(run) -> str:
    skipped = [spec.name for spec in run.phases if spec.name not in run.selected]
    return (
        f"agentforge run: {run.dir} (preset {run.config.preset}, seed {run.config.seed}); "
        f"phases to run: {', '.join(run.selected) or 'none'}"
        + (f"; not selected: {', '.join(skipped)}" if skipped else "")
    )


SECTION_DOCS = {
    "data": "The run's text and task data. The first phase records it (data.json) and every later phase "
    "trains and evaluates on it; a resumed run cannot change it.",
    "tools": "How the model's tool calls run.",
}
WIDTH = 100  # of the comment lines --explain writes


def _comment(text: str, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=f"{indent}# ",
        subsequent_indent=f"{indent}# ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _flow(value) -> str:
    """A value as one line of YAML (a list as ``[a, b]``)."""
    import yaml

    return (
        yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
        .removesuffix("\n")
        .removesuffix("\n...")
    )


def _key_line(key: str, value, indent: str) -> list[str]:
    """``key: value`` on one line, or as a block (one list item a line) when that is too long."""
    import yaml

    line = f"{indent}{key}: {_flow(value)}"
    if len(line) <= WIDTH or not isinstance(value, list):
        return [line]
    text = yaml.safe_dump({key: value}, default_flow_style=False, width=float("inf"), allow_unicode=True)
    return [indent + line for line in text.splitlines()]


def _per_preset(values: dict, current) -> str:
    """``micro=3, tiny/small=180``; ``all 64`` when the presets agree, ``all as below`` when they
    also agree with a long ``current`` value."""
    groups: dict[str, list[str]] = {}
    for preset, value in values.items():
        groups.setdefault(_flow(value), []).append(preset)
    if len(groups) == 1:
        (shown,) = groups
        return "all as below" if len(shown) > 60 and shown == _flow(current) else f"all {shown}"
    return ", ".join(f"{'/'.join(presets)}={shown}" for shown, presets in groups.items())


def _at(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def explain(config, phases) -> str:
    """``config`` as YAML (accepted back by ``--config``) with every key's doc, accepted values and
    value in each preset in comments above it, from the settings declarations."""
    from agentforge import config as configuration
    from agentforge.data.spec import PRESETS as DATA_PRESETS
    from agentforge.data.spec import DataSpec
    from agentforge.settings import describe, to_dict
    from agentforge.tools.sandbox import ToolSettings

    presets = configuration.PRESETS
    values = config.to_dict()
    lines = [
        "# The agentforge run configuration: every key, the values it accepts, its value in each preset (a",
        "# key's default is its preset's value) and what it does. Written by",
        "# `agentforge run --print-config --explain`, whose values are the resolved config's (with --preset,",
        "# --config and --set applied). A --config file needs only the keys it changes.",
        "",
        *_comment(
            f"The seed of every random choice in the run. Accepts an int in [0, {configuration.MAX_SEED}]; default 0.",
            "",
        ),
        *_key_line("seed", values["seed"], ""),
        *_comment(
            f"The preset every other key starts from (each key's value in it is listed above the key). "
            f"Accepts one of {', '.join(presets)}; default {configuration.DEFAULT_PRESET}.",
            "",
        ),
        *_key_line("preset", values["preset"], ""),
    ]
    sections = [
        ("data", SECTION_DOCS["data"], DataSpec, {p: to_dict(DATA_PRESETS[p]) for p in presets}),
        ("tools", SECTION_DOCS["tools"], ToolSettings, {p: to_dict(ToolSettings()) for p in presets}),
    ]
    sections += [
        (
            spec.name,
            f"Phase {spec.number}, {spec.name}: {spec.summary}.",
            spec.settings,
            {p: to_dict(spec.presets[p]) for p in presets},
        )
        for spec in phases
    ]
    for name, doc, cls, preset_values in sections:
        lines += ["", *_comment(doc, ""), f"{name}:"]
        opened: list[str] = []  # the nested settings whose mapping is open
        for key, accepts, _, key_doc in describe(cls):
            *parents, leaf = key.split(".")
            shared = next(
                (i for i, (a, b) in enumerate(zip(opened, parents)) if a != b), min(len(opened), len(parents))
            )
            for depth, parent in enumerate(parents[shared:], start=shared):
                lines.append(f"{'  ' * (depth + 1)}{parent}:")
            opened = parents
            indent = "  " * (len(parents) + 1)
            current = _at(values[name], key)
            per_preset = _per_preset({p: _at(v, key) for p, v in preset_values.items()}, current)
            lines += _comment(f"{key_doc[:1].upper()}{key_doc[1:]}.", indent) if key_doc else []
            lines += _comment(f"Accepts {accepts}. Presets: {per_preset}.", indent)
            lines += _key_line(leaf, current, indent)
    return "\n".join(lines) + "\n"


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

    if args.explain and not args.print_config:
        raise ConfigError("--explain goes with --print-config: agentforge run --print-config --explain")
    distributed.choose_device(args.device)
    if args.base is not None:
        import json

        args.sets = [*args.sets, f"cognate.base_model={json.dumps(args.base)}"]  # a JSON string is YAML
    distributed.maybe_init()  # under torchrun: join the process group first, so the ranks can agree
    try:
        try:
            require_wandb_key(resolve_wandb_mode(args.wandb))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        planned = distributed.on_main(
            pipeline.prepare,
            out=args.out,
            resume=args.resume,
            preset=args.preset,
            config_file=args.config,
            sets=args.sets,
            start=args.start,
            stop=args.stop,
            allow_config_change=args.allow_config_change,
        )
        if args.print_config:
            if distributed.is_main():
                print(explain(planned.config, planned.phases) if args.explain else planned.config.to_yaml(), end="")
            return 0
        if distributed.is_main():
            print(_header(planned), flush=True)
        try:
            pipeline.execute(
                planned,
                wandb_mode=args.wandb,
                progress=not args.no_progress,
                say=lambda line: print(line, flush=True),
                on_change=_report_writer(write_report),
            )
        except KeyboardInterrupt:
            print(f"agentforge run: interrupted; continue with: agentforge run --resume {planned.dir}", file=sys.stderr)
            return 130
        if distributed.is_main():
            print(f"report: {planned.dir}/{REPORT_FILE}")
        return 0
    finally:
        distributed.shutdown()
