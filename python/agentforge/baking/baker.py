"""Baking a prompt into the weights, half-baking, re-baking (Prompt Pursuit) and stacking.

    result = bake(model, tokenizer, "Answer with the number only.", train_inputs, held_out_inputs,
                  BakeSettings(), out_dir="runs/bake", strength=0.5)      # half-baked
    result.kl_before, result.kl_after                                      # measured, held out

One bake: sample the prompted model's own trajectories on ``inputs`` (and, separately, on
``held_out`` inputs that never train anything), then train the unprompted model on the token
KL of :mod:`agentforge.baking.kl` with ``agentforge.train.train`` and MuGrokfast, either every
weight ("full", for tiny models) or LoRA adapters merged at the end ("lora"). BitLinear models
stay quantization-aware either way: full baking trains the latent weights through the STE, and
LoRA on a BitLinear lives inside its quantizer (:mod:`agentforge.baking.lora`).

Every ``eval_every`` steps the held-out KL is measured; ``strength`` is the fraction of the
initial KL to remove. A bake stops when it has removed that much (half-baking: 0.5), when the
reduction stops growing (a plateau: what "fully baked" means here), or after ``max_steps``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from agentforge.baking.cycles import plateaued
from agentforge.baking.kl import BakingData, anchor_rows, kl_loss, measured_kl, prompted_trajectories
from agentforge.baking.lora import DEFAULT_TARGETS, add_lora, check_bakeable, merge_lora
from agentforge.optim.presets import PRESETS as OPTIMIZER_PRESETS
from agentforge.settings import Checked, check_micro_batch, micro_batch_setting, setting

if TYPE_CHECKING:
    from peft import PeftModel

METHODS = ("full", "lora")
BEST_FILE = "best-rank{rank}.safetensors"  # the lowest-KL weights of a bake in progress (per process)


@dataclass
class BakeSettings(Checked):
    """How one prompt is baked (the Baking phase nests these in its settings)."""

    method: str = setting("full", choices=METHODS, doc="full: every weight (tiny models); lora: peft adapters, merged")
    lora_rank: int = setting(8, "[1, 4096]")
    lora_alpha: float = setting(16.0, "(0, 100000]")
    lora_targets: list[str] = setting(list(DEFAULT_TARGETS), length="[1, 64]", doc="layer name endings LoRA adapts")
    samples_per_input: int = setting(2, "[1, 1024]", doc="trajectories sampled per training input")
    max_new_tokens: int = setting(16, "[1, 65536]", doc="trajectory length (a trajectory also ends at eos)")
    temperature: float = setting(1.0, "(0, 100]", doc="of the prompted model's sampling")
    tools: bool = setting(False, doc="trajectories run the tool calls they write (prompts about tool use)")
    batch_size: int = setting(32, "[1, 65536]")
    micro_batch_size: int = micro_batch_setting()
    max_steps: int = setting(60, "[1, 10000000]")
    eval_every: int = setting(5, "[1, 10000000]", doc="steps between held-out KL measurements (the stop decisions)")
    optimizer_preset: str = setting("finetune", choices=tuple(OPTIMIZER_PRESETS), doc="a MuGrokfast preset")
    lr_scale: float = setting(1.0, "(0, 1000]", doc="multiplies the preset's learning rates")
    plateau_window: int = setting(2, "[1, 10000]", doc="measurements without a relative reduction gain of ...")
    plateau_threshold: float = setting(0.02, "[0, 100]", doc="... this much end a full bake")
    min_kl: float = setting(1e-4, "[0, 100]", doc="nats/token: a prompt that moves the model less has nothing to bake")
    anchor_weight: float = setting(
        0.0, "[0, 1000]", doc="weight of the retention anchor's KL (when bake() is given anchor text)"
    )

    def check(self) -> None:
        if not all(target.strip() for target in self.lora_targets):
            self.fail("lora_targets", "must hold non-empty layer name endings")
        check_micro_batch(self)


@dataclass
class Kept:
    """A copy of the model taken during a bake (adapters merged), with its held-out KL."""

    model: nn.Module
    kl: float
    step: int


@dataclass
class BakeResult:
    """What one bake did, measured on the held-out inputs. ``model`` is the baked model (for
    full baking the very object passed in, trained in place). ``kept[f]`` is the model at the
    first measurement that had removed a fraction ``f`` of the KL (see ``keep`` in :func:`bake`).
    ``curve``: ``{"step", "kl"}`` per measurement, step 0 included."""

    model: nn.Module
    prompt: str
    strength: float
    kl_before: float
    kl_after: float  # of the weights the bake ended on: the lowest held-out KL it measured
    steps: int  # the training step of those weights
    stop_reason: str  # "target", "plateau", "max_steps" or "no effect"
    curve: list[dict] = field(default_factory=list)
    kept: dict[float, Kept] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def reduction(self) -> float:
        """Fraction of the held-out KL(prompted ‖ unprompted) the bake removed."""
        return 1.0 - self.kl_after / self.kl_before if self.kl_before > 0 else 0.0

    def summary(self) -> dict:
        """The JSON-ready figures (no model)."""
        return {
            "prompt": self.prompt,
            "strength": self.strength,
            "kl_before": self.kl_before,
            "kl_after": self.kl_after,
            "reduction": self.reduction,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "curve": self.curve,
            "seconds": self.seconds,
            "kept": {str(f): {"kl": k.kl, "step": k.step} for f, k in self.kept.items()},
        }


def _check_strengths(strength: float, keep: Sequence[float]) -> None:
    if not 0 < strength <= 1:
        raise ValueError(f"bake: strength must be in (0, 1] (the fraction of the KL to remove), got {strength!r}")
    bad = [f for f in keep if not 0 < f < strength]
    if bad:
        raise ValueError(f"bake: keep fractions must lie in (0, strength={strength}), got {bad}")


def _check_disjoint(inputs: Sequence[str], held_out: Sequence[str]) -> None:
    shared = set(inputs) & set(held_out)
    if shared:
        raise ValueError(
            f"bake: {len(shared)} held-out input(s) are also baking inputs (e.g. {sorted(shared)[0]!r}); "
            "the KL must be measured on inputs the bake never trains on"
        )


def _optimizer(student: nn.Module, settings: BakeSettings):
    from agentforge.optim import MuGrokfast

    rates = {k: OPTIMIZER_PRESETS[settings.optimizer_preset][k] * settings.lr_scale for k in ("muon_lr", "adamw_lr")}
    return MuGrokfast.from_preset(student, settings.optimizer_preset, total_steps=settings.max_steps, **rates)


def save_weights(weights: nn.Module | Mapping[str, torch.Tensor], path: Path) -> None:
    """A module's weights (tied ones once: safetensors' ``save_model``, read back with its
    ``load_model``) or a dict of distinct tensors, to a safetensors file written beside ``path``
    and renamed into place."""
    from safetensors.torch import save_file, save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    if isinstance(weights, nn.Module):
        save_model(weights, str(scratch))
    else:
        save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()}, str(scratch))
    os.replace(scratch, path)


class _Monitor:
    """The held-out KL measurements of one bake and its stop rule (``eval_fn``/``stop_fn`` of
    ``agentforge.train.train``). Keeps merged model copies when reductions in ``keep`` are
    reached, and the trainable weights of the lowest KL so far (the bake ends on them, as the
    reference code keeps its best checkpoint by validation KL) in ``best_file``: on disk, since
    in a full bake they are a whole model's worth beside its gradients and optimizer state."""

    def __init__(
        self,
        student: nn.Module,
        held_out: BakingData,
        kl_before: float,
        strength: float,
        keep: Sequence[float],
        settings: BakeSettings,
        best_file: Path,
    ):
        self.held_out, self.kl_before, self.strength, self.settings = held_out, kl_before, strength, settings
        self.waiting = sorted(keep)
        self.curve: list[dict[str, Any]] = [{"step": 0, "kl": kl_before}]
        self.kept: dict[float, Kept] = {}
        self.reason = "max_steps"
        self.trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
        self.best, self.best_file = (kl_before, 0), best_file
        save_weights(self.trainable, best_file)

    def restore_best(self) -> tuple[float, int]:
        """Put the lowest-KL weights back (and delete their file); returns (their KL, their step)."""
        from safetensors.torch import load_file

        weights = load_file(str(self.best_file))
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(weights[name])
        self.best_file.unlink()
        return self.best

    def reductions(self) -> list[float]:
        return [1.0 - point["kl"] / self.kl_before for point in self.curve]

    def evaluate(self, student: nn.Module) -> dict[str, float]:
        kl = measured_kl(student, self.held_out, batch_size=self.settings.batch_size)
        # train() evaluates every eval_every steps and at its last step
        step = min(self.curve[-1]["step"] + self.settings.eval_every, self.settings.max_steps)
        self.curve.append({"step": step, "kl": kl})
        if kl < self.best[0]:
            self.best = (kl, step)
            save_weights(self.trainable, self.best_file)
        reduction = 1.0 - kl / self.kl_before
        while self.waiting and reduction >= self.waiting[0]:
            self.kept[self.waiting.pop(0)] = Kept(_merged_copy(student), kl, step)
        return {"kl": kl, "reduction": reduction}

    def should_stop(self, measured: dict[str, float]) -> bool:
        if measured["reduction"] >= self.strength:
            self.reason = "target"
        elif plateaued(self.reductions(), self.settings.plateau_window, self.settings.plateau_threshold):
            self.reason = "plateau"
        else:
            return False
        return True


def _merged_copy(student: nn.Module) -> nn.Module:
    from peft import PeftModel

    duplicate = copy.deepcopy(student)
    return merge_lora(duplicate) if isinstance(duplicate, PeftModel) else duplicate


def bake(
    model: nn.Module,
    tokenizer,
    prompt: str,
    inputs: Sequence[str],
    held_out: Sequence[str],
    settings: BakeSettings,
    *,
    out_dir: str | Path,
    strength: float = 1.0,
    keep: Sequence[float] = (),
    anchor: Sequence[Sequence[int]] = (),
    seed: int = 0,
    wandb_mode: str | None = "disabled",
    progress: bool = False,
) -> BakeResult:
    """Bake ``prompt`` into ``model`` until a fraction ``strength`` of the held-out
    KL(prompted ‖ unprompted) is gone (1.0: until it stops falling). ``inputs`` are what the
    prompt is followed by in the baking data (task prompts, questions), ``held_out`` the same
    kind of inputs kept apart for the measurement. ``keep``: reductions below ``strength`` at
    which to keep a copy of the model (e.g. ``keep=(0.5,)`` with ``strength=1.0`` gives the
    half-baked and the fully baked model from one run). ``anchor``: token-id rows of unrelated
    text on which the model is held to its pre-bake predictions, with weight
    ``settings.anchor_weight`` (retention). Training logs go to ``out_dir``."""
    from agentforge.train import TrainConfig, distributed, train

    started = time.perf_counter()
    _check_strengths(strength, keep)
    _check_disjoint(inputs, held_out)
    check_bakeable(model)
    sample: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        batch_size=settings.batch_size,
        tools=settings.tools,
    )
    data = prompted_trajectories(
        model, tokenizer, prompt, inputs, samples_per_input=settings.samples_per_input, seed=seed, **sample
    )
    measure = prompted_trajectories(model, tokenizer, prompt, held_out, seed=seed + 1, **sample)
    kl_before = measured_kl(model, measure, batch_size=settings.batch_size)
    result = BakeResult(
        model=model,
        prompt=prompt,
        strength=strength,
        kl_before=kl_before,
        kl_after=kl_before,
        steps=0,
        stop_reason="no effect",
        curve=[{"step": 0, "kl": kl_before}],
    )
    if kl_before < settings.min_kl:
        result.seconds = time.perf_counter() - started
        return result

    student = (
        add_lora(model, rank=settings.lora_rank, alpha=settings.lora_alpha, targets=settings.lora_targets)
        if settings.method == "lora"
        else model
    )
    rows = data.rows
    if len(anchor) and settings.anchor_weight > 0:  # each baking row is paired with an anchor row, cycling
        anchors = anchor_rows(model, anchor, batch_size=settings.batch_size)
        rows = [{**row, **anchors[i % len(anchors)]} for i, row in enumerate(rows)]
    best_file = Path(out_dir) / BEST_FILE.format(rank=distributed.rank())
    monitor = _Monitor(student, measure, kl_before, strength, keep, settings, best_file)
    config = TrainConfig(
        steps=settings.max_steps,
        batch_size=settings.batch_size,
        micro_batch_size=settings.micro_batch_size or None,
        eval_every=settings.eval_every,
        log_every=settings.eval_every,
        seed=seed,
        wandb_mode=wandb_mode,
        progress=progress,
        run_name="baking/bake",
    )
    train(
        student,
        rows,
        config,
        optimizer=_optimizer(student, settings),
        out_dir=out_dir,
        phase="baking/bake",
        loss_fn=functools.partial(kl_loss, anchor_weight=settings.anchor_weight),
        eval_fn=monitor.evaluate,
        stop_fn=monitor.should_stop,
        resume=False,
    )
    kl_after, step = monitor.restore_best()
    baked = merge_lora(cast("PeftModel", student)) if settings.method == "lora" else student
    return dataclasses.replace(
        result,
        model=baked,
        kl_after=kl_after,
        steps=step,
        stop_reason=monitor.reason,
        curve=monitor.curve,
        kept=monitor.kept,
        seconds=time.perf_counter() - started,
    )


def prompt_pursuit(
    model: nn.Module,
    tokenizer,
    prompt: str,
    inputs: Sequence[str],
    held_out: Sequence[str],
    settings: BakeSettings,
    *,
    out_dir: str | Path,
    rounds: int = 3,
    strength: float = 1.0,
    score_fn: Callable[[nn.Module], float] | None = None,
    min_gain: float = 0.01,
    anchor: Sequence[Sequence[int]] = (),
    seed: int = 0,
) -> list[BakeResult]:
    """Re-bake ``prompt`` into the model it was baked into (Prompt Pursuit): each round's teacher
    is the previous round's baked model *with* the prompt, so the prompt's effect compounds.
    Stops after ``rounds``, when a round finds nothing left to bake, or, given ``score_fn``
    (higher is better), when a round raised the score by less than ``min_gain`` (relative)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"prompt_pursuit: rounds must be a positive int, got {rounds!r}")
    scores = [score_fn(model)] if score_fn else []
    results = []
    for r in range(rounds):
        results.append(
            bake(
                model,
                tokenizer,
                prompt,
                inputs,
                held_out,
                settings,
                out_dir=Path(out_dir) / f"round_{r}",
                strength=strength,
                anchor=anchor,
                seed=seed + 2 * r,
            )
        )
        model = results[-1].model
        if results[-1].stop_reason == "no effect":
            break
        if score_fn:
            scores.append(score_fn(model))
            if plateaued(scores, 1, min_gain):
                break
    return results


def bake_stack(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    inputs: Sequence[str],
    held_out: Sequence[str],
    settings: BakeSettings,
    *,
    out_dir: str | Path,
    strength: float = 1.0,
    anchor: Sequence[Sequence[int]] = (),
    seed: int = 0,
) -> list[BakeResult]:
    """Bake several prompts one after another, θ_{u1 u2} = B(B(θ, u1), u2): each prompt is baked
    into the model that already carries the ones before it."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("bake_stack: prompts must be a non-empty sequence of strings")
    results = []
    for i, prompt in enumerate(prompts):
        results.append(
            bake(
                model,
                tokenizer,
                prompt,
                inputs,
                held_out,
                settings,
                out_dir=Path(out_dir) / f"prompt_{i}",
                strength=strength,
                anchor=anchor,
                seed=seed + 2 * i,
            )
        )
        model = results[-1].model
    return results
