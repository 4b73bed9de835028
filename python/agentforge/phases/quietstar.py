"""Phase 3, Quiet-STaR: the model learns to think before it speaks, measured against controls.

1. Pick the held-out tasks: (family, level) pairs where the parent's accuracy on validation items
   is closest to the 20–60 % band (so that thinking has room to help and something to work with).
2. Add learned start/end-of-thought tokens and a mixing head; train with the Quiet-STaR loss
   (``thinking.py``: thoughts sampled in parallel at every answer position, teacher-forced
   lookahead, REINFORCE against the mean of the n thoughts) on the training split of those
   families, through the shared trainer.
3. Control: the parent fine-tuned with plain NLL on the same rows for the same wall-clock time.
4. On the test split (items training and selection never saw): accuracy and answer-token
   log-likelihood of (a) the parent, (b) the Quiet-STaR model thinking, (c) the same model with
   thinking off, (d) the control, with bootstrap 95 % intervals and paired differences to (a).

Output ``model/``: the thinking model as an HF directory (the base LM with the two new tokens, its
tokenizer, plus ``mixing_head.safetensors`` and ``quietstar.json``; ``from_pretrained`` loads the
base, ``ThinkingModel.load`` the thinker). Later phases train the base LM.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.phases import PhaseContext, PhaseResult
from agentforge.phases.quietstar.thinking import IGNORE_INDEX, ThinkingModel, ThoughtSettings, add_thought_tokens

NAME = "quietstar"


@dataclass
class Settings:
    n_thoughts: int = 2
    thought_length: int = 4
    lookahead: int = 3
    temperature: float = 1.0
    reinforce_weight: float = 1.0
    base_loss_weight: float = 0.5
    mixing_init: float = 0.12
    positions: str = "answers"
    steps: int = 30
    batch_size: int = 8
    train_items: int = 600  # training items per chosen (family, level)
    candidate_levels: list = field(default_factory=lambda: [0, 1, 2])
    selection_items: int = 50  # validation items per candidate (family, level)
    band: list = field(default_factory=lambda: [0.2, 0.6])  # the parent's accuracy band to evaluate in
    eval_pairs: int = 4  # (family, level) pairs evaluated
    test_items: int = 150  # test items per chosen pair (>= 500 in all for the tiny preset)
    bootstrap: int = 1000
    eval_batch_size: int = 64


PRESETS: dict[str, Settings] = {
    "micro": Settings(thought_length=2, lookahead=2, steps=3, batch_size=4, train_items=20, candidate_levels=[0],
                      selection_items=8, eval_pairs=2, test_items=8, bootstrap=100, eval_batch_size=32),
    "tiny": Settings(),
    "small": Settings(thought_length=8, lookahead=4, steps=400, batch_size=16, train_items=5000,
                      candidate_levels=[0, 1, 2, 3, 4], selection_items=100, eval_pairs=6, test_items=300),
}


# ---------------------------------------------------------------------------------------------
# tasks: where to evaluate, what to train on


def choose_tasks(model, tokenizer, settings: Settings, seed: int) -> list[dict]:
    """The (family, level) pairs whose parent accuracy on validation items lies in (or, failing
    that, nearest to) the band; each with its measured accuracy."""
    from agentforge.data import FAMILIES, make_split, score
    from agentforge.eval import task_accuracy

    low, high = settings.band
    measured = []
    for family in FAMILIES:
        for level in settings.candidate_levels:
            items = make_split(family, "validation", settings.selection_items, seed=seed, level=level)
            accuracy = task_accuracy(model, tokenizer, items, score=score, max_new_tokens=_budget(tokenizer, items),
                                     batch_size=settings.eval_batch_size).accuracy
            distance = 0.0 if low <= accuracy <= high else min(abs(accuracy - low), abs(accuracy - high))
            measured.append({"family": family, "level": level, "parent_validation_accuracy": accuracy,
                             "distance_to_band": distance})
    measured.sort(key=lambda m: (m["distance_to_band"], -m["parent_validation_accuracy"]))
    return measured[:settings.eval_pairs]


def _budget(tokenizer, items) -> int:
    return max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1


def task_rows(tokenizer, items, seq_len: int, seed: int):
    from agentforge.data import pack_tasks

    return pack_tasks(tokenizer, items, seq_len, seed=seed)


def item_rows(tokenizer, items) -> tuple[torch.Tensor, torch.Tensor]:
    """One item per row, right-padded: ``(input_ids, labels)`` with labels on the answer and eos."""
    encoded = []
    for item in items:
        prompt = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in encoded])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in encoded])
    return ids, labels


# ---------------------------------------------------------------------------------------------
# measuring


@torch.no_grad()
def answer_loglik(scorer, ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[float]:
    """Per item, the summed log-likelihood of its answer tokens (and eos) under ``scorer(ids,
    labels) -> log-probs of the labelled tokens [B, T]`` (0 where unlabelled)."""
    out = []
    for start in range(0, len(ids), batch_size):
        out += scorer(ids[start:start + batch_size], labels[start:start + batch_size]).sum(-1).tolist()
    return out


def plain_scorer(model):
    def score(ids, labels):
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return torch.nn.functional.pad(logp * (target != IGNORE_INDEX), (1, 0))
    return score


def thinking_scorer(model: ThinkingModel):
    return lambda ids, labels: model.answer_logprobs(ids, labels)


def generated_accuracy(generate, tokenizer, items, batch_size: int) -> list[float]:
    """Per item, the reasoning-gym score of the greedy answer produced by ``generate(ids, mask,
    max_new_tokens) -> new token ids``."""
    from agentforge.data import score

    scores = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [tokenizer(it.prompt, add_special_tokens=False)["input_ids"] for it in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = generate(ids, mask, _budget(tokenizer, batch))
        for item, tokens in zip(batch, new.tolist()):
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
            scores.append(score(item, tokenizer.decode(tokens, skip_special_tokens=True)))
    return scores


def bootstrap_interval(values: list[float], reference: list[float] | None, rounds: int, seed: int) -> dict:
    """Mean and 95 % percentile-bootstrap interval of ``values`` (of ``values - reference`` item by
    item when a reference is given: a paired difference)."""
    data = values if reference is None else [a - b for a, b in zip(values, reference)]
    rng = random.Random(seed)
    n = len(data)
    means = sorted(sum(data[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return {"mean": sum(data) / n, "low": means[int(0.025 * rounds)], "high": means[int(0.975 * rounds) - 1]}


# ---------------------------------------------------------------------------------------------
# training


def _train(model, rows, settings: Settings, steps: int, ctx: PhaseContext, stage: str, loss_fn=None):
    from agentforge.optim import MuGrokfast
    from agentforge.train import TrainConfig, train

    optimizer = MuGrokfast.from_preset(model, "finetune", total_steps=steps)
    cfg = TrainConfig(steps=steps, batch_size=settings.batch_size, checkpoint_every=max(steps // 3, 1), log_every=5,
                      seed=ctx.seed, wandb_mode=ctx.wandb_mode, run_name=f"{NAME}/{stage}", progress=ctx.progress)
    return train(model, rows, cfg, optimizer=optimizer, out_dir=ctx.out_dir / "train" / stage,
                 phase=f"{NAME}/{stage}", loss_fn=loss_fn)


def _quietstar_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, out.metrics


def _control_steps(control, rows, settings: Settings, seconds: float) -> int:
    """Steps of plain NLL fine-tuning that take ``seconds``, from the time of a few probe steps."""
    probe = torch.optim.AdamW(control.parameters(), lr=0.0)  # lr 0: timing only, nothing changes
    batch = rows[:settings.batch_size]
    ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    started = time.perf_counter()
    for _ in range(3):
        control(input_ids=ids, labels=labels).loss.backward()
        probe.step()
        probe.zero_grad()
    return max(1, round(seconds / ((time.perf_counter() - started) / 3)))


# ---------------------------------------------------------------------------------------------
# the phase


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Select tasks, train the thinker and the equal-time control, measure all four, save."""
    from agentforge.artifacts import atomic_write_json, load_model_dir, save_model_dir
    from agentforge.data import make_split
    from agentforge.train import MetricsLogger

    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    out_dir = ctx.out_dir / "model"
    finished = _finished(ctx.out_dir)
    if finished is not None:
        return PhaseResult(artifacts={"model": out_dir}, metrics=finished["headline"])
    parent, tokenizer, meta = load_model_dir(Path(inputs["model"]))
    data = meta.get("data", {"seq_len": 64, "seed": ctx.seed})
    ctx.say(f"{NAME}: choosing held-out tasks where the parent scores in {settings.band}")
    tasks = choose_tasks(parent.eval(), tokenizer, settings, ctx.seed)
    train_items = [it for t in tasks for it in make_split(t["family"], "train", settings.train_items, seed=ctx.seed,
                                                          level=t["level"])]
    test_items = [it for t in tasks for it in make_split(t["family"], "test", settings.test_items, seed=ctx.seed,
                                                         level=t["level"])]
    rows = task_rows(tokenizer, train_items, data["seq_len"], ctx.seed)

    base = load_model_dir(Path(inputs["model"]))[0]
    start, end = add_thought_tokens(base, tokenizer)
    thought = ThoughtSettings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(ThoughtSettings)
                                 if hasattr(settings, f.name)}, start_id=start, end_id=end)
    thinker = ThinkingModel(base, thought)
    ctx.say(f"{NAME}: training the thinker ({settings.steps} steps, {thought.n_thoughts} thoughts of "
            f"{thought.thought_length} tokens, lookahead {thought.lookahead})")
    trained = _train(thinker, rows, settings, settings.steps, ctx, "thinker", _quietstar_loss)
    control = load_model_dir(Path(inputs["model"]))[0]
    control_steps = _control_steps(control, rows, settings, trained.elapsed_s)
    ctx.say(f"{NAME}: training the equal-time control ({control_steps} plain NLL steps, {trained.elapsed_s:.0f} s)")
    control_run = _train(control, rows, settings, control_steps, ctx, "control")

    ctx.say(f"{NAME}: measuring parent, thinker (thinking / not) and control on {len(test_items)} test items")
    results = _measure_all(parent.eval(), thinker.eval(), control.eval(), tokenizer, test_items, settings)
    summary = _summary(settings, tasks, results, trained, control_run, control_steps, ctx.seed,
                       time.perf_counter() - started, len(test_items))
    if ctx.is_main:
        save_model_dir(thinker.base, tokenizer, out_dir,
                       {"phase": NAME, "parents": [str(inputs["model"])], "data": data,
                        "thought_settings": dataclasses.asdict(thought)}, write_extra=thinker.save_extras)
        atomic_write_json(ctx.out_dir / "summary.json", summary)
        with MetricsLogger(ctx.out_dir, phase=NAME, wandb_mode="disabled") as log:
            log.log(summary["headline"])
    return PhaseResult(artifacts={"model": out_dir}, metrics=summary["headline"])


def _finished(phase_dir: Path) -> dict | None:
    """The summary of a previous complete run (its model directory verified), else None."""
    import json

    from agentforge.artifacts import CorruptArtifact, verify_model_dir

    summary = phase_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        verify_model_dir(phase_dir / "model")
    except CorruptArtifact:
        return None
    return json.loads(summary.read_text())


def _measure_all(parent, thinker: ThinkingModel, control, tokenizer, items, settings: Settings) -> dict:
    eos = tokenizer.eos_token_id

    def hf_generate(model):
        return lambda ids, mask, n: model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                   eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                                   **_suppress(model, thinker))[:, ids.shape[1]:]

    ids, labels = item_rows(tokenizer, items)
    variants = {
        "parent": (hf_generate(parent), plain_scorer(parent)),
        "thinking": (lambda i, m, n: thinker.generate(i, m, max_new_tokens=n, eos_token_id=eos, think=True),
                     thinking_scorer(thinker)),
        "not_thinking": (lambda i, m, n: thinker.generate(i, m, max_new_tokens=n, eos_token_id=eos, think=False),
                         plain_scorer(thinker.base)),
        "control": (hf_generate(control), plain_scorer(control)),
    }
    return {name: {"accuracy": generated_accuracy(gen, tokenizer, items, settings.eval_batch_size),
                   "answer_loglik": answer_loglik(scorer, ids, labels, settings.eval_batch_size)}
            for name, (gen, scorer) in variants.items()}


def _suppress(model, thinker: ThinkingModel) -> dict:
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = [i for i in (thinker.settings.start_id, thinker.settings.end_id) if i < vocab]
    return {"suppress_tokens": ids} if ids else {}


def _summary(settings, tasks, results, trained, control_run, control_steps, seed, seconds, n_items) -> dict:
    table = {}
    for name, r in results.items():
        table[name] = {
            "accuracy": bootstrap_interval(r["accuracy"], None, settings.bootstrap, seed),
            "answer_loglik": bootstrap_interval(r["answer_loglik"], None, settings.bootstrap, seed),
            "accuracy_minus_parent": bootstrap_interval(r["accuracy"], results["parent"]["accuracy"],
                                                        settings.bootstrap, seed),
            "loglik_minus_parent": bootstrap_interval(r["answer_loglik"], results["parent"]["answer_loglik"],
                                                      settings.bootstrap, seed),
        }

    def thinking_minus(other: str, metric: str) -> dict:
        return bootstrap_interval(results["thinking"][metric], results[other][metric], settings.bootstrap, seed)

    thinking_vs_off = thinking_minus("not_thinking", "answer_loglik")
    vs_control = {metric: thinking_minus("control", metric) for metric in ("accuracy", "answer_loglik")}
    headline = {f"{name}/{metric}": table[name][metric]["mean"] for name in table for metric in ("accuracy", "answer_loglik")}
    headline.update(thinking_minus_off_loglik=thinking_vs_off["mean"], thinker_train_seconds=trained.elapsed_s,
                    control_steps=control_steps, phase_seconds=seconds, test_items=n_items,
                    thinking_minus_control_accuracy=vs_control["accuracy"]["mean"],
                    thinking_minus_control_loglik=vs_control["answer_loglik"]["mean"],
                    # thoughts help the model that has them (CI above zero) ...
                    thoughts_raise_loglik=thinking_vs_off["low"] > 0,
                    # ... and the phase beats spending the same time on plain fine-tuning
                    beats_equal_compute_control=vs_control["answer_loglik"]["low"] > 0
                    and vs_control["accuracy"]["mean"] >= 0)
    return {"settings": dataclasses.asdict(settings), "tasks": tasks, "table": table,
            "thinking_minus_not_thinking_loglik": thinking_vs_off, "thinking_minus_control": vs_control,
            "thinker_losses": trained.losses,
            "control_losses": control_run.losses, "headline": headline}


def figures(phase_dir: Path) -> list:
    """Accuracy and answer log-likelihood (with 95 % intervals) of the four variants; the training
    losses of the thinker and the control."""
    import json

    from matplotlib.figure import Figure

    summary_path = Path(phase_dir) / "summary.json"
    if not summary_path.is_file():
        return []
    summary = json.loads(summary_path.read_text())
    names = list(summary["table"])
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    for ax, metric, label in zip(fig.subplots(1, 2), ("accuracy", "answer_loglik"),
                                 ("test accuracy", "answer log-likelihood (nats)")):
        stats = [summary["table"][n][metric] for n in names]
        ax.bar(names, [s["mean"] for s in stats],
               yerr=[[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]], capsize=4)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
    out = [("Quiet-STaR vs controls on held-out tasks (95 % bootstrap intervals)", fig, [summary_path])]
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(summary["thinker_losses"], label="Quiet-STaR loss (thinker)")
    ax.plot(summary["control_losses"], label="plain NLL (equal-time control)")
    ax.set_xlabel("step")
    ax.legend()
    out.append(("Quiet-STaR training loss vs the control", fig, [summary_path]))
    return out
