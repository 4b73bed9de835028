"""Activation capture: what chosen modules receive while a model reads calibration batches.

    calls = capture_calls(model, ["model.layers.0.mlp.up_proj"], batches)
    # {"model.layers.0.mlp.up_proj": [args of call 1, args of call 2, ...]}

Forward pre-hooks record each call's inputs (detached copies, so nothing the forward pass does
afterwards can change them); a module called several times per forward (a weight-shared
recursive block) contributes every call, up to ``max_calls``. The model runs in eval mode without
gradients and is left in the mode it had; the hooks are removed even when the forward fails.
"""

from __future__ import annotations

import torch
from torch import nn


def detached(value, device=None):
    """``value`` with every tensor inside it (tuples, lists, dicts) detached and copied (to
    ``device`` when given)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v, device) for v in value)
    if isinstance(value, dict):
        return {k: detached(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_calls(
    model: nn.Module, module_names, batches, *, max_calls: int | None = None, with_kwargs: bool = False, device=None
) -> dict[str, list]:
    """The inputs of each named module while ``model`` reads ``batches`` (dicts of model keyword
    arguments, e.g. ``input_ids`` and ``attention_mask``), in call order: per call its positional
    arguments (a tuple), or ``(args, kwargs)`` with ``with_kwargs``. At most ``max_calls`` calls
    are kept per module (all without it). ``device``: where the copies are kept (where the model
    computes by default; "cpu" keeps a large capture out of accelerator memory). A module never
    called has an empty list."""
    calls: dict[str, list] = {name: [] for name in module_names}

    def recorder(name: str):
        def record(module, args, kwargs=None):
            if max_calls is None or len(calls[name]) < max_calls:
                calls[name].append(
                    (detached(args, device), detached(kwargs, device)) if with_kwargs else detached(args, device)
                )

        return record

    handles = [
        model.get_submodule(name).register_forward_pre_hook(recorder(name), with_kwargs=with_kwargs) for name in calls
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls
