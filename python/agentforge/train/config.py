"""TrainConfig: everything the training loop needs besides the model, data and optimizer,
validated when it is built so a bad value fails before any work is done."""

import math
import os
from dataclasses import dataclass

WANDB_MODES = ("online", "offline", "disabled")
AMP_MODES = ("auto", "bf16", "off")


def resolve_wandb_mode(mode: str | None) -> str:
    """``mode``, else env ``WANDB_MODE``, else "offline" (W&B with no API key must not fail a run)."""
    source = "wandb_mode" if mode is not None else "environment WANDB_MODE"
    mode = mode if mode is not None else os.environ.get("WANDB_MODE", "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"{source}={mode!r} must be one of {'/'.join(WANDB_MODES)}")
    return mode


def require_wandb_key(mode: str) -> None:
    """An online W&B run needs an API key; without one, fail before anything is written (W&B would
    otherwise stop the run at its first log, or prompt for a key)."""
    import netrc

    if mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ValueError(
        "W&B mode online needs an API key: run `wandb login` or set WANDB_API_KEY (or use --wandb offline)"
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """How to train.

    ``batch_size`` is the number of rows per optimizer step over all ranks and accumulation
    steps; ``micro_batch_size`` the rows per forward pass on one rank (default: ``batch_size //
    world_size``, i.e. no accumulation). ``checkpoint_every``/``log_every``/``eval_every`` = 0
    means "only at the last step". ``wandb_mode`` None means env ``WANDB_MODE``, else "offline".
    ``amp``: "auto" = bf16 autocast on CUDA and none on CPU, "bf16" = always, "off" = never.
    """

    steps: int
    batch_size: int
    micro_batch_size: int | None = None
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    eval_every: int = 0
    wandb_mode: str | None = None
    wandb_project: str = "agentforge"
    wandb_group: str | None = None  # one pipeline run: its W&B runs share this group
    run_name: str | None = None
    amp: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            self._require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "a positive int")
        if self.micro_batch_size is not None:
            self._require(
                _is_int(self.micro_batch_size) and self.micro_batch_size >= 1,
                "micro_batch_size",
                "None or a positive int",
            )
            if self.batch_size % self.micro_batch_size:
                raise ValueError(
                    f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                    f"micro_batch_size ({self.micro_batch_size})"
                )
        for name in ("seed", "checkpoint_every", "log_every", "eval_every"):
            self._require(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        self._require(
            isinstance(self.grad_clip, (int, float))
            and not isinstance(self.grad_clip, bool)
            and math.isfinite(self.grad_clip)
            and self.grad_clip >= 0,
            "grad_clip",
            "a finite number >= 0 (0 turns clipping off)",
        )
        self._require(
            self.wandb_mode is None or self.wandb_mode in WANDB_MODES,
            "wandb_mode",
            f"None or one of {'/'.join(WANDB_MODES)}",
        )
        self._require(
            isinstance(self.wandb_project, str) and self.wandb_project != "", "wandb_project", "a non-empty string"
        )
        self._require(self.run_name is None or isinstance(self.run_name, str), "run_name", "None or a string")
        self._require(self.wandb_group is None or isinstance(self.wandb_group, str), "wandb_group", "None or a string")
        self._require(self.amp in AMP_MODES, "amp", f"one of {'/'.join(AMP_MODES)}")
        self._require(isinstance(self.progress, bool), "progress", "a bool")

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

    def micro_batch(self, world_size: int) -> int:
        """Rows per forward pass on one rank, checked against ``world_size``."""
        if self.batch_size % world_size:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by the world "
                f"size ({world_size}): each rank takes an equal share of the global batch"
            )
        micro = self.micro_batch_size or self.batch_size // world_size
        if self.batch_size % (world_size * micro):
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by world size × "
                f"micro_batch_size ({world_size} × {micro} = {world_size * micro})"
            )
        return micro

    def resolved_wandb_mode(self) -> str:
        """``wandb_mode``, else env ``WANDB_MODE``, else "offline"."""
        return resolve_wandb_mode(self.wandb_mode)

    def trajectory(self) -> dict:
        """The fields that change what training computes, so a checkpoint written under other
        values must not be resumed. ``steps`` may grow (continue training); micro-batching,
        logging, checkpoint cadence and W&B settings do not change the math."""
        return {"batch_size": self.batch_size, "seed": self.seed, "grad_clip": self.grad_clip, "amp": self.amp}
