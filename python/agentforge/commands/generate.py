"""``agentforge generate TARGET --prompt TEXT``: open a model with ``agentforge.load`` and print its
greedy completion of the prompt, up to the end-of-sequence token.

TARGET is a ``model.afz``, a model directory, or a run's phase (``runs/tiny/08-compression``, or
just ``runs/tiny/compression``); what it opens is hash-checked, and the experts and the Quiet-STaR
thinking head it holds are attached. Where a phase hands over several models, ``--artifact``
picks one (``trunk``, ``latent``, ...). An empty completion is said on stderr, so stdout holds
only the model's text.

    agentforge generate runs/tiny/compression --prompt "12+7="
    agentforge generate runs/tiny/quietstar --prompt "12+7=" --think
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELP = "print a model's completion of a prompt"


def add_model_arguments(parser) -> None:
    """The arguments that choose and open a model (shared with ``agentforge chat``)."""
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="a model.afz, a model directory, or a run's phase (runs/tiny/08-compression or runs/tiny/compression)",
    )
    parser.add_argument(
        "--artifact",
        metavar="NAME",
        help="in a phase that hands over several models, which one (e.g. trunk, latent); "
        "default: the first of model, champion, artifact, packed, trunk that the phase holds",
    )
    parser.add_argument(
        "--think",
        action="store_true",
        help="think before each token with the model's Quiet-STaR head (from the quietstar phase on)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the thoughts --think samples (default 0: the same command, the same answer)",
    )


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation budget (default 32)")


def resolve_target(target: str) -> Path:
    """TARGET as a path; ``runs/tiny/compression`` names the run's ``08-compression``."""
    from agentforge.errors import ConfigError

    path = Path(target)
    if path.exists():
        return path
    numbered = sorted(path.parent.glob(f"[0-9][0-9]-{path.name}")) if path.parent.is_dir() else []
    if not numbered:
        raise ConfigError(f"{target}: no such file or directory (nor a phase {path.name} in {path.parent})")
    return numbered[0]


def load_agent(args):
    """The ``Agent`` that ``args`` (target, --artifact, --think, --seed, --max-new-tokens) name, loaded
    without the libraries' progress bars and notices, checked to be able to answer."""
    from agentforge.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Loading a small model takes milliseconds; transformers' "Loading weights" bars and its
    # generation notices would be the only thing on stderr besides the answer. Both are read when
    # transformers is first imported, which is below; a user's own setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from agentforge.loading import load

    agent = load(resolve_target(args.target), artifact=args.artifact)
    torch.manual_seed(args.seed)  # decoding is greedy; only the thoughts are sampled
    if agent.tokenizer is None:
        raise ConfigError(f"{args.target}: the model has no tokenizer, so it cannot read a prompt")
    if args.think and not agent.parts["thinking"]:
        raise ConfigError(
            f"--think: {args.target} has no Quiet-STaR thinking head (models from the quietstar phase on carry one)"
        )
    return agent


def run(args) -> int:
    agent = load_agent(args)
    completion = agent.complete([args.prompt], max_new_tokens=args.max_new_tokens, think=args.think)[0]
    if completion:
        print(completion)
    else:
        print(
            "(empty completion: the model's first new token ended the text, or it wrote only whitespace)",
            file=sys.stderr,
        )
    return 0
