"""Phase 4, BitNet: ternary (b1.58) conversion, calibration, STE fine-tuning with a quantization
warm-up, and a packed model that runs on the ternary kernels.

Input ``model``: any HF causal LM directory with a tokenizer (in the pipeline, the Quiet-STaR
model). Steps:

1. Calibration (``agentforge.quant.calibration``) on training-split text rows: for every
   ``nn.Linear`` outside ``skip`` (embeddings and LM head by default), the layer's output error
   with one weight scale per tensor and per output row, the chosen scheme, and the loss increase
   when that layer alone is ternary; the most sensitive layers are flagged (and, only if asked,
   the top ``keep_sensitive_fp`` of them stay float).
2. Conversion (``convert_to_bitnet``); each layer gets its chosen scales, recorded per layer in
   config.json's ``quantization_config``.
3. STE fine-tuning through ``agentforge.train.train`` with MuGrokfast ("qat") on a mixture of
   training text and task rows, with the quantization warm-up of the Hugging Face 1.58-bit
   recipe: every BitLinear computes with ``w + λ·(q(w) − w)`` and ``x + λ·(q(x) − x)``, where
   ``λ = min(step / warm-up steps, 1)``, the linear schedule that recipe found best (WikiText
   ppl 12.2 against ≈13.5 for sigmoid and ≈15 for exponential schedules on Llama3-8B). λ
   reaches 1 well before the end, so the last steps train exactly the ternary forward pass.
   With ``fp_control`` a copy of the float model is fine-tuned alike, the equal-training control.
4. Outputs, both HF model directories (``AutoModelForCausalLM.from_pretrained`` after
   ``import agentforge``): ``latent/`` (training-state BitLinear layers with latent weights,
   which phases 5–7 keep training through the STE) and ``packed/`` (2-bit codes and scales
   only, run by the ternary kernels). A gradient-flow check on the reloaded latent model
   requires a finite, non-zero gradient for every latent weight.
5. Measurements on held-out data the model never trained on (the test split of the documents
   and task prompts): perplexity, task accuracy and answer NLL of the float input, the ternary
   model before fine-tuning and the packed model after; bytes on disk, bits per weight and
   sparsity per ternary layer; generation tokens/s at each batch size, the share of generation
   time spent in the converted layers, and peak memory, packed (kernels) against float
   (``F.linear``).

Outputs in the phase directory: ``latent/``, ``packed/``, ``train/ternary`` (and
``train/fp_control``: checkpoints and training metrics, λ included), ``evaluations.json``
(cached measurements), ``metrics.jsonl`` and ``summary.json``. A rerun reuses finished model
directories (hash-verified) and evaluations.

Run alone: ``python -m agentforge.phases.bitnet --model DIR --preset tiny --out DIR``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentforge.artifacts import load_finished_model_dir
from agentforge.phases import PhaseContext, PhaseResult, standalone_main
from agentforge.quant import (bitlinear_layers, convert_as_calibrated, gradient_flow, require_state, set_lambda,
                              warmup_lambda)

NAME = "bitnet"
MODELS = ("fp", "ternary_before", "finetuned")  # the evaluated states (plus "fp_control" when asked)


@dataclass
class Settings:
    """How the phase converts, fine-tunes and measures (per-preset values in ``PRESETS``)."""

    skip: list = field(default_factory=lambda: ["lm_head", "embed"])  # Linear names that stay float
    calibration_rows: int = 16  # training-split text rows the calibration reads
    calibration_tokens: int = 2048  # recorded inputs per layer for the output-error measurement
    per_channel_min_gain: float = 0.05  # per-row scales must cut a layer's output error by this fraction
    sensitive_layers: int = 3  # layers flagged as the most sensitive
    keep_sensitive_fp: int = 0  # of those, how many stay float (0: every converted layer is ternary)
    steps: int = 100
    batch_size: int = 32
    lambda_warmup_fraction: float = 0.2  # λ rises linearly 0 -> 1 over this share of the steps
    fp_control: bool = False  # also fine-tune the float model alike: the equal-training control
    text_weight: float = 0.4  # share of text rows in the fine-tuning mixture; the task domains share the rest
    train_items: int = 500  # training task items per family and level
    checkpoint_every: int = 50
    # held-out data (the input model's recorded data settings take precedence)
    seq_len: int = 64
    text_docs: int = 300
    task_levels: list = field(default_factory=lambda: [0, 1])
    eval_items: int = 50  # test items per family and level
    eval_text_rows: int = 256
    eval_batch_size: int = 64
    # speed and memory
    speed_batch_sizes: list = field(default_factory=lambda: [1, 8])
    speed_prompt_len: int = 16
    speed_new_tokens: int = 16
    measure_memory: bool = True  # peak memory of each model in a fresh process (a few seconds each)

    def __post_init__(self):
        for name in ("calibration_rows", "calibration_tokens", "steps", "batch_size", "train_items", "eval_items",
                     "eval_text_rows", "eval_batch_size", "speed_prompt_len", "speed_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{NAME}.{name} must be a positive int, got {value!r}")
        if not 0 <= self.lambda_warmup_fraction <= 1:
            raise ValueError(f"{NAME}.lambda_warmup_fraction must be in [0, 1], got {self.lambda_warmup_fraction}")
        if not 0 <= self.per_channel_min_gain < 1:
            raise ValueError(f"{NAME}.per_channel_min_gain must be in [0, 1), got {self.per_channel_min_gain}")
        if not 0 <= self.keep_sensitive_fp <= self.sensitive_layers:
            raise ValueError(f"{NAME}.keep_sensitive_fp must be between 0 and sensitive_layers "
                             f"({self.sensitive_layers}), got {self.keep_sensitive_fp}")
        if not 0 < self.text_weight < 1:
            raise ValueError(f"{NAME}.text_weight must be in (0, 1), got {self.text_weight}")
        if not self.speed_batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.speed_batch_sizes):
            raise ValueError(f"{NAME}.speed_batch_sizes must be a non-empty list of positive ints, "
                             f"got {self.speed_batch_sizes}")
        if not all(isinstance(s, str) and s for s in self.skip):
            raise ValueError(f"{NAME}.skip must be a list of non-empty name patterns, got {self.skip}")


PRESETS: dict[str, Settings] = {
    "micro": Settings(calibration_rows=4, calibration_tokens=256, sensitive_layers=2, steps=6, batch_size=8,
                      train_items=40, checkpoint_every=3, seq_len=48, text_docs=20, task_levels=[0], eval_items=4,
                      eval_text_rows=16, eval_batch_size=32, speed_batch_sizes=[1, 2], speed_new_tokens=4,
                      measure_memory=False),
    "tiny": Settings(),
    "small": Settings(calibration_rows=64, calibration_tokens=8192, sensitive_layers=5, steps=2000, batch_size=64,
                      fp_control=True, train_items=5000, checkpoint_every=250, seq_len=256, text_docs=1500,
                      task_levels=[0, 1, 2, 3], eval_items=100, eval_text_rows=512, speed_new_tokens=32),
}


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PhaseData:
    calibration: object  # training-split text rows (Dataset)
    train_rows: object  # the fine-tuning mixture of text and task rows
    eval_text: object  # held-out (test split) text rows
    test_items: dict  # domain -> held-out TaskItems
    test_rows: dict  # domain -> those items packed (answer-only labels), for answer NLL


def data_record(settings: Settings, metadata: dict, seed: int) -> dict:
    """Which documents are held out is decided by the data the input model was trained on: its
    recorded ``data`` (Cognate's trunk record, passed on by every phase) beats our settings."""
    own = {"seq_len": settings.seq_len, "text_docs": settings.text_docs, "task_levels": settings.task_levels,
           "seed": seed}
    return {**own, **{k: v for k, v in (metadata.get("data") or {}).items() if k in own}}


def _items(families, split: str, n: int, levels, seed: int):
    from agentforge.data import make_split

    return [item for family in families for level in levels
            for item in make_split(family, split, n, seed=seed, level=level)]


def build_data(tokenizer, settings: Settings, record: dict, rows: int, seed: int) -> PhaseData:
    """Calibration rows, ``rows`` fine-tuning rows, and the held-out text and task items."""
    from agentforge.data import DOMAINS, load_text, mixture, pack_tasks, text_splits

    texts = load_text("stdlib", max_docs=record["text_docs"]) + load_text("pydoc")
    splits = text_splits(tokenizer, texts, record["seq_len"], seed=record["seed"])
    levels = record["task_levels"]
    domains = {d: pack_tasks(tokenizer, _items(fams, "train", settings.train_items, levels, seed), record["seq_len"],
                             seed=seed) for d, fams in DOMAINS.items()}
    share = (1 - settings.text_weight) / len(domains)
    train_rows = mixture({"text": splits["train"], **domains},
                         {"text": settings.text_weight, **dict.fromkeys(domains, share)}, rows, seed=seed)
    test_items = {d: _items(fams, "test", settings.eval_items, levels, seed) for d, fams in DOMAINS.items()}
    calibration = splits["train"].shuffle(seed=seed).select(range(min(settings.calibration_rows, len(splits["train"]))))
    return PhaseData(
        calibration=calibration, train_rows=train_rows,
        eval_text=splits["test"].select(range(min(settings.eval_text_rows, len(splits["test"])))),
        test_items=test_items,
        test_rows={d: pack_tasks(tokenizer, items, record["seq_len"], seed=seed) for d, items in test_items.items()},
    )


# ---------------------------------------------------------------------------------------------
# measuring a model


def measure(model, tokenizer, data: PhaseData, batch_size: int) -> dict:
    """Held-out perplexity (and forward tokens/s while computing it), accuracy and answer NLL per
    domain, and their means over the domains."""
    from agentforge.data import score
    from agentforge.eval import perplexity, task_accuracy

    started = time.perf_counter()
    report = {"perplexity": perplexity(model, data.eval_text, batch_size=batch_size)}
    seconds = time.perf_counter() - started
    report["forward_tokens_per_s"] = len(data.eval_text) * len(data.eval_text[0]["input_ids"]) / max(seconds, 1e-9)
    report["accuracy"], report["answer_nll"] = {}, {}
    for domain, items in data.test_items.items():
        budget = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1
        report["accuracy"][domain] = task_accuracy(model, tokenizer, items, score=score, max_new_tokens=budget,
                                                   batch_size=batch_size).accuracy
        report["answer_nll"][domain] = math.log(perplexity(model, data.test_rows[domain], batch_size=batch_size))
    report["accuracy_mean"] = sum(report["accuracy"].values()) / len(report["accuracy"])
    report["answer_nll_mean"] = sum(report["answer_nll"].values()) / len(report["answer_nll"])
    return report


class EvaluationCache:
    """Measurements by model name in ``evaluations.json`` (written atomically after each one), so
    a rerun measures only what an interrupted run had not."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str, compute) -> dict:
        from agentforge.artifacts import atomic_write_json

        if name not in self.values:
            self.values[name] = compute()
            atomic_write_json(self.path, self.values)
        return self.values[name]


@torch.no_grad()
def max_logit_difference(a, b, rows) -> float:
    """Largest absolute difference between two models' logits on ``rows`` (a Dataset); both
    models are freshly loaded, so eval mode is already theirs."""
    ids = torch.tensor(rows["input_ids"])
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


# ---------------------------------------------------------------------------------------------
# conversion and fine-tuning


def finetune(model, rows, settings: Settings, ctx: PhaseContext, stage: str):
    """STE fine-tuning with the λ warm-up, MuGrokfast "qat" and the shared trainer, in
    ``train/<stage>``. λ is read from the optimizer's own step count, which a resumed run
    restores; each logged row carries it. A model without BitLinear layers (the float control)
    trains the same way, without λ."""
    from agentforge.optim import MuGrokfast
    from agentforge.train import TrainConfig, default_loss, train

    layers = list(bitlinear_layers(model).values())
    optimizer = MuGrokfast.from_preset(model, "qat", total_steps=settings.steps)
    warmup_steps = round(settings.lambda_warmup_fraction * settings.steps)

    def loss_fn(wrapped, batch):
        if not layers:
            return default_loss(wrapped, batch)
        lam = warmup_lambda(optimizer.steps_done, warmup_steps)
        set_lambda(layers, lam)
        return default_loss(wrapped, batch), {"lambda": lam}

    cfg = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, checkpoint_every=settings.checkpoint_every,
                      log_every=5, seed=ctx.seed, wandb_mode=ctx.wandb_mode, run_name=f"{NAME}/{stage}",
                      progress=ctx.progress)
    try:
        return train(model, rows, cfg, optimizer=optimizer, out_dir=ctx.out_dir / "train" / stage,
                     phase=f"{NAME}/{stage}", loss_fn=loss_fn)
    finally:
        set_lambda(layers, 1.0)  # the model leaves fine-tuning fully ternary, as it is saved


# ---------------------------------------------------------------------------------------------
# the phase


def _calibrate(fp, data: PhaseData, settings: Settings, seed: int) -> list[dict]:
    from agentforge.eval import perplexity
    from agentforge.nn.convert import linear_names
    from agentforge.quant import calibrate

    names = linear_names(fp, tuple(settings.skip))
    if not names:
        raise ValueError(f"{NAME}: {type(fp).__name__} has no nn.Linear layer outside the skip patterns "
                         f"{settings.skip}")

    def mean_nll(model) -> float:
        return math.log(perplexity(model, data.calibration, batch_size=settings.eval_batch_size))

    rows, size = data.calibration, settings.eval_batch_size
    batches = [{"input_ids": torch.tensor(rows[i:i + size]["input_ids"])} for i in range(0, len(rows), size)]
    records = calibrate(fp, names, batches, mean_nll,
                        min_gain=settings.per_channel_min_gain, n_sensitive=settings.sensitive_layers,
                        max_tokens=settings.calibration_tokens, seed=seed)
    return [r.to_dict() for r in records]


def _convert_and_finetune(fp, tokenizer, data: PhaseData, settings: Settings, ctx: PhaseContext,
                          cache: EvaluationCache):
    """Calibrate on the float model, convert a copy, measure it (rank 0), fine-tune it.
    Returns ``(latent model, calibration records, names kept float, fine-tuning seconds)``."""
    ctx.say(f"{NAME}: calibrating {type(fp).__name__} on {len(data.calibration)} training text rows")
    calibration = _calibrate(fp, data, settings, ctx.seed)
    student = copy.deepcopy(fp)
    kept = convert_as_calibrated(student, calibration, settings.skip, settings.keep_sensitive_fp)
    if ctx.is_main:
        ctx.say(f"{NAME}: measuring the ternary model before fine-tuning")
        cache.get("ternary_before", lambda: measure(student, tokenizer, data, settings.eval_batch_size))
    ctx.say(f"{NAME}: STE fine-tuning ({settings.steps} steps, λ warm-up over "
            f"{round(settings.lambda_warmup_fraction * settings.steps)})")
    result = finetune(student, data.train_rows, settings, ctx, "ternary")
    return student, calibration, kept, result.elapsed_s


def _fp_control(fp, tokenizer, data: PhaseData, settings: Settings, ctx: PhaseContext, cache: EvaluationCache) -> None:
    """The equal-training control: a copy of the float model fine-tuned on the same rows with the
    same optimizer and steps, then measured; it separates what ternary weights cost from what
    the extra training gives."""
    if "fp_control" in cache.values:
        return
    ctx.say(f"{NAME}: fine-tuning the float control ({settings.steps} steps)")
    control = copy.deepcopy(fp)
    seconds = finetune(control, data.train_rows, settings, ctx, "fp_control").elapsed_s
    if ctx.is_main:
        cache.get("fp_control", lambda: {**measure(control, tokenizer, data, settings.eval_batch_size),
                                         "finetune_seconds": seconds})


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    """Calibrate, convert, fine-tune, pack, verify and measure (reusing finished outputs)."""
    from agentforge.artifacts import load_model_dir, save_model_dir
    from agentforge.nn import pack_bitnet
    from agentforge.train import barrier

    started = time.perf_counter()
    if "model" not in inputs:
        raise ValueError(f"{NAME}: inputs must name 'model' (an HF causal LM directory), got {sorted(inputs)}")
    source = Path(inputs["model"])
    torch.manual_seed(ctx.seed)
    fp, tokenizer, metadata = load_model_dir(source)
    if tokenizer is None:
        raise ValueError(f"{NAME}: {source} has no tokenizer; the phase needs one to build its data")
    record = data_record(settings, metadata, ctx.seed)
    data = build_data(tokenizer, settings, record, settings.steps * settings.batch_size, ctx.seed)
    cache = EvaluationCache(ctx.out_dir / "evaluations.json")
    latent_dir, packed_dir = ctx.out_dir / "latent", ctx.out_dir / "packed"
    artifacts = {"packed": packed_dir, "latent": latent_dir}
    if ctx.is_main:
        ctx.say(f"{NAME}: measuring the float input model")
        cache.get("fp", lambda: measure(fp, tokenizer, data, settings.eval_batch_size))

    done = load_finished_model_dir(latent_dir)
    if done:
        latent, quant = done[0], done[2]["quantization"]
    else:
        latent, calibration, kept, seconds = _convert_and_finetune(fp, tokenizer, data, settings, ctx, cache)
        quant = {"calibration": calibration, "kept_fp": kept, "skip": list(settings.skip), "finetune_seconds": seconds,
                 "lambda_warmup_steps": round(settings.lambda_warmup_fraction * settings.steps)}
        if ctx.is_main:
            save_model_dir(latent, tokenizer, latent_dir, {"phase": NAME, "role": "latent", "parents": [str(source)],
                                                           "data": record, "quantization": quant})
        barrier()  # no rank looks for the latent model while rank 0 is still writing it
    if settings.fp_control:
        _fp_control(fp, tokenizer, data, settings, ctx, cache)
    if not ctx.is_main:
        return PhaseResult(artifacts=artifacts)
    if load_finished_model_dir(packed_dir) is None:
        save_model_dir(pack_bitnet(copy.deepcopy(latent)), tokenizer, packed_dir,
                       {"phase": NAME, "role": "packed", "parents": [str(source)], "latent": str(latent_dir),
                        "data": record, "quantization": quant})
    summary = _verify_and_measure(source, fp, tokenizer, data, settings, ctx, cache, quant)
    summary.update(settings=dataclasses.asdict(settings), data=record, input=str(source),
                   phase_seconds=time.perf_counter() - started)
    headline = _write_summary(summary, ctx)
    return PhaseResult(artifacts=artifacts, metrics=headline)


def _verify_and_measure(source: Path, fp, tokenizer, data: PhaseData, settings: Settings, ctx: PhaseContext,
                        cache: EvaluationCache, quant: dict) -> dict:
    """Reload both outputs as they will be consumed, check them, and measure everything the
    summary reports."""
    from agentforge.artifacts import load_model_dir
    from agentforge.eval import perplexity
    from agentforge.quant import speed_report

    latent_dir, packed_dir = ctx.out_dir / "latent", ctx.out_dir / "packed"
    latent, packed = load_model_dir(latent_dir)[0], load_model_dir(packed_dir)[0]
    require_state(latent, "training", str(latent_dir))
    require_state(packed, "packed", str(packed_dir))
    grad = gradient_flow(latent, {k: torch.tensor(v) for k, v in data.train_rows[:settings.batch_size].items()})
    if not grad["ok"]:
        raise RuntimeError(f"{NAME}: no finite, non-zero STE gradient reaches the latent weights of "
                           f"{grad['bad_layers']}")
    ctx.say(f"{NAME}: measuring the packed model (ternary kernels)")
    reports = {"fp": cache.values["fp"],
               "ternary_before": cache.get("ternary_before", lambda: measure(
                   _converted_copy(fp, quant), tokenizer, data, settings.eval_batch_size)),
               "finetuned": cache.get("finetuned", lambda: measure(packed, tokenizer, data, settings.eval_batch_size))}
    if settings.fp_control:
        reports["fp_control"] = cache.values["fp_control"]
    latent_ppl = cache.get("finetuned_latent", lambda: {
        "perplexity": perplexity(latent, data.eval_text, batch_size=settings.eval_batch_size)})["perplexity"]
    sizes = _sizes(source, packed_dir, packed, latent)
    ctx.say(f"{NAME}: generation speed and memory, packed vs float")
    speed = speed_report({"fp": fp, "packed": packed}, {"fp": source, "packed": packed_dir}, list(sizes["layers"]),
                         batch_sizes=settings.speed_batch_sizes, prompt_len=settings.speed_prompt_len,
                         new_tokens=settings.speed_new_tokens, memory=settings.measure_memory)
    return {"quantization": quant, "models": reports, "finetuned_latent_perplexity": latent_ppl,
            "latent_packed_max_logit_diff": max_logit_difference(
                latent, packed, data.eval_text.select(range(min(8, len(data.eval_text))))),
            "targets": _targets(reports), "gradient_flow": grad, "sizes": sizes, "speed": speed,
            "machine": {"device": "cpu", "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                        "kv_cache": bool(getattr(fp.generation_config, "use_cache", True))}}


def _converted_copy(fp, quant: dict):
    """The float model converted as recorded, before any fine-tuning (to re-measure it when
    evaluations.json lost that measurement)."""
    student = copy.deepcopy(fp)
    convert_as_calibrated(student, quant["calibration"], quant["skip"], len(quant["kept_fp"]))
    return student


def _sizes(source: Path, packed_dir: Path, packed, latent) -> dict:
    """Bytes on disk of the float input and the packed output, and per ternary layer its stored
    bits per weight and sparsity (with weighted totals)."""
    from agentforge.quant import safetensors_bytes, ternary_layer_stats, totals

    stats = ternary_layer_stats(packed_dir, {n: m.in_features for n, m in bitlinear_layers(packed).items()})
    sizes = {"fp_bytes": safetensors_bytes(source), "packed_bytes": safetensors_bytes(packed_dir), **totals(stats),
             "fp_ternary_layer_bytes": sum(m.weight.numel() * m.weight.element_size()
                                           for m in bitlinear_layers(latent).values()), "layers": stats}
    sizes["size_ratio"] = sizes["fp_bytes"] / sizes["packed_bytes"]
    return sizes


def _retention(after: dict, reference: dict) -> float | None:
    """Mean task accuracy relative to the reference's; undefined (None) when the reference scores 0."""
    return after["accuracy_mean"] / reference["accuracy_mean"] if reference["accuracy_mean"] > 0 else None


def _targets(reports: dict) -> dict:
    """The issue's targets: perplexity after fine-tuning ≤ 1.3× the float model's, mean task
    accuracy ≥ 80 % of the float model's; and the same ratios against the float control."""
    fp, after = reports["fp"], reports["finetuned"]
    ratio, retention = after["perplexity"] / fp["perplexity"], _retention(after, fp)
    targets = {"perplexity_ratio": ratio,
               "perplexity_ratio_before": reports["ternary_before"]["perplexity"] / fp["perplexity"],
               "accuracy_retention": retention, "perplexity_target_met": ratio <= 1.3,
               "accuracy_target_met": None if retention is None else retention >= 0.8}
    if "fp_control" in reports:
        targets["perplexity_ratio_vs_control"] = after["perplexity"] / reports["fp_control"]["perplexity"]
        targets["accuracy_retention_vs_control"] = _retention(after, reports["fp_control"])
    return targets


def _write_summary(summary: dict, ctx: PhaseContext) -> dict:
    """summary.json, one row per ternary layer and the headline row in metrics.jsonl; returns the headline."""
    from agentforge.artifacts import atomic_write_json
    from agentforge.train import MetricsLogger

    atomic_write_json(ctx.out_dir / "summary.json", summary)
    headline = _flat_metrics(summary)
    with MetricsLogger(ctx.out_dir, phase=f"{NAME}/layer", wandb_mode="disabled") as log:
        for row in _layer_rows(summary):
            log.log(row)
    with MetricsLogger(ctx.out_dir, phase=NAME, wandb_mode=ctx.wandb_mode) as log:
        log.log(headline)
    return headline


def _layer_rows(summary: dict) -> list[dict]:
    stats = summary["sizes"]["layers"]
    return [{**record, **{k: v for k, v in stats.get(record["name"], {}).items()
                          if k in ("sparsity", "bits_per_weight", "bits_per_weight_with_scales")}}
            for record in summary["quantization"]["calibration"]]


def _flat_metrics(summary: dict) -> dict:
    """The headline numbers as one flat row (metrics.jsonl and the pipeline report)."""
    row = {}
    for name, report in summary["models"].items():
        row.update({f"{name}/{k}": v for k, v in report.items() if not isinstance(v, dict)})
        row.update({f"{name}/accuracy/{d}": v for d, v in report["accuracy"].items()})
    targets = summary["targets"]
    row.update({k: v for k, v in targets.items() if v is not None})
    sizes = summary["sizes"]
    row.update({k: v for k, v in sizes.items() if k != "layers"})
    for name, report in summary["speed"].items():
        row.update({f"{name}/{k}": v for k, v in report.items() if not isinstance(v, dict)})
        if "generation_memory" in report:
            row[f"{name}/generation_peak_bytes"] = report["generation_memory"]["peak_bytes"]
            row[f"{name}/generation_model_bytes"] = report["generation_memory"]["model_bytes"]
    fp_speed, packed_speed = summary["speed"]["fp"], summary["speed"]["packed"]
    for key in (k for k in fp_speed if k.startswith("tokens_per_s_b")):
        row[f"speedup_{key.removeprefix('tokens_per_s_')}"] = packed_speed[key] / fp_speed[key]
    calibration = summary["quantization"]["calibration"]
    row.update({"finetuned/perplexity_latent": summary["finetuned_latent_perplexity"],
                "latent_packed_max_logit_diff": summary["latent_packed_max_logit_diff"],
                "ternary_layers": len(sizes["layers"]),
                "per_channel_layers": sum(r["per_channel"] for r in calibration),
                "kept_fp_layers": len(summary["quantization"]["kept_fp"]),
                "gradient_flow_ok": summary["gradient_flow"]["ok"],
                "min_latent_grad_norm": summary["gradient_flow"]["min_grad_norm"],
                "finetune_seconds": summary["quantization"]["finetune_seconds"],
                "phase_seconds": summary["phase_seconds"]})
    return row


def figures(phase_dir: Path) -> list:
    """Report figures from ``summary.json`` and the fine-tuning rows: held-out quality of the three
    states, per-layer calibration error and sparsity, the loss and λ during fine-tuning, and
    speed and size packed vs float. Returns ``[(title, matplotlib Figure, [source files])]``."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    phase_dir = Path(phase_dir)
    source = phase_dir / "summary.json"
    if not source.is_file():
        return []
    summary = json.loads(source.read_text())
    labels = {"fp": "float input", "ternary_before": "ternary, before FT", "finetuned": "packed, after FT",
              "fp_control": "float, same FT (control)"}
    models = [m for m in labels if m in summary["models"]]
    out = []

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ppl, acc = fig.subplots(1, 2)
    ppl.bar(range(len(models)), [summary["models"][m]["perplexity"] for m in models], color="tab:blue")
    ppl.set_xticks(range(len(models)), [labels[m] for m in models], rotation=20, fontsize="small")
    ppl.set_ylabel("held-out text perplexity")
    domains = list(summary["models"]["fp"]["accuracy"])
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        acc.bar([d + (i - (len(models) - 1) / 2) * width for d in range(len(domains))],
                [summary["models"][model]["accuracy"][d] for d in domains], width, label=labels[model])
    acc.set_xticks(range(len(domains)), domains)
    acc.set_ylabel("held-out task accuracy")
    acc.legend(fontsize="small")
    out.append(("BitNet: held-out quality, float vs ternary before and after fine-tuning", fig, [source]))

    layers = _layer_rows(summary)
    fig = Figure(figsize=(8, 0.8 + 0.22 * len(layers)), layout="constrained")
    err, sparse = fig.subplots(1, 2, sharey=True)
    ys = range(len(layers))
    err.barh([y + 0.2 for y in ys], [r["error_per_tensor"] for r in layers], 0.4, label="per-tensor scale")
    err.barh([y - 0.2 for y in ys], [r["error_per_channel"] for r in layers], 0.4, label="per-channel scales")
    err.set_yticks(list(ys), [("* " if r["sensitive"] else "") + r["name"] + (" [pc]" if r["per_channel"] else "")
                              for r in layers], fontsize="x-small")
    err.set_xlabel("relative output error (calibration)")
    err.legend(fontsize="small")
    sparse.barh(list(ys), [r.get("sparsity", 0.0) for r in layers], color="tab:gray")
    sparse.set_xlabel("fraction of zero codes (packed)")
    out.append(("BitNet: per-layer calibration (* sensitive, [pc] per-channel) and sparsity", fig, [source]))

    train_source = phase_dir / "train" / "ternary" / "metrics.jsonl"
    rows = read_metrics(train_source, phase=f"{NAME}/ternary")
    if rows:
        fig = Figure(figsize=(6, 3), layout="constrained")
        loss = fig.add_subplot()
        loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue")
        loss.set_xlabel("fine-tuning step")
        loss.set_ylabel("training loss", color="tab:blue")
        lam = loss.twinx()
        lam.plot([r["step"] for r in rows], [r["lambda"] for r in rows], color="tab:red", ls="--")
        lam.set_ylabel("quantization strength λ", color="tab:red")
        out.append(("BitNet: STE fine-tuning loss and the λ warm-up", fig, [train_source]))

    speed = summary["speed"]
    keys = [k for k in speed["fp"] if k.startswith("tokens_per_s_b")]
    fig = Figure(figsize=(8, 3), layout="constrained")
    tps, size = fig.subplots(1, 2)
    for i, name in enumerate(("fp", "packed")):
        tps.bar([j + (i - 0.5) * 0.4 for j in range(len(keys))], [speed[name][k] for k in keys], 0.4,
                label="float (F.linear)" if name == "fp" else "packed (ternary kernels)")
    tps.set_xticks(range(len(keys)), [f"batch {k.removeprefix('tokens_per_s_b')}" for k in keys])
    tps.set_ylabel("generation tokens/s")
    tps.legend(fontsize="small")
    size.bar(["float", "packed"], [summary["sizes"]["fp_bytes"] / 1e6, summary["sizes"]["packed_bytes"] / 1e6],
             color=["tab:blue", "tab:orange"])
    size.set_ylabel("weights on disk (MB)")
    out.append(("BitNet: generation speed and size on disk, packed vs float", fig, [source]))
    return out


def main(argv: list[str] | None = None) -> int:
    return standalone_main(NAME, {'model': 'input HF causal LM directory (with tokenizer)'}, argv)


if __name__ == "__main__":
    sys.exit(main())
