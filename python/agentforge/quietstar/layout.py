"""Where the thought tokens go: the columns, positions and visibility of the extra tokens that
Quiet-STaR appends to a batch, and the real columns it thinks at."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Layout:
    """Columns, positions and visibility of the extra tokens for a batch (P positions per row)."""

    parents: torch.Tensor  # [B, P] real column each chain extends (0 for padding entries)
    valid: torch.Tensor  # [B, P] whether entry p is a real chosen position
    steps: int

    def columns(self, n_real: int, step: int) -> torch.Tensor:
        """Columns of step ``step``'s extra tokens: [P]."""
        P = self.parents.shape[1]
        return n_real + step * P + torch.arange(P, device=self.parents.device)

    def for_steps(self, n_steps: int, real_positions: torch.Tensor):
        """``(extra_parents [B, E], extra_mask [B, E, T + E], position_ids [B, T + E])`` for the
        first ``n_steps`` steps; ``real_positions`` [B, T] are the real tokens' positions."""
        B, P = self.parents.shape
        T = real_positions.shape[1]
        device = self.parents.device
        step = torch.arange(n_steps, device=device).repeat_interleave(P)  # [E]
        index = torch.arange(P, device=device).repeat(n_steps)  # [E]
        parents = self.parents[:, index]  # [B, E]
        # extra -> real: columns up to the parent
        sees_real = torch.arange(T, device=device)[None, None, :] <= parents[..., None]
        # extra -> extra: same position, earlier or same step
        sees_extra = (index[:, None] == index[None, :]) & (step[None, :] <= step[:, None])
        mask = torch.cat((sees_real, sees_extra[None].expand(B, -1, -1)), dim=2)
        positions = torch.cat((real_positions, real_positions.gather(1, parents) + 1 + step[None]), dim=1)
        return parents, mask, positions


def choose_positions(labels: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the real columns t to think at: every column but the last ("all"), or those whose
    next token has a label ("answers"). Returns ``(parents [B, P], valid [B, P])``, padded."""
    chosen = chosen_columns(labels, mode)
    counts = chosen.sum(1)
    P = max(int(counts.max()), 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :P]  # chosen columns first, in order
    valid = torch.arange(P, device=labels.device)[None] < counts[:, None]
    return torch.where(valid, order, 0), valid


def chosen_columns(labels: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T - 1] bool: whether each row thinks at column t (see ``choose_positions``)."""
    if mode == "all":
        return torch.ones(labels.shape[0], labels.shape[1] - 1, dtype=torch.bool, device=labels.device)
    return labels[:, 1:] != IGNORE_INDEX
