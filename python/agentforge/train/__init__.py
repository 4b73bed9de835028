"""The one training loop every phase uses (see loop.py), its config, metrics logger, checkpoints
and process-group helpers."""

from agentforge.train.config import TrainConfig
from agentforge.train.distributed import barrier, is_main, maybe_init, rank, unwrap, world_size
from agentforge.train.loop import TrainResult, default_loss, train
from agentforge.train.metrics import MetricsLogger, read_metrics

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "default_loss",
    "MetricsLogger",
    "read_metrics",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "maybe_init",
    "unwrap",
]
