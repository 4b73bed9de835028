"""Model merging over state dicts, tensor by tensor.

    from agentforge.merge import merge, merged_model
    state = merge("ties", [sibling_a, sibling_b, sibling_c], base=trunk, density=0.5, weights=[1, 1, 1])
    model = merged_model("dfs", [a, b], path=[(0, 0), (1, 1), (0, 1)], scales=[1.0, 0.8, 1.1])

Methods (parameters as in a mergekit YAML recipe, so a recipe carries over):

    linear            Σ w_i θ_i (normalize: / Σ w_i; default true)
    slerp             two models, t = 0 gives the first, 1 the second
    task_arithmetic   base + Σ w_i τ_i          (normalize default false)
    ties              trim τ_i to ``density``, elect signs, disjoint mean   (normalize default true)
    dare_linear       drop τ_i entries with prob 1 - density, rescale 1/density, then sum
    dare_ties         DARE drop and rescale, then TIES sign election
    frankenmerge      ``layers``: a source index per layer slot (every stack, in order)
    dfs               ``path``: (source, layer) steps through the main layer stack, ``scales``:
                      one residual-branch scale per step (Sakana's data-flow-space merge)

The layer stacks of frankenmerge and dfs are the models' ``nn.ModuleList``s of repeated blocks
(``agentforge.merge.layers``), so those two methods take the models themselves, not state dicts.

τ_i = θ_i − θ_base. ``normalize=None`` means mergekit's default for the method. For frankenmerge
and dfs, the tensors no layer choice covers (embeddings, norms, head; for dfs also any second
layer stack, such as Cognate's recursive core) are the ``weights``-average of the sources.
Results are deterministic for a given ``seed`` (DARE draws its masks from it, per tensor name).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from agentforge.merge import layers as _layers
from agentforge.merge import methods as _m

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "frankenmerge", "dfs")
LAYER_METHODS = ("frankenmerge", "dfs")  # they choose whole layers of the models' layer stacks
TASK_VECTOR_METHODS = {  # name -> (sparsification, sign consensus, mergekit's default normalize)
    "task_arithmetic": (None, False, False),
    "ties": ("magnitude", True, True),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
}

__all__ = ["merge", "merged_tensors", "merged_model", "dfs_stack_of", "METHODS", "TASK_VECTOR_METHODS"]


def _state(model) -> dict[str, torch.Tensor]:
    return model.state_dict() if isinstance(model, nn.Module) else model


def _check_same_layout(states: list[dict], base: dict | None) -> None:
    reference = states[0]
    for i, state in enumerate(states[1:] + ([base] if base is not None else []), start=1):
        who = "base" if i == len(states) else f"model {i}"
        if state.keys() != reference.keys():
            missing = sorted(set(reference) ^ set(state))[:3]
            raise ValueError(
                f"merge: {who} and model 0 have different tensors (e.g. {missing}); only models of "
                "one architecture can be merged"
            )
        for key, tensor in state.items():
            if tensor.shape != reference[key].shape:
                raise ValueError(
                    f"merge: {key} is {list(tensor.shape)} in {who} but {list(reference[key].shape)} in model 0"
                )


def _tensor_generator(seed: int, key: str) -> torch.Generator:
    # per tensor name, so a mask does not depend on the order the tensors are visited in
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _check_params(method: str, n: int, base, weights, density, t) -> list[float]:
    if method not in METHODS:
        raise ValueError(f"merge: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if n < 1 or (method == "slerp" and n != 2):
        raise ValueError(f"merge: {method} needs {'exactly 2' if method == 'slerp' else 'at least 1'} models, got {n}")
    if method in TASK_VECTOR_METHODS and base is None:
        raise ValueError(f"merge: {method} merges task vectors and needs base= (e.g. the shared trunk)")
    if method == "slerp" and (t is None or not 0 <= t <= 1):
        raise ValueError(f"merge: slerp needs t in [0, 1], got {t!r}")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"merge: density must be in (0, 1], got {density!r}")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"merge: {len(weights)} weights for {n} models")
    return weights


def merge(method: str, models: list, base=None, **params) -> dict[str, torch.Tensor]:
    """Merge ``models`` (state dicts or modules of one architecture) into a new state dict.

    See the module docstring for the methods and :func:`merged_tensors` for the parameters.
    Tensors are merged one at a time in fp32 and returned in the first model's dtypes; non-float
    tensors are copied from the first model."""
    return dict(merged_tensors(method, models, base, **params))


def merged_tensors(
    method: str,
    models: list,
    base=None,
    *,
    weights: list[float] | None = None,
    density: float | None = None,
    t: float | None = None,
    normalize: bool | None = None,
    seed: int = 0,
    layers: list[int] | None = None,
    path: list | None = None,
    scales: list[float] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`merge`'s tensors as ``(name, tensor)`` pairs, made one at a time as they are asked
    for, so a caller that writes each into a model at once never holds a second copy of the whole
    model. The arguments are checked here, before the first tensor is made."""
    states = [_state(m) for m in models]
    base_state = _state(base) if base is not None else None
    weights = _check_params(method, len(states), base_state, weights, density, t)
    _check_same_layout(states, base_state)
    if normalize is None:
        normalize = TASK_VECTOR_METHODS[method][2] if method in TASK_VECTOR_METHODS else True
    stacks = _stacks_of(models[0], method) if method in LAYER_METHODS else {}
    choice, replaced, rewired = _layer_plan(method, states, stacks, layers, path, scales)

    def each() -> Iterator[tuple[str, torch.Tensor]]:
        yield from replaced.items()
        for key, reference in states[0].items():
            if rewired and key.startswith(f"{rewired}."):
                continue  # this stack is replaced by the DFS path
            if not reference.is_floating_point():
                yield key, reference.clone()
                continue
            tensors = [s[key] for s in states]
            merged = _merge_tensor(
                method, key, tensors, base_state, weights, density, t, normalize, seed, states, (stacks, choice)
            )
            yield key, merged.to(reference.dtype)

    return each()


def _stacks_of(model, method: str) -> dict[str, int]:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"merge: {method} chooses whole layers and needs the models themselves (nn.Module), "
            "whose layer stacks it finds on the model, not their state dicts"
        )
    return _layers.layer_stacks(model)


def dfs_stack_of(model: nn.Module) -> str:
    """The layer stack DFS rewires: the model's first one (Llama's ``model.layers``, Cognate's
    ``model.prelude``)."""
    stacks = _layers.layer_stacks(model)
    if not stacks:
        raise ValueError(
            f"merge: dfs needs a model with a stack of repeated blocks (an nn.ModuleList); "
            f"{type(model).__name__} has none"
        )
    return next(iter(stacks))


def _layer_plan(method, states, stacks, layers, path, scales):
    """FrankenMerge's slot -> source map; or DFS's new stack tensors and the stack they replace."""
    if method == "frankenmerge":
        slots = _layers.layer_slots(stacks)
        if layers is None or len(layers) != len(slots) or any(not 0 <= s < len(states) for s in layers):
            raise ValueError(
                f"merge: frankenmerge needs layers= with one source index in 0..{len(states) - 1} per "
                f"layer slot ({len(slots)}: {slots})"
            )
        return dict(zip(slots, layers)), {}, None
    if method == "dfs":
        if not stacks:
            raise ValueError("merge: dfs needs a model with a stack of repeated blocks (an nn.ModuleList)")
        stack = next(iter(stacks))
        scales = [1.0] * len(path or []) if scales is None else list(scales)
        _layers.check_dfs_path(states, stack, stacks[stack], path or [], scales)
        return None, _layers.dfs_stack(states, stack, path, scales), stack
    return None, {}, None


def _merge_tensor(method, key, tensors, base, weights, density, t, normalize, seed, states, layer_choice):
    if method == "linear":
        return _m.linear(tensors, weights, normalize)
    if method == "slerp":
        return _m.slerp(tensors[0], tensors[1], t)
    if method in TASK_VECTOR_METHODS:
        sparsify, consensus, _ = TASK_VECTOR_METHODS[method]
        return _m.task_vector_merge(
            base[key],
            tensors,
            weights,
            sparsify=sparsify,
            density=1.0 if density is None else density,
            consensus=consensus,
            normalize=normalize,
            generator=_tensor_generator(seed, key),
        )
    if method == "frankenmerge":
        chosen = _layers.frankenmerge_layer(key, states, *layer_choice)
        if chosen is not None:
            return chosen
    return _m.linear(tensors, weights, True)  # outside the layer choices: the weighted average


def merged_model(method: str, models: list, base=None, *, config_from: int = 0, **params) -> nn.Module:
    """``merge`` into a new model of the sources' class (HF ``PreTrainedModel``s) with the config of
    ``models[config_from]`` (its behaviour settings, for Cognate siblings); for ``dfs`` the
    config's layer count follows the path."""
    if not all(isinstance(m, nn.Module) and hasattr(m, "config") for m in models):
        raise ValueError("merged_model: models must be Hugging Face models (use merge() for state dicts)")
    if not 0 <= config_from < len(models):
        raise ValueError(f"merged_model: config_from={config_from} is not a model index (0..{len(models) - 1})")
    tensors = merged_tensors(method, models, base, **params)
    source = models[config_from]
    config = source.config.__class__(**source.config.to_dict())
    if method == "dfs":
        _resize_config(config, source, params["path"])
    model = source.__class__(config).to(next(models[0].parameters()).dtype)
    _write_into(model, tensors)
    return model


def _write_into(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy each merged tensor into ``model``'s own as it is made (``load_state_dict`` would need
    all of them at once: a second model's worth of memory); every tensor must be written."""
    target = model.state_dict()
    written = set()
    for key, tensor in tensors:
        if key not in target or target[key].shape != tensor.shape:
            raise ValueError(f"merged_model: merged tensor {key} {list(tensor.shape)} does not fit the new model")
        with torch.no_grad():
            target[key].copy_(tensor)
        written.add(key)
    missing = sorted(set(target) - written)
    if missing:
        raise ValueError(f"merged_model: the merge made no tensor for {missing[:3]} of the new model")


def _resize_config(config, source: Any, path: list) -> None:  # source: a transformers model
    """Set the main stack's layer count (and Cognate's memory layers) for a DFS path."""
    if config.model_type == "cognate":
        memory = set(source.config.memory_layers)
        config.num_prelude_layers = len(path)
        config.memory_layers = [step for step, (_, layer) in enumerate(path) if layer in memory]
    elif hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(path)
        if getattr(config, "layer_types", None):
            config.layer_types = [source.config.layer_types[layer] for _, layer in path]
    else:
        raise ValueError(f"merged_model: cannot set the layer count of a {config.model_type} config for dfs")
