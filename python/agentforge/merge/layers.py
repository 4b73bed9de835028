"""Layer-level merges: FrankenMerge (each layer taken whole from one source) and DFS, the
data-flow-space merge of Sakana's evolutionary model merging: a path through the sources'
layers, each step with its own scale.

A "layer stack" is a run of numbered blocks in a state dict (``model.layers.3.…`` in Llama,
``model.prelude.1.…`` and ``model.core.0.…`` in Cognate). Tensors outside every stack
(embeddings, final norm, LM head, halting head) are not a layer choice; the callers average them.

DFS scaling. Sakana scales the hidden state by a learned factor where the path jumps between
layers. In a pre-norm block, x -> x + f(norm(x)), f ignores the scale of x, so scaling the
stream before block t is the same (after the final norm) as scaling block t's residual branch
by the inverse cumulative factor. We therefore parametrise DFS directly by one branch scale per
step, x -> x + s_t f(norm(x)), and fold s_t into the weights that produce the branch output
(o_proj, down_proj, the memory's out_proj) so the merged model is an ordinary state dict. The
Cognate memory gate reads those outputs, so its weight is divided by s_t to keep the gate exact.
"""
from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^(?P<stack>.*?\.(?:layers|prelude|core|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
# residual-branch outputs (scaled by s) and readers of those outputs (scaled by 1/s)
_BRANCH_OUTPUTS = ("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias",
                   "memory.out_proj.weight", "memory.out_proj.bias")
_BRANCH_READERS = ("memory_gate.weight",)


def split_layer_key(key: str) -> tuple[str, int, str] | None:
    """``(stack, index, rest)`` for a tensor inside a layer stack, else None."""
    match = _LAYER.match(key)
    return (match["stack"], int(match["index"]), match["rest"]) if match else None


def layer_stacks(state: dict) -> dict[str, int]:
    """Each layer stack of a state dict and its number of layers, in order of first appearance."""
    stacks: dict[str, int] = {}
    for key in state:
        parts = split_layer_key(key)
        if parts:
            stacks[parts[0]] = max(stacks.get(parts[0], 0), parts[1] + 1)
    return stacks


def layer_slots(state: dict) -> list[tuple[str, int]]:
    """Every (stack, index) in order: the positions a FrankenMerge chooses a source for."""
    return [(stack, i) for stack, n in layer_stacks(state).items() for i in range(n)]


def frankenmerge_layer(key: str, states: list[dict], choice: dict[tuple[str, int], int]) -> torch.Tensor | None:
    """The tensor ``key`` of the source chosen for its layer, or None outside the layer stacks."""
    parts = split_layer_key(key)
    if parts is None:
        return None
    return states[choice[(parts[0], parts[1])]][key]


def _branch_factor(rest: str, scale: float) -> float:
    if any(rest.endswith(name) for name in _BRANCH_OUTPUTS):
        return scale
    if any(rest.endswith(name) for name in _BRANCH_READERS):
        return 1.0 / scale
    return 1.0


def check_dfs_path(states: list[dict], stack: str, path: list, scales: list[float]) -> None:
    """Raise ValueError unless ``path`` is a non-empty list of (source, layer) pairs that exist
    in ``stack`` and ``scales`` holds one positive scale per step (foldable into the weights)."""
    n_layers = layer_stacks(states[0])[stack]
    if not path:
        raise ValueError("dfs: path must hold at least one (source, layer) step")
    for step in path:
        source, layer = step
        if not (0 <= source < len(states) and 0 <= layer < n_layers):
            raise ValueError(f"dfs: step {tuple(step)} is not (source in 0..{len(states) - 1}, "
                             f"layer in 0..{n_layers - 1}) of stack {stack!r}")
    if len(scales) != len(path) or any(not s > 0 for s in scales):
        raise ValueError(f"dfs: scales must hold {len(path)} positive numbers, one per step; got {scales}")
    rests = {split_layer_key(k)[2] for k in states[0] if split_layer_key(k) and split_layer_key(k)[0] == stack}
    if any(s != 1.0 for s in scales) and not any(r.endswith(o) for r in rests for o in _BRANCH_OUTPUTS):
        raise ValueError(f"dfs: scales need pre-norm blocks whose branch outputs are o_proj/down_proj "
                         f"(Llama, Cognate); stack {stack!r} has none, so use scales of 1.0")


def dfs_stack(states: list[dict], stack: str, path: list, scales: list[float]) -> dict[str, torch.Tensor]:
    """The tensors of the new ``stack``: step t is layer ``path[t][1]`` of source ``path[t][0]``,
    renumbered t, with its branch scale folded in."""
    out = {}
    for t, ((source, layer), scale) in enumerate(zip(path, scales)):
        prefix = f"{stack}.{layer}."
        for key, tensor in states[source].items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                factor = _branch_factor(rest, scale)
                out[f"{stack}.{t}.{rest}"] = tensor * factor if factor != 1.0 else tensor
    return out
