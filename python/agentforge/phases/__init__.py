"""The eight pipeline phases. Each is one module with ``run(inputs, settings, ctx) -> PhaseResult``
and a ``Settings`` dataclass; phases meet only through the model directories they write.

``inputs`` maps the names a phase needs (e.g. ``"siblings"``) to artifact directories written by
earlier phases; ``ctx`` says where this phase writes and how it reports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def _is_main_process() -> bool:
    from agentforge.train.distributed import is_main

    return is_main()


@dataclass
class PhaseContext:
    """Where a phase writes and how it reports. ``out_dir`` is the phase's own directory.

    Under torchrun every rank runs the phase (training is data-parallel inside
    ``agentforge.train.train``), but only the rank with ``is_main`` writes model directories,
    summaries and metrics, and evaluates; the others return the same artifact paths."""

    out_dir: Path
    seed: int = 0
    wandb_mode: str | None = None  # None: env WANDB_MODE, else offline
    progress: bool = True
    say: Callable[[str], None] = print  # one human-readable progress line
    is_main: bool = field(default_factory=_is_main_process)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class PhaseResult:
    """``artifacts``: name -> model directory (or list of them); ``metrics``: the headline figures
    of the phase, also written to its ``summary.json``."""

    artifacts: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def settings_from_dict(cls, values: dict[str, Any], where: str):
    """``cls(**values)`` for a settings dataclass, with a one-line error naming an unknown key or a
    value of the wrong type (the allowed keys are listed)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; allowed: {sorted(fields)}")
    for name, value in values.items():
        default = getattr(cls, name, None) if fields[name].default is not dataclasses.MISSING else None
        if default is not None and not _same_kind(default, value):
            raise ValueError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
    return cls(**values)


def _same_kind(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def standalone_main(name: str, inputs: dict[str, str], argv: list[str] | None = None) -> int:
    """``python -m agentforge.phases.<name>``: run phase ``name`` on its own, outside a pipeline run.
    ``inputs`` maps each input directory the phase needs to its help text (``siblings`` takes
    several); settings come from ``--preset`` plus ``--set KEY=JSON`` overrides."""
    import argparse
    import importlib
    import json
    import os

    module = importlib.import_module(f"agentforge.phases.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m agentforge.phases.{name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for input_name, help_text in inputs.items():
        parser.add_argument(f"--{input_name}", required=True, type=Path,
                            nargs="+" if input_name == "siblings" else None,
                            help=help_text)
    parser.add_argument("--preset", choices=sorted(module.PRESETS), default="tiny")
    parser.add_argument("--out", required=True, type=Path, help="phase directory (reused on a rerun)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a setting, e.g. --set steps=200 or --set task_levels=[0,1] (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: the value must be JSON (e.g. 200, 0.5, true, [1, 8], '\"lora\"')")
    try:
        settings = settings_from_dict(module.Settings, {**dataclasses.asdict(module.PRESETS[args.preset]),
                                                        **overrides}, name)
    except ValueError as e:
        parser.error(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = module.run({key: getattr(args, key) for key in inputs}, settings,
                        PhaseContext(out_dir=args.out, seed=args.seed))
    print(json.dumps(result.metrics, indent=2, default=str))
    return 0
