"""Counted compute of Quiet-STaR training, and the plain NLL fine-tuning that matches it.

The unit is one token through one forward pass of the model (about 2 × its parameters in
FLOPs): a forward and backward pass over a token counts 3 (the backward costs about twice the
forward), a forward pass without gradients counts 1. The attention's quadratic term and the
mixing head are left out; at these lengths the weights dominate, and both sides are priced alike.

One training row of T tokens with P chosen positions (the row's own, see ``choose_positions``),
run as n thought replicas with thoughts of L tokens and lookahead k (S = L + 1 + k extra tokens
per position):

    sampling  L passes without gradients; pass s reads T + s·P columns
    scoring   one pass with gradients over T + S·P columns

    compute(row) = n · ( Σ_{s=1..L} (T + s·P) + 3 · (T + S·P) )
                 = n · ( (L + 3) · T + (L(L + 1)/2 + 3·S) · P )

The thinker's compute is the sum over the rows of every batch it trained on (the trainer's
batch schedule replayed, so it is known before and after training alike). Each row counts its
own positions, not the batch's widest row, so the count does not depend on how a batch is cut
into micro-batches or shared among ranks. A plain NLL step over B rows of T tokens costs 3·B·T,
so the control gets ``round(thinker compute / (3·B·T))`` steps (at least one): the same
deterministic number on every run.
"""

from __future__ import annotations

import torch

from agentforge.quietstar.layout import chosen_columns


def row_compute(labels: torch.Tensor, settings) -> torch.Tensor:
    """Counted compute [R] of one Quiet-STaR training pass over each row of ``labels`` [R, T]
    under ``settings`` (a ``ThoughtSettings``), by the formula above."""
    T = labels.shape[1]
    P = chosen_columns(labels, settings.positions).sum(1).long()
    L, S = settings.thought_length, settings.steps
    return settings.n_thoughts * ((L + 3) * T + (L * (L + 1) // 2 + 3 * S) * P)


def training_compute(labels: torch.Tensor, steps: int, batch_size: int, seed: int, settings) -> int:
    """Counted compute of ``steps`` Quiet-STaR training steps of ``batch_size`` rows drawn from
    the rows of ``labels`` in the trainer's order for ``seed``."""
    from agentforge.train.batches import global_batch

    per_row = row_compute(labels, settings)
    return sum(int(per_row[global_batch(step, len(labels), batch_size, seed)].sum()) for step in range(steps))


def plain_steps(compute: int, batch_size: int, seq_len: int) -> int:
    """Plain NLL steps of ``batch_size`` rows of ``seq_len`` tokens that spend ``compute``."""
    return max(1, round(compute / (3 * batch_size * seq_len)))
