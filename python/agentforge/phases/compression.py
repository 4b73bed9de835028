"""Phase 8, Final compression: one artifact file with honest byte accounting.

Inputs: ``model`` (the phase-7 model: BitLinear layers in latent training state, possibly extra
files such as expert vectors) and ``packed`` (the phase-4 packed ternary model, a size
reference). Output: ``artifact``, the container ``model.afz`` (format in
``agentforge.compress.container``), loadable with ``agentforge.compress.load``.

1. Calibration: rows of the model's own training distribution (training-split text and task
   items); the inputs of every layer that holds a tensor to compress are captured.
2. Per tensor: ternary layers take their smallest exact layout (2-bit, base-3 or rANS); small
   tensors (norms, biases) fp16; every matrix is encoded with every candidate codec (raw, RTN,
   SeedLM, VPTQ, hyper-compression) and the one with the least *layer-output* error among those
   whose measured bits per weight fit the budget is chosen.
3. Knowledge distillation: logit KL to the uncompressed model on calibration rows, training only
   what the codecs leave trainable; kept only if it lowers the KL on rows it did not train on.
4. Quality gate on the validation split (held-out text perplexity, task accuracy), measured on
   the artifact as ``load`` returns it. On failure the rollback ladder raises the budget of the
   tensor whose codec alone costs the most logit KL, and tries again.
5. Final report on the test split: bytes (total, per group, per tensor) against the fp32 and fp16
   sizes, quality before/after, decompression time, tokens/s; a size/quality sweep over budgets.

Outputs: ``model.afz``, ``summary.json``, ``metrics.jsonl`` (headline, attempts, tensors, sweep),
``train/kd-N/`` (distillation logs). A rerun with the same settings reuses a verified artifact.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.phases import PhaseContext, PhaseResult, standalone_main

NAME = "compression"
ARTIFACT = "model.afz"
GROUPS = ("ternary", "embedding", "lm_head", "rest")


@dataclass
class Settings:
    bits_budget: float = 4.25  # per matrix that is not ternary, in measured bits per weight
    ladder: list = field(default_factory=lambda: [8.25, 16.0, 32.0])  # the rollback ladder's rungs
    candidates: list = field(default_factory=lambda: ["int8", "rtn4", "rtn3", "rtn2", "seedlm4", "seedlm3",
                                                      "vptq4", "vptq3", "vptq2", "hyper4", "hyper3", "hyper2"])
    min_numel: int = 4096  # smaller tensors are stored fp16
    importance_floor: float = 0.25  # weight of the uniform part in VPTQ's importance
    capture_rows: int = 16  # calibration rows whose layer inputs score the candidates
    calibration_rows: int = 256  # distillation rows (training split)
    check_rows: int = 32  # other training rows: does distillation help?
    kd_steps: int = 40
    kd_batch_size: int = 8
    kd_lr: float = 0.003
    max_perplexity_ratio: float = 1.1
    min_accuracy_retained: float = 0.95
    max_rollbacks: int = 4
    sweep_budgets: list = field(default_factory=lambda: [2.25, 3.25, 4.25, 8.25, 16.0])
    # held-out data (the Cognate trunk's data record in the model's metadata takes precedence)
    seq_len: int = 64
    text_docs: int = 300
    task_levels: list = field(default_factory=lambda: [0, 1])
    gate_items: int = 8  # validation items per family and level
    gate_text_rows: int = 64
    final_items: int = 25  # test items per family and level
    final_text_rows: int = 128
    eval_batch_size: int = 64


PRESETS: dict[str, Settings] = {
    "micro": Settings(min_numel=1024, candidates=["int8", "rtn4", "vptq4", "vptq2", "hyper4"], capture_rows=4,
                      calibration_rows=16, check_rows=4, kd_steps=4, kd_batch_size=4, max_rollbacks=2,
                      sweep_budgets=[4.25, 16.0], seq_len=48, text_docs=20, task_levels=[0], gate_items=3,
                      gate_text_rows=8, final_items=3, final_text_rows=8, eval_batch_size=32),
    "tiny": Settings(),
    "small": Settings(capture_rows=32, calibration_rows=1024, check_rows=64, kd_steps=200, kd_batch_size=16,
                      seq_len=256, text_docs=1500, task_levels=[0, 1, 2, 3], gate_items=25, gate_text_rows=256,
                      final_items=100, final_text_rows=512),
}


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PhaseData:
    calibration: object  # Dataset: training-split text and task rows (distillation)
    capture: list  # batches whose layer inputs score the codecs
    check: list  # other training rows: does distillation help?
    gate: object  # evomerge.HeldOut on the validation split
    final: object  # evomerge.HeldOut on the test split
    pad_id: int | None


def data_record(settings: Settings, metadata: dict) -> dict:
    """The data that decided which documents the Cognate trunk trained on (from the model's metadata)."""
    own = {"seq_len": settings.seq_len, "text_docs": settings.text_docs, "task_levels": list(settings.task_levels)}
    return {**own, **{k: v for k, v in metadata.get("data", {}).items() if k in own or k == "seed"}}


def _batches(rows, size: int) -> list[dict]:
    ids = torch.tensor(rows["input_ids"])
    return [{"input_ids": ids[i:i + size]} for i in range(0, len(ids), size)]


def build_data(tokenizer, settings: Settings, record: dict, seed: int) -> PhaseData:
    """Calibration rows from the training split, gate and final sets from the held-out splits."""
    from agentforge.data import DOMAINS, load_text, make_split, mixture, pack_tasks, text_splits
    from agentforge.phases.evomerge import HeldOut

    texts = load_text("stdlib", max_docs=record["text_docs"]) + load_text("pydoc")
    splits = text_splits(tokenizer, texts, record["seq_len"], seed=record.get("seed", seed))

    def items(split: str, n: int) -> dict:
        return {d: [it for f in fams for level in record["task_levels"] for it in make_split(f, split, n, seed=seed,
                                                                                            level=level)]
                for d, fams in DOMAINS.items()}

    def held_out(split: str, n_items: int, n_rows: int) -> HeldOut:
        task_items = items(split, n_items)
        return HeldOut(splits[split].select(range(min(n_rows, len(splits[split])))), task_items,
                       {d: pack_tasks(tokenizer, its, record["seq_len"], seed=seed) for d, its in task_items.items()})

    train_tasks = {d: pack_tasks(tokenizer, its, record["seq_len"], seed=seed)
                   for d, its in items("train", max(8, settings.calibration_rows // 4)).items()}
    sources = {"text": splits["train"], **train_tasks}
    total = settings.capture_rows + settings.calibration_rows + settings.check_rows
    rows = mixture(sources, {"text": 0.5, **{d: 0.5 / len(train_tasks) for d in train_tasks}}, total, seed=seed)
    capture = rows.select(range(settings.capture_rows))
    check = rows.select(range(settings.capture_rows, settings.capture_rows + settings.check_rows))
    calibration = rows.select(range(settings.capture_rows + settings.check_rows, total))
    return PhaseData(calibration, _batches(capture, 8), _batches(check, 8),
                     held_out("validation", settings.gate_items, settings.gate_text_rows),
                     held_out("test", settings.final_items, settings.final_text_rows), tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# measuring


def measure(model, tokenizer, held_out, settings: Settings) -> dict:
    """Held-out text perplexity; per domain, greedy-answer accuracy (reasoning-gym scorers), the
    answers themselves (for the paired agreement of two models) and the answer NLL."""
    from agentforge.data import score
    from agentforge.eval import generate_answers, perplexity

    batch = settings.eval_batch_size
    report = {"perplexity": perplexity(model, held_out.text, batch_size=batch), "accuracy": {}, "answer_nll": {},
              "answers": {}}
    for domain, items in held_out.items.items():
        budget = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1
        answers = generate_answers(model, tokenizer, [it.prompt for it in items], max_new_tokens=budget, batch_size=batch)
        report["answers"][domain] = answers
        report["accuracy"][domain] = sum(score(it, a) for it, a in zip(items, answers)) / len(items)
        report["answer_nll"][domain] = math.log(perplexity(model, held_out.rows[domain], batch_size=batch))
    report["mean_accuracy"] = statistics.mean(report["accuracy"].values())
    return report


def quality(reference: dict, candidate: dict) -> dict:
    """Perplexity ratio, accuracy retained (1 when the reference scores 0 and so does the
    candidate) and answer agreement: the share of items answered identically, a paired measure
    far less noisy than the difference of two accuracies on a few hundred items."""
    ref_acc, acc = reference["mean_accuracy"], candidate["mean_accuracy"]
    pairs = [(a, b) for d in reference["answers"] for a, b in zip(reference["answers"][d], candidate["answers"][d])]
    return {"perplexity_ratio": candidate["perplexity"] / reference["perplexity"],
            "accuracy_retained": acc / ref_acc if ref_acc > 0 else (1.0 if acc >= ref_acc else 0.0),
            "answer_agreement": sum(a == b for a, b in pairs) / len(pairs)}


def without_answers(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "answers"}


def passes(q: dict, settings: Settings) -> bool:
    return q["perplexity_ratio"] <= settings.max_perplexity_ratio and q["accuracy_retained"] >= settings.min_accuracy_retained


class _Substituted(torch.nn.Module):
    """``base`` evaluated with some tensors replaced (the size/quality sweep scores a budget
    without building a model for it)."""

    def __init__(self, base, overrides: dict):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.overrides = overrides
        self.config = base.config

    def forward(self, **batch):
        from torch.func import functional_call

        return functional_call(self.base, self.overrides, (), batch)


# ---------------------------------------------------------------------------------------------
# building the artifact


def container_for(choices, model_dir: Path, metadata: dict):
    from agentforge.compress import Container, TensorRecord, carried_files

    return Container([TensorRecord(c.slot.names, c.slot.group, c.trial.encoded) for c in choices],
                     carried_files(model_dir), metadata)


def byte_report(accounting: dict, choices) -> dict:
    """Bytes per group, per part of the file, and bits per weight overall and per group."""
    groups = {g: {"bytes": 0, "weights": 0} for g in GROUPS}
    for choice, nbytes in zip(choices, accounting["tensors"]):
        groups[choice.slot.group]["bytes"] += nbytes
        groups[choice.slot.group]["weights"] += choice.slot.tensor.numel()
    for g in groups.values():
        g["bits_per_weight"] = 8 * g["bytes"] / g["weights"] if g["weights"] else None
    weights = sum(g["weights"] for g in groups.values())
    tensor_bytes = sum(accounting["tensors"])
    return {"total": accounting["total"], "tensors": tensor_bytes, "files": accounting["files"],
            "file_bytes": accounting["file_bytes"],
            "container_overhead": accounting["header"] + accounting["manifest"] + accounting["trailer"],
            "weights": weights, "bits_per_weight": 8 * tensor_bytes / weights,
            "bits_per_weight_all_in": 8 * accounting["total"] / weights, "groups": groups}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def reference_sizes(slots, inputs: dict) -> dict:
    """The sizes the artifact is compared with: every distinct tensor at fp32 (what a Cognate
    sibling weighs) and fp16 (the phase-7 model in fp16), and the input directories on disk."""
    numel = sum(s.tensor.numel() for s in slots)
    return {"fp32": 4 * numel, "fp16": 2 * numel, "model_dir": _dir_bytes(Path(inputs["model"])),
            "packed_dir": _dir_bytes(Path(inputs["packed"]))}


def distill(model, choices, data: PhaseData, settings: Settings, ctx: PhaseContext, attempt: int) -> dict:
    """Train the codecs' trainable parts on the logit KL; replace the encodings when the KL on the
    check rows went down. Returns the KL before and after and whether the result was kept."""
    from agentforge.compress.distill import Distillation, distillation_loss, mean_kl
    from agentforge.train import TrainConfig, distributed, train

    kd = Distillation(model, [c.slot.names for c in choices], [c.trial.encoded for c in choices], data.pad_id)
    before = mean_kl(kd, data.check)
    if settings.kd_steps == 0:
        return {"kl_before": before, "kl_after": before, "kept": False}
    cfg = TrainConfig(steps=settings.kd_steps, batch_size=settings.kd_batch_size, log_every=10, seed=ctx.seed,
                      wandb_mode=ctx.wandb_mode, run_name=f"{NAME}/kd-{attempt}", progress=ctx.progress)
    train(kd, data.calibration, cfg, optimizer=torch.optim.Adam(kd.parameters(), lr=settings.kd_lr),
          out_dir=ctx.out_dir / "train" / f"kd-{attempt}", phase=f"{NAME}/kd-{attempt}",
          loss_fn=distillation_loss, resume=False)
    after = mean_kl(kd, data.check)
    kept = distributed.broadcast_from_main(after < before)  # every rank keeps the same encodings
    if kept:
        for choice, encoded in zip(choices, kd.export()):
            trial = choice.trial
            choice.trials[choice.choice] = dataclasses.replace(trial, encoded=encoded, bits=encoded.bits_per_weight)
    return {"kl_before": before, "kl_after": after, "kept": kept}


def _gate(choices, tokenizer, data: PhaseData, reference: dict, settings: Settings, inputs: dict, metadata: dict,
          path: Path) -> dict:
    """Rank 0: write the artifact, load it back as a user would, and score it on the validation split."""
    from agentforge.compress import load, write_container

    accounting = write_container(path, container_for(choices, Path(inputs["model"]), metadata))
    q = quality(reference, measure(load(path)[0], tokenizer, data.gate, settings))
    return {"bytes": accounting["total"], **q, "passed": passes(q, settings)}


def _most_damaging(model, lossy, data: PhaseData) -> dict:
    """Rank 0: each lossy tensor's solo logit KL on the capture rows."""
    from agentforge.compress.select import solo_damage

    with torch.no_grad():
        reference_logits = [model(**batch).logits for batch in data.capture]
        return {c.slot.name: solo_damage(model, c, data.capture, reference_logits) for c in lossy}


def ladder(model, tokenizer, choices, data: PhaseData, reference: dict | None, settings: Settings,
           ctx: PhaseContext, inputs: dict, metadata: dict, path: Path | None) -> list[dict]:
    """Distil, write, load and gate; on failure raise the budget of the most damaging tensor and
    retry. Every rank distils (data-parallel); rank 0 gates and decides. Returns one record per
    attempt (the last one describes the artifact left at ``path``)."""
    from agentforge.compress.select import escalate
    from agentforge.train import distributed

    attempts = []
    for attempt in range(settings.max_rollbacks + 1):
        kd = distill(model, choices, data, settings, ctx, attempt)
        gate = distributed.broadcast_from_main(
            _gate(choices, tokenizer, data, reference, settings, inputs, metadata, path) if ctx.is_main else None)
        record = {"attempt": attempt, **gate, **kd,
                  "choices": {c.slot.name: c.choice for c in choices if c.slot.group != "ternary"}}
        attempts.append(record)
        ctx.say(f"{NAME}: attempt {attempt}: {gate['bytes']:,} bytes, perplexity x{gate['perplexity_ratio']:.3f}, "
                f"accuracy retained {gate['accuracy_retained']:.1%} -> {'pass' if gate['passed'] else 'fail'}")
        lossy = [c for c in choices if c.lossy]
        if gate["passed"] or not lossy or attempt == settings.max_rollbacks:
            break
        damage = distributed.broadcast_from_main(_most_damaging(model, lossy, data) if ctx.is_main else None)
        worst = max(lossy, key=lambda c: damage[c.slot.name])
        dropped = worst.choice
        if not escalate(worst, settings.ladder):
            break
        record["rollback"] = {"tensor": worst.slot.name, "dropped": dropped, "now": worst.choice, "damage": damage}
        ctx.say(f"{NAME}: rollback: {worst.slot.name} {dropped} -> {worst.choice} (solo KL {damage[worst.slot.name]:.4f})")
    return attempts


def sweep(model, choices, data: PhaseData, settings: Settings, inputs: dict) -> list[dict]:
    """Size and validation perplexity at each budget in ``sweep_budgets`` (no distillation), with
    the tensors decoded into the uncompressed model: the size/quality trade-off the budget sets."""
    from agentforge.compress import decode, serialize
    from agentforge.compress.select import TensorChoice, best_within
    from agentforge.eval import perplexity

    rows = []
    for budget in settings.sweep_budgets:
        picked = [c if c.slot.group == "ternary" or c.small else
                  TensorChoice(c.slot, c.trials, budget, best_within(c.trials, budget)) for c in choices]
        _, accounting = serialize(container_for(picked, Path(inputs["model"]), {}))
        # one name per tensor: functional_call ties the others (embedding and LM head) itself
        overrides = {c.slot.name: decode(c.trial.encoded) for c in picked if c.slot.group != "ternary"}
        rows.append({"budget": budget, "bytes": accounting["total"],
                     "perplexity": perplexity(_Substituted(model, overrides), data.gate.text,
                                              batch_size=settings.eval_batch_size),
                     "codecs": sorted({c.choice for c in picked if c.slot.group != "ternary"})})
    return rows


def _tokens_per_second(model) -> float:
    from agentforge.eval import tokens_per_second

    return tokens_per_second(model, prompt_len=16, new_tokens=16)


def _decompression_seconds(path: Path, repeats: int = 3) -> float:
    from agentforge.compress import load

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load(path)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _tensor_rows(choices) -> list[dict]:
    return [{"tensor": c.slot.name, "names": c.slot.names, "group": c.slot.group, "shape": list(c.slot.tensor.shape),
             "codec": c.choice if c.choice != "ternary" else f"ternary-{c.trial.encoded.params['storage']}",
             "bits_per_weight": c.trial.bits, "bytes": c.trial.encoded.nbytes, "dropped": c.history,
             "trials": {name: {"bits_per_weight": t.bits, "output_error": t.error, "seconds": t.seconds}
                        for name, t in c.trials.items()}}
            for c in choices]


def _finished(ctx: PhaseContext, settings: Settings, inputs: dict) -> dict | None:
    """The summary of a previous run with these settings and inputs whose artifact still verifies."""
    import json

    from agentforge.artifacts import CorruptArtifact
    from agentforge.compress import read_container

    summary_path, artifact = ctx.out_dir / "summary.json", ctx.out_dir / ARTIFACT
    if not (summary_path.is_file() and artifact.is_file()):
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("settings") != dataclasses.asdict(settings) or summary.get("inputs") != _input_digests(inputs):
        return None
    try:
        read_container(artifact)
    except CorruptArtifact:
        return None
    return summary


def _input_digests(inputs: dict) -> dict:
    from agentforge.artifacts import read_metadata, sha256_file

    model = Path(inputs["model"])
    return {"model": sha256_file(model / "agentforge.json") if (model / "agentforge.json").is_file() else None,
            "packed": str(Path(inputs["packed"]).resolve()), "model_phase": read_metadata(model).get("phase")}


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Compress ``inputs["model"]`` into ``model.afz`` (see the module docstring). Under torchrun
    every rank encodes and distils; rank 0 alone gates, writes and reports."""
    from agentforge.artifacts import atomic_write_json, load_model_dir
    from agentforge.compress import model_tensors
    from agentforge.compress.calibration import Calibration
    from agentforge.compress.select import plan
    from agentforge.train import distributed

    artifacts = {"artifact": ctx.out_dir / ARTIFACT}
    for key in ("model", "packed"):
        if key not in inputs or not Path(inputs[key]).is_dir():
            raise ValueError(f"{NAME}: input {key!r} must be a model directory, got {inputs.get(key)!r}")
    distributed.maybe_init()
    done = distributed.broadcast_from_main(_finished(ctx, settings, inputs) if ctx.is_main else None)
    if done:
        ctx.say(f"{NAME}: reusing the verified artifact of a previous run")
        return PhaseResult(artifacts=artifacts, metrics=headline(done))
    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model, tokenizer, metadata = load_model_dir(inputs["model"])
    model.eval()
    record = data_record(settings, metadata)
    ctx.say(f"{NAME}: calibration and held-out data")
    data = build_data(tokenizer, settings, record, ctx.seed)
    slots = model_tensors(model)
    calibration = Calibration(model, [s for s in slots if s.group != "ternary"], data.capture)
    ctx.say(f"{NAME}: encoding {len(slots)} tensors with every candidate codec")
    choices = plan(slots, calibration, settings.candidates, settings.bits_budget, settings.min_numel,
                   settings.importance_floor, say=ctx.say)
    size_quality, reference_gate = None, None
    if ctx.is_main:
        size_quality = sweep(model, choices, data, settings, inputs)
        ctx.say(f"{NAME}: measuring the uncompressed model")
        reference_gate = measure(model, tokenizer, data.gate, settings)
    out_metadata = {"phase": NAME, "parents": [str(inputs["model"]), str(inputs["packed"])], "data": record}
    scratch = ctx.out_dir / f".{ARTIFACT}.attempt"
    attempts = ladder(model, tokenizer, choices, data, reference_gate, settings, ctx, inputs, out_metadata, scratch)
    if ctx.is_main:
        os.replace(scratch, ctx.out_dir / ARTIFACT)  # the last attempt's artifact, loaded and gated above
        summary = final_report(model, tokenizer, choices, data, settings, ctx, inputs, slots)
        summary.update({"settings": dataclasses.asdict(settings), "inputs": _input_digests(inputs), "data": record,
                        "attempts": attempts, "gate_reference": without_answers(reference_gate), "gate_passed": attempts[-1]["passed"],
                        "sweep": size_quality, "tensors": _tensor_rows(choices),
                        "phase_seconds": time.perf_counter() - started})
        atomic_write_json(ctx.out_dir / "summary.json", summary)
        _log_metrics(ctx, summary)
    distributed.barrier()
    return PhaseResult(artifacts=artifacts, metrics=headline(summary) if ctx.is_main else {})


def final_report(model, tokenizer, choices, data: PhaseData, settings: Settings, ctx: PhaseContext, inputs: dict,
                 slots) -> dict:
    """Bytes, quality before/after on the test split, decompression time and tokens/s."""
    from agentforge.compress import load, read_container, serialize

    path = ctx.out_dir / ARTIFACT
    ctx.say(f"{NAME}: final measurements on the test split")
    _, accounting = serialize(read_container(path))
    compressed = load(path)[0]
    before, after = measure(model, tokenizer, data.final, settings), measure(compressed, tokenizer, data.final, settings)
    sizes = reference_sizes(slots, inputs)
    byte_counts = byte_report(accounting, choices)
    return {"bytes": byte_counts, "reference_bytes": sizes,
            "ratio_vs_fp32": sizes["fp32"] / byte_counts["total"], "ratio_vs_fp16": sizes["fp16"] / byte_counts["total"],
            "ratio_vs_packed_dir": sizes["packed_dir"] / byte_counts["total"],
            "test_before": without_answers(before), "test_after": without_answers(after),
            "test_quality": quality(before, after),
            "decompression_seconds": _decompression_seconds(path),
            "tokens_per_s": {"compressed": _tokens_per_second(compressed), "uncompressed": _tokens_per_second(model)},
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def headline(summary: dict) -> dict:
    """The phase's headline numbers (metrics.jsonl and the pipeline report)."""
    b, q = summary["bytes"], summary["test_quality"]
    row = {"artifact_bytes": b["total"], "tensor_bytes": b["tensors"], "bits_per_weight": b["bits_per_weight"],
           "ratio_vs_fp32": summary["ratio_vs_fp32"], "ratio_vs_fp16": summary["ratio_vs_fp16"],
           "perplexity_before": summary["test_before"]["perplexity"],
           "perplexity_after": summary["test_after"]["perplexity"], "perplexity_ratio": q["perplexity_ratio"],
           "accuracy_before": summary["test_before"]["mean_accuracy"],
           "accuracy_after": summary["test_after"]["mean_accuracy"], "accuracy_retained": q["accuracy_retained"],
           "answer_agreement": q["answer_agreement"],
           "gate_passed": summary["gate_passed"], "rollbacks": len(summary["attempts"]) - 1,
           "decompression_seconds": summary["decompression_seconds"],
           "tokens_per_s": summary["tokens_per_s"]["compressed"], "phase_seconds": summary["phase_seconds"]}
    row.update({f"bits_per_weight/{g}": v["bits_per_weight"] for g, v in b["groups"].items() if v["weights"]})
    return row


def _log_metrics(ctx: PhaseContext, summary: dict) -> None:
    from agentforge.train import MetricsLogger

    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/tensor", wandb_mode="disabled") as log:
        for i, row in enumerate(summary["tensors"]):
            log.log({k: v for k, v in row.items() if k not in ("trials", "names", "dropped", "shape")}, step=i)
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/sweep", wandb_mode="disabled") as log:
        for i, row in enumerate(summary["sweep"]):
            log.log({k: v for k, v in row.items() if k != "codecs"}, step=i)
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/attempt", wandb_mode="disabled") as log:
        for row in summary["attempts"]:
            log.log({k: v for k, v in row.items() if not isinstance(v, dict)}, step=row["attempt"])
    with MetricsLogger(ctx.out_dir, phase=NAME, wandb_mode=ctx.wandb_mode) as log:
        log.log(headline(summary))


# ---------------------------------------------------------------------------------------------
# report


def figures(phase_dir: Path) -> list:
    """Report figures from ``summary.json`` (``agentforge.compress.figures``): bits per weight and
    codec of every tensor, the codecs tried on the largest tensors, quality against size.
    ``[(title, Figure, [source])]``."""
    import json

    from agentforge.compress import figures as draw

    source = Path(phase_dir) / "summary.json"
    if not source.is_file():
        return []
    summary = json.loads(source.read_text())
    drawn = [draw.bits_per_tensor(summary), draw.codecs_tried(summary), draw.quality_vs_size(summary)]
    return [(title, fig, [source]) for title, fig in drawn if fig is not None]


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {'model': 'the phase-7 (or any latent BitNet) model dir', 'packed': 'the phase-4 packed model dir (size reference)'}, argv)


if __name__ == "__main__":
    sys.exit(main())
