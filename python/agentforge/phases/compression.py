"""Phase 8, Final compression: one artifact file with honest byte accounting.

Inputs: ``model`` (the phase-7 model: BitLinear layers in latent training state, possibly extra
files such as expert vectors) and ``packed`` (the phase-4 packed ternary model, a size
reference). Output: ``artifact``, the container ``model.afz`` (format in
``agentforge.compress.container``), loadable with ``agentforge.compress.load``.

1. Calibration: rows of the model's own training distribution (training-split text and task
   items); the inputs of every layer that holds a tensor to compress are captured.
2. Per tensor (step ``plan``): ternary layers take their smallest exact layout (2-bit, base-3
   or rANS); small tensors (norms, biases) fp16; every matrix is encoded with every candidate
   codec (raw, RTN, SeedLM, VPTQ, hyper-compression) and the one with the least *layer-output*
   error among those whose measured bits per weight fit the budget is chosen. A matrix above
   ``trial_numel`` weights (a pretrained model's embedding) is scored on a row sample, and only
   the candidates that the budget, a ladder rung or a sweep budget chooses encode it whole. Every
   encoding is kept in ``steps/plan.afz``, so a rerun never encodes again.
3. Knowledge distillation: logit KL to the uncompressed model on calibration rows, training only
   what the codecs leave trainable; kept only if it lowers the KL on rows it did not train on.
4. Quality gate on the validation split (held-out text perplexity, task accuracy, against the
   uncompressed model's: step ``measure_reference``), measured on the artifact as ``load``
   returns it. On failure the rollback ladder raises the budget of the tensor whose codec alone
   costs the most logit KL, and tries again. Steps 3 and 4 are the step ``ladder``, which
   leaves ``model.afz``; it runs again when that file is missing or changed.
5. Final report on the test split (step ``final``): bytes (total, per group, per tensor) against
   the fp32 and fp16 sizes, quality before/after, decompression time, tokens/s; and (step
   ``sweep``) a size/quality sweep over budgets.

Outputs: ``model.afz`` (the same bytes from the same inputs, settings, data and seed on one
machine: its metadata holds the parents as relative paths with their digests, nothing timed),
``summary.json``, ``metrics.jsonl`` (headline, attempt, tensor and sweep rows), ``train/kd-N/``
(distillation logs) and ``steps/`` (the memoised steps and the codec plan).

Run alone: ``python -m agentforge.phases.compression --model DIR --packed DIR --preset tiny --out DIR``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from agentforge.compress.select import CANDIDATES
from agentforge.errors import ConfigError
from agentforge.runtime import STEPS_DIR, Effect, Input, PhaseResult, PhaseRun, PhaseSpec, a_file, standalone_main
from agentforge.settings import Checked, setting

NAME = "compression"
ARTIFACT = "model.afz"
PLAN = "plan.afz"  # in steps/, beside the plan step's record
GROUPS = ("ternary", "embedding", "lm_head", "rest")


@dataclass
class Settings(Checked):
    """What the phase tries, how hard it distils and what its gate accepts (per preset in ``PRESETS``)."""

    bits_budget: float = setting(4.25, "(0, 64]", doc="per matrix that is not ternary, in measured bits per weight")
    ladder: list[float] = setting(
        [8.25, 16.0, 32.0], "(0, 64]", length="[1, 16]", doc="the rollback ladder's rungs (bits per weight)"
    )
    candidates: list[str] = setting(
        ["int8", "rtn4", "rtn3", "rtn2", "seedlm4", "seedlm3", "vptq4", "vptq3", "vptq2", "hyper4", "hyper3", "hyper2"],
        choices=tuple(CANDIDATES),
        length="[1, 32]",
        doc="codecs tried on every matrix (fp16 and fp32 always are)",
    )
    min_numel: int = setting(4096, "[1, 1e12]", doc="smaller tensors are stored fp16")
    importance_floor: float = setting(0.25, "[0, 1]", doc="weight of the uniform part in VPTQ's importance")
    capture_rows: int = setting(16, "[1, 100000]", doc="calibration rows whose layer inputs score the candidates")
    trial_numel: int = setting(
        1 << 19,
        "[1, 1e12]",
        doc="a larger matrix is scored on evenly spaced rows holding "
        "about this many weights; the candidates a budget chooses "
        "then encode it whole",
    )
    error_elements: int = setting(
        1 << 26,
        "[1, 1e12]",
        doc="per layer, the output elements (of its first captured calls) that score the candidates",
    )
    calibration_rows: int = setting(256, "[1, 10000000]", doc="distillation rows (training split)")
    check_rows: int = setting(32, "[1, 100000]", doc="other training rows: does distillation help?")
    kd_steps: int = setting(40, "[0, 10000000]")
    kd_batch_size: int = setting(8, "[1, 65536]")
    kd_lr: float = setting(0.003, "(0, 10]")
    max_perplexity_ratio: float = setting(1.1, "(0, 1000]", doc="gate: validation perplexity over the model's")
    min_accuracy_retained: float = setting(
        0.95,
        "[0, 1]",
        doc="gate: validation task accuracy over the model's (a loss beyond it must be measurable to fail)",
    )
    max_rollbacks: int = setting(4, "[0, 1000]")
    sweep_budgets: list[float] = setting(
        [2.25, 3.25, 4.25, 8.25, 16.0], "(0, 64]", length="[0, 32]", doc="budgets of the size/quality sweep"
    )
    gate_items: int = setting(8, "[1, 100000]", doc="validation items per family and level")
    gate_text_rows: int = setting(64, "[1, 1000000]")
    final_items: int = setting(25, "[1, 100000]", doc="test items per family and level")
    final_text_rows: int = setting(128, "[1, 1000000]")
    eval_batch_size: int = setting(64, "[1, 65536]")


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        min_numel=1024,
        candidates=["int8", "rtn4", "vptq4", "vptq2", "hyper4"],
        capture_rows=4,
        calibration_rows=16,
        check_rows=4,
        kd_steps=4,
        kd_batch_size=4,
        max_rollbacks=2,
        sweep_budgets=[4.25, 16.0],
        gate_items=3,
        gate_text_rows=8,
        final_items=3,
        final_text_rows=8,
        eval_batch_size=32,
    ),
    "tiny": Settings(),
    "small": Settings(
        capture_rows=32,
        calibration_rows=1024,
        check_rows=64,
        kd_steps=200,
        kd_batch_size=16,
        gate_items=25,
        gate_text_rows=256,
        final_items=100,
        final_text_rows=512,
    ),
    "smol": Settings(
        candidates=["int8", "rtn4", "rtn2", "vptq4", "hyper4"],
        capture_rows=4,
        calibration_rows=32,
        check_rows=8,
        kd_steps=8,
        kd_batch_size=4,
        sweep_budgets=[2.25, 4.25],
        gate_items=4,
        gate_text_rows=16,
        final_items=8,
        final_text_rows=32,
        eval_batch_size=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PhaseData:
    calibration: Any  # Dataset: training-split text and task rows (distillation)
    capture: list  # batches whose layer inputs score the codecs
    check: list  # other training rows: does distillation help?
    gate: Any  # HeldOut on the validation split
    final: Any  # HeldOut on the test split
    pad_id: int | None


def _batches(rows, size: int) -> list[dict]:
    ids = torch.tensor(rows["input_ids"])
    return [{"input_ids": ids[i : i + size]} for i in range(0, len(ids), size)]


def build_data(p: PhaseRun, tokenizer) -> PhaseData:
    """Capture, check and calibration rows from one training mixture (half text, half task rows),
    gate and final sets from the held-out splits."""
    settings, suite = p.settings, p.suite(tokenizer)
    total = settings.capture_rows + settings.calibration_rows + settings.check_rows
    rows = suite.training_mixture(max(8, settings.calibration_rows // 4), 0.5, total)
    capture = rows.select(range(settings.capture_rows))
    check = rows.select(range(settings.capture_rows, settings.capture_rows + settings.check_rows))
    calibration = rows.select(range(settings.capture_rows + settings.check_rows, total))
    return PhaseData(
        calibration,
        _batches(capture, 8),
        _batches(check, 8),
        suite.held_out("validation", settings.gate_items, settings.gate_text_rows),
        suite.held_out("test", settings.final_items, settings.final_text_rows),
        tokenizer.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------
# measuring


def measure(p: PhaseRun, model, tokenizer, held_out) -> dict:
    """``EvalSuite.measure`` with the answers themselves (for the paired agreement of two models)."""
    return p.suite(tokenizer).measure(model, held_out, batch_size=p.settings.eval_batch_size, answers=True)


def quality(reference: dict, candidate: dict, seed: int = 0) -> dict:
    """Perplexity ratio, accuracy retained (1 when the reference scores 0 and so does the
    candidate), the accuracy lost with its paired 95 % interval (the same items; on a few hundred
    items of a weak model one answer moves "retained" by several points, so the gate asks whether
    the loss is measurable), and answer agreement: the share of items answered identically."""
    from agentforge.eval.stats import paired_difference

    ref_acc, acc = reference["accuracy_mean"], candidate["accuracy_mean"]
    pairs = [(a, b) for d in reference["answers"] for a, b in zip(reference["answers"][d], candidate["answers"][d])]
    scores = lambda report: [s for d in report["scores"].values() for s in d]
    loss = paired_difference(scores(reference), scores(candidate), seed=seed)
    return {
        "perplexity_ratio": candidate["perplexity"] / reference["perplexity"],
        "accuracy_retained": acc / ref_acc if ref_acc > 0 else (1.0 if acc >= ref_acc else 0.0),
        "accuracy_loss": {k: loss[k] for k in ("mean", "low", "high")},
        "reference_accuracy": ref_acc,
        "answer_agreement": sum(a == b for a, b in pairs) / len(pairs),
    }


def without_answers(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "answers"}


def passes(q: dict, settings: Settings) -> bool:
    """Perplexity within ``max_perplexity_ratio``, and no measurable accuracy loss beyond what
    ``min_accuracy_retained`` allows: the gate fails when the loss's 95 % interval lies wholly
    above ``(1 − min_accuracy_retained) ×`` the reference accuracy."""
    allowed = (1 - settings.min_accuracy_retained) * q["reference_accuracy"]
    return q["perplexity_ratio"] <= settings.max_perplexity_ratio and q["accuracy_loss"]["low"] <= allowed


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
# the codec plan


def encode_plan(p: PhaseRun, model, slots, data: PhaseData, path: Path) -> dict:
    """Capture the layer inputs, encode every tensor with every candidate, write the encodings to
    ``path``; returns the plan's record (``agentforge.compress.select.save_plan``)."""
    from agentforge.compress.calibration import Calibration
    from agentforge.compress.select import plan, save_plan

    settings = p.settings
    calibration = Calibration(
        model, [s for s in slots if s.group != "ternary"], data.capture, max_elements=settings.error_elements
    )
    p.say(f"encoding {len(slots)} tensors with every candidate codec")
    choices = plan(
        p.bar(slots, "encoding tensors", total=len(slots)),
        calibration,
        settings.candidates,
        settings.bits_budget,
        settings.min_numel,
        settings.importance_floor,
        say=p.say,
        budgets=[*settings.ladder, *settings.sweep_budgets],
        trial_numel=settings.trial_numel,
    )
    return save_plan(choices, path)


def codec_plan(p: PhaseRun, model, slots, data: PhaseData):
    """The ``plan`` step; returns a function giving its choices afresh (as first chosen) on each call."""
    from agentforge.compress.select import load_plan

    path = p.out_dir / STEPS_DIR / PLAN
    record = p.file_step("plan", lambda: encode_plan(p, model, slots, data, path), path)
    return functools.partial(load_plan, record, slots, path)


# ---------------------------------------------------------------------------------------------
# building the artifact


def container_for(choices, model_dir: Path, metadata: dict):
    from agentforge.compress import Container, TensorRecord, carried_files

    return Container(
        [TensorRecord(c.slot.names, c.slot.group, c.trial.encoded) for c in choices], carried_files(model_dir), metadata
    )


def artifact_metadata(p: PhaseRun) -> dict:
    """The container's metadata: the phase and its parents, each as a path relative to the
    artifact with its digest (no absolute path, nothing timed: two runs write the same bytes)."""
    path = p.out_dir / ARTIFACT
    return {"phase": NAME, "parents": [p.parent(p.inputs["model"], path), p.parent(p.inputs["packed"], path)]}


def distill(p: PhaseRun, model, choices, data: PhaseData, attempt: int) -> dict:
    """Train the codecs' trainable parts on the logit KL; replace the encodings when the KL on the
    check rows went down. Returns the KL before and after and whether the result was kept."""
    from agentforge.compress.distill import Distillation, distillation_loss, mean_kl
    from agentforge.train import distributed

    settings = p.settings
    kd = Distillation(model, [c.slot.names for c in choices], [c.trial.encoded for c in choices], data.pad_id)
    before = mean_kl(kd, data.check)
    if settings.kd_steps == 0:
        return {"kl_before": before, "kl_after": before, "kept": False}
    p.train(
        kd,
        data.calibration,
        f"kd-{attempt}",
        optimizer=torch.optim.Adam(kd.parameters(), lr=settings.kd_lr),
        steps=settings.kd_steps,
        batch_size=settings.kd_batch_size,
        loss_fn=distillation_loss,
        log_every=10,
        resume=False,
    )
    after = mean_kl(kd, data.check)
    kept = distributed.broadcast_from_main(after < before)  # every rank keeps the same encodings
    if kept:
        for choice, encoded in zip(choices, kd.export()):
            trial = choice.trial
            choice.trials[choice.choice] = dataclasses.replace(trial, encoded=encoded, bits=encoded.bits_per_weight)
    return {"kl_before": before, "kl_after": after, "kept": kept}


def _gate(p: PhaseRun, choices, tokenizer, data: PhaseData, reference: dict, path: Path) -> dict:
    """Rank 0: write the artifact, load it back as a user would (``agentforge.load``: experts and
    their router attached), and score it on the validation split."""
    from agentforge.compress import write_container
    from agentforge.loading import load

    accounting = write_container(path, container_for(choices, p.inputs["model"], artifact_metadata(p)))
    q = quality(reference, measure(p, load(path), tokenizer, data.gate))
    return {"bytes": accounting["total"], **q, "passed": passes(q, p.settings)}


def _most_damaging(model, lossy, data: PhaseData) -> dict:
    """Rank 0: each lossy tensor's solo logit KL on the capture rows."""
    from agentforge.compress.select import solo_damage

    with torch.no_grad():
        reference_logits = [model(**batch).logits for batch in data.capture]
        return {c.slot.name: solo_damage(model, c, data.capture, reference_logits) for c in lossy}


def _publish(scratch: Path, path: Path) -> str:
    """Rank 0: the last attempt's artifact (loaded and gated) becomes ``path``; its sha256."""
    from agentforge.artifacts import sha256_file

    os.replace(scratch, path)
    return sha256_file(path)


def ladder(p: PhaseRun, model, tokenizer, choices, data: PhaseData, reference: dict) -> dict:
    """Distil, write, load and gate; on failure raise the budget of the most damaging tensor and
    retry. Every rank distils (data-parallel); rank 0 gates and decides. Leaves the last
    attempt's artifact at ``model.afz``; returns one record per attempt, the tensor rows and the
    artifact's sha256."""
    from agentforge.compress.select import escalate
    from agentforge.train import distributed

    settings, scratch = p.settings, p.out_dir / f".{ARTIFACT}.attempt"
    attempts = []
    for attempt in range(settings.max_rollbacks + 1):
        kd = distill(p, model, choices, data, attempt)
        gate = distributed.on_main(_gate, p, choices, tokenizer, data, reference, scratch)
        record = {
            "attempt": attempt,
            **gate,
            **kd,
            "choices": {c.slot.name: c.choice for c in choices if c.slot.group != "ternary"},
        }
        attempts.append(record)
        p.say(
            f"attempt {attempt}: {gate['bytes']:,} bytes, perplexity x{gate['perplexity_ratio']:.3f}, "
            f"accuracy retained {gate['accuracy_retained']:.1%} (loss {gate['accuracy_loss']['mean']:+.3f}, 95 % "
            f"[{gate['accuracy_loss']['low']:+.3f}, {gate['accuracy_loss']['high']:+.3f}]) -> "
            f"{'pass' if gate['passed'] else 'fail'}"
        )
        lossy = [c for c in choices if c.lossy]
        if gate["passed"] or not lossy or attempt == settings.max_rollbacks:
            break
        damage = distributed.on_main(_most_damaging, model, lossy, data)
        worst = max(lossy, key=lambda c: damage[c.slot.name])
        dropped = worst.choice
        if not escalate(worst, settings.ladder):
            break
        record["rollback"] = {"tensor": worst.slot.name, "dropped": dropped, "now": worst.choice, "damage": damage}
        p.say(f"rollback: {worst.slot.name} {dropped} -> {worst.choice} (solo KL {damage[worst.slot.name]:.4f})")
    digest = distributed.on_main(_publish, scratch, p.out_dir / ARTIFACT)
    return {"attempts": attempts, "tensors": _tensor_rows(choices), "sha256": digest}


def _tensor_rows(choices) -> list[dict]:
    return [
        {
            "tensor": c.slot.name,
            "names": c.slot.names,
            "group": c.slot.group,
            "shape": list(c.slot.tensor.shape),
            "codec": c.choice if c.choice != "ternary" else f"ternary-{c.trial.encoded.params['storage']}",
            "bits_per_weight": c.trial.bits,
            "bytes": c.trial.encoded.nbytes,
            "dropped": c.history,
            "trials": {
                name: {"bits_per_weight": t.bits, "output_error": t.error, "seconds": t.seconds}
                for name, t in c.trials.items()
            },
        }
        for c in choices
    ]


# ---------------------------------------------------------------------------------------------
# the sweep and the final report


def sweep(p: PhaseRun, model, choices, data: PhaseData) -> list[dict]:
    """Size and validation perplexity at each budget in ``sweep_budgets`` (no distillation), with
    the tensors decoded into the uncompressed model: the size/quality trade-off the budget sets."""
    from agentforge.compress import Encoded, decode, serialize
    from agentforge.compress.select import TensorChoice, best_within
    from agentforge.eval import perplexity

    rows = []
    for budget in p.bar(p.settings.sweep_budgets, "sweep", total=len(p.settings.sweep_budgets)):
        picked = [
            c
            if c.slot.group == "ternary" or c.small
            else TensorChoice(c.slot, c.trials, budget, best_within(c.trials, budget))
            for c in choices
        ]
        _, accounting = serialize(container_for(picked, p.inputs["model"], {}))
        # one name per tensor: functional_call ties the others (embedding and LM head) itself
        # (a chosen trial always holds its encoding)
        overrides = {c.slot.name: decode(cast(Encoded, c.trial.encoded)) for c in picked if c.slot.group != "ternary"}
        rows.append(
            {
                "budget": budget,
                "bytes": accounting["total"],
                "perplexity": perplexity(
                    _Substituted(model, overrides), data.gate.text, batch_size=p.settings.eval_batch_size
                ),
                "codecs": sorted({c.choice for c in picked if c.slot.group != "ternary"}),
            }
        )
    return rows


def byte_report(accounting: dict, records) -> dict:
    """Bytes per group, per part of the file, and bits per weight overall and per group
    (``records``: the container's tensors, in the order ``accounting`` counts them)."""
    groups: dict[str, dict[str, Any]] = {g: {"bytes": 0, "weights": 0} for g in GROUPS}
    for record, nbytes in zip(records, accounting["tensors"]):
        groups[record.group]["bytes"] += nbytes
        groups[record.group]["weights"] += record.encoded.numel
    for g in groups.values():
        g["bits_per_weight"] = 8 * g["bytes"] / g["weights"] if g["weights"] else None
    weights = sum(g["weights"] for g in groups.values())
    tensor_bytes = sum(accounting["tensors"])
    return {
        "total": accounting["total"],
        "tensors": tensor_bytes,
        "files": accounting["files"],
        "file_bytes": accounting["file_bytes"],
        "container_overhead": accounting["header"] + accounting["manifest"] + accounting["trailer"],
        "weights": weights,
        "bits_per_weight": 8 * tensor_bytes / weights,
        "bits_per_weight_all_in": 8 * accounting["total"] / weights,
        "groups": groups,
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def reference_sizes(p: PhaseRun, slots) -> dict:
    """The sizes the artifact is compared with: every distinct tensor at fp32 (what a Cognate
    sibling weighs) and fp16 (the phase-7 model in fp16), and the input directories on disk."""
    numel = sum(s.tensor.numel() for s in slots)
    return {
        "fp32": 4 * numel,
        "fp16": 2 * numel,
        "model_dir": _dir_bytes(p.inputs["model"]),
        "packed_dir": _dir_bytes(p.inputs["packed"]),
    }


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


def final_report(p: PhaseRun, model, tokenizer, slots, data: PhaseData) -> dict:
    """Bytes; quality on the test split of the uncompressed model and of ``model.afz``, both as a
    user runs them (``agentforge.load``: experts routed, two passes), of the artifact without its
    experts when it carries them, and of the artifact thinking when it carries a thinking head;
    decompression time and tokens/s."""
    from agentforge.compress import read_container, serialize
    from agentforge.loading import load

    path = p.out_dir / ARTIFACT
    container = read_container(path)
    _, accounting = serialize(container)
    compressed = load(path)
    before, after = (
        measure(p, load(p.inputs["model"]), tokenizer, data.final),
        measure(p, compressed, tokenizer, data.final),
    )
    thinking = (
        {"test_thinking": without_answers(measure(p, load(path, think=True), tokenizer, data.final))}
        if compressed.thinker is not None
        else {}
    )
    experts = (
        {"test_without_experts": measure_without_experts(p, compressed, tokenizer, data)} if compressed.experts else {}
    )
    sizes = reference_sizes(p, slots)
    byte_counts = byte_report(accounting, container.tensors)
    return {
        "bytes": byte_counts,
        "reference_bytes": sizes,
        "ratio_vs_fp32": sizes["fp32"] / byte_counts["total"],
        "ratio_vs_fp16": sizes["fp16"] / byte_counts["total"],
        "ratio_vs_packed_dir": sizes["packed_dir"] / byte_counts["total"],
        "test_before": without_answers(before),
        "test_after": without_answers(after),
        **thinking,
        **experts,
        "parts": compressed.parts,
        "test_quality": quality(before, after),
        "decompression_seconds": _decompression_seconds(path),
        "tokens_per_s": {"compressed": _tokens_per_second(compressed.lm), "uncompressed": _tokens_per_second(model)},
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def measure_without_experts(p: PhaseRun, agent, tokenizer, data: PhaseData) -> dict:
    """The loaded artifact with its experts detached: the base that the two passes adapt."""
    routed, agent.experts = agent.experts, None
    try:
        return without_answers(measure(p, agent, tokenizer, data.final))
    finally:
        agent.experts = routed


def headline(summary: dict) -> dict:
    """The phase's headline numbers (metrics.jsonl and the pipeline report)."""
    b, q = summary["bytes"], summary["test_quality"]
    row = {
        "artifact_bytes": b["total"],
        "tensor_bytes": b["tensors"],
        "bits_per_weight": b["bits_per_weight"],
        "ratio_vs_fp32": summary["ratio_vs_fp32"],
        "ratio_vs_fp16": summary["ratio_vs_fp16"],
        "perplexity_before": summary["test_before"]["perplexity"],
        "perplexity_after": summary["test_after"]["perplexity"],
        "perplexity_ratio": q["perplexity_ratio"],
        "accuracy_before": summary["test_before"]["accuracy_mean"],
        "accuracy_after": summary["test_after"]["accuracy_mean"],
        "accuracy_retained": q["accuracy_retained"],
        "answer_agreement": q["answer_agreement"],
        "gate_passed": summary["gate_passed"],
        "rollbacks": len(summary["attempts"]) - 1,
        "decompression_seconds": summary["decompression_seconds"],
        "tokens_per_s": summary["tokens_per_s"]["compressed"],
    }
    row.update({f"bits_per_weight/{g}": v["bits_per_weight"] for g, v in b["groups"].items() if v["weights"]})
    return row


def metric_rows(summary: dict) -> dict[str, list[dict]]:
    """metrics.jsonl rows beside the headline: one per tensor, sweep budget and ladder attempt."""
    return {
        "tensor": [
            {k: v for k, v in row.items() if k not in ("trials", "names", "dropped", "shape")}
            for row in summary["tensors"]
        ],
        "sweep": [{k: v for k, v in row.items() if k != "codecs"} for row in summary["sweep"]],
        "attempt": [{k: v for k, v in row.items() if not isinstance(v, dict)} for row in summary["attempts"]],
    }


# ---------------------------------------------------------------------------------------------
# the phase


def check_inputs(p: PhaseRun) -> None:
    """Both inputs are model directories (``packed`` is read only at the end: fail before any work)."""
    for name in ("model", "packed"):
        if not p.inputs[name].is_dir():
            raise ConfigError(f"{NAME}: input {name!r} must be a model directory, got {p.inputs[name]}")


def run(p: PhaseRun) -> PhaseResult:
    """Compress the ``model`` input into ``model.afz`` (see the module docstring). Under torchrun
    rank 0 encodes, gates, writes and reports; every rank distils."""
    from agentforge.compress import model_tensors

    check_inputs(p)
    torch.manual_seed(p.seed)
    source = p.load("model")
    model, tokenizer = source.model.eval(), source.tokenizer
    data = build_data(p, tokenizer)
    slots = model_tensors(model)
    plan = codec_plan(p, model, slots, data)
    reference = p.step("measure_reference", lambda: measure(p, uncompressed(p), tokenizer, data.gate))
    built = p.file_step(
        "ladder",
        lambda: ladder(p, model, tokenizer, plan(), data, reference),
        p.out_dir / ARTIFACT,
        dependents=("final",),
        everywhere=True,
    )
    size_quality = p.step("sweep", lambda: sweep(p, model, plan(), data))
    final = p.step("final", lambda: final_report(p, model, tokenizer, slots, data))
    summary = {
        **final,
        "attempts": built["attempts"],
        "gate_reference": without_answers(reference),
        "gate_passed": built["attempts"][-1]["passed"],
        "sweep": size_quality,
        "tensors": built["tensors"],
    }
    return p.finish(
        {"artifact": p.out_dir / ARTIFACT},
        headline(summary),
        summary,
        rows=metric_rows(summary),
        effects=effects(summary, p.seed),
    )


def uncompressed(p: PhaseRun):
    """The input model as a user runs it (``agentforge.load``: experts routed, two passes): the
    reference the gate and the report compare the artifact with."""
    from agentforge.loading import load

    return load(p.inputs["model"])


def effects(summary: dict, seed: int) -> list[Effect]:
    """``model.afz`` as loaded against the uncompressed model on the test split: perplexity ratio
    and accuracy (paired, 95 % intervals); the artifact's two passes against its base without the
    experts; and the artifact thinking against not thinking."""
    from agentforge.eval.stats import paired_difference, perplexity_ratio

    before, after = summary["test_before"], summary["test_after"]
    scores = lambda report: [s for domain in report["scores"].values() for s in domain]
    found = [
        Effect.of(
            "text perplexity ratio, compressed artifact",
            "the uncompressed model",
            perplexity_ratio(
                after["text_rows"]["nll"], before["text_rows"]["nll"], before["text_rows"]["tokens"], seed=seed
            ),
            better="lower",
            neutral=1.0,
        ),
        Effect.of(
            "held-out task accuracy, compressed artifact",
            "the uncompressed model",
            paired_difference(scores(after), scores(before), seed=seed),
        ),
    ]
    if "test_without_experts" in summary:
        found.append(
            Effect.of(
                "held-out task accuracy, artifact two-pass (experts routed)",
                "the artifact without its experts",
                paired_difference(scores(after), scores(summary["test_without_experts"]), seed=seed),
            )
        )
    if "test_thinking" in summary:
        found.append(
            Effect.of(
                "held-out task accuracy, artifact thinking",
                "the artifact not thinking",
                paired_difference(scores(summary["test_thinking"]), scores(after), seed=seed),
            )
        )
    return found


SPEC = PhaseSpec(
    number=8,
    name=NAME,
    summary="one artifact file: per-tensor codecs, distillation, a quality gate with rollbacks",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={
        "model": Input("experts.model", "the phase-7 (or any latent BitNet) model dir"),
        "packed": Input("bitnet.packed", "the phase-4 packed model dir (size reference)"),
    },
    provides={"artifact": a_file},
    figures="agentforge.figures.compression",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
