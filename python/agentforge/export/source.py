"""Where an export starts: the artifact opened as an Agent, its ternary layers as exact codes and
scales, the parts a plain model file cannot hold, and a destination that is safe to write."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from agentforge.errors import ConfigError

# What each attached part of an Agent is called where the command names what it left behind.
PART_NAMES = {"experts": "experts", "thinking": "thinking head"}


def open_artifact(path: str | os.PathLike, artifact: str | None = None):
    """The ``Agent`` of a model artifact (``model.afz``, model directory or phase directory);
    ``ConfigError`` when ``path`` is none of them."""
    from agentforge.compress.container import MAGIC
    from agentforge.loading import load

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ConfigError(f"{path}: not a model artifact (a model.afz, a model directory or a phase directory)")
    return load(path, artifact=artifact)


@torch.no_grad()
def ternary_layers(lm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (codes int8 [N, K], scale fp32 [1] or [N])}`` for every BitLinear of ``lm``:
    the weight it computes with is ``codes × scale`` (per tensor, or per output row). A packed
    layer's codes come from its kernel layout; a training-state layer's are those its forward
    quantizes the latent weight to (the same ones ``pack()`` would store)."""
    from agentforge import ops
    from agentforge.nn import BitLinear
    from agentforge.nn.bitlinear import PACKED

    layers = {}
    for name, module in lm.named_modules():
        if not isinstance(module, BitLinear):
            continue
        K = module.in_features
        if module.state == PACKED:
            codes = ops.unpack_ternary(ops.unprepack_ternary(module.w_prepacked, K), K)
            layers[name] = codes, module.w_scale.detach().float().reshape(-1)
        else:
            codes, scale = ops.quantize_ternary(module.weight.detach(), module.per_channel)
            layers[name] = codes, scale.reshape(-1)
    return layers


def dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes × scale`` in fp32, the scale per tensor ([1]) or per output row ([N])."""
    return codes.float() * (scale[:, None] if scale.numel() > 1 else scale)


def not_exported(agent) -> list[str]:
    """The names of the parts attached to ``agent`` that a plain model file cannot hold."""
    return [PART_NAMES[part] for part, attached in agent.parts.items() if attached]


def check_destination(dest: Path, kind: str, force: bool) -> None:
    """Refuse to overwrite anything unless ``force``, and never a file with a directory or back."""
    if not dest.exists():
        return
    if kind == "directory" and not dest.is_dir() or kind == "file" and dest.is_dir():
        raise ConfigError(f"{dest}: exists and is not a {kind}; choose another destination")
    if not force:
        raise ConfigError(f"{dest}: already exists; choose another destination, or pass --force to replace it")
