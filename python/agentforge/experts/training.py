"""Training one expert's z on its domain's tasks, through ``agentforge.train`` (atomic checkpoints,
exact resume, metrics.jsonl), in up to two stages that both keep a KL penalty to the base model:

1. cross-entropy on the answers of packed task rows (answer-only labels), the cheap dense signal;
2. REINFORCE on verified rewards: sample an answer from the adapted model, score it with the task's
   own scorer (reward in [0, 1]), and push up the log-probability of answers that beat the
   leave-one-out mean reward of their batch (an unbiased baseline).

The penalty is the exact KL(p_z ‖ p_base) over the vocabulary, averaged over the answer positions,
where p_base is the same model with z = 1 (evaluated without gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from agentforge.experts.svf import SVDBasis, SVFExpert, installed
from agentforge.settings import Checked, setting

IGNORE_INDEX = -100


@dataclass
class TrainSettings(Checked):
    """How long and how hard one expert trains (``ce_steps`` and ``rl_steps`` may each be 0, not both)."""

    ce_steps: int = setting(30, "[0, 10000000]", doc="cross-entropy steps")
    rl_steps: int = setting(30, "[0, 10000000]", doc="REINFORCE steps after them")
    batch_size: int = setting(32, "[1, 65536]")
    seq_len: int = setting(
        32,
        "[8, 8192]",
        doc="tokens per packed task row of the cross-entropy stage and of "
        "discovery's gradients (compact items fit several per row; not the data spec's)",
    )
    lr: float = setting(3e-2, "(0, 10]", doc="AdamW on z (MuGrokfast finetune preset, no decay for a 1-D vector)")
    rl_lr: float = setting(1e-2, "(0, 10]", doc="lower: REINFORCE's gradient is far noisier than the cross-entropy's")
    kl_weight: float = setting(0.05, "[0, 1000]", doc="KL(p_z || p_base) penalty of both stages")
    temperature: float = setting(1.0, "(0, 100]", doc="sampling temperature of the REINFORCE stage")
    checkpoint_every: int = setting(0, "[0, 10000000]", doc="0: only at the end of each stage")

    def check(self) -> None:
        if self.ce_steps + self.rl_steps == 0:
            self.fail("rl_steps", "expert training needs ce_steps + rl_steps > 0")


def answer_kl(logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is true of KL(softmax(logits) ‖ softmax(base_logits)).
    Only those positions are normalised: a vocabulary-wide log-softmax of every position of a
    packed row (and its gradient) was the experts phase's peak memory on SmolLM2."""
    log_p = F.log_softmax(logits[mask].float(), dim=-1)
    log_q = F.log_softmax(base_logits[mask].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum() / mask.sum().clamp(min=1)


def cross_entropy_loss(base: torch.nn.Module, kl_weight: float):
    """``loss_fn(expert, batch)`` for packed task rows: answer cross-entropy + ``kl_weight`` · KL."""

    def loss_fn(expert, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        logits = expert(**inputs).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        ce = F.cross_entropy(logits[mask].float(), targets[mask])  # the answer tokens only, as answer_kl
        with torch.no_grad():
            base_logits = base(**inputs).logits[:, :-1]
        kl = answer_kl(logits, base_logits, mask)
        return ce + kl_weight * kl, {"ce": ce.item(), "kl": kl.item()}

    return loss_fn


def prompt_rows(tokenizer, items: Sequence, width: int | None = None) -> list[dict]:
    """REINFORCE training rows: each item's prompt left-padded to ``width`` (default: the longest),
    its reference answer as ``labels`` (for the record) and its index in ``items``."""
    prompts = tokenizer([it.prompt for it in items], add_special_tokens=False)["input_ids"]
    answers = tokenizer([it.answer for it in items], add_special_tokens=False)["input_ids"]
    width = width or max(map(len, prompts))
    answer_width = max(map(len, answers))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        if len(prompt) > width:
            raise ValueError(f"item {items[index].prompt!r} has {len(prompt)} prompt tokens, more than width={width}")
        rows.append(
            {
                "input_ids": [pad] * (width - len(prompt)) + prompt,
                "attention_mask": [0] * (width - len(prompt)) + [1] * len(prompt),
                "labels": answer + [IGNORE_INDEX] * (answer_width - len(answer)),
                "item": index,
            }
        )
    return rows


def _sample(
    model, basis: SVDBasis, z: torch.Tensor, batch, tokenizer, max_new_tokens: int, temperature: float
) -> torch.Tensor:
    """New tokens sampled from the adapted model after each (left-padded) prompt of the batch."""
    with torch.no_grad(), installed(model, basis.adapted(z.detach())):
        output = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return output[:, batch["input_ids"].shape[1] :]


def _until_eos_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """True for each sampled token up to and including the first eos of its row."""
    is_eos = (tokens == eos).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline is the mean reward of the *other* samples of its batch (unbiased)."""
    n = rewards.numel()
    if n < 2:
        return torch.zeros_like(rewards)
    return (rewards.sum() - rewards) / (n - 1)


def reinforce_loss(
    base: torch.nn.Module, tokenizer, items: Sequence, kl_weight: float, temperature: float, max_new_tokens: int, score
):
    """``loss_fn(expert, batch)`` for ``prompt_rows``: −mean((r − b) · log π(answer)) + ``kl_weight`` · KL,
    with r = ``score(item, sampled answer)`` and b the leave-one-out baseline; the extras report
    the batch's mean reward."""
    from agentforge.train import distributed

    eos = tokenizer.eos_token_id

    def loss_fn(expert, batch):
        svf = distributed.unwrap(expert)
        sampled = _sample(base, svf.basis, svf.z, batch, tokenizer, max_new_tokens, temperature)
        keep = _until_eos_mask(sampled, eos)
        answers = [tokenizer.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(sampled, keep)]
        rewards = torch.tensor([float(score(items[i], a)) for i, a in zip(batch["item"].tolist(), answers)])
        advantage = (rewards - leave_one_out_baseline(rewards)).to(sampled.device)
        ids = torch.cat([batch["input_ids"], sampled], dim=1)
        # tokens after a row's eos stay visible (the mask must stay left-padded); causality keeps
        # them from touching the answer's log-probabilities, and ``keep`` drops their own terms
        mask = torch.cat([batch["attention_mask"], torch.ones_like(sampled)], dim=1)
        width = batch["input_ids"].shape[1]
        logits = expert(input_ids=ids, attention_mask=mask).logits[:, width - 1 : -1]
        log_probs = F.log_softmax(logits.float(), dim=-1).gather(-1, sampled[..., None]).squeeze(-1)
        policy = -(advantage * (log_probs * keep).sum(1)).mean()
        with torch.no_grad():
            base_logits = base(input_ids=ids, attention_mask=mask).logits[:, width - 1 : -1]
        kl = answer_kl(logits, base_logits, keep)
        return policy + kl_weight * kl, {"reward": rewards.mean().item(), "kl": kl.item()}

    return loss_fn


# ``fit(module, rows, stage, *, optimizer, steps, batch_size, loss_fn, checkpoint_every, log_every)``:
# trains ``module`` through ``agentforge.train.train`` in a directory of its own per stage, where a
# rerun resumes (a phase's ``PhaseRun.train``, or ``in_directory`` outside a phase)
Fit = Callable[..., object]


def in_directory(out_dir: Path, *, seed: int = 0, progress: bool = False) -> Fit:
    """A ``Fit`` that trains each stage in ``out_dir/<stage>`` (checkpoints, metrics.jsonl), W&B off."""
    from agentforge.train import TrainConfig, train

    def fit(
        module,
        rows,
        stage: str,
        *,
        optimizer,
        steps: int,
        batch_size: int,
        loss_fn,
        checkpoint_every: int,
        log_every: int,
    ):
        cfg = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            seed=seed,
            wandb_mode="disabled",
            run_name=f"experts/{stage}",
            progress=progress,
        )
        return train(
            module,
            rows,
            cfg,
            optimizer=optimizer,
            out_dir=Path(out_dir) / stage,
            phase=f"experts/{stage}",
            loss_fn=loss_fn,
        )

    return fit


def _stage(fit: Fit, expert: SVFExpert, rows, stage: str, steps: int, lr: float, settings: TrainSettings, loss_fn):
    from agentforge.optim import MuGrokfast

    optimizer = MuGrokfast.from_preset(expert, "finetune", total_steps=steps, adamw_lr=lr)
    return fit(
        expert,
        rows,
        stage,
        optimizer=optimizer,
        steps=steps,
        batch_size=settings.batch_size,
        loss_fn=loss_fn,
        checkpoint_every=settings.checkpoint_every,
        log_every=10,
    )


def train_expert(
    model, basis: SVDBasis, tokenizer, items: Sequence, settings: TrainSettings, fit: Fit, *, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """Train an expert's flat z on ``items`` (cross-entropy stage ``ce``, then REINFORCE stage
    ``rl``), each through ``fit``, which resumes a stage from its checkpoint; ``seed`` orders the
    packed rows. Returns ``(z, {stage: TrainResult})``."""
    if not items:
        raise ValueError("expert training: no training items")
    expert = SVFExpert(model, basis)
    model.eval()  # the base stays deterministic; only z trains
    with frozen(model):
        results = _train_stages(fit, expert, model, tokenizer, items, settings, seed)
    return expert.z.detach().clone(), results


def _train_stages(fit: Fit, expert, model, tokenizer, items, settings: TrainSettings, seed: int) -> dict:
    from agentforge.data import pack_tasks, score

    results = {}
    if settings.ce_steps:
        rows = pack_tasks(tokenizer, items, settings.seq_len, seed=seed)
        results["ce"] = _stage(
            fit,
            expert,
            rows,
            "ce",
            settings.ce_steps,
            settings.lr,
            settings,
            cross_entropy_loss(model, settings.kl_weight),
        )
    if settings.rl_steps:
        budget = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1
        loss_fn = reinforce_loss(model, tokenizer, items, settings.kl_weight, settings.temperature, budget, score)
        results["rl"] = _stage(
            fit, expert, prompt_rows(tokenizer, items), "rl", settings.rl_steps, settings.rl_lr, settings, loss_fn
        )
    return results


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """No gradient for any of ``model``'s own parameters inside the block (the adapted weights
    still carry z's gradient); the previous flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
