"""The one training loop every phase uses: gradient accumulation, DDP under torchrun, bf16
autocast on CUDA, gradient clipping, atomic checkpoints with exact resume, metrics.jsonl + W&B.

    result = train(model, dataset, TrainConfig(steps=200, batch_size=32),
                   optimizer=torch.optim.AdamW(model.parameters(), 3e-3), out_dir="runs/p1")
"""

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from agentforge.artifacts import recover_directory
from agentforge.eval.speed import trim_c_heap
from agentforge.train import distributed
from agentforge.train.batches import check_dataset, collate, global_batch, micro_batches, rank_share
from agentforge.train.checkpoint import (
    CHECKPOINT_DIR,
    capture_rng,
    config_hash,
    load_checkpoint,
    preserved_rng,
    restore_rng,
    run_fingerprint,
    save_checkpoint,
    seed_everything,
)
from agentforge.train.config import TrainConfig
from agentforge.train.metrics import MetricsLogger

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
StopFn = Callable[[dict[str, float]], bool]


@dataclass
class TrainResult:
    """What a training run did. ``losses[i]`` is the global-batch loss of step ``i + 1``, including
    steps done before a resume; ``last_eval`` is the last ``eval_fn`` result ({} without one)."""

    step: int
    losses: list[float]
    last_eval: dict[str, float]
    elapsed_s: float
    tokens: int


@dataclass
class _RunState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    tokens: int = 0

    def result(self) -> TrainResult:
        return TrainResult(self.step, list(self.losses), dict(self.last_eval), self.elapsed_s, self.tokens)


def default_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hugging Face convention: the model shifts ``labels`` itself and returns the mean loss."""
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask") if k in batch}
    return model(**inputs).loss


def _due(step: int, every: int, last_step: int) -> bool:
    return step == last_step or (every > 0 and step % every == 0)


def _autocast(amp: str, device: torch.device):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# one optimizer step


def _split_loss(output) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, tuple):
        loss, extras = output
        return loss, {k: float(v) for k, v in extras.items()}
    return output, {}


def _accumulate_gradients(
    wrapped: nn.Module,
    data,
    rows: list[int],
    micro: int,
    global_rows: int,
    loss_fn: LossFn,
    amp: str,
    device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """Forward/backward over this rank's micro-batches. Returns ``[loss, tokens, *extras]`` as this
    rank's share of the global-batch mean (sum it over ranks) and the sorted extra-metric names."""
    world = distributed.world_size()
    chunks = micro_batches(rows, micro)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    extras_sum: dict[str, float] = {}
    tokens = 0
    for i, chunk in enumerate(chunks):
        batch = collate(data, chunk, device)
        weight = len(chunk) / global_rows  # gradients invariant to micro-batching and world size
        # Gradients are all-reduced only on the last micro-batch; earlier ones accumulate locally.
        sync = (
            contextlib.nullcontext()
            if world == 1 or i == len(chunks) - 1
            else cast(DistributedDataParallel, wrapped).no_sync()  # wrapped in DDP when world > 1
        )
        with sync:
            with _autocast(amp, device):
                loss, extras = _split_loss(loss_fn(wrapped, batch))
            # DDP averages gradients over ranks; x world turns that average back into our weighted sum.
            (loss * (weight * world)).backward()
        loss_sum += loss.detach().double() * weight
        for name, value in extras.items():
            extras_sum[name] = extras_sum.get(name, 0.0) + value * weight
        tokens += batch["input_ids"].numel()
    names = sorted(extras_sum)
    tail = torch.tensor([tokens, *(extras_sum[n] for n in names)], dtype=torch.float64, device=device)
    return torch.cat([loss_sum.view(1), tail]), names


def _step(
    wrapped: nn.Module,
    model: nn.Module,
    data,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    micro: int,
    step: int,
) -> dict:
    """Optimizer step number ``step + 1``: accumulate the global batch's gradients, clip, step,
    zero. Returns its metrics: global loss, lr, pre-clip gradient norm, tokens and loss_fn extras."""
    device = distributed.device()
    rows = global_batch(step, len(data), cfg.batch_size, cfg.seed)
    rows = rank_share(rows, distributed.rank(), distributed.world_size())
    sums, extra_names = _accumulate_gradients(wrapped, data, rows, micro, cfg.batch_size, loss_fn, cfg.amp, device)
    loss, tokens, *extras = distributed.all_reduce_sum(sums).tolist()
    if not math.isfinite(loss):  # every rank sees the same reduced loss, so all of them stop
        raise FloatingPointError(
            f"loss is {loss} at step {step + 1}; training diverged (lower the learning rate or check the data)"
        )
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    lr = float(optimizer.param_groups[0]["lr"])  # the lr this update uses; self-scheduling optimizers
    optimizer.step()  # (MuGrokfast) write the next one inside step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens": int(tokens),
        **dict(zip(extra_names, extras)),
    }


# ---------------------------------------------------------------------------------------------
# start, evaluate, checkpoint


def _start(model, optimizer, cfg: TrainConfig, fingerprint: dict, ckpt_dir: Path, resume: bool) -> _RunState:
    """Fresh seeded state, or the state of the checkpoint in ``ckpt_dir`` loaded into model and optimizer."""
    state = None
    if resume:
        if distributed.is_main():
            recover_directory(ckpt_dir)  # finish a checkpoint swap that a crash interrupted
        distributed.barrier()
        state = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, fingerprint=fingerprint, steps=cfg.steps)
    if state is None:
        seed_everything(cfg.seed + distributed.rank())  # ranks draw different dropout masks
        return _RunState()
    if state["world_size"] == distributed.world_size():
        restore_rng(state["rng"][distributed.rank()])
    else:
        log.warning(
            "%s: resuming a run of %d processes on %d; same data order, but not bitwise identical",
            ckpt_dir,
            state["world_size"],
            distributed.world_size(),
        )
        seed_everything(cfg.seed + distributed.rank() + state["step"])
    return _RunState(state["step"], state["losses"], state["last_eval"], state["elapsed_s"], state["tokens"])


def _evaluate(model: nn.Module, eval_fn: EvalFn) -> dict[str, float]:
    """``eval_fn`` on rank 0 (eval mode, no grad, training RNG untouched); every rank gets the result."""

    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), preserved_rng():
                return {k: float(v) for k, v in eval_fn(model).items()}
        finally:
            model.train(was_training)

    measured = distributed.on_main(evaluate)
    # Evaluation's batches have other shapes than training's; what it freed stays in the C heap
    # as fragments that training's next allocations do not fit unless they go back to the
    # system (without this, a SmolLM2 bake's RSS after each step climbed from 3.9 to 6.2 GB
    # over 12 steps).
    trim_c_heap()
    return measured


def _checkpoint(
    ckpt_dir: Path, model, optimizer, run: _RunState, cfg: TrainConfig, fingerprint: dict, logger: MetricsLogger
) -> None:
    rng_states = distributed.all_gather(capture_rng())
    if distributed.is_main():
        logger.sync()  # the rows up to this step are durable before the checkpoint claims them
        state = {
            "phase": fingerprint["phase"],
            "step": run.step,
            "seed": cfg.seed,
            "world_size": distributed.world_size(),
            "config_hash": config_hash(fingerprint),
            "config": fingerprint,
            "losses": run.losses,
            "tokens": run.tokens,
            "elapsed_s": run.elapsed_s,
            "last_eval": run.last_eval,
        }
        save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, state=state, rng_states=rng_states)
    distributed.barrier()


# ---------------------------------------------------------------------------------------------
# the loop


def train(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer,
    out_dir: str | Path,
    phase: str = "train",
    loss_fn: LossFn | None = None,
    eval_fn: EvalFn | None = None,
    resume: bool = True,
    stop_fn: StopFn | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps on ``data``.

    ``data``: a ``datasets.Dataset`` or an indexable of dict rows with fixed-length int columns
    ``input_ids`` and ``labels`` (other numeric columns reach ``loss_fn`` as tensors).
    ``loss_fn(model, batch)``: mean loss of a micro-batch, or ``(loss, {name: float})``; default
    ``model(input_ids, labels[, attention_mask]).loss``. Under DDP it receives the wrapped model:
    run forward passes through it (``distributed.unwrap(model)`` gives the attributes).
    ``eval_fn(model) -> {name: number}``: every ``cfg.eval_every`` steps and at the end, on rank 0.
    ``resume``: continue from ``out_dir/checkpoint`` if one exists (exactly, same process layout).
    ``stop_fn(eval results) -> bool``: True ends training after that evaluation (a target reached);
    every rank sees the same results, so all stop together. ``TrainResult.step`` says where; the
    run is checkpointed there (a resumed run would continue from that step).
    ``on_step(step, steps, loss)``: after every optimizer step (progress shown elsewhere than a bar).
    Under torchrun the process group is joined and the model wrapped in DDP here; rank 0 alone
    writes. The model is left unwrapped, in train mode, on this rank's device.
    """
    distributed.maybe_init()
    world, device = distributed.world_size(), distributed.device()
    micro = cfg.micro_batch(world)
    check_dataset(data)
    loss_fn = loss_fn or default_loss
    out_dir = Path(out_dir)
    model.to(device).train()
    optimizer.zero_grad(set_to_none=True)
    fingerprint = run_fingerprint(cfg, phase, len(data), optimizer)
    run = _start(model, optimizer, cfg, fingerprint, out_dir / CHECKPOINT_DIR, resume)
    if run.step == cfg.steps:
        return run.result()

    wrapped = model
    if world > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    logger = MetricsLogger(
        out_dir,
        phase=phase,
        wandb_mode=cfg.resolved_wandb_mode(),
        project=cfg.wandb_project,
        run_name=cfg.run_name,
        wandb_group=cfg.wandb_group,
        enabled=distributed.is_main(),
        config={**asdict(cfg), "phase": phase, "world_size": world},
    )
    logger.truncate_after(run.step)  # rows after the checkpoint belong to lost work
    show_bar = cfg.progress and distributed.is_main() and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=run.step, desc=phase, disable=not show_bar, dynamic_ncols=True)
    started, elapsed_before = time.perf_counter(), run.elapsed_s
    try:
        while run.step < cfg.steps:
            row = _step(wrapped, model, data, cfg, optimizer, loss_fn, micro, run.step)
            run.step += 1
            run.losses.append(row["loss"])
            run.tokens += row["tokens"]
            run.elapsed_s = elapsed_before + time.perf_counter() - started
            row.update(tokens=run.tokens, elapsed_s=round(run.elapsed_s, 3))
            evaluated = eval_fn is not None and _due(run.step, cfg.eval_every, cfg.steps)
            if evaluated and eval_fn is not None:  # (evaluated implies an eval_fn)
                run.last_eval = _evaluate(model, eval_fn)
                row.update({f"eval/{k}": v for k, v in run.last_eval.items()})
            stop = evaluated and stop_fn is not None and stop_fn(run.last_eval)
            if evaluated or _due(run.step, cfg.log_every, cfg.steps):
                logger.log(row, step=run.step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if stop or _due(run.step, cfg.checkpoint_every, cfg.steps):
                _checkpoint(out_dir / CHECKPOINT_DIR, model, optimizer, run, cfg, fingerprint, logger)
            bar.update(1)
            if on_step is not None:
                on_step(run.step, cfg.steps, row["loss"])
            if stop:
                break
    finally:
        bar.close()
        logger.close()
    return run.result()
