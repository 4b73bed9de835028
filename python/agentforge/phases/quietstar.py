"""Phase 3, Quiet-STaR: the model learns to think before it speaks, measured against controls.

Input ``model``: the EvoMerge champion (any HF causal LM directory with a tokenizer). Steps:

1. ``tasks``: the held-out (family, level) pairs where the parent's accuracy on validation items
   is closest to the 20–60 % band (so that thinking has room to help and something to work with).
2. ``model``: learned start/end-of-thought tokens and a mixing head are added, and the model is
   trained with the Quiet-STaR loss (``agentforge.quietstar``: thoughts sampled in parallel at
   every answer position, teacher-forced lookahead, REINFORCE against the mean of the n
   thoughts) on the training split of those tasks, through the shared trainer.
3. ``control``: the parent fine-tuned with plain NLL on the same rows for as many steps as spend
   the thinker's counted compute (``agentforge.quietstar.compute``: tokens through the model,
   3 per token of a forward and backward pass, 1 per token of a sampling pass, from the shapes
   of the thinker's batches; the same number on every run), then measured.
4. ``measure``: on the test split (items training and selection never saw), accuracy and
   answer-token log-likelihood of (a) the parent, (b) the Quiet-STaR model thinking, (c) the same
   model with thinking off; with the control's (d), bootstrap 95 % intervals and paired
   differences to (a).

Output ``model/``: the thinking model as an HF directory (the base LM with the two new tokens, its
tokenizer, plus ``mixing_head.safetensors`` and ``quietstar.json``; ``from_pretrained`` loads the
base, ``agentforge.quietstar.ThinkingModel.load`` the thinker). Later phases train the base LM.
Also in the phase directory: ``train/thinker`` and ``train/control`` (checkpoints and training
metrics), ``metrics.jsonl`` and ``summary.json``.

Run alone: ``python -m agentforge.phases.quietstar --model DIR --preset tiny --out DIR``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agentforge.errors import ConfigError
from agentforge.quietstar import (
    IGNORE_INDEX,
    ThinkingModel,
    ThoughtSettings,
    add_thought_tokens,
    plain_steps,
    training_compute,
)
from agentforge.runtime import Built, Effect, Input, PhaseResult, PhaseRun, PhaseSpec, model_dir, standalone_main
from agentforge.settings import Checked, check_micro_batch, micro_batch_setting, setting, to_dict


@dataclass
class Settings(Checked):
    """How the phase picks tasks, trains the thinker and measures (per-preset values in ``PRESETS``)."""

    thought: ThoughtSettings = setting(ThoughtSettings)
    steps: int = setting(30, "[1, 10000000]", doc="thinker training steps")
    batch_size: int = setting(8, "[1, 65536]")
    micro_batch_size: int = micro_batch_setting()
    train_items: int = setting(600, "[1, 1000000]", doc="training items per chosen (family, level)")
    candidate_levels: list[int] = setting(
        [0, 1, 2], "[0, 9]", length="[1, 10]", doc="task levels searched for the accuracy band"
    )
    selection_items: int = setting(50, "[1, 100000]", doc="validation items per candidate (family, level)")
    band: list[float] = setting(
        [0.2, 0.6], "[0, 1]", length="[2, 2]", doc="the parent's accuracy band to evaluate in: [low, high]"
    )
    eval_pairs: int = setting(4, "[1, 1000]", doc="(family, level) pairs evaluated")
    test_items: int = setting(150, "[1, 100000]", doc="test items per chosen pair")
    bootstrap: int = setting(1000, "[1, 1000000]", doc="bootstrap rounds of the 95 % intervals")
    eval_batch_size: int = setting(64, "[1, 65536]")

    def check(self) -> None:
        if self.band[0] > self.band[1]:
            self.fail("band", "must be [low, high] with low <= high")
        check_micro_batch(self)


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        thought=ThoughtSettings(thought_length=2, lookahead=2),
        steps=3,
        batch_size=4,
        train_items=20,
        candidate_levels=[0],
        selection_items=8,
        eval_pairs=2,
        test_items=8,
        bootstrap=100,
        eval_batch_size=32,
    ),
    "tiny": Settings(),
    "small": Settings(
        thought=ThoughtSettings(thought_length=8, lookahead=4),
        steps=400,
        batch_size=16,
        train_items=5000,
        candidate_levels=[0, 1, 2, 3, 4],
        selection_items=100,
        eval_pairs=6,
        test_items=300,
    ),
    "smol": Settings(
        thought=ThoughtSettings(thought_length=2, lookahead=2),
        steps=8,
        batch_size=4,
        micro_batch_size=2,  # a whole batch's thought activations took the peak past 6 GB
        train_items=200,
        candidate_levels=[0, 1],
        selection_items=8,
        eval_pairs=2,
        test_items=32,
        eval_batch_size=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# tasks: where to evaluate, what to train on


def choose_tasks(p: PhaseRun, model, suite) -> list[dict]:
    """The (family, level) pairs whose parent accuracy on validation items lies in (or, failing
    that, nearest to) the band; each with its measured accuracy."""
    from agentforge.data import FAMILIES, score
    from agentforge.eval import task_accuracy
    from agentforge.eval.suite import answer_budget

    settings = p.settings
    low, high = settings.band
    candidates = [(family, level) for family in FAMILIES for level in settings.candidate_levels]
    measured = []
    for family, level in p.bar(candidates, "parent accuracy per task", total=len(candidates)):
        items = suite.items("validation", settings.selection_items, [family], [level])
        accuracy = task_accuracy(
            model,
            suite.tokenizer,
            items,
            score=score,
            max_new_tokens=answer_budget(suite.tokenizer, items),
            batch_size=settings.eval_batch_size,
        ).accuracy
        distance = 0.0 if low <= accuracy <= high else min(abs(accuracy - low), abs(accuracy - high))
        measured.append(
            {"family": family, "level": level, "parent_validation_accuracy": accuracy, "distance_to_band": distance}
        )
    measured.sort(key=lambda m: (m["distance_to_band"], -m["parent_validation_accuracy"]))
    return measured[: settings.eval_pairs]


def task_items(suite, tasks: list[dict], split: str, n: int) -> list:
    """``n`` items of ``split`` for each chosen (family, level)."""
    return [item for t in tasks for item in suite.items(split, n, [t["family"]], [t["level"]])]


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
        out += scorer(ids[start : start + batch_size], labels[start : start + batch_size]).sum(-1).tolist()
    return out


def plain_scorer(model, masked: Sequence[int] = ()):
    """Log-probabilities of the labelled tokens under ``model``, the ``masked`` token ids (the
    thought tokens, where the vocabulary has them) excluded before the softmax, exactly as the
    thinking scorer excludes them: both arms must be scored alike."""
    masked = list(masked)

    def score(ids, labels):
        logits = model(input_ids=ids).logits[:, :-1].float()
        if masked:
            logits[..., masked] = float("-inf")
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
    from agentforge.eval.suite import answer_budget

    scores = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [tokenizer(it.prompt, add_special_tokens=False)["input_ids"] for it in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = generate(ids, mask, answer_budget(tokenizer, batch))
        for item, tokens in zip(batch, new.tolist()):
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            scores.append(score(item, tokenizer.decode(tokens, skip_special_tokens=True)))
    return scores


def interval(values: list[float], reference: list[float] | None, rounds: int, seed: int) -> dict:
    """Mean and 95 % bootstrap interval of ``values``, or of ``values - reference`` item by item."""
    from agentforge.eval.stats import bootstrap_interval, paired_difference

    if reference is None:
        return bootstrap_interval(values, seed=seed, samples=rounds)
    return paired_difference(values, reference, seed=seed, samples=rounds)


def hf_variant(model, tokenizer, thought_ids: list[int]):
    """``(generate, scorer)`` of a plain HF model: greedy generation that never emits a thought
    token (when its vocabulary has them), and the plain answer scorer."""
    vocab = model.get_output_embeddings().weight.shape[0]
    suppress = [i for i in thought_ids if i < vocab]

    def generate(ids, mask, n):
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **({"suppress_tokens": suppress} if suppress else {}),
        )[:, ids.shape[1] :]

    return generate, plain_scorer(model, suppress)


def thinker_variants(thinker: ThinkingModel, eos: int) -> dict:
    """``{name: (generate, scorer)}`` of the thinker with thinking on and off."""

    def generate(think: bool):
        return lambda i, m, n: thinker.generate(i, m, max_new_tokens=n, eos_token_id=eos, think=think)

    return {
        "thinking": (generate(True), thinking_scorer(thinker)),
        "not_thinking": (generate(False), plain_scorer(thinker.base, list(thinker.tokens))),
    }


def measure_variants(p: PhaseRun, variants: dict, tokenizer, items) -> dict:
    """Per variant, each test item's generated accuracy and answer log-likelihood."""
    batch_size = p.settings.eval_batch_size
    ids, labels = item_rows(tokenizer, items)
    return {
        name: {
            "accuracy": generated_accuracy(generate, tokenizer, items, batch_size),
            "answer_loglik": answer_loglik(scorer, ids, labels, batch_size),
        }
        for name, (generate, scorer) in p.bar(variants.items(), "measuring", total=len(variants))
    }


# ---------------------------------------------------------------------------------------------
# training


def train_stage(p: PhaseRun, model, rows, steps: int, stage: str, loss_fn=None):
    from agentforge.optim import MuGrokfast

    optimizer = MuGrokfast.from_preset(model, "finetune", total_steps=steps)
    return p.train(
        model,
        rows,
        stage,
        optimizer=optimizer,
        steps=steps,
        batch_size=p.settings.batch_size,
        micro_batch_size=p.settings.micro_batch_size or None,
        loss_fn=loss_fn,
        checkpoint_every=max(steps // 3, 1),
        log_every=5,
    )


def quietstar_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, out.metrics


def build_thinker(p: PhaseRun, rows) -> Built:
    """The input model with the thought tokens and a mixing head, trained with the Quiet-STaR loss."""
    thought = p.settings.thought
    torch.manual_seed(p.seed)  # the new embedding rows and the mixing head start from the seed
    base = p.load("model")
    tokens = add_thought_tokens(base.model, base.tokenizer)
    thinker = ThinkingModel(base.model, thought, tokens)
    p.say(
        f"training the thinker ({p.settings.steps} steps, {thought.n_thoughts} thoughts of "
        f"{thought.thought_length} tokens, lookahead {thought.lookahead})"
    )
    trained = train_stage(p, thinker, rows, p.settings.steps, "thinker", quietstar_loss)
    return Built(
        thinker.base,
        base.tokenizer,
        {
            "role": "thinker",
            "thought_settings": {**to_dict(thought), **tokens._asdict()},
            "train_losses": trained.losses,
            "parents": [base.path],
        },
        write_extra=thinker.save_extras,
    )


def control_run(p: PhaseRun, rows, test_items, thought_ids: list[int]) -> dict:
    """The parent fine-tuned with plain NLL for the thinker's counted compute, and its measurements."""
    settings = p.settings
    labels = torch.tensor(rows["labels"])
    thinker_compute = training_compute(labels, settings.steps, settings.batch_size, p.seed, settings.thought)
    steps = plain_steps(thinker_compute, settings.batch_size, labels.shape[1])
    p.say(
        f"training the equal-compute control ({steps} plain NLL steps for the thinker's "
        f"{thinker_compute} counted token passes)"
    )
    control = p.load("model")
    trained = train_stage(p, control.model, rows, steps, "control")
    variant = hf_variant(control.model.eval(), control.tokenizer, thought_ids)
    measured = measure_variants(p, {"control": variant}, control.tokenizer, test_items)
    return {
        "steps": steps,
        "thinker_compute": thinker_compute,
        "control_compute": 3 * steps * settings.batch_size * labels.shape[1],
        "losses": trained.losses,
        **measured["control"],
    }


def measure(p: PhaseRun, parent, thinker_dir, test_items) -> dict:
    """Parent and thinker (thinking and not) on the test items; thoughts are sampled from the seed."""
    p.say(f"measuring parent and thinker (thinking / not) on {len(test_items)} test items")
    thinker, tokenizer = ThinkingModel.load(thinker_dir)
    torch.manual_seed(p.seed)
    variants = {
        "parent": hf_variant(parent.model.eval(), parent.tokenizer, list(thinker.tokens)),
        **thinker_variants(thinker, tokenizer.eos_token_id),
    }
    return measure_variants(p, variants, tokenizer, test_items)


# ---------------------------------------------------------------------------------------------
# the phase


def run(p: PhaseRun) -> PhaseResult:
    """Select tasks, train the thinker and the equal-compute control, measure all four."""
    from agentforge.eval.speed import release_freed_memory

    settings = p.settings
    torch.manual_seed(p.seed)
    parent = p.load("model")
    if parent.tokenizer is None:
        raise ConfigError(f"quietstar: {parent.path} has no tokenizer; the phase needs one to build its data")
    suite = p.suite(parent.tokenizer)
    tasks = p.step("tasks", lambda: choose_tasks(p, parent.model.eval(), suite))
    rows = suite.rows(task_items(suite, tasks, "train", settings.train_items))
    test_items = task_items(suite, tasks, "test", settings.test_items)

    thinker_dir, thinker_metadata = trained_thinker(p, rows)
    release_freed_memory()  # the thinker is on disk; the control's training state takes its place
    thought_ids = [thinker_metadata["thought_settings"][k] for k in ("start_id", "end_id")]
    control = p.step("control", lambda: control_run(p, rows, test_items, thought_ids), everywhere=True)
    results = {
        **p.step("measure", lambda: measure(p, parent, thinker_dir, test_items)),
        "control": {k: control[k] for k in ("accuracy", "answer_loglik")},
    }
    summary = summarise(settings, tasks, results, thinker_metadata["train_losses"], control, p.seed)
    return p.finish({"model": thinker_dir}, summary.pop("headline"), summary, effects=effects(summary))


def trained_thinker(p: PhaseRun, rows) -> tuple[Path, dict]:
    """The thinker's directory and metadata, once it is trained and saved. Its weights are let go
    on return: the control trains next and ``measure`` loads the thinker back, so holding them
    would put a third model beside the parent and the control."""
    thinker = p.model_step("model", lambda: build_thinker(p, rows))
    return thinker.path, thinker.metadata


def summarise(settings: Settings, tasks, results, thinker_losses, control, seed) -> dict:
    """The four variants' means with 95 % intervals and paired differences, the thinker's and the
    control's losses and compute, and the headline."""
    table = {}
    for name, r in results.items():
        table[name] = {
            "accuracy": interval(r["accuracy"], None, settings.bootstrap, seed),
            "answer_loglik": interval(r["answer_loglik"], None, settings.bootstrap, seed),
            "accuracy_minus_parent": interval(r["accuracy"], results["parent"]["accuracy"], settings.bootstrap, seed),
            "loglik_minus_parent": interval(
                r["answer_loglik"], results["parent"]["answer_loglik"], settings.bootstrap, seed
            ),
        }

    def thinking_minus(other: str, metric: str) -> dict:
        return interval(results["thinking"][metric], results[other][metric], settings.bootstrap, seed)

    thinking_vs_off = thinking_minus("not_thinking", "answer_loglik")
    vs_control = {metric: thinking_minus("control", metric) for metric in ("accuracy", "answer_loglik")}
    headline = {
        f"{name}/{metric}": table[name][metric]["mean"] for name in table for metric in ("accuracy", "answer_loglik")
    }
    headline.update(
        thinking_minus_off_loglik=thinking_vs_off["mean"],
        control_steps=control["steps"],
        thinker_compute=control["thinker_compute"],
        control_compute=control["control_compute"],
        test_items=len(results["parent"]["accuracy"]),
        thinking_minus_control_accuracy=vs_control["accuracy"]["mean"],
        thinking_minus_control_loglik=vs_control["answer_loglik"]["mean"],
        # thoughts help the model that has them (CI above zero) ...
        thoughts_raise_loglik=thinking_vs_off["low"] > 0,
        # ... and the phase beats spending the same compute on plain fine-tuning
        beats_equal_compute_control=vs_control["answer_loglik"]["low"] > 0 and vs_control["accuracy"]["mean"] >= 0,
    )
    return {
        "tasks": tasks,
        "table": table,
        "thinking_minus_not_thinking_loglik": thinking_vs_off,
        "thinking_minus_control": vs_control,
        "thinker_losses": thinker_losses,
        "control_losses": control["losses"],
        "control": {k: control[k] for k in ("steps", "thinker_compute", "control_compute")},
        "headline": headline,
    }


def effects(summary: dict) -> list[Effect]:
    """The thinker's answer log-likelihood and accuracy against the equal-compute control, and
    its log-likelihood against itself not thinking (paired differences with 95 % intervals)."""

    def effect(what: str, control: str, stat: dict) -> Effect:
        return Effect(what, control, stat["mean"], stat["low"], stat["high"])

    vs_control = summary["thinking_minus_control"]
    return [
        effect("answer log-likelihood, thinking", "the equal-compute NLL control", vs_control["answer_loglik"]),
        effect("accuracy, thinking", "the equal-compute NLL control", vs_control["accuracy"]),
        effect(
            "answer log-likelihood, thinking",
            "the same model not thinking",
            summary["thinking_minus_not_thinking_loglik"],
        ),
    ]


SPEC = PhaseSpec(
    number=3,
    name="quietstar",
    summary="learned thought tokens trained with REINFORCE, against an equal-compute NLL control",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={
        "model": Input(
            "evomerge.champion", "input model directory (the EvoMerge champion or any causal LM with a tokenizer)"
        )
    },
    provides={"model": model_dir},
    figures="agentforge.figures.quietstar",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
