"""Layer-level merges: FrankenMerge (each layer taken whole from one source) and DFS, the
data-flow-space merge of Sakana's evolutionary model merging: a path through the sources'
layers, each step with its own scale.

A "layer stack" is one of the model's ``nn.ModuleList``s of repeated blocks (blocks of one
class), found on the model object itself, not by parameter names: ``model.layers`` in Llama,
``model.prelude`` and ``model.core`` in Cognate, ``transformer.h`` in GPT-2. A stack is named by
its state-dict prefix, so its tensors are ``<stack>.<index>.<rest>``. Only the outermost lists
count (a list inside a block is part of that block). Tensors outside every stack (embeddings,
final norm, LM head, halting head) are not a layer choice; the callers average them.

DFS scaling. Sakana scales the hidden state by a learned factor where the path jumps between
layers. In a pre-norm block, x -> x + f(norm(x)), f ignores the scale of x, so scaling the
stream before block t is the same (after the final norm) as scaling block t's residual branch
by the inverse cumulative factor. We therefore parametrise DFS directly by one branch scale per
step, x -> x + s_t f(norm(x)), and fold s_t into the weights that produce the branch output
(o_proj, down_proj, the memory's out_proj) so the merged model is an ordinary state dict. The
Cognate memory gate reads those outputs, so its weight is divided by s_t to keep the gate exact.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

# residual-branch outputs (scaled by s) and readers of those outputs (scaled by 1/s)
_BRANCH_OUTPUTS = (
    "o_proj.weight",
    "o_proj.bias",
    "down_proj.weight",
    "down_proj.bias",
    "memory.out_proj.weight",
    "memory.out_proj.bias",
)
_BRANCH_READERS = ("memory_gate.weight",)


def _is_stack(module: nn.Module) -> bool:
    blocks = list(module) if isinstance(module, nn.ModuleList) else []
    return bool(blocks) and len({type(b) for b in blocks}) == 1 and any(True for _ in blocks[0].parameters())


def layer_stacks(model: nn.Module) -> dict[str, int]:
    """Each layer stack of ``model`` (its state-dict prefix) and its number of blocks, in the order
    the model registers them (the order of its state dict)."""
    stacks: dict[str, int] = {}
    for name, module in model.named_modules():
        if _is_stack(module) and not any(name.startswith(f"{stack}.") for stack in stacks):
            stacks[name] = len(module)
    return stacks


def split_layer_key(key: str, stacks: dict[str, int]) -> tuple[str, int, str] | None:
    """``(stack, index, rest)`` for a tensor inside one of ``stacks``, else None."""
    for stack in stacks:
        if key.startswith(f"{stack}."):
            index, _, rest = key[len(stack) + 1 :].partition(".")
            return stack, int(index), rest
    return None


def layer_slots(stacks: dict[str, int]) -> list[tuple[str, int]]:
    """Every (stack, index) in order: the positions a FrankenMerge chooses a source for."""
    return [(stack, i) for stack, n in stacks.items() for i in range(n)]


def frankenmerge_layer(
    key: str, states: list[dict], stacks: dict[str, int], choice: dict[tuple[str, int], int]
) -> torch.Tensor | None:
    """The tensor ``key`` of the source chosen for its layer, or None outside the layer stacks."""
    parts = split_layer_key(key, stacks)
    if parts is None:
        return None
    return states[choice[(parts[0], parts[1])]][key]


def _branch_factor(rest: str, scale: float) -> float:
    if any(rest.endswith(name) for name in _BRANCH_OUTPUTS):
        return scale
    if any(rest.endswith(name) for name in _BRANCH_READERS):
        return 1.0 / scale
    return 1.0


def check_dfs_path(states: list[dict], stack: str, n_layers: int, path: list, scales: list[float]) -> None:
    """Raise ValueError unless ``path`` is a non-empty list of (source, layer) pairs that exist
    in ``stack`` (``n_layers`` blocks) and ``scales`` holds one positive scale per step
    (foldable into the weights)."""
    if not path:
        raise ValueError("dfs: path must hold at least one (source, layer) step")
    for step in path:
        source, layer = step
        if not (0 <= source < len(states) and 0 <= layer < n_layers):
            raise ValueError(
                f"dfs: step {tuple(step)} is not (source in 0..{len(states) - 1}, "
                f"layer in 0..{n_layers - 1}) of stack {stack!r}"
            )
    if len(scales) != len(path) or any(not s > 0 for s in scales):
        raise ValueError(f"dfs: scales must hold {len(path)} positive numbers, one per step; got {scales}")
    rests = {
        cast(tuple[str, int, str], split_layer_key(k, {stack: n_layers}))[2]  # k is in the stack
        for k in states[0]
        if k.startswith(f"{stack}.")
    }
    if any(s != 1.0 for s in scales) and not any(r.endswith(o) for r in rests for o in _BRANCH_OUTPUTS):
        raise ValueError(
            f"dfs: scales need pre-norm blocks whose branch outputs are o_proj/down_proj "
            f"(Llama, Cognate); stack {stack!r} has none, so use scales of 1.0"
        )


def dfs_stack(states: list[dict], stack: str, path: list, scales: list[float]) -> dict[str, torch.Tensor]:
    """The tensors of the new ``stack``: step t is layer ``path[t][1]`` of source ``path[t][0]``,
    renumbered t, with its branch scale folded in."""
    out = {}
    for t, ((source, layer), scale) in enumerate(zip(path, scales)):
        prefix = f"{stack}.{layer}."
        for key, tensor in states[source].items():
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                factor = _branch_factor(rest, scale)
                out[f"{stack}.{t}.{rest}"] = tensor * factor if factor != 1.0 else tensor
    return out
