"""Helpers shared by the measurements: where a model lives, running it in eval mode, left-padded
batches, argument checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model holding neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token sequences padded on the left to the longest (a
    batch that generates continues every row from its last column)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the model in eval mode (no dropout) without autograd, then restore the training flag
    of every submodule: a measurement must not change the model it measures.

    ``no_grad`` rather than ``inference_mode``: a model that caches tensors lazily (rotary
    tables, memory state) would otherwise keep inference tensors that break its next training
    step with "Inference tensors cannot be saved for backward"."""
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in was_training.items():
            module.training = training


def require_positive(caller: str, **values: int) -> None:
    """Raise a one-line ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{caller}: {name} must be a positive integer, got {value!r}")
