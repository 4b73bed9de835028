"""``agentforge generate TARGET --prompt TEXT``: load a model artifact (hash-verified) and print
its greedy completion of the prompt, up to the end-of-sequence token.

TARGET is a run's phase (``runs/tiny/cognate`` or ``runs/tiny/01-cognate``) or a model directory.
In a phase that hands over several models, ``--model`` picks one by name (``trunk``,
``reasoning``, ...); the default is the first.

    agentforge generate runs/tiny/cognate --model reasoning --prompt "12+7="
"""
from __future__ import annotations

from pathlib import Path

HELP = "load a model artifact and print its completion of a prompt"


def add_arguments(parser) -> None:
    parser.add_argument("target", metavar="DIR/PHASE", help="a run's phase directory, or a model directory")
    parser.add_argument("--prompt", required=True, help="the text to complete")
    parser.add_argument("--model", help="which of the phase's models (default: the first it hands over)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation budget (default 32)")


def phase_models(phase_dir: Path) -> dict[str, Path]:
    """``{name: model directory}`` of a completed phase, named as in the registry."""
    from agentforge.errors import ConfigError
    from agentforge.rundir import PHASE_FILE, absolute_artifacts, read_record

    record = read_record(phase_dir)
    if record is None:
        raise ConfigError(f"{phase_dir}: no completed phase there ({PHASE_FILE} is missing)")
    models = {}
    for name, value in absolute_artifacts(phase_dir, record).items():
        for path in value if isinstance(value, list) else [value]:
            models[path.name if isinstance(value, list) else name] = path
    return models


def resolve_target(target: str, model: str | None) -> Path:
    """The model directory that TARGET and ``--model`` name."""
    from agentforge.artifacts import MANIFEST
    from agentforge.errors import ConfigError

    path = Path(target)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        numbered = sorted(path.parent.glob(f"[0-9][0-9]-{path.name}"))
        if not numbered:
            raise ConfigError(f"{target}: neither a model directory nor a phase of a run directory")
        path = numbered[0]
    models = phase_models(path)
    if model is None:
        return next(iter(models.values()))
    if model not in models:
        raise ConfigError(f"--model {model}: not a model of {path.name}; choose from {', '.join(models)}")
    return models[model]


def run(args) -> int:
    from agentforge.artifacts import load_model_dir
    from agentforge.errors import ConfigError
    from agentforge.eval import generate_answers

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model_dir = resolve_target(args.target, args.model)
    model, tokenizer, _ = load_model_dir(model_dir)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: the model has no tokenizer, so it cannot read a prompt")
    print(generate_answers(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens)[0])
    return 0
