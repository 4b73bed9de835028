"""Optimizers: MuGrokfast (Muon on hidden matrices + torch.optim.AdamW on the rest,
a Grokfast gradient filter, a warm-up + cosine schedule and optional QK-clip) and its presets."""

from agentforge.optim.grouping import split_parameters
from agentforge.optim.mugrokfast import MuGrokfast
from agentforge.optim.muon import Muon
from agentforge.optim.presets import PRESETS
from agentforge.optim.schedule import lr_factor

__all__ = ["MuGrokfast", "Muon", "PRESETS", "lr_factor", "split_parameters"]
