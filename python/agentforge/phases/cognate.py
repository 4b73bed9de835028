"""Phase 1, Cognate: three sibling models with a shared ancestor.

1. Data: a byte-level BPE tokenizer trained on Python stdlib sources + pydoc prose + task strings;
   packed text rows; packed task rows per domain (reasoning, memory, speed; answer-only loss).
2. Trunk: a Cognate model trained from scratch on a mixture of text and all three domains
   (MuGrokfast, "pretrain" preset, a low ponder cost so that it learns to use its recursion).
3. Siblings: three copies of the trunk, each trained further (at half the trunk's rates) on a
   mixture dominated by its own domain and given its own recursion/halting/memory behaviour
   (config fields that change no parameter shape, so the siblings stay mergeable):
       reasoning: up to 4 passes, late halting, almost no ponder cost
       memory:    memory writes every 8 tokens (not 16) at twice the write rate
       speed:     at most 2 passes, early halting, a higher ponder cost
4. Evaluation on held-out data the training never saw: text perplexity against a unigram
   control; per domain, task accuracy (greedy generation, reasoning-gym scorers) and the mean NLL
   of the answer tokens (graded where accuracy is still near zero); mean ACT passes; forward
   and generation tokens/s; parameter counts.

Outputs in the phase directory: ``trunk/`` and ``reasoning/``, ``memory/``, ``speed/`` (HF model
directories with tokenizer and ``agentforge.json``), ``train/<stage>/`` (checkpoints and training
metrics), ``metrics.jsonl`` and ``summary.json``. A rerun reuses every finished model directory
(hash-verified) and resumes a stage from its last checkpoint.

Run alone: ``python -m agentforge.phases.cognate --preset tiny --out DIR``.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.artifacts import load_finished_model_dir
from agentforge.phases import PhaseContext, PhaseResult, standalone_main

NAME = "cognate"
# The trunk keeps its ponder cost low, so that it learns to use its recursion before the speed
# sibling is taught to skip it (at 0.01 the trunk halted after ~1.1 passes and kept no depth).
TRUNK_BEHAVIOUR = {"ponder_weight": 0.001}
SIBLINGS: dict[str, tuple[str, dict]] = {
    "reasoning": ("reasoning", {"max_recursion": 4, "halt_epsilon": 0.001, "ponder_weight": 0.0002}),
    "memory": ("memory", {"memory_chunk": 8, "memory_max_lr": 0.2}),
    "speed": ("speed", {"max_recursion": 2, "halt_epsilon": 0.2, "ponder_weight": 0.02}),
}


@dataclass
class Settings:
    """What the phase trains on and for how long (per-preset values in ``PRESETS``)."""

    model_preset: str = "tiny"  # CognateConfig preset: micro, tiny or small
    vocab_size: int = 2048
    seq_len: int = 64
    text_docs: int = 300  # stdlib source files (pydoc prose is always added)
    task_levels: list = field(default_factory=lambda: [0, 1])
    train_items: int = 2000  # training items per family and level
    eval_items: int = 100  # held-out test items per family and level
    eval_text_rows: int = 256  # held-out text rows for perplexity, ACT passes and throughput
    batch_size: int = 32
    trunk_steps: int = 180
    sibling_steps: int = 50
    text_weight: float = 0.2  # share of text rows in the trunk mixture; the domains share the rest
    own_domain_weight: float = 0.6  # a sibling's own domain; text and the other domains share the rest
    sibling_lr_scale: float = 0.5  # sibling learning rates relative to the trunk's (pretrain preset)
    checkpoint_every: int = 50
    eval_batch_size: int = 64


PRESETS: dict[str, Settings] = {
    "micro": Settings(model_preset="micro", vocab_size=384, seq_len=48, text_docs=20, task_levels=[0],
                      train_items=200, eval_items=8, eval_text_rows=32, batch_size=8, trunk_steps=12,
                      sibling_steps=6, checkpoint_every=6, eval_batch_size=32),
    "tiny": Settings(),
    "small": Settings(model_preset="small", vocab_size=8192, seq_len=256, text_docs=1500, task_levels=[0, 1, 2, 3],
                      train_items=10000, eval_items=100, batch_size=64, trunk_steps=4000, sibling_steps=1000,
                      checkpoint_every=250),
}


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PhaseData:
    tokenizer: object
    text: object  # DatasetDict: train / validation / test packed text rows
    domains: dict  # domain -> packed training task rows
    test_items: dict  # domain -> held-out TaskItems
    test_rows: dict  # domain -> the held-out items packed (answer-only labels), for answer NLL


def _task_items(families, split: str, n: int, levels, seed: int):
    from agentforge.data import make_split

    return [item for family in families for level in levels for item in make_split(family, split, n, seed=seed, level=level)]


def build_data(settings: Settings, seed: int, tokenizer=None) -> PhaseData:
    """Tokenizer (trained unless given), text splits, per-domain training rows and held-out items."""
    from agentforge.data import DOMAINS, load_text, pack_tasks, text_splits, train_tokenizer

    texts = load_text("stdlib", max_docs=settings.text_docs) + load_text("pydoc")
    train_items = {d: _task_items(fams, "train", settings.train_items, settings.task_levels, seed)
                   for d, fams in DOMAINS.items()}
    if tokenizer is None:
        task_strings = [item.prompt + item.answer for items in train_items.values() for item in items]
        tokenizer = train_tokenizer(texts + task_strings, settings.vocab_size, seed=seed)
    test_items = {d: _task_items(fams, "test", settings.eval_items, settings.task_levels, seed)
                  for d, fams in DOMAINS.items()}
    return PhaseData(
        tokenizer=tokenizer,
        text=text_splits(tokenizer, texts, settings.seq_len, seed=seed),
        domains={d: pack_tasks(tokenizer, items, settings.seq_len, seed=seed) for d, items in train_items.items()},
        test_items=test_items,
        test_rows={d: pack_tasks(tokenizer, items, settings.seq_len, seed=seed) for d, items in test_items.items()},
    )


def data_record(settings: Settings, seed: int) -> dict:
    """What decides the held-out split of the text documents (and the task levels trained on),
    recorded with the trunk so that later phases evaluate on documents it never trained on."""
    return {"seq_len": settings.seq_len, "text_docs": settings.text_docs, "task_levels": list(settings.task_levels),
            "seed": seed}


def trunk_mixture(data: PhaseData, settings: Settings, rows: int, seed: int):
    from agentforge.data import mixture

    share = (1 - settings.text_weight) / len(data.domains)
    return mixture({"text": data.text["train"], **data.domains},
                   {"text": settings.text_weight, **{d: share for d in data.domains}}, rows, seed=seed)


def sibling_mixture(data: PhaseData, settings: Settings, domain: str, rows: int, seed: int):
    from agentforge.data import mixture

    rest = (1 - settings.own_domain_weight) / len(data.domains)  # text and each other domain
    weights = {"text": rest, **{d: settings.own_domain_weight if d == domain else rest for d in data.domains}}
    return mixture({"text": data.text["train"], **data.domains}, weights, rows, seed=seed)


# ---------------------------------------------------------------------------------------------
# training stages


def _train_stage(model, rows, settings: Settings, steps: int, lr_scale: float, ctx: PhaseContext, stage: str):
    from agentforge.optim import PRESETS as OPTIMIZER_PRESETS
    from agentforge.optim import MuGrokfast
    from agentforge.train import TrainConfig, train

    rates = {key: OPTIMIZER_PRESETS["pretrain"][key] * lr_scale for key in ("muon_lr", "adamw_lr")}
    optimizer = MuGrokfast.from_preset(model, "pretrain", total_steps=steps, **rates)
    cfg = TrainConfig(steps=steps, batch_size=settings.batch_size, checkpoint_every=settings.checkpoint_every,
                      log_every=10, seed=ctx.seed, wandb_mode=ctx.wandb_mode, run_name=f"{NAME}/{stage}",
                      progress=ctx.progress)
    return train(model, rows, cfg, optimizer=optimizer, out_dir=ctx.out_dir / "train" / stage,
                 phase=f"{NAME}/{stage}")


def new_trunk_model(settings: Settings, tokenizer):
    from agentforge.models import CognateConfig, CognateForCausalLM

    config = CognateConfig.from_preset(settings.model_preset, vocab_size=len(tokenizer), **TRUNK_BEHAVIOUR,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CognateForCausalLM(config)


def sibling_from(trunk, overrides: dict):
    """A copy of ``trunk`` with its behaviour fields changed (no parameter changes shape)."""
    from agentforge.models import CognateConfig, CognateForCausalLM

    config = CognateConfig(**{**trunk.config.to_dict(), **overrides})
    sibling = CognateForCausalLM(config)
    sibling.load_state_dict(trunk.state_dict())
    return sibling


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def act_passes_and_throughput(model, rows, batch_size: int) -> tuple[float, float]:
    """Mean core passes per token (ACT's N) and forward tokens/s over ``rows``, in eval mode: the
    fewer passes a model's tokens take, the faster it reads a sequence."""
    was_training = model.training
    model.eval()
    passes, tokens, seconds = 0.0, 0, 0.0
    for start in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[start:start + batch_size]["input_ids"])
        began = time.perf_counter()
        steps = float(model(ids).mean_steps)
        seconds += time.perf_counter() - began
        passes += steps * ids.numel()
        tokens += ids.numel()
    model.train(was_training)
    return passes / max(tokens, 1), tokens / max(seconds, 1e-9)


def _answer_budget(tokenizer, items) -> int:
    """New tokens that cover the longest held-out answer plus eos (and nothing more to generate)."""
    return max(len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) for item in items) + 1


def held_out_text(data: PhaseData, settings: Settings):
    """The held-out text rows every model (and the unigram control) is scored on."""
    return data.text["test"].select(range(min(settings.eval_text_rows, len(data.text["test"]))))


def evaluate_model(model, data: PhaseData, text, settings: Settings) -> dict:
    """Held-out perplexity on ``text``, per-domain and per-family accuracy, ACT passes and tokens/s."""
    from agentforge.data import score
    from agentforge.eval import parameter_count, perplexity, task_accuracy, tokens_per_second

    act_steps, forward_tokens_per_s = act_passes_and_throughput(model, text, settings.eval_batch_size)
    report = {"perplexity": perplexity(model, text, batch_size=settings.eval_batch_size),
              "act_steps": act_steps, "forward_tokens_per_s": forward_tokens_per_s,
              "tokens_per_s": tokens_per_second(model, prompt_len=16, new_tokens=16),
              "parameters": parameter_count(model), "accuracy": {}, "answer_nll": {}, "family_accuracy": {}}
    for domain, items in data.test_items.items():
        # mean negative log-likelihood of the held-out answers: graded where accuracy is still ~0
        report["answer_nll"][domain] = math.log(perplexity(model, data.test_rows[domain],
                                                           batch_size=settings.eval_batch_size))
        result = task_accuracy(model, data.tokenizer, items, score=score,
                               max_new_tokens=_answer_budget(data.tokenizer, items),
                               batch_size=settings.eval_batch_size)
        report["accuracy"][domain] = result.accuracy
        report["family_accuracy"].update(result.per_family)
    return report


def specialisation(reports: dict[str, dict]) -> dict[str, dict]:
    """For each sibling, on its own domain: its accuracy and answer NLL against the best other
    sibling's (``gap`` > 0 and ``nll_gap`` > 0 mean it is the best sibling there)."""
    out = {}
    for name, (domain, _) in SIBLINGS.items():
        others = [o for o in SIBLINGS if o != name]
        rival = max(others, key=lambda o: reports[o]["accuracy"][domain])
        nll_rival = min(others, key=lambda o: reports[o]["answer_nll"][domain])
        own, own_nll = reports[name]["accuracy"][domain], reports[name]["answer_nll"][domain]
        out[name] = {"domain": domain, "accuracy": own, "best_other": rival,
                     "best_other_accuracy": reports[rival]["accuracy"][domain],
                     "gap": own - reports[rival]["accuracy"][domain],
                     "answer_nll": own_nll, "best_other_nll": reports[nll_rival]["answer_nll"][domain],
                     "nll_gap": reports[nll_rival]["answer_nll"][domain] - own_nll}
    return out


# ---------------------------------------------------------------------------------------------
# the phase


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Train the trunk and the three siblings (reusing finished ones), evaluate, write the summary."""
    from agentforge.artifacts import atomic_write_json, save_model_dir
    from agentforge.eval import unigram_perplexity
    from agentforge.train import MetricsLogger, barrier

    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    trunk_dir = ctx.out_dir / "trunk"
    done = load_finished_model_dir(trunk_dir)
    ctx.say(f"{NAME}: building data (tokenizer {'reused' if done else 'trained'})")
    data = build_data(settings, ctx.seed, tokenizer=done[1] if done else None)
    timings = {}
    if done:
        trunk = done[0]
    else:
        trunk = new_trunk_model(settings, data.tokenizer)
        ctx.say(f"{NAME}: training the trunk ({settings.trunk_steps} steps)")
        rows = trunk_mixture(data, settings, settings.trunk_steps * settings.batch_size, ctx.seed)
        timings["trunk_s"] = _train_stage(trunk, rows, settings, settings.trunk_steps, 1.0, ctx, "trunk").elapsed_s
        if ctx.is_main:  # under torchrun every rank holds the same trained trunk; one writes it
            save_model_dir(trunk, data.tokenizer, trunk_dir, {"phase": NAME, "role": "trunk", "parents": [],
                                                              "data": data_record(settings, ctx.seed)})
        barrier()  # no rank looks for a finished model while rank 0 is still writing it

    models = {"trunk": trunk}
    for name, (domain, overrides) in SIBLINGS.items():
        done = load_finished_model_dir(ctx.out_dir / name)
        if done:
            models[name] = done[0]
            continue
        sibling = sibling_from(trunk, overrides)
        ctx.say(f"{NAME}: specialising the {name} sibling ({settings.sibling_steps} steps)")
        rows = sibling_mixture(data, settings, domain, settings.sibling_steps * settings.batch_size, ctx.seed + 1)
        timings[f"{name}_s"] = _train_stage(sibling, rows, settings, settings.sibling_steps,
                                            settings.sibling_lr_scale, ctx, name).elapsed_s
        if ctx.is_main:
            save_model_dir(sibling, data.tokenizer, ctx.out_dir / name,
                           {"phase": NAME, "role": "sibling", "domain": domain, "behaviour": overrides,
                            "parents": [str(trunk_dir)]})
        barrier()
        models[name] = sibling

    artifacts = {"trunk": trunk_dir, "siblings": [ctx.out_dir / n for n in SIBLINGS]}
    if not ctx.is_main:  # evaluation, summary and metrics are rank 0's work; the other ranks are done
        return PhaseResult(artifacts=artifacts)
    ctx.say(f"{NAME}: evaluating on held-out data")
    text = held_out_text(data, settings)
    reports = {name: evaluate_model(model, data, text, settings) for name, model in models.items()}
    summary = {
        "settings": dataclasses.asdict(settings),
        "unigram_perplexity": unigram_perplexity(data.text["train"], text, len(data.tokenizer)),
        "models": reports,
        "specialisation": specialisation(reports),
        "identical_shapes": _identical_shapes([models[n] for n in SIBLINGS]),
        "train_seconds": timings,
        "phase_seconds": time.perf_counter() - started,
    }
    atomic_write_json(ctx.out_dir / "summary.json", summary)
    with MetricsLogger(ctx.out_dir, phase=NAME) as log:
        log.log(_flat_metrics(summary))
    return PhaseResult(artifacts=artifacts, metrics=_flat_metrics(summary))


def _identical_shapes(models) -> bool:
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
    return all(s == shapes[0] for s in shapes)


def _flat_metrics(summary: dict) -> dict:
    """The headline numbers as one flat row (metrics.jsonl and the pipeline report)."""
    row = {"unigram_perplexity": summary["unigram_perplexity"], "phase_seconds": summary["phase_seconds"]}
    for name, report in summary["models"].items():
        row[f"{name}/perplexity"] = report["perplexity"]
        row[f"{name}/act_steps"] = report["act_steps"]
        row[f"{name}/tokens_per_s"] = report["tokens_per_s"]
        row[f"{name}/forward_tokens_per_s"] = report["forward_tokens_per_s"]
        row.update({f"{name}/accuracy/{d}": acc for d, acc in report["accuracy"].items()})
        row.update({f"{name}/answer_nll/{d}": nll for d, nll in report["answer_nll"].items()})
    for name, s in summary["specialisation"].items():
        row[f"{name}/specialisation_gap"] = s["gap"]
        row[f"{name}/specialisation_nll_gap"] = s["nll_gap"]
    return row


def figures(phase_dir: Path) -> list:
    """The report's figures for this phase, drawn from the summary row of ``phase_dir/metrics.jsonl``:
    held-out accuracy and answer NLL per domain for the trunk and each sibling, and each model's
    ACT passes beside its forward throughput. Returns ``[(title, matplotlib Figure, [source file])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    source = Path(phase_dir) / "metrics.jsonl"
    rows = read_metrics(source, phase=NAME)
    if not rows:
        return []
    row, models = rows[-1], ["trunk", *SIBLINGS]
    domains = [domain for domain, _ in SIBLINGS.values()]
    width = 0.8 / len(models)
    out = []
    for key, title, label in (("accuracy", "Held-out accuracy per domain", "exact-match accuracy"),
                              ("answer_nll", "Held-out answer NLL per domain (lower is better)",
                               "mean NLL of answer tokens (nats)")):
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        for i, model in enumerate(models):
            offsets = [d + (i - (len(models) - 1) / 2) * width for d in range(len(domains))]
            ax.bar(offsets, [row[f"{model}/{key}/{domain}"] for domain in domains], width, label=model)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_xlabel("held-out domain")
        ax.set_ylabel(label)
        ax.legend(title="model", fontsize="small")
        out.append((title, fig, [source]))
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    passes, speed = fig.subplots(1, 2)
    passes.bar(models, [row[f"{model}/act_steps"] for model in models], color="tab:purple")
    passes.set_ylabel("mean ACT passes per token")
    speed.bar(models, [row[f"{model}/forward_tokens_per_s"] for model in models], color="tab:green")
    speed.set_ylabel("forward tokens/s (held-out text)")
    out.append(("ACT passes and forward throughput", fig, [source]))
    return out


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {}, argv)


if __name__ == "__main__":
    sys.exit(main())
