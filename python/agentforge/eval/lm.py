"""Held-out language-modelling quality: the perplexity of a causal LM, and its unigram control.

Both functions score the same tokens, exactly those a Hugging Face causal LM computes its loss
on: labels are shifted by one (the logits at position ``t`` predict the label at ``t + 1``, so
the label at position 0 is never a target) and labels equal to ``-100`` are skipped. The mean
negative log-likelihood is weighted by tokens over the whole set, never a mean of batch means,
so the result does not depend on the batch size or on how many labels each row carries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agentforge.eval._common import evaluation_mode, model_device, require_positive

IGNORE_INDEX = -100  # the label value that Hugging Face losses skip
_UNIGRAM_CHUNK_ROWS = 1024  # rows of labels read at once while counting (bounds memory, not results)
# fp32 logits per forward (a 49k-token vocabulary at 32 rows x 128 tokens would be 800 MB, and the
# cross-entropy copies them); fewer rows per forward bound memory, not results
_LOGITS_BYTES = 256 << 20


def perplexity(model: torch.nn.Module, data: Any, *, batch_size: int = 16) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` over every target token of
    ``data``.

    ``data`` is a ``datasets.Dataset`` with fixed-length ``input_ids`` and ``labels`` columns
    (and optionally ``attention_mask``, passed to the model). The model is called as
    ``model(input_ids=..., attention_mask=...)`` and must return ``.logits`` of shape
    ``[batch, time, vocab]``; the loss is computed here from the logits (in fp32) rather than
    taken from ``.loss``, which is a per-batch mean.
    """
    nll, tokens = row_nll(model, data, batch_size=batch_size)
    if sum(tokens) == 0:
        raise ValueError("perplexity: data has no target tokens (every shifted label is -100)")
    return _exp(sum(nll) / sum(tokens))


def row_nll(model: torch.nn.Module, data: Any, *, batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Per row of ``data``: the summed next-token cross-entropy and the number of target tokens
    (what :func:`perplexity` totals; per row, two models' perplexities get a paired interval)."""
    require_positive("perplexity", batch_size=batch_size)
    _require_columns("perplexity", data, ("input_ids", "labels"))
    columns = [name for name in ("input_ids", "attention_mask", "labels") if name in data.column_names]
    device = model_device(model)
    nll, tokens = [], []
    with evaluation_mode(model):
        for batch in _torch_batches("perplexity", data, columns, _rows_per_forward(model, data, batch_size)):
            labels = batch.pop("labels").to(device)
            logits = model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits
            if logits.shape[:2] != labels.shape:
                raise ValueError(
                    f"perplexity: logits shape {tuple(logits.shape)} does not match labels "
                    f"shape {tuple(labels.shape)} as [batch, time, vocab]"
                )
            row_sums, row_tokens = _next_token_nll(logits, labels)
            nll += row_sums.tolist()
            tokens += row_tokens.tolist()
    return nll, tokens


def _rows_per_forward(model: Any, data: Any, batch_size: int) -> int:  # model: an nn.Module, HF or not
    """``batch_size``, or fewer rows where their logits would pass ``_LOGITS_BYTES``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else getattr(getattr(model, "config", None), "vocab_size", 0)
    width = len(data[0]["input_ids"]) if len(data) else 1
    return max(1, min(batch_size, _LOGITS_BYTES // max(4 * vocab * width, 1)))


def unigram_perplexity(train_data: Any, eval_data: Any, vocab_size: int) -> float:
    """The control for :func:`perplexity`: a unigram model with add-one smoothing,
    ``p(t) = (count(t) + 1) / (N + vocab_size)``, fitted on the target tokens of ``train_data``
    and scored on the target tokens of ``eval_data`` (same shift and ``-100`` rule as
    :func:`perplexity`). A model that does not beat it has learned nothing beyond token
    frequencies."""
    require_positive("unigram_perplexity", vocab_size=vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for targets in _label_targets("unigram_perplexity", train_data, vocab_size, "train_data"):
        counts += np.bincount(targets, minlength=vocab_size)
    if counts.sum() == 0:
        raise ValueError("unigram_perplexity: train_data has no target tokens (every shifted label is -100)")
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)

    total_nll, total_tokens = 0.0, 0
    for targets in _label_targets("unigram_perplexity", eval_data, vocab_size, "eval_data"):
        total_nll -= float(log_probs[targets].sum())
        total_tokens += targets.size
    if total_tokens == 0:
        raise ValueError("unigram_perplexity: eval_data has no target tokens (every shifted label is -100)")
    return _exp(total_nll / total_tokens)


def _next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed cross-entropy of logits[:, t] against labels[:, t + 1] (in float64),
    and how many targets."""
    logits = logits[:, :-1].float()  # fp32 softmax: bf16 log-probabilities are too coarse to average
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape).double().sum(1), (targets != IGNORE_INDEX).sum(1)


def _torch_batches(caller: str, data: Any, columns: list[str], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive row batches of ``data`` as dicts of 2-D tensors."""
    view = data.select_columns(columns).with_format("torch")
    for start in range(0, len(view), batch_size):
        batch = view[start : start + batch_size]
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise ValueError(f"{caller}: column {name!r} must hold fixed-length rows of token ids")
        if batch["labels"].shape != batch["input_ids"].shape:
            raise ValueError(
                f"{caller}: labels shape {tuple(batch['labels'].shape)} differs from "
                f"input_ids shape {tuple(batch['input_ids'].shape)}"
            )
        yield batch


def _label_targets(caller: str, data: Any, vocab_size: int, argument: str) -> Iterator[np.ndarray]:
    """The target token ids of ``data`` (shifted labels that are not -100), chunk by chunk."""
    _require_columns(caller, data, ("labels",), argument)
    view = data.select_columns(["labels"]).with_format("numpy")
    for start in range(0, len(view), _UNIGRAM_CHUNK_ROWS):
        labels = view[start : start + _UNIGRAM_CHUNK_ROWS]["labels"]
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{caller}: {argument} column 'labels' must hold fixed-length rows of token ids")
        targets = labels[:, 1:]
        targets = targets[targets != IGNORE_INDEX]
        if targets.size and (targets.min() < 0 or targets.max() >= vocab_size):
            raise ValueError(f"{caller}: {argument} has label ids outside [0, {vocab_size}) other than -100")
        yield targets


def _require_columns(caller: str, data: Any, needed: tuple[str, ...], argument: str = "data") -> None:
    columns = getattr(data, "column_names", None)
    if columns is None:
        raise TypeError(f"{caller}: {argument} must be a datasets.Dataset, got {type(data).__name__}")
    missing = [name for name in needed if name not in columns]
    if missing:
        raise ValueError(
            f"{caller}: {argument} has no {', '.join(map(repr, missing))} column "
            f"(columns: {', '.join(columns) or 'none'})"
        )


def _exp(mean_nll: float) -> float:
    """``exp``, saturating to ``inf`` instead of raising for an absurdly bad model."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
